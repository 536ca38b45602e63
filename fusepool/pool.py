"""Pool: the whole thin-pool engine as a plain, synchronous Python API.

No FUSE and no sockets here: the FUSE filesystem, the control socket and the
CLI are adapters over this class.  Every method runs to completion without
yielding, so under trio's single thread each call is atomic with respect to
every other request.

Semantics (see docs/design.md for the full contract):

- A *device* is a thin volume or snapshot: a 24-bit ``dev_id``, a user-visible
  ``name``, a virtual ``size`` and a copy-on-write mapping tree.
- Writes allocate whole data blocks.  A partial write to a new block zero-fills
  the rest of it unless the pool skips block zeroing; a partial write to a
  block shared with another device copies the block first.  Zeros are data
  like any other (dm-thin), unless the pool has zero detection: then zeros
  into a hole store nothing and a block left all zeros is unmapped.
- Metadata changes are held in memory until :meth:`commit`, which flushes the
  data image first (data before metadata).  Namespace changes (create,
  snapshot, remove, rename, resize) commit before they return.
- dm-thin's time model: the pool time goes up by one at every snapshot; a
  mapping records the pool time when it was provisioned; a snapshot sets the
  ``snap_time`` of both origin and snapshot to the new pool time.  A block
  whose mapping time is older than a device's ``snap_time`` may be shared.
"""

import contextlib
import dataclasses
import errno
import logging
import os
import time as wallclock
import uuid as uuidlib
from array import array
from dataclasses import dataclass, field

from fusepool import __version__, autoextend
from fusepool.config import (
    DATA,
    JOURNAL,
    METADATA,
    BadConfig,
    PoolConfig,
    PoolLock,
    make_pool_dir,
    tighten_pool_dir,
)
from fusepool.datastore import DataStore, DirectDataStore, check_data_device
from fusepool.errors import (
    BelowMinFreeSpace,
    Corrupt,
    InvalidArgument,
    MetadataFull,
    NoSuchVolume,
    NotAPool,
    PoolError,
    PoolFailed,
    PoolFull,
    ReadOnlyPool,
    UsageError,
    VolumeExists,
)
from fusepool.metadata.format import (
    FANOUT,
    FLAG_NEEDS_CHECK,
    MAX_DEV_ID,
    MAX_VOLUME_SIZE,
    PAGE_SIZE,
    TIME_BITS,
    TIME_MASK,
    UNMAPPED,
    Superblock,
)
from fusepool.metadata.journal import Journal
from fusepool.metadata.spacemap import DataSpaceMap
from fusepool.metadata.store import MetadataStore
from fusepool.metadata.tree import Node, Tree, height_for
from fusepool.units import bytes_size

log = logging.getLogger(__name__)

MIN_BLOCK_SIZE = 64 << 10
MAX_BLOCK_SIZE = 1 << 30
MAX_METADATA_SIZE = 16 << 30  # dm-thin's limit is just under 16 GiB
MAX_NAME_BYTES = 255
CONTROL_NAME = ".fusepool"  # reserved: the mount's hidden control file (see fs.py)
METADATA_RESERVE_PAGES = 64  # kept free so a commit can always be written
# Past these an fsync takes a full commit instead of a journal record (a long journal
# would make a crash's replay slow and hold freed blocks back too long).
JOURNAL_MAX_MAPPINGS = 100_000
JOURNAL_MAX_BYTES = 16 << 20
VOLUME_MODE = 0o600  # a new volume's permission bits unless the creator says otherwise


@dataclass
class Device:
    """A thin volume or snapshot.  ``to_record`` is its durable form."""

    dev_id: int
    name: str
    size: int
    creation_time: int  # pool time when created (dm-thin)
    snap_time: int  # pool time of the last snapshot taken of or from it (dm-thin)
    transaction: int  # transaction id current when it was created
    created: float  # wall clock, for users
    origin: int | None = None  # dev_id it was snapshotted from (informational)
    mapped_blocks: int = 0
    mtime: float = 0.0
    deleted: bool = False  # removed while open: freed when the last handle closes
    root: Node | None = field(default=None, repr=False)
    open_count: int = 0
    # Permission bits of the volume's file in the mount (chmod; enforced by the kernel's
    # default_permissions).  Records written before modes existed read as the default.
    mode: int = VOLUME_MODE

    def to_record(self) -> dict:
        return {
            "dev_id": self.dev_id, "name": self.name, "size": self.size,
            "creation_time": self.creation_time, "snap_time": self.snap_time,
            "transaction": self.transaction, "created": self.created, "origin": self.origin,
            "mapped_blocks": self.mapped_blocks, "mtime": self.mtime, "deleted": self.deleted,
            "mode": self.mode,
            "root": 0,  # filled in by the store
        }

    @classmethod
    def from_record(cls, rec: dict, root: Node | None) -> "Device":
        mode = rec.get("mode")
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
            mode = VOLUME_MODE  # absent (an older pool) or damaged: the owner-only default
        return cls(rec["dev_id"], rec["name"], rec["size"], rec["creation_time"], rec["snap_time"],
                   rec["transaction"], rec["created"], rec.get("origin"), rec["mapped_blocks"],
                   rec.get("mtime", rec["created"]), rec.get("deleted", False), root, mode=mode)


def validate_name(name: str) -> str:
    """Volume names are file names in the mount: no '/', no NUL, at most 255 bytes."""
    if not isinstance(name, str) or not name or name in (".", "..", CONTROL_NAME):
        raise UsageError(f"invalid volume name {name!r}" + (
            " (reserved for the mount's control file)" if name == CONTROL_NAME else ""))
    if "/" in name or "\0" in name:
        raise UsageError(f"invalid volume name {name!r}: it may not contain '/' or NUL")
    # Control characters (a newline would forge lines in `list`) and bytes that are not
    # UTF-8 (they arrive as lone surrogates, which no JSON reply or terminal can carry).
    if any(c < " " or c == "\x7f" or "\ud800" <= c <= "\udfff" for c in name):
        raise UsageError(f"invalid volume name {name!r}: control characters and bytes that "
                         "are not UTF-8 are not allowed")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise UsageError(f"invalid volume name: longer than {MAX_NAME_BYTES} bytes")
    return name


def validate_block_size(block_size: int) -> int:
    if block_size % MIN_BLOCK_SIZE or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise UsageError(f"invalid block size {block_size}: it must be a multiple of 64 KiB "
                         f"between 64 KiB and 1 GiB")
    return block_size


class Pool:
    """An open thin pool.  Use :meth:`create` once, then :meth:`open`."""

    # Why on_low_water must not run (set by open: pool.json not the user's own), or None.
    hook_refusal: str | None = None

    # --- lifecycle -------------------------------------------------------------

    @classmethod
    def create(cls, path: str, data_size: int | None = None, metadata_size: int = 2 << 30,
               block_size: int = 64 << 10, base_size: int = 10 << 30,
               min_free_space: float = 10.0, skip_block_zeroing: bool = False,
               no_space_timeout: float = 0.0, mode: str | None = None,
               data_device: str | None = None, preallocate: bool = False, force: bool = False,
               autoextend_threshold: float = autoextend.OFF, autoextend_percent: float = 20.0,
               max_data_size: int = 0, low_water_mark: int = 0,
               on_low_water: str | None = None, zero_detection: bool = False) -> int:
        """Make a new pool directory (or fill an empty existing one); returns its data size.

        ``mode`` is "loop" (a sparse data file; the default) or "direct" (a
        block device given as ``data_device``, or a data file preallocated in
        full; ``data_device`` or ``preallocate`` imply it).  ``data_size``
        defaults to 100 GiB, or to the whole device; it may be smaller than the
        device.  Everything is validated before anything is created, and a
        failure leaves nothing behind (not even the directory, if made here).
        """
        validate_block_size(block_size)
        if data_device and preallocate:
            raise UsageError("--data-device and --preallocate exclude each other: the data lives "
                             "either on a block device or in a preallocated file")
        if mode is None:
            mode = "direct" if data_device or preallocate else "loop"
        if mode not in ("loop", "direct"):
            raise UsageError(f"invalid mode {mode!r}: use loop or direct")
        if mode == "loop" and (data_device or preallocate):
            raise UsageError("loop mode keeps its data in a sparse file: --data-device and "
                             "--preallocate need --mode direct")
        if mode == "direct" and not data_device:
            preallocate = True  # direct mode on a file: the whole file is allocated up front
        if data_device:
            data_device = os.path.abspath(data_device)
            device_size = check_data_device(data_device, force)
            if data_size is None:
                data_size = device_size
            elif data_size > device_size:
                raise UsageError(f"data size {bytes_size(data_size)} is larger than the data device "
                                 f"{data_device} ({bytes_size(device_size)})")
        elif data_size is None:
            data_size = 100 << 30
        nr_blocks = data_size // block_size
        if nr_blocks < 1:
            raise UsageError(f"data size {data_size} is smaller than one block ({block_size})")
        if nr_blocks >= 1 << (64 - TIME_BITS):
            raise UsageError("data size too large for the block size")
        if not 0 < base_size <= MAX_VOLUME_SIZE:
            raise UsageError(f"invalid base size {base_size}")
        nr_pages = metadata_size // PAGE_SIZE
        needed = min_metadata_pages(nr_blocks)
        if nr_pages < needed:
            raise UsageError(f"metadata size {bytes_size(metadata_size)} is too small for "
                             f"{nr_blocks} data blocks: use at least {bytes_size(needed * PAGE_SIZE)}")
        if metadata_size > MAX_METADATA_SIZE:
            raise UsageError(f"metadata size is limited to {bytes_size(MAX_METADATA_SIZE)}")
        autoextend_threshold = autoextend.parse_threshold(autoextend_threshold)
        autoextend_percent = autoextend.parse_grow_percent(autoextend_percent)
        autoextend.validate(mode, nr_blocks, block_size, autoextend_threshold, autoextend_percent,
                            max_data_size, low_water_mark, on_low_water)
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise UsageError(f"{path} exists and is not a directory")
            if os.listdir(path):
                raise VolumeExists(f"{path} is not empty: refusing to create a pool there")
        try:
            made_dir = make_pool_dir(path)  # owner-only (0700), whatever the umask
        except OSError as exc:
            raise PoolError(f"cannot create {path}: {exc.strerror}") from None
        uuid = str(uuidlib.uuid4())
        try:
            if preallocate:
                DirectDataStore.create_preallocated(os.path.join(path, DATA), nr_blocks * block_size)
            elif not data_device:
                DataStore.create(os.path.join(path, DATA), nr_blocks * block_size)
            sb = Superblock(uuid, 0, 0, block_size, nr_blocks, nr_pages,
                            root_len=0, root_checksum=0, root_pages=[])
            MetadataStore.create(os.path.join(path, METADATA), sb, nr_blocks)
            Journal.create(os.path.join(path, JOURNAL))
            PoolConfig(uuid, block_size, base_size, min_free_space, skip_block_zeroing,
                       no_space_timeout, mode, data_device=data_device, preallocated=preallocate,
                       autoextend_threshold=autoextend_threshold,
                       autoextend_percent=autoextend_percent, max_data_size=max_data_size,
                       low_water_mark=low_water_mark, on_low_water=on_low_water or None,
                       zero_detection=bool(zero_detection)).save(path)
        except BaseException:
            for name in (DATA, METADATA, JOURNAL, "pool.json", "pool.json.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, name))
            if made_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        return nr_blocks * block_size

    @classmethod
    def open(cls, path: str, readonly: bool = False, clear_needs_check: bool = False) -> "Pool":
        """Open a pool under its exclusive lock (raises PoolBusy when held).

        A pool flagged needs-check opens read-only (``failed`` says why) unless
        ``clear_needs_check``: then the flag is cleared by a commit at once
        (``fusepool check`` does that after a clean check).
        """
        path = os.path.abspath(path)
        config = PoolConfig.load(path)
        if not os.path.exists(os.path.join(path, METADATA)):
            raise NotAPool(f"{path}: the metadata file is missing")
        lock = PoolLock(path)
        try:
            # Judged before tightening: a pool.json others could write stays untrusted.
            hook_refusal = autoextend.untrusted_config(path)
            if not readonly:
                tighten_pool_dir(path)
            pool = cls(path, config, lock, readonly, clear_needs_check)
        except BaseException:
            lock.release()
            raise
        pool.hook_refusal = hook_refusal
        return pool

    def __init__(self, path: str, config: PoolConfig, lock: PoolLock, readonly: bool,
                 clear_needs_check: bool = False):
        self.path = path
        self.config = config
        self.lock = lock
        self.readonly = readonly
        self.failed: str | None = None  # set when the pool stops accepting changes
        # dm-thin's needs_check: an I/O error or an internal error stopped the pool; it
        # stays read-only, across opens (superblock flag), until check or repair.
        self.needs_check = False
        try:
            self.store, loaded = MetadataStore.open(os.path.join(path, METADATA), readonly)
        except Corrupt as exc:
            raise Corrupt(f"pool metadata is damaged ({exc}); run `fusepool check {path}` "
                          f"and `fusepool repair {path}`") from None
        sb = loaded.superblock
        if sb.uuid != config.uuid:  # pool.json belongs to another pool's metadata
            self.store.close()
            raise BadConfig(f"{path}/pool.json: uuid: {config.uuid} differs from the metadata's {sb.uuid}")
        if sb.block_size != config.block_size:
            raise Corrupt(f"block size in metadata ({sb.block_size}) differs from pool.json")
        self.block_size = sb.block_size
        self.zero_block = bytes(self.block_size)
        self.time = sb.time
        self.next_dev_id = loaded.state.get("next_dev_id", 1)
        self.space = DataSpaceMap(sb.nr_data_blocks, loaded.counts)
        self.tree = Tree(self.space.inc, self.space.dec, self.store.release)
        self.devices: dict[int, Device] = {}
        self.names: dict[str, int] = {}
        try:
            for rec in loaded.state["devices"]:
                dev = Device.from_record(rec, loaded.roots.get(rec["dev_id"]))
                self.devices[dev.dev_id] = dev
                if not dev.deleted:
                    self.names[dev.name] = dev.dev_id
        except (KeyError, TypeError, ValueError) as exc:
            self.store.close()
            raise Corrupt(f"pool metadata is damaged (device table: {exc!r}); run `fusepool check "
                          f"{path}` and `fusepool repair {path}`") from None
        try:
            self.data = DataStore.open(path, config, readonly)
        except BaseException:
            self.store.close()
            raise
        self.dirty = False  # metadata changed since the last commit
        self.data_dirty = False  # data written since the last flush
        self.commits = 0
        # What the next journal record must carry: per device, the virtual blocks
        # remapped since the last commit or record.  Anything else that changes
        # (devices, names, pool time) needs a full commit: ``structure_changed``.
        self.unsynced: dict[int, set[int]] = {}
        self.structure_changed = False
        self.journal_syncs = 0
        self.journal = Journal(os.path.join(path, JOURNAL), readonly)
        try:
            self._replay_journal(sb)
        except BaseException:
            self.journal.close()
            self.data.close()
            self.store.close()
            raise
        # Autoextend and the low-water event (see _space_low): write() compares the free
        # block count with space_watch, and only below it does anything more.
        self.on_low_water = None  # how to start the hook: (command, env) -> None; None: detached
        self.low_water_armed = True
        self.autoextend_pending = False  # grown in the middle of a write, not committed yet
        self.autoextend_stuck_at = 0  # data size (blocks) at which growing was last refused
        self.space_watch = 0
        self._arm_space_watch()
        if sb.flags & FLAG_NEEDS_CHECK and clear_needs_check and not readonly:
            self.store.superblock.flags &= ~FLAG_NEEDS_CHECK  # written by the commit below
            self.dirty = self.structure_changed = True
            log.info("pool %s: needs-check flag cleared", path)
        elif sb.flags & FLAG_NEEDS_CHECK:
            log.warning("pool %s is flagged needs-check: read-only until `fusepool check` or "
                        "`fusepool repair`", path)
            self.needs_check = True
            self.failed = (f"the pool is flagged needs-check (an I/O error or an internal error "
                           f"stopped it earlier); {self._check_advice()}")
            self.dirty = False  # (a journal replayed above is durable already: an fsync succeeds)
        if not readonly and self.failed is None:
            self.data.grow(self.nr_blocks * self.block_size)
            # Deferred deletions that a crash interrupted are finished now.
            for dev in [d for d in self.devices.values() if d.deleted]:
                self._drop_device(dev)
            if self.dirty:
                self.commit()

    def close(self) -> None:
        """Commit and release everything (safe to call twice)."""
        try:
            if not self.readonly and self.failed is None and (self.dirty or self.data_dirty):
                self.commit()
        finally:
            self.journal.close()
            self.data.close()
            self.store.close()
            self.lock.release()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- durability --------------------------------------------------------------

    def commit(self) -> int:
        """Make every change so far durable: data first, then metadata.

        Returns the transaction id (unchanged when nothing was dirty).
        """
        if not self.dirty:
            if self.data_dirty and not self.readonly:  # in-place overwrites: FLUSH the data
                if self.needs_check:  # (their earlier flush failed: never report them durable)
                    raise PoolFailed(f"the pool is read-only: {self.failed}")
                self._flush_data()
            return self.store.superblock.transaction_id
        self._check_writable()
        # Data before the metadata that points at it.  A failed flush is never retried:
        # Linux reports a writeback error once, and the next fdatasync would return 0.
        self._flush_data()
        try:
            state = {"next_dev_id": self.next_dev_id,
                     "devices": [d.to_record() for d in self.devices.values()]}
            roots = {d.dev_id: d.root for d in self.devices.values()}
            txn = self.store.commit(state, roots, self.space, self.time, self.nr_blocks)
        except MetadataFull as exc:
            self._fail(str(exc) + "; extend the metadata with `fusepool extend POOL --metadata-size SIZE`")
            raise ReadOnlyPool(self.failed) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # The host filesystem is full under the sparse files.  The store rolled
                # the commit back, so nothing is damaged: stay writable and retry later.
                raise PoolFull(f"the host filesystem under {self.path} is full: metadata not "
                               "committed (free space on the host)") from None
            self._fail_needs_check(f"writing the metadata failed ({exc.strerror or exc})")
            raise PoolFailed(self.failed) from None
        self.dirty = False
        self.tree.dirtied = 0
        self.commits += 1
        self.journal.reset()  # its records are in this commit now
        self.unsynced = {}
        self.structure_changed = False
        freed = self.space.committed()
        if freed:
            self._arm_space_watch()  # free space came back: the low-water event re-arms
        try:
            self.data.punch(freed)
        except OSError as exc:  # space stays allocated on the host: harmless
            log.warning("could not punch holes for %d freed blocks: %s", len(freed), exc)
        return txn

    def sync(self) -> None:
        """What a FLUSH (fsync) needs: everything written so far made durable.

        Data-path changes since the last commit (writes, discards) go to the
        journal: one append and two fdatasyncs, whatever the size of the trees.
        Anything else, a journal grown too long or a journal write that fails
        takes a full commit.  A failed flush of the data fails the sync (EIO)
        and the pool (see :meth:`_flush_data`): it never falls back to a commit.
        """
        if self.needs_check and (self.dirty or self.data_dirty):
            raise PoolFailed(f"the pool is read-only: {self.failed}")
        if not self.dirty or not self._journal_fits():
            self.commit()
            return
        self._check_writable()
        if self.data_dirty:  # (an fdatasync with nothing to write still flushes the disk)
            self._flush_data()
        try:
            self.journal.append(self._uuid_bytes, self.store.superblock.transaction_id, self.time,
                                *self._journal_payload())
        except OSError as exc:  # only the journal failed: the commit makes it all durable
            log.info("journal append failed (%s): committing instead", exc)
            self.commit()
            return
        self.unsynced = {}
        self.journal_syncs += 1

    def _journal_fits(self) -> bool:
        if self.structure_changed or self.readonly or self.failed is not None:
            return False
        if self.time != self.store.superblock.time:
            return False
        changed = sum(len(vbs) for vbs in self.unsynced.values())
        return changed <= JOURNAL_MAX_MAPPINGS and self.journal.end + 24 * changed <= JOURNAL_MAX_BYTES

    def _journal_payload(self) -> tuple[list[tuple[int, int, int]], array]:
        devices = []
        mappings = array("Q")
        for dev_id, vbs in self.unsynced.items():
            dev = self.devices.get(dev_id)
            if dev is None:  # (dropped: a structure change, so never here)
                continue
            devices.append((dev_id, dev.size, int(dev.mtime * 1e9)))
            root = dev.root
            leaf_index, leaf = -1, None
            for vb in sorted(vbs):
                if vb // FANOUT != leaf_index:
                    leaf_index = vb // FANOUT
                    leaf = Tree.leaf(root, leaf_index)
                mappings.extend((dev_id, vb, leaf.entries[vb % FANOUT] if leaf is not None else UNMAPPED))
        return devices, mappings

    def _replay_journal(self, sb) -> None:
        """Apply the journal records that follow the commit just opened (after a crash)."""
        records = self.journal.read(self._uuid_bytes, sb.transaction_id)
        if not records:
            return
        nr_mappings = sum(r.nr_mappings for r in records)
        try:
            for record in records:
                if record.time != self.time:
                    raise Corrupt(f"record {record.seq} has pool time {record.time}, the commit "
                                  f"{self.time}")
                self._apply_record(record)
        except Corrupt as exc:
            raise Corrupt(f"the journal of pool {self.path} does not apply to its metadata ({exc}); "
                          f"run `fusepool check {self.path}` and `fusepool repair {self.path}`") from None
        log.info("pool %s: replayed %d journal record(s), %d mapping(s), on top of transaction %d",
                 self.path, len(records), nr_mappings, sb.transaction_id)
        self.unsynced = {}

    def _apply_record(self, record) -> None:
        for dev_id, size, mtime_ns in record.devices:
            dev = self.devices.get(dev_id)
            if dev is None:
                raise Corrupt(f"record {record.seq} names device {dev_id}, which does not exist")
            if size > dev.size:
                self._grow_device(dev, size)
            dev.mtime = mtime_ns / 1e9
        words = record.mappings
        changes: dict[int, list[tuple[int, int]]] = {}
        for i in range(0, len(words), 3):
            dev_id, vb, entry = words[i], words[i + 1], words[i + 2]
            dev = self.devices.get(dev_id)
            if dev is None or vb >= self._blocks_for(dev.size):
                raise Corrupt(f"record {record.seq} maps block {vb} of device {dev_id}, "
                              "outside every volume")
            if entry != UNMAPPED and (entry >> TIME_BITS >= self.nr_blocks
                                      or entry & TIME_MASK > self.time & TIME_MASK):
                raise Corrupt(f"record {record.seq} maps to an invalid entry {entry:#x}")
            changes.setdefault(dev_id, []).append((vb, entry))
        for dev_id, dev_changes in changes.items():
            self._set_entries(self.devices[dev_id], dev_changes)

    def _set_entries(self, dev: Device, changes: list[tuple[int, int]]) -> None:
        """Set mapping entries as a journal logged them; reference counts follow."""
        level = height_for(self._blocks_for(dev.size))
        space = self.space
        leaf_index, leaf = -1, None
        for vb, entry in changes:
            if vb // FANOUT != leaf_index:
                leaf_index = vb // FANOUT
                dev.root, leaf = self.tree.writable_leaf(dev.root, level, leaf_index)
            slot = vb % FANOUT
            old = leaf.entries[slot]
            if old == entry:
                continue
            if entry != UNMAPPED:  # the new block first: a count never dips to zero and back
                block = entry >> TIME_BITS
                if space.counts[block]:
                    space.inc(block)
                else:
                    space.claim(block)
                dev.mapped_blocks += 1
            leaf.entries[slot] = entry
            if old != UNMAPPED:
                space.dec(old >> TIME_BITS)
                dev.mapped_blocks -= 1
        self.dirty = True

    def _fail(self, reason: str) -> None:
        """Stop accepting changes (dm-thin's read-only mode); reads still work."""
        if self.failed is None:
            log.error("pool %s is now read-only: %s", self.path, reason)
        self.failed = reason

    def _check_advice(self) -> str:
        return (f"unmount it and run `fusepool check {self.path}` (a clean check clears the flag) "
                f"or `fusepool repair {self.path}`")

    def _fail_needs_check(self, reason: str) -> None:
        """Stop for good: read-only, flagged needs-check on disk, nothing committed again.

        dm-thin's answer to an I/O error or an internal error.  Only the flag is
        written, into the superblock of the last commit (see
        MetadataStore.mark_needs_check): the state in memory may be half-updated
        and is never written.  Cleared by a clean ``fusepool check`` or by
        ``fusepool repair``.
        """
        if self.needs_check:
            return  # (the first cause is the one to report)
        self.needs_check = True
        self.failed = None  # (a metadata-full failure, say, is superseded)
        self._fail(f"{reason}; the pool needs checking: {self._check_advice()}")
        if self.readonly:
            return
        try:
            self.store.mark_needs_check()
        except OSError as exc:  # the metadata cannot be written either: memory only
            log.error("pool %s: could not set the needs-check flag on disk: %s", self.path, exc)

    def fail_unexpected(self, reason: str) -> None:
        """An adapter caught an exception the engine did not expect (a bug).

        The engine may have stopped half-way through a change (a remap cut
        short), so the state in memory is not trusted: the pool fails as on
        an I/O error and the last commit stays the durable state.
        """
        self._fail_needs_check(f"unexpected error: {reason}")

    def _flush_data(self) -> None:
        """fdatasync the data image; a failure fails the pool (PoolFailed, EIO)."""
        try:
            self.data.flush()
        except OSError as exc:
            self._fail_needs_check(f"flushing the data to {self.data.path} failed "
                                   f"({exc.strerror or exc}): writes since the last commit may be lost")
            raise PoolFailed(self.failed) from None
        self.data_dirty = False

    def _data_write_error(self, exc: OSError) -> PoolError:
        """What a failed write to the data image becomes: PoolFull, or a failed pool."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return PoolFull(f"the host filesystem under {self.path} is full")
        self._fail_needs_check(f"writing to the data at {self.data.path} failed ({exc.strerror or exc})")
        return PoolFailed(self.failed)

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyPool("the pool is open read-only")
        if self.failed is not None:
            raise ReadOnlyPool(f"the pool is read-only: {self.failed}")

    def _ensure_metadata_room(self) -> None:
        """Refuse a change that a commit could not store (dm-thin: metadata full)."""
        pending = self.tree.dirtied + len(self.space.dirty_pages) + METADATA_RESERVE_PAGES
        if self.store.free_pages < pending:
            self.commit()  # frees the pages the previous transaction held
            if self.store.free_pages < self.tree.dirtied + METADATA_RESERVE_PAGES:
                raise MetadataFull("pool is out of metadata space; extend it with "
                                   f"`fusepool extend {self.path} --metadata-size SIZE`")

    # --- properties ----------------------------------------------------------------

    @property
    def _uuid_bytes(self) -> bytes:
        return uuidlib.UUID(self.store.superblock.uuid).bytes

    @property
    def nr_blocks(self) -> int:
        return self.space.nr_blocks

    @property
    def transaction_id(self) -> int:
        return self.store.superblock.transaction_id

    # --- namespace -------------------------------------------------------------------

    def volume(self, name: str) -> Device:
        dev_id = self.names.get(name)
        if dev_id is None:
            raise NoSuchVolume(f"no volume named {name!r} in pool {self.path}")
        return self.devices[dev_id]

    def device(self, dev_id: int) -> Device:
        dev = self.devices.get(dev_id)
        if dev is None:
            raise NoSuchVolume(f"no device with id {dev_id}")
        return dev

    def volumes(self) -> list[Device]:
        """Visible volumes (deferred deletions excluded), by name."""
        return sorted((self.devices[i] for i in self.names.values()), key=lambda d: d.name)

    def create_volume(self, name: str, size: int | None = None, mode: int = VOLUME_MODE) -> Device:
        """A new, empty thin volume of ``size`` bytes (default: the base size).

        ``mode``: its permission bits in the mount (owner-only unless the creator
        in the mount asked for more, through its open() mode and umask).
        """
        validate_name(name)
        size = self.config.base_size if size is None else size
        self._check_size(size)
        self._check_writable()
        if name in self.names:
            raise VolumeExists(f"a volume named {name!r} already exists")
        self._check_min_free("create volume")
        now = wallclock.time()
        dev = Device(self._new_dev_id(), name, size, self.time, self.time, self.transaction_id + 1,
                     now, mtime=now, mode=mode & 0o777)
        self._add(dev)
        return dev

    def snapshot(self, origin_name: str, name: str) -> Device:
        """A writable point-in-time copy of ``origin_name``: O(1), shares every block."""
        validate_name(name)
        origin = self.volume(origin_name)
        self._check_writable()
        if name in self.names:
            raise VolumeExists(f"a volume named {name!r} already exists")
        self._check_min_free("create snapshot")
        self._ensure_metadata_room()
        self.time += 1
        origin.snap_time = self.time
        if origin.root is not None:
            origin.root.share += 1
        now = wallclock.time()
        dev = Device(self._new_dev_id(), name, origin.size, self.time, self.time,
                     self.transaction_id + 1, now, origin=origin.dev_id,
                     mapped_blocks=origin.mapped_blocks, mtime=now, root=origin.root,
                     mode=origin.mode)  # the same data: the same access as its origin
        self._add(dev)
        return dev

    def _add(self, dev: Device) -> None:
        self.devices[dev.dev_id] = dev
        self.names[dev.name] = dev.dev_id
        self.dirty = self.structure_changed = True
        try:
            self.commit()
        except PoolError:
            # Not durable, so not made: take it back out of memory.
            del self.devices[dev.dev_id]
            del self.names[dev.name]
            if dev.root is not None:
                self.tree.drop(dev.root)
            raise

    def remove(self, name: str) -> bool:
        """Delete a volume; deferred while it is open.  Returns True if deferred.

        The removal is made durable first (the device is flagged deleted and
        committed; if that commit fails nothing changed), then its tree is
        dropped and the freed blocks reach the next commit.
        """
        dev = self.volume(name)
        self._check_writable()
        del self.names[name]
        dev.deleted = True
        self.dirty = self.structure_changed = True
        try:
            self.commit()
        except PoolError:
            dev.deleted = False
            self.names[name] = dev.dev_id
            raise
        if dev.open_count:
            return True
        self._drop_device(dev)
        self._commit_quietly()
        return False

    def _commit_quietly(self) -> None:
        """Commit now if possible; a failure only delays it to the next commit."""
        try:
            self.commit()
        except PoolError as exc:
            log.info("commit postponed: %s", exc)

    def _drop_device(self, dev: Device) -> None:
        if dev.root is not None:
            self.tree.drop(dev.root)
            dev.root = None
        del self.devices[dev.dev_id]
        self.dirty = self.structure_changed = True

    def rename(self, old: str, new: str, replace: bool = False) -> bool:
        """Rename a volume; with ``replace``, a volume already named ``new`` goes.

        The target's removal (deferred while it is open, as in :meth:`remove`)
        and the rename are one commit: a crash shows both or neither.
        Returns True when the target's removal is deferred.
        """
        validate_name(new)
        dev = self.volume(old)
        self._check_writable()
        if old == new:
            return False
        target = None
        if new in self.names:
            if not replace:
                raise VolumeExists(f"a volume named {new!r} already exists")
            target = self.devices[self.names[new]]
            target.deleted = True
        del self.names[old]
        dev.name = new
        self.names[new] = dev.dev_id
        self.dirty = self.structure_changed = True
        try:
            self.commit()
        except PoolError:
            dev.name = old  # not durable, so not done
            self.names[old] = dev.dev_id
            if target is not None:
                target.deleted = False
                self.names[new] = target.dev_id
            else:
                del self.names[new]
            raise
        if target is None:
            return False
        if target.open_count:
            return True
        self._drop_device(target)
        self._commit_quietly()
        return False

    def set_mode(self, dev_id: int, mode: int) -> Device:
        """chmod of a volume in the mount: permission bits only; durable before it returns."""
        dev = self.device(dev_id)
        self._check_writable()
        mode &= 0o777
        if mode != dev.mode:
            old, dev.mode = dev.mode, mode
            self.dirty = self.structure_changed = True  # the device table: a full commit
            try:
                self.commit()
            except PoolError:
                dev.mode = old
                raise
        return dev

    def resize(self, dev_id: int, size: int) -> Device:
        """Grow a device (online).  Shrinking is refused: data would be lost.

        By device id, as every call from an open handle: a volume removed while
        open may have a new namesake (only the command layer resolves names).
        """
        dev = self.device(dev_id)
        self._check_size(size)
        self._check_writable()
        if size < dev.size:
            raise InvalidArgument(f"cannot shrink volume {dev.name!r} from {dev.size} to {size} "
                                  "bytes: volumes only grow")
        if size > dev.size:
            self._zero_tail(dev)
            self._grow_device(dev, size)
            self.commit()
        return dev

    def _zero_tail(self, dev: Device) -> None:
        """Zero the rest of a volume's last block before the volume grows over it.

        Those bytes may hold a write past the end whose size change a crash took
        back; growing must not bring them back into view.
        """
        bs = self.block_size
        tail = dev.size % bs
        if not tail:
            return
        leaf = Tree.leaf(dev.root, dev.size // bs // FANOUT)
        if leaf is None or leaf.entries[dev.size // bs % FANOUT] == UNMAPPED:
            return
        size = dev.size
        self.write(dev.dev_id, size, bytes(bs - tail))
        dev.size = size  # the zeros are not part of the volume yet

    def _grow_device(self, dev: Device, size: int) -> None:
        self._check_size(size)
        dev.size = size
        self.unsynced.setdefault(dev.dev_id, set())  # the journal carries the new size
        dev.root = self.tree.grow(dev.root, self._blocks_for(size))
        self.dirty = True

    def _check_size(self, size: int) -> None:
        if not isinstance(size, int) or not 0 <= size <= MAX_VOLUME_SIZE:
            raise UsageError(f"invalid volume size {size!r}: must be 0 to {MAX_VOLUME_SIZE} bytes")

    def _blocks_for(self, size: int) -> int:
        return max(1, (size + self.block_size - 1) // self.block_size)

    def _new_dev_id(self) -> int:
        for _ in range(MAX_DEV_ID + 1):
            dev_id = self.next_dev_id
            self.next_dev_id = dev_id + 1 if dev_id < MAX_DEV_ID else 1
            if dev_id not in self.devices:
                return dev_id
        raise PoolFull("all 2^24 device ids are in use")

    def _check_min_free(self, what: str) -> None:
        """Docker's dm.min_free_space, for data and metadata alike."""
        limit = self.config.min_free_space
        data_free = 100.0 * self.space.free / self.nr_blocks
        if data_free < limit:
            raise BelowMinFreeSpace(
                f"cannot {what}: only {data_free:.1f}% of the pool's data space is free, below the "
                f"minimum free space of {limit:g}%; extend the pool with `fusepool extend {self.path} "
                "--data-size SIZE` or remove volumes")
        meta_free = 100.0 * self.store.free_pages / self.store.superblock.nr_meta_pages
        if meta_free < limit:
            raise BelowMinFreeSpace(
                f"cannot {what}: only {meta_free:.1f}% of the pool's metadata space is free, below "
                f"the minimum free space of {limit:g}%; extend it with `fusepool extend {self.path} "
                "--metadata-size SIZE`")

    # --- handles (deferred deletion) -----------------------------------------------

    def open_device(self, dev_id: int) -> None:
        self.device(dev_id).open_count += 1

    def close_device(self, dev_id: int) -> None:
        dev = self.devices.get(dev_id)
        if dev is None:
            return
        dev.open_count -= 1
        if dev.open_count <= 0 and dev.deleted and self.failed is None and not self.readonly:
            self._drop_device(dev)
            self._commit_quietly()

    # --- data path --------------------------------------------------------------------

    def read(self, dev_id: int, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; unmapped ranges read as zeros."""
        dev = self.device(dev_id)
        if offset < 0 or length < 0:
            raise InvalidArgument("negative offset or length")
        end = min(offset + length, dev.size)
        if offset >= end:
            return b""
        bs = self.block_size
        zero = memoryview(self.zero_block)
        root = dev.root
        parts: list = []
        run_pos = run_len = 0  # a pending run of physically contiguous mapped bytes
        leaf_index, leaf = -1, None
        vb = offset // bs
        pos = offset
        while pos < end:
            lo = pos - vb * bs
            hi = min(end - vb * bs, bs)
            if vb // FANOUT != leaf_index:
                leaf_index = vb // FANOUT
                leaf = Tree.leaf(root, leaf_index)
            entry = leaf.entries[vb % FANOUT] if leaf is not None else UNMAPPED
            if entry == UNMAPPED:
                if run_len:
                    parts.append(self.data.read(0, run_pos, run_len))
                    run_len = 0
                parts.append(zero[: hi - lo])
            else:
                phys = (entry >> TIME_BITS) * bs + lo
                if run_len and run_pos + run_len == phys:
                    run_len += hi - lo
                else:
                    if run_len:
                        parts.append(self.data.read(0, run_pos, run_len))
                    run_pos, run_len = phys, hi - lo
            pos = (vb + 1) * bs
            vb += 1
        if run_len:
            parts.append(self.data.read(0, run_pos, run_len))
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    def write(self, dev_id: int, offset: int, data) -> int:
        """Write ``data`` at ``offset``; returns the bytes written.

        A write past the end grows the volume (file semantics, so ``cp`` into a
        new volume works).  When the pool runs out of space part-way, the
        blocks before the first one that could not be allocated are written
        and their length is returned; with none written, PoolFull is raised.
        """
        dev = self.device(dev_id)
        self._check_writable()
        if offset < 0:
            raise InvalidArgument("negative offset")
        length = len(data)
        if not length:
            return 0
        end = offset + length
        if end > MAX_VOLUME_SIZE:
            raise InvalidArgument(f"write beyond the largest volume size ({MAX_VOLUME_SIZE} bytes)")
        bs = self.block_size
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)  # startswith below needs the object itself
        zeros = memoryview(self.zero_block)
        detect = self.config.zero_detection
        vb = offset // bs
        if (end <= dev.size and (end - 1) // bs == vb
                and not (detect and data.startswith(zeros[: min(length, bs)]))):
            # The common case first: an overwrite inside one block the volume owns
            # (same tests as the in-place branch below; with zero detection, all-zero
            # data goes the long way).
            leaf = Tree.leaf(dev.root, vb // FANOUT)
            entry = leaf.entries[vb % FANOUT] if leaf is not None else UNMAPPED
            block = entry >> TIME_BITS
            if (entry != UNMAPPED and self.space.counts[block] == 1
                    and entry & TIME_MASK >= dev.snap_time
                    and not Tree.leaf_is_shared(dev.root, vb // FANOUT)):
                self.data_dirty = True
                try:
                    self.data.write_one(block * bs + offset - vb * bs, data)
                except OSError as exc:
                    raise self._data_write_error(exc) from None
                dev.mtime = wallclock.time()
                return length
        if offset > dev.size:
            self._zero_tail(dev)
        view = memoryview(data)
        counts = self.space.counts
        snap_time = dev.snap_time
        zeroing = not self.config.skip_block_zeroing
        # Plan: decide every block's fate and allocate, touching no mapping yet.
        io: list[tuple[int, object]] = []  # (byte position in the data image, buffer)
        remap: list[tuple[int, int]] = []  # (virtual block, new data block or UNMAPPED)
        allocated: list[int] = []
        maybe_zero: list[tuple[int, int]] = []  # exclusive blocks that may now be all zeros
        leaf_index, leaf, leaf_shared = -1, None, False
        written = 0
        vb = offset // bs
        pos = offset
        while pos < end:
            lo = pos - vb * bs
            hi = min(end - vb * bs, bs)
            piece = view[pos - offset : pos - offset + hi - lo]
            if vb // FANOUT != leaf_index:
                leaf_index = vb // FANOUT
                leaf = Tree.leaf(dev.root, leaf_index)
                leaf_shared = leaf is not None and Tree.leaf_is_shared(dev.root, leaf_index)
            entry = leaf.entries[vb % FANOUT] if leaf is not None else UNMAPPED
            block = entry >> TIME_BITS
            whole = hi - lo == bs
            # In place, no copy: a memoryview compared with bytes goes byte by byte.
            # Without zero detection zeros are data (dm-thin provisions them too).
            zero = detect and not piece[0] and data.startswith(zeros[: hi - lo], pos - offset)
            if entry == UNMAPPED:
                if zero:  # unmapped blocks read as zeros already: nothing to store
                    written += hi - lo
                    pos = (vb + 1) * bs
                    vb += 1
                    continue
                buf = piece if whole else None
            elif zero and whole:
                if not remap and not allocated:
                    self._ensure_metadata_room()
                remap.append((vb, UNMAPPED))
                buf = False
            elif (not leaf_shared and counts[block] == 1 and entry & TIME_MASK >= snap_time):
                # Exclusive: overwrite in place.  dm-thin's time rule (mapped before the
                # last snapshot => shared) also covers sharing that only the last *commit*
                # still has, so a crash can never show this write in a snapshot.
                io.append((block * bs + lo, piece))
                if zero and hi == bs:  # zeros ending a block: it may be all zeros now
                    maybe_zero.append((vb, block))
                buf = False
            elif whole:  # shared, and all of it rewritten: nothing to copy
                buf = piece
            else:  # shared: copy the block, unless the copy would be all zeros
                try:
                    buf = bytearray(self.data.read(block, 0, bs))
                except PoolError:  # a read error (EIO): this write fails, nothing changed
                    self._undo_allocations(allocated)
                    raise
                buf[lo:hi] = piece
                if zero and buf == self.zero_block:
                    if not remap and not allocated:
                        self._ensure_metadata_room()
                    remap.append((vb, UNMAPPED))
                    buf = False
            if buf is not False:
                try:
                    if not remap and not allocated:
                        self._ensure_metadata_room()
                    new = self.space.allocate() if self.space.free else self._allocate_grown()
                except (PoolFull, MetadataFull):
                    if not written:
                        self._undo_allocations(allocated)
                        raise
                    break
                allocated.append(new)
                if buf is not None:
                    io.append((new * bs, buf))
                elif zeroing and not self.data.is_hole(new):
                    buf = bytearray(bs)
                    buf[lo:hi] = piece
                    io.append((new * bs, buf))
                else:  # a hole (never written, or punched) reads as zeros; or skip_block_zeroing
                    io.append((new * bs + lo, piece))
                remap.append((vb, new))
            written += hi - lo
            pos = (vb + 1) * bs
            vb += 1
        # I/O: one pwritev per physically contiguous run.
        try:
            self.data_dirty = True
            self._write_runs(io)
            for vb, block in maybe_zero:  # (the kernel splits zero writes at page boundaries)
                if self.data.read(block, 0, bs) == self.zero_block:
                    remap.append((vb, UNMAPPED))
        except OSError as exc:
            self._undo_allocations(allocated)
            raise self._data_write_error(exc) from None
        except PoolError:  # a read failed (DataReadError): nothing remapped
            self._undo_allocations(allocated)
            raise
        # Apply: only now do size and mappings change (no I/O can fail after this point).
        if offset + written > dev.size:
            self._grow_device(dev, offset + written)
        if remap:
            self._remap(dev, remap)
        dev.mtime = wallclock.time()
        if self.space.free < self.space_watch:  # the one space check per write: see _space_low
            self._space_low()
        return written

    def _undo_allocations(self, blocks: list[int]) -> None:
        for block in blocks:
            self.space.unallocate(block)

    def _write_runs(self, io: list) -> None:
        i, n = 0, len(io)
        while i < n:
            start, first = io[i]
            buffers = [first]
            next_pos = start + len(first)
            i += 1
            while i < n and io[i][0] == next_pos:
                buffers.append(io[i][1])
                next_pos += len(io[i][1])
                i += 1
            self.data.write(start, buffers)

    def _remap(self, dev: Device, changes: list[tuple[int, int]]) -> None:
        """Point virtual blocks at new data blocks (or UNMAPPED); adjust counts."""
        level = height_for(self._blocks_for(dev.size))
        stamp = self.time & TIME_MASK
        leaf_index, leaf = -1, None
        unsynced = self.unsynced.setdefault(dev.dev_id, set())
        for vb, new in changes:
            unsynced.add(vb)
            if vb // FANOUT != leaf_index:
                leaf_index = vb // FANOUT
                dev.root, leaf = self.tree.writable_leaf(dev.root, level, leaf_index)
            slot = vb % FANOUT
            old = leaf.entries[slot]
            if new == UNMAPPED:
                leaf.entries[slot] = UNMAPPED
            else:
                leaf.entries[slot] = (new << TIME_BITS) | stamp
            if old != UNMAPPED:
                self.space.dec(old >> TIME_BITS)
                dev.mapped_blocks -= 1
            if new != UNMAPPED:
                dev.mapped_blocks += 1
        self.dirty = True

    def discard(self, dev_id: int, offset: int, length: int) -> int:
        """Unmap the whole blocks inside the range (rounded inward, as dm-thin)."""
        dev = self.device(dev_id)
        self._check_writable()
        if offset < 0 or length < 0 or offset + length > dev.size:
            raise InvalidArgument(f"discard range {offset}+{length} is outside the volume "
                                  f"({dev.size} bytes)")
        bs = self.block_size
        first = (offset + bs - 1) // bs
        last = (offset + length) // bs  # exclusive
        self._ensure_metadata_room()
        changes = []
        for leaf_index in range(first // FANOUT, (last + FANOUT - 1) // FANOUT):
            leaf = Tree.leaf(dev.root, leaf_index)
            if leaf is None:
                continue
            base = leaf_index * FANOUT
            for slot in range(max(first - base, 0), min(last - base, FANOUT)):
                if leaf.entries[slot] != UNMAPPED:
                    changes.append((base + slot, UNMAPPED))
        if changes:
            self._remap(dev, changes)
        return len(changes)

    # --- pool size -------------------------------------------------------------------

    def extend(self, data_size: int | None = None, metadata_size: int | None = None) -> None:
        """Grow the data and/or metadata space (never shrink).

        Everything is validated before anything changes.  Growing the metadata
        is allowed on a pool that went read-only for lack of metadata space,
        and brings it back.
        """
        if self.readonly:
            raise ReadOnlyPool("the pool is open read-only")
        meta_pages = self.store.superblock.nr_meta_pages
        nr_blocks = self.nr_blocks
        if metadata_size is not None:
            if metadata_size // PAGE_SIZE < meta_pages:
                raise InvalidArgument(f"cannot shrink the metadata space from {meta_pages * PAGE_SIZE} "
                                      f"to {metadata_size} bytes")
            if metadata_size > MAX_METADATA_SIZE:
                raise UsageError(f"metadata size is limited to {bytes_size(MAX_METADATA_SIZE)}")
            meta_pages = metadata_size // PAGE_SIZE
        if data_size is not None:
            if data_size // self.block_size < nr_blocks:
                raise InvalidArgument(f"cannot shrink the data space from {nr_blocks * self.block_size} "
                                      f"to {data_size} bytes")
            if data_size // self.block_size >= 1 << (64 - TIME_BITS):
                raise UsageError("data size too large")
            nr_blocks = data_size // self.block_size
        if meta_pages < min_metadata_pages(nr_blocks):
            raise UsageError(f"metadata space too small for {nr_blocks} data blocks: extend it to at "
                             f"least {bytes_size(min_metadata_pages(nr_blocks) * PAGE_SIZE)} too "
                             "(--metadata-size)")
        if self.failed is not None and (self.needs_check or not (
                meta_pages > self.store.superblock.nr_meta_pages and "metadata" in self.failed)):
            self._check_writable()
        if nr_blocks > self.nr_blocks:  # the data first: a device too small or a host too
            self.data.grow(nr_blocks * self.block_size)  # full for a preallocated file stop here
        if meta_pages > self.store.superblock.nr_meta_pages:
            self.store.grow(meta_pages)
            self.dirty = self.structure_changed = True
            if self.failed is not None and "metadata" in self.failed and not self.needs_check:
                log.info("metadata extended: pool %s is writable again", self.path)
                self.failed = None
        if nr_blocks > self.nr_blocks:
            self._grow_data(nr_blocks)
        self.commit()
        self.autoextend_stuck_at = 0
        self._arm_space_watch()

    def _grow_data(self, nr_blocks: int) -> None:
        """More data blocks (in memory until the next commit)."""
        self.data.grow(nr_blocks * self.block_size)
        self.space.grow(nr_blocks)
        self.dirty = self.structure_changed = True  # a journal record cannot carry it

    # --- autoextend and the low-water event ----------------------------------------------

    def configure(self, **settings) -> None:
        """Change autoextend/low-water settings (``fusepool set``): validated, then saved.

        Keys: autoextend_threshold, autoextend_percent, max_data_size,
        low_water_mark, on_low_water (an empty command removes the hook),
        zero_detection (a bool; takes effect from the next write).
        """
        known = ("autoextend_threshold", "autoextend_percent", "max_data_size", "low_water_mark",
                 "on_low_water")
        zero_detection = settings.pop("zero_detection", self.config.zero_detection)
        if not isinstance(zero_detection, bool):
            raise UsageError(f"zero_detection must be true or false, not {zero_detection!r}")
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise UsageError(f"unknown setting(s): {', '.join(unknown)}")
        if self.readonly:
            raise ReadOnlyPool("the pool is open read-only")
        values = {k: getattr(self.config, k) for k in known} | settings
        values["autoextend_threshold"] = autoextend.parse_threshold(values["autoextend_threshold"])
        values["autoextend_percent"] = autoextend.parse_grow_percent(values["autoextend_percent"])
        values["on_low_water"] = values["on_low_water"] or None
        # (A maximum kept from before is not checked again: `extend` may have passed it.)
        autoextend.validate(self.config.mode, self.nr_blocks, self.block_size,
                            **values | ({} if "max_data_size" in settings else {"max_data_size": 0}))
        config = dataclasses.replace(self.config, **values, zero_detection=zero_detection)
        config.save(self.path)
        self.config = config
        if "on_low_water" in settings:  # the hook is now one this process wrote itself
            self.hook_refusal = None
        self.autoextend_stuck_at = 0
        self._arm_space_watch()
        if self.space.free < self.space_watch:  # already past a new threshold: act now
            self._space_low()

    def _autoextend_on(self) -> bool:
        c = self.config
        return (c.mode == "loop" and c.autoextend_threshold < autoextend.OFF and not self.readonly
                and (not c.max_data_size or self.nr_blocks < c.max_data_size // self.block_size))

    def _arm_space_watch(self) -> None:
        """Set ``space_watch``: below this many free blocks, write() calls :meth:`_space_low`."""
        watch = 0
        if self._autoextend_on():
            # used >= trigger is only possible once free <= nr_blocks - trigger
            watch = self.nr_blocks - autoextend.trigger_blocks(
                self.nr_blocks, self.config.autoextend_threshold) + 1
        mark = self.config.low_water_mark
        if mark:
            if self.space.free >= mark:
                self.low_water_armed = True
            if self.low_water_armed:
                watch = max(watch, mark)
        self.space_watch = watch

    def _space_low(self) -> None:
        """After a write left few free blocks: autoextend, then maybe the low-water event.

        Runs between requests with everything applied, so the commit that
        makes a growth durable is a consistent one.  Nothing here fails the
        write that got us here.
        """
        if self._autoextend() or self.autoextend_pending:
            self.autoextend_pending = False
            self._commit_quietly()  # durable at once, as `fusepool extend` is
        mark = self.config.low_water_mark
        free = self.space.free
        if mark and free < mark and self.low_water_armed:
            self.low_water_armed = False
            self._low_water_event(free)
        self._arm_space_watch()

    def _allocate_grown(self) -> int:
        """No free block in the middle of a write: grow first if autoextend may, then allocate.

        The growth is committed at the end of the write (see _space_low),
        when the mappings it serves are in place.
        """
        if self._autoextend():
            self.autoextend_pending = True
            self.space_watch = self.nr_blocks + 1  # makes this write end in _space_low
        return self.space.allocate()

    def _autoextend(self) -> bool:
        """Grow the data space if use reached the threshold; True if it grew."""
        from fusepool.metadata.format import COUNTS_PER_PAGE

        if not self._autoextend_on():
            return False
        c = self.config
        nr, used = self.nr_blocks, self.space.used
        if used < autoextend.trigger_blocks(nr, c.autoextend_threshold):
            return False
        limit = (1 << (64 - TIME_BITS)) - 1
        if c.max_data_size:
            limit = min(limit, c.max_data_size // self.block_size)
        host_limit = nr + self.data.host_free_bytes() // self.block_size
        # Growing writes the new space-map pages at the next commit: keep that commit possible.
        meta_free = (self.store.free_pages - self.tree.dirtied - len(self.space.dirty_pages)
                     - 2 * METADATA_RESERVE_PAGES)
        meta_limit = nr + max(0, meta_free) * COUNTS_PER_PAGE
        meta_limit = min(meta_limit, max_blocks_for_metadata(self.store.superblock.nr_meta_pages))
        cap = min(limit, host_limit, meta_limit)
        target = autoextend.target_blocks(nr, used, c.autoextend_threshold, c.autoextend_percent, cap)
        if target <= nr:
            if self.autoextend_stuck_at != nr:  # (said once per size, not at every write)
                self.autoextend_stuck_at = nr
                why = ("its maximum data size" if cap == limit else
                       "the free space of the host filesystem" if cap == host_limit else
                       "its metadata space (extend it with --metadata-size)")
                log.warning("pool %s is %d%% full and cannot autoextend: limited by %s",
                            self.path, 100 * used // nr, why)
            return False
        try:
            self._grow_data(target)
        except (OSError, PoolError) as exc:
            log.error("autoextend of pool %s failed: %s", self.path, exc)
            return False
        log.info("autoextend: pool %s data space %s -> %s (%d of %d blocks were in use)", self.path,
                 bytes_size(nr * self.block_size), bytes_size(target * self.block_size), used, nr)
        if target == limit and c.max_data_size:
            log.warning("pool %s reached its maximum data size (%s): it will not autoextend again",
                        self.path, bytes_size(target * self.block_size))
        return True

    def _low_water_event(self, free: int) -> None:
        c = self.config
        log.warning("pool %s: %d free data blocks, below the low-water mark of %d%s", self.path, free,
                    c.low_water_mark, "; running its hook" if c.on_low_water else "")
        if not c.on_low_water:
            return
        refusal = self.hook_refusal or autoextend.untrusted_config(self.path, c.on_low_water)
        if refusal:
            log.error("pool %s: not running the low-water hook: %s", self.path, refusal)
            return
        env = autoextend.hook_environment(self.path, free, self.nr_blocks, self.space.used,
                                          self.block_size, c.low_water_mark)
        (self.on_low_water or autoextend.spawn_hook)(c.on_low_water, env)

    # --- statistics ----------------------------------------------------------------------

    def device_usage(self, dev: Device) -> tuple[int, int]:
        """``(exclusive, shared)`` mapped blocks of a device."""
        exclusive = shared = 0
        counts = self.space.counts
        for _, leaf, path_shared in Tree.leaves(dev.root):
            for entry in leaf.entries:
                if entry == UNMAPPED:
                    continue
                if path_shared or counts[entry >> TIME_BITS] > 1:
                    shared += 1
                else:
                    exclusive += 1
        return exclusive, shared

    def extents(self, dev: Device) -> list[dict]:
        """Mapped extents: runs of virtual blocks on contiguous data blocks with one sharing state."""
        out: list[dict] = []
        counts = self.space.counts
        for leaf_index, leaf, path_shared in Tree.leaves(dev.root):
            base = leaf_index * FANOUT
            for slot, entry in enumerate(leaf.entries):
                if entry == UNMAPPED:
                    continue
                block = entry >> TIME_BITS
                shared = path_shared or counts[block] > 1
                vb = base + slot
                last = out[-1] if out else None
                if (last and last["shared"] == shared and last["virtual_block"] + last["blocks"] == vb
                        and last["data_block"] + last["blocks"] == block):
                    last["blocks"] += 1
                else:
                    out.append({"virtual_block": vb, "data_block": block, "blocks": 1, "shared": shared})
        return out

    def mappings(self, dev: Device):
        """Yield ``(virtual_block, data_block, time)`` for every mapping, in order."""
        for leaf_index, leaf, _ in Tree.leaves(dev.root):
            base = leaf_index * FANOUT
            for slot, entry in enumerate(leaf.entries):
                if entry != UNMAPPED:
                    yield base + slot, entry >> TIME_BITS, entry & TIME_MASK

    def stats(self) -> dict:
        """Exact figures behind ``fusepool info`` (bytes, counts)."""
        bs = self.block_size
        data_total = self.nr_blocks * bs
        data_used = self.space.used * bs
        direct = self.config.mode == "direct"
        # Docker's devicemapper rule (deviceset.go Status): available = total - used, capped
        # by the host filesystem's free space (statfs Bfree * Bsize) when the data or
        # metadata is a regular (sparse) file.  A direct-mode data file is regular too, but
        # fully allocated: like a block device, nothing on the host can take its space.
        data_available = data_total - data_used
        pool_dir_fs = os.statvfs(self.path)
        if direct:
            host_free = pool_dir_fs.f_bavail * pool_dir_fs.f_frsize
            blocks_available = self.space.free
        else:
            host_free = self.data.host_free_bytes()
            data_available = min(data_available, self.data.host_bfree_bytes())
            blocks_available = min(self.space.free, host_free // bs)
        meta = self.store.superblock.nr_meta_pages * PAGE_SIZE
        meta_used = self.store.used_pages * PAGE_SIZE
        meta_available = min(meta - meta_used, pool_dir_fs.f_bfree * pool_dir_fs.f_bsize)
        deferred = sum(1 for d in self.devices.values() if d.deleted)
        c = self.config
        return {
            "pool_name": os.path.basename(self.path.rstrip("/")) or self.path,
            "pool_dir": self.path,
            "mode": self.config.mode,
            "block_size": bs,
            "base_size": self.config.base_size,
            "backing_filesystem": host_filesystem(self.path),
            "data_file": c.data_device or os.path.join(self.path, DATA),
            "data_device": c.data_device,
            "preallocated": c.preallocated,
            "metadata_file": os.path.join(self.path, METADATA),
            "data_space_used": data_used,
            "data_space_total": data_total,
            # Loop mode promises space it has not reserved: the host caps it (as Docker reports).
            "data_space_available": max(0, data_available),
            "metadata_space_used": meta_used,
            "metadata_space_total": meta,
            "metadata_space_available": max(0, meta_available),
            "min_free_space": int(data_total * self.config.min_free_space / 100),
            "min_free_space_percent": self.config.min_free_space,
            "skip_block_zeroing": self.config.skip_block_zeroing,
            "no_space_timeout": self.config.no_space_timeout,
            "zero_detection": c.zero_detection,
            "deferred_deleted_device_count": deferred,
            "volume_count": len(self.names),
            "data_blocks_total": self.nr_blocks,
            "data_blocks_used": self.space.used,
            "data_blocks_free": self.space.free,
            "data_blocks_available": blocks_available,  # what df shows: capped by the host in loop mode
            "autoextend_threshold": c.autoextend_threshold,
            "autoextend_percent": c.autoextend_percent,
            "max_data_size": c.max_data_size,
            "low_water_mark": c.low_water_mark,
            "on_low_water": c.on_low_water,
            "host_free_bytes": host_free,
            "host_allocated_bytes": self.data.allocated_bytes(),
            "transaction_id": self.transaction_id,
            "journal_records": self.journal.seq,  # synced since that transaction, not yet in it
            "time": self.time,
            "read_only": self.failed,
            "library_version": f"fusepool {__version__}",
        }

    def describe(self, dev: Device, usage: bool = True) -> dict:
        """Everything about one device, for ``list --json`` and ``inspect``."""
        out = {
            "name": dev.name, "dev_id": dev.dev_id, "size": dev.size,
            "mapped_blocks": dev.mapped_blocks, "mapped_bytes": dev.mapped_blocks * self.block_size,
            "origin": self.devices[dev.origin].name if dev.origin in self.devices else None,
            "origin_dev_id": dev.origin, "creation_time": dev.creation_time,
            "snap_time": dev.snap_time, "transaction": dev.transaction, "created": dev.created,
            "open_count": dev.open_count, "deleted": dev.deleted,
        }
        if usage:
            out["exclusive_blocks"], out["shared_blocks"] = self.device_usage(dev)
        return out


def max_blocks_for_metadata(nr_pages: int) -> int:
    """The most data blocks ``nr_pages`` of metadata can serve (min_metadata_pages inverted)."""
    from fusepool.metadata.format import COUNTS_PER_PAGE

    return max(0, (nr_pages - 2 * METADATA_RESERVE_PAGES) // 2 * COUNTS_PER_PAGE)


def min_metadata_pages(nr_blocks: int) -> int:
    """Metadata pages a pool needs at the least: two copies of the space map and slack."""
    from fusepool.metadata.format import COUNTS_PER_PAGE

    return 2 * ((nr_blocks + COUNTS_PER_PAGE - 1) // COUNTS_PER_PAGE) + 2 * METADATA_RESERVE_PAGES


def host_filesystem(path: str) -> str:
    """The type of the filesystem holding ``path`` (longest mount point prefix)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype
