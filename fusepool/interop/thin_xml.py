"""thin_dump XML: the one intermediate representation for dump, restore and import.

The format is what ``thin_dump`` (thin-provisioning-tools 0.9) writes and
``thin_restore`` reads::

    <superblock uuid="" time="1" transaction="2" flags="0" version="2"
                data_block_size="128" nr_data_blocks="1024">
      <device dev_id="1" mapped_blocks="6" transaction="0" creation_time="0" snap_time="1">
        <range_mapping origin_begin="0" data_begin="0" length="5" time="0"/>
        <single_mapping origin_block="7" data_block="20" time="0"/>
      </device>
    </superblock>

``data_block_size`` is in 512-byte sectors.  Runs of virtual blocks on
contiguous data blocks with one mapping time become ``range_mapping``;
anything else a ``single_mapping``.  Volume names are not part of the format:
they travel in a side file, ``{"<dev_id>": {"name": ..., "size": ...}}``.
"""

import contextlib
import errno
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

from fusepool.errors import UsageError
from fusepool.metadata.format import (
    MAX_DATA_BLOCKS,
    MAX_DEV_ID,
    MAX_TRANSACTION_ID,
    MAX_U32,
    MAX_U64,
    MAX_VOLUME_SIZE,
    TIME_MASK,
)

SECTOR = 512
Run = tuple[int, int, int, int]  # (origin_begin, data_begin, length, time)


@dataclass
class DeviceIR:
    dev_id: int
    mapped_blocks: int
    transaction: int
    creation_time: int
    snap_time: int
    runs: list[Run] = field(default_factory=list)

    def mappings(self) -> Iterator[tuple[int, int, int]]:
        """``(virtual_block, data_block, time)`` for every mapping."""
        for origin, data, length, t in self.runs:
            for i in range(length):
                yield origin + i, data + i, t


@dataclass
class MetadataIR:
    uuid: str
    time: int
    transaction: int
    flags: int
    version: int
    data_block_size: int  # sectors
    nr_data_blocks: int
    devices: list[DeviceIR] = field(default_factory=list)

    @property
    def block_size(self) -> int:
        return self.data_block_size * SECTOR


def runs_of(mappings: Iterator[tuple[int, int, int]]) -> list[Run]:
    """Group sorted mappings into runs: contiguous virtual and data blocks, one time."""
    runs: list[list[int]] = []
    for vb, db, t in mappings:
        last = runs[-1] if runs else None
        if last and last[0] + last[2] == vb and last[1] + last[2] == db and last[3] == t:
            last[2] += 1
        else:
            runs.append([vb, db, 1, t])
    return [tuple(r) for r in runs]


# --- writing ---------------------------------------------------------------------------------

def write_xml(ir: MetadataIR, out) -> None:
    """Write ``ir`` as thin_dump does (same element and attribute order)."""
    for piece in xml_pieces(ir):
        out.write(piece)


def xml_pieces(ir: MetadataIR) -> Iterator[str]:
    """thin_dump's XML for ``ir``, a device (or 4096 mappings) at a time."""
    yield (f'<superblock uuid={quoteattr(ir.uuid)} time="{ir.time}" transaction="{ir.transaction}" '
           f'flags="{ir.flags}" version="{ir.version}" data_block_size="{ir.data_block_size}" '
           f'nr_data_blocks="{ir.nr_data_blocks}">\n')
    for dev in ir.devices:
        lines = [f'  <device dev_id="{dev.dev_id}" mapped_blocks="{dev.mapped_blocks}" '
                 f'transaction="{dev.transaction}" creation_time="{dev.creation_time}" '
                 f'snap_time="{dev.snap_time}">\n']
        for origin, data, length, t in dev.runs:
            if length == 1:
                lines.append(f'    <single_mapping origin_block="{origin}" data_block="{data}" '
                             f'time="{t}"/>\n')
            else:
                lines.append(f'    <range_mapping origin_begin="{origin}" data_begin="{data}" '
                             f'length="{length}" time="{t}"/>\n')
            if len(lines) >= 4096:
                yield "".join(lines)
                lines = []
        lines.append("  </device>\n")
        yield "".join(lines)
    yield "</superblock>\n"


# --- reading and validating -------------------------------------------------------------------

_SUPER_ATTRS = {"uuid", "time", "transaction", "flags", "version", "data_block_size", "nr_data_blocks"}
_DEVICE_ATTRS = {"dev_id", "mapped_blocks", "transaction", "creation_time", "snap_time"}
_RANGE_ATTRS = {"origin_begin", "data_begin", "length", "time"}
_SINGLE_ATTRS = {"origin_block", "data_block", "time"}


_DIGITS = re.compile(r"[0-9]{1,40}", re.ASCII)


def _int(elem, name: str, where: str, limit: int, default: int | None = None) -> int:
    """An attribute as thin_dump writes numbers: ASCII digits, at most ``limit``.

    ``limit`` is the width of the field it lands in (see fusepool.metadata.format);
    int() alone would also take ' 1', '+1', '1_0' and other scripts' digits.
    """
    text = elem.get(name)
    if text is None:
        if default is not None:
            return default
        raise UsageError(f"{where}: missing attribute {name!r}")
    if not _DIGITS.fullmatch(text):
        raise UsageError(f"{where}: attribute {name}={text[:40]!r} is not a number "
                         "(ASCII digits, no sign)")
    value = int(text)
    if value > limit:
        raise UsageError(f"{where}: attribute {name}={value} is larger than {limit}, the most "
                         f"its field holds ({limit.bit_length()}-bit)")
    return value


def _check_attrs(elem, allowed: set[str], where: str) -> None:
    unknown = set(elem.attrib) - allowed
    if unknown:
        raise UsageError(f"{where}: unknown attribute(s) {', '.join(sorted(unknown))}")


def read_xml(source) -> MetadataIR:
    """Parse and validate thin_dump XML; every refusal is one clear message."""
    try:
        root = ElementTree.parse(source).getroot()
    except ElementTree.ParseError as exc:
        raise UsageError(f"not valid XML: {exc}") from None
    if root.tag != "superblock":
        raise UsageError(f"expected a <superblock> element, found <{root.tag}>")
    _check_attrs(root, _SUPER_ATTRS, "<superblock>")
    sup = "<superblock>"
    ir = MetadataIR(root.get("uuid", ""), _int(root, "time", sup, TIME_MASK),
                    _int(root, "transaction", sup, MAX_TRANSACTION_ID),
                    _int(root, "flags", sup, MAX_U32, default=0),
                    _int(root, "version", sup, 2, default=2),
                    _int(root, "data_block_size", sup, MAX_U32),
                    _int(root, "nr_data_blocks", sup, MAX_DATA_BLOCKS - 1))
    if ir.version < 1:
        raise UsageError(f"{sup}: version {ir.version} is not a thin_dump format version (1 or 2)")
    if ir.nr_data_blocks < 1:
        raise UsageError(f"{sup}: nr_data_blocks 0: a pool needs at least one data block")
    bs = ir.data_block_size * SECTOR
    if not bs or bs % (64 << 10) or bs > 1 << 30:
        raise UsageError(f"data_block_size {ir.data_block_size} sectors ({bs} bytes) is not a multiple "
                         "of 64 KiB between 64 KiB and 1 GiB")
    seen: set[int] = set()
    for elem in root:
        where = f"<device dev_id={elem.get('dev_id')!r}>"
        if elem.tag != "device":
            raise UsageError(f"unknown element <{elem.tag}> inside <superblock>")
        _check_attrs(elem, _DEVICE_ATTRS, where)
        dev = DeviceIR(_int(elem, "dev_id", where, MAX_DEV_ID), _int(elem, "mapped_blocks", where, MAX_U64),
                       _int(elem, "transaction", where, MAX_U64),
                       _int(elem, "creation_time", where, TIME_MASK),
                       _int(elem, "snap_time", where, TIME_MASK))
        if dev.dev_id in seen:
            raise UsageError(f"{where}: device id appears twice")
        seen.add(dev.dev_id)
        if not dev.creation_time <= dev.snap_time <= ir.time:
            raise UsageError(f"{where}: creation_time {dev.creation_time} <= snap_time {dev.snap_time} "
                             f"<= pool time {ir.time} does not hold (no kernel pool has such times)")
        for m in elem:
            if m.tag == "range_mapping":
                _check_attrs(m, _RANGE_ATTRS, where)
                run = (_int(m, "origin_begin", where, MAX_U64), _int(m, "data_begin", where, MAX_U64),
                       _int(m, "length", where, MAX_U64), _int(m, "time", where, TIME_MASK))
                if run[2] == 0:
                    raise UsageError(f"{where}: a range_mapping has length 0")
            elif m.tag == "single_mapping":
                _check_attrs(m, _SINGLE_ATTRS, where)
                run = (_int(m, "origin_block", where, MAX_U64), _int(m, "data_block", where, MAX_U64), 1,
                       _int(m, "time", where, TIME_MASK))
            else:
                raise UsageError(f"{where}: unknown element <{m.tag}>")
            if run[1] + run[2] > ir.nr_data_blocks:
                raise UsageError(f"{where}: mapping to data blocks {run[1]}..{run[1] + run[2] - 1} is "
                                 f"beyond nr_data_blocks={ir.nr_data_blocks}")
            if run[3] > ir.time:
                raise UsageError(f"{where}: mapping time {run[3]} is after the pool time {ir.time}")
            if (run[0] + run[2]) * bs > MAX_VOLUME_SIZE:
                raise UsageError(f"{where}: virtual block {run[0] + run[2] - 1} is beyond the largest "
                                 f"volume size ({MAX_VOLUME_SIZE} bytes)")
            dev.runs.append(run)
        ir.devices.append(dev)
    _check_sharing(ir)
    return ir


def _check_sharing(ir: MetadataIR) -> None:
    """A data block mapped by two devices must be a snapshot share, as the kernel sees it.

    The kernel treats a block as shared by a device only when its mapping time
    is older than the device's snap_time; a block two devices map without that
    would be overwritten in place by one of them, corrupting the other.  Such
    devices are unrelated: refused.
    """
    owner: dict[int, tuple[int, int]] = {}  # data block -> (dev_id, time) of first mapping seen
    by_id = {d.dev_id: d for d in ir.devices}
    for dev in ir.devices:
        for _origin, data, length, t in dev.runs:
            for db in range(data, data + length):
                first = owner.get(db)
                if first is None:
                    owner[db] = (dev.dev_id, t)
                    continue
                other = by_id[first[0]]
                if first[0] == dev.dev_id:
                    raise UsageError(f"device {dev.dev_id} maps data block {db} twice")
                if not (t < dev.snap_time and first[1] < other.snap_time):
                    raise UsageError(
                        f"devices {other.dev_id} and {dev.dev_id} both map data block {db} but are "
                        "not snapshots of each other (the mapping time is not older than both "
                        "devices' snap_time)")


def load_json(path: str, what: str):
    """A JSON file a user hands in, or one clear UsageError: not UTF-8, not JSON, NaN or
    Infinity (not JSON either, though Python's parser takes them), too deep to parse."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None

    def constant(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text.decode("utf-8"), parse_constant=constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"{path}: unreadable {what} ({str(exc)[:100] or 'nested too deep'})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_names(path: str | None) -> dict[int, dict]:
    """The side file: ``{"<dev_id>": {"name": ..., "size": ...}}`` (both optional)."""
    if path is None:
        return {}
    raw = load_json(path, "names file")
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: unreadable names file (not a JSON object of devices)")
    names = {}
    for key, entry in raw.items():
        where = f"{path}: device {key[:30]!r}"
        if not re.fullmatch(r"[0-9]{1,8}", key, re.ASCII) or int(key) > MAX_DEV_ID:
            raise UsageError(f"{where}: not a device id (0 to {MAX_DEV_ID})")
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: names entry is not an object: {str(entry)[:40]!r}")
        unknown = set(entry) - {"name", "size"}
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))[:60]}")
        if "name" in entry and not isinstance(entry["name"], str):
            raise UsageError(f"{where}: name {str(entry['name'])[:40]!r} is not a string")
        if "size" in entry and not (_is_int(entry["size"]) and 0 <= entry["size"] <= MAX_VOLUME_SIZE):
            raise UsageError(f"{where}: size {str(entry['size'])[:40]} is not a byte count from 0 to "
                             f"{MAX_VOLUME_SIZE}")
        names[int(key)] = entry
    return names


def write_names(path: str, names: dict[int, dict]) -> None:
    with open(path, "w") as f:
        json.dump({str(k): v for k, v in sorted(names.items())}, f, indent=2)
        f.write("\n")


# --- pools <-> IR ------------------------------------------------------------------------------

def dump(pool, progress=None) -> tuple[MetadataIR, dict[int, dict]]:
    """The pool's metadata as IR, and the names side file's content.

    The runs come from one walk (fusepool.engine.walks) that makes a shared
    subtree's runs once, however many devices reach it; ``progress(done, total)``
    is told after each device.
    """
    from fusepool.engine.walks import device_runs

    ir = MetadataIR(pool.store.superblock.uuid, pool.time, pool.transaction_id,
                    0, 2, pool.block_size // SECTOR, pool.nr_blocks)
    names = {}
    devices = [d for d in sorted(pool.devices.values(), key=lambda d: d.dev_id) if not d.deleted]
    runs = device_runs(pool, devices, progress)
    for dev in devices:
        ir.devices.append(DeviceIR(dev.dev_id, dev.mapped_blocks, dev.transaction, dev.creation_time,
                                   dev.snap_time, runs[dev.dev_id]))
        names[dev.dev_id] = {"name": dev.name, "size": dev.size}
    _check_thin_limits(ir)
    return ir, names


def _check_thin_limits(ir: MetadataIR) -> None:
    """Never write a dump thin_restore would refuse (its fields: u64 transaction ids and
    block counts, u32 times and device ids); the pool would be damaged to hold such values."""
    from fusepool.errors import Corrupt

    fields = [("transaction", ir.transaction, MAX_U64), ("time", ir.time, MAX_U32)]
    for d in ir.devices:
        fields += [(f"device {d.dev_id} transaction", d.transaction, MAX_U64),
                   (f"device {d.dev_id} dev_id", d.dev_id, MAX_U32),
                   (f"device {d.dev_id} creation_time", d.creation_time, MAX_U32),
                   (f"device {d.dev_id} snap_time", d.snap_time, MAX_U32)]
    for what, value, limit in fields:
        if not _is_int(value) or not 0 <= value <= limit:
            raise Corrupt(f"cannot dump: {what} {value!r} is outside what thin_restore reads "
                          f"(0 to {limit}); run `fusepool check`")


def image_size(path: str) -> int:
    """Size of a data image: a file, or a block device (whose st_size is 0)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def copy_sparse(src: str, dst: str) -> None:
    """Copy a file or block device into a file, keeping holes (SEEK_DATA/SEEK_HOLE)."""
    size = image_size(src)
    # A new file of the pool: owner-only whatever the umask, never through a symlink.
    out_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(out_fd, 0o600)
    with open(src, "rb") as fin, open(out_fd, "wb") as fout:
        os.ftruncate(fout.fileno(), size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
                end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                start, end = pos, size  # no hole information (a block device): all data
            _copy_range(fin.fileno(), fout.fileno(), start, end)
            pos = end
        os.fsync(fout.fileno())


def _copy_range(fd_in: int, fd_out: int, start: int, end: int) -> None:
    offset = start
    try:
        while offset < end:
            n = os.copy_file_range(fd_in, fd_out, end - offset, offset, offset)
            if n == 0:
                return
            offset += n
    except OSError as exc:  # from a block device: copy by hand
        if exc.errno not in (errno.EINVAL, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    zero = bytes(1 << 20)
    while offset < end:
        data = os.pread(fd_in, min(len(zero), end - offset), offset)
        if not data:
            return
        if data != zero[: len(data)]:  # zero chunks stay holes
            os.pwrite(fd_out, data, offset)
        offset += len(data)


def restore(ir: MetadataIR, names: dict[int, dict], data_path: str, pool_dir: str,
            metadata_size: int | None = None) -> list[str]:
    """Make a new pool at ``pool_dir`` from ``ir`` and a copy of the data image.

    Returns the names given to the volumes.  Without a names entry a volume is
    named by its decimal dev_id and sized to cover its highest mapped block.
    """
    import uuid as uuidlib

    from fusepool.config import DATA, METADATA, PoolConfig
    from fusepool.engine import MAX_METADATA_SIZE, min_metadata_pages, validate_name
    from fusepool.metadata.format import FANOUT, PAGE_SIZE
    from fusepool.metadata.store import MetadataStore
    from fusepool.metadata.tree import Tree, WritableLeafCursor, height_for, pack

    bs = ir.block_size
    try:  # a file or a block device: a directory or a FIFO is refused before it is opened
        mode = os.stat(data_path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise UsageError(f"data image {data_path} is not a file or a block device")
        data_bytes = image_size(data_path)
    except OSError as exc:
        raise UsageError(f"data image {data_path}: {exc.strerror}") from None
    if data_bytes < ir.nr_data_blocks * bs:
        raise UsageError(f"data image {data_path} has {data_bytes} bytes; the metadata needs "
                         f"{ir.nr_data_blocks} blocks of {bs} bytes ({ir.nr_data_blocks * bs} bytes)")
    if os.path.exists(pool_dir) and (not os.path.isdir(pool_dir) or os.listdir(pool_dir)):
        raise UsageError(f"{pool_dir} exists and is not an empty directory")

    tree = Tree(lambda b: None, lambda b: None, lambda p: None)  # (write_new counts references)
    roots, records, given = {}, [], []
    for dev in ir.devices:
        side = names.get(dev.dev_id, {})
        if not isinstance(side, dict):
            raise UsageError(f"names entry for device {dev.dev_id} is not an object: {side!r}")
        name = validate_name(side["name"] if isinstance(side.get("name"), str) else str(dev.dev_id))
        if name in given:
            raise UsageError(f"volume name {name!r} is given to two devices")
        last_vb = max((o + n - 1 for o, _, n, _ in dev.runs), default=-1)
        size = side.get("size", (last_vb + 1) * bs)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_VOLUME_SIZE:
            raise UsageError(f"device {dev.dev_id}: size {size!r} is not a byte count from 0 to "
                             f"{MAX_VOLUME_SIZE}")
        if last_vb >= 0 and last_vb * bs >= size:
            raise UsageError(f"device {dev.dev_id}: size {size} does not cover its mapped block {last_vb}")
        cursor = WritableLeafCursor(tree, None, height_for(max(1, (size + bs - 1) // bs)))
        for vb, db, t in sorted(dev.mappings()):
            cursor.leaf_for(vb).entries[vb % FANOUT] = pack(db, t)
        roots[dev.dev_id] = cursor.root
        records.append({"dev_id": dev.dev_id, "name": name, "size": size,
                        "creation_time": dev.creation_time, "snap_time": dev.snap_time,
                        "transaction": dev.transaction, "created": 0.0, "origin": None,
                        "mtime": 0.0, "deleted": False})  # (mapped_blocks: write_new counts them)
        given.append(name)

    pages = min_metadata_pages(ir.nr_data_blocks) + 2 * tree.dirtied + 1024  # (dirtied: new nodes)
    if metadata_size is None:
        metadata_size = max(pages * PAGE_SIZE, 64 << 20)
    if metadata_size // PAGE_SIZE < pages or metadata_size > MAX_METADATA_SIZE:
        raise UsageError(f"metadata size must be between {pages * PAGE_SIZE} and {MAX_METADATA_SIZE}")
    try:  # keep the dumped pool's identity when it has one (thin_dump's is often empty)
        uuid = str(uuidlib.UUID(ir.uuid))
    except ValueError:
        uuid = str(uuidlib.uuid4())
    from fusepool.config import make_pool_dir

    try:
        made_dir = make_pool_dir(pool_dir)  # owner-only (0700), whatever the umask
    except OSError as exc:
        raise UsageError(f"cannot create {pool_dir}: {exc.strerror}") from None
    made = []
    try:
        made.append(os.path.join(pool_dir, DATA))
        copy_sparse(data_path, made[-1])
        made.append(os.path.join(pool_dir, METADATA))
        state = {"next_dev_id": max([d.dev_id for d in ir.devices], default=0) + 1, "devices": records}
        MetadataStore.write_new(made[-1], uuid=uuid, transaction_id=max(ir.transaction, 1), time=ir.time,
                                block_size=bs, nr_data_blocks=ir.nr_data_blocks,
                                nr_meta_pages=metadata_size // PAGE_SIZE, state=state, roots=roots)
        made.append(os.path.join(pool_dir, "pool.json"))
        PoolConfig(uuid, bs).save(pool_dir)
    except BaseException:
        for path in made + [os.path.join(pool_dir, "pool.json.tmp")]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if made_dir:
            with contextlib.suppress(OSError):
                os.rmdir(pool_dir)
        raise
    return given
