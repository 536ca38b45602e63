"""``fusepool check`` and ``fusepool repair``: verify and rebuild the metadata.

The checker reads the metadata file itself, tolerating damage (the engine's
loader stops at the first bad page); each invariant of the durable format
(see :mod:`fusepool.metadata.format`) is verified by one method.  Problems are
*fatal* when data could be lost or misread (a bad checksum, an under-counted
block, a broken time model) and *leaks* when space is merely unaccounted for —
thin-provisioning-tools' distinction.  Either makes ``check`` exit 1.

``repair`` is thin_repair's shape: a tolerant read, then restore.  It picks
the newest commit whose pages all verify (falling back to the one before when
the latest is damaged), or salvages what can be read from the newest one; it
turns that into device records and mapping trees (shared subtrees stay
shared), applies the journal, restores the time model, and writes them with
``MetadataStore.write_new`` as restore does (reference and mapped-block counts
recomputed from the trees there).  The old file is kept as
``metadata.damaged``.
"""

import contextlib
import logging
import os
import uuid as uuidlib
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import xxhash

from fusepool.config import JOURNAL, METADATA, PoolConfig, PoolLock
from fusepool.errors import Corrupt, PoolError
from fusepool.metadata.format import (
    COUNTS_PER_PAGE,
    FANOUT,
    FIRST_DATA_PAGE,
    FLAG_NEEDS_CHECK,
    MAX_DEV_ID,
    MAX_VOLUME_SIZE,
    PAGE_NODE,
    PAGE_ROOT,
    PAGE_SIZE,
    PAGE_SPACEMAP,
    TIME_BITS,
    TIME_MASK,
    UNMAPPED,
    Superblock,
    decode_root,
    unpack_page,
)
from fusepool.metadata.journal import Journal, validate_record
from fusepool.metadata.store import MetadataStore, read_superblocks
from fusepool.metadata.tree import Node, Tree, WritableLeafCursor, grown, height_for

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class Problem:
    kind: str  # superblock, root, spacemap, node, device, bounds, refcount, leak, time, count
    message: str
    fatal: bool = True


@dataclass
class Report:
    transaction: int | None = None
    slot: int | None = None
    devices: int = 0
    nodes: int = 0
    mappings: int = 0
    data_blocks: int = 0
    used_blocks: int = 0
    needs_check: bool = False  # the superblock's flag (an I/O or internal error stopped the pool)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        return out


@dataclass
class _NodeInfo:
    level: int
    entries: array  # raw u64 entries: packed mappings in a leaf, child pages otherwise
    reach: int = 0  # devices whose tree contains this node (counted per path)
    min_snap: int = TIME_MASK + 1  # smallest snap_time among those devices
    min_blocks: int = 1 << 62  # smallest size (in blocks) among those devices
    base: int = 0  # first virtual block it covers (the same in every device that shares it)
    mapped: int = -1  # mapped entries in the subtree (memoised)


class Checker:
    """Verify one commit of a metadata file, collecting every problem."""

    def __init__(self, fd: int, block_size: int, slot: int | None = None,
                 progress: Progress | None = None, superblock: Superblock | None = None):
        self.fd = fd
        self.block_size = block_size
        self.want_slot = slot
        self.given_sb = superblock  # a held commit's (its slot may be rewritten meanwhile)
        self.progress = progress
        self.report = Report()
        self.nodes: dict[int, _NodeInfo] = {}
        self.page_kind: dict[int, str] = {}
        self.sb: Superblock | None = None
        self.state: dict | None = None
        self.stored_counts: array | None = None
        self.bad_subtrees: dict[int, str] = {}  # page -> why it could not be read

    def problem(self, kind: str, message: str, fatal: bool = True) -> None:
        self.report.problems.append(Problem(kind, message, fatal))

    def run(self) -> Report:
        if not self.check_superblocks():
            return self.report
        try:
            if not self.check_root_record():
                return self.report
            self.check_device_table()
            self.check_space_map()
            self.walk_trees()
            self.check_mapped_counts()
            self.check_references()
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError, MemoryError,
                OverflowError, IndexError) as exc:
            # Pages that verify but hold impossible values (bad RAM, a bug): report, never crash.
            self.problem("root", f"metadata is internally inconsistent ({type(exc).__name__}: {exc})")
            self.state = None
        return self.report

    # --- one method per invariant -------------------------------------------------

    def check_superblocks(self) -> bool:
        """At least one slot verifies; the newest valid one (or the one asked for) is used."""
        valid = []
        found = read_superblocks(self.fd) if self.given_sb is None else \
            [(self.given_sb.transaction_id % 2, self.given_sb)]
        for slot, sb in found:
            if isinstance(sb, Superblock):
                valid.append((sb.transaction_id, slot, sb))
            elif self.want_slot is None and any(os.pread(self.fd, PAGE_SIZE, slot * PAGE_SIZE)):
                self.report.notes.append(f"superblock slot {slot}: {sb}")
        if self.want_slot is not None:
            valid = [v for v in valid if v[1] == self.want_slot]
        if not valid:
            self.problem("superblock", "no valid superblock: the metadata cannot be read")
            return False
        txn, slot, sb = max(valid)
        self.sb, self.report.transaction, self.report.slot = sb, txn, slot
        self.report.needs_check = bool(sb.flags & FLAG_NEEDS_CHECK)
        self.report.data_blocks = sb.nr_data_blocks
        if sb.block_size != self.block_size:
            self.problem("superblock",
                         f"block size {sb.block_size} differs from pool.json ({self.block_size})")
        size = os.fstat(self.fd).st_size
        if size < sb.nr_meta_pages * PAGE_SIZE:
            self.problem("superblock", f"metadata file is {size} bytes, superblock says "
                         f"{sb.nr_meta_pages} pages")
        return True

    def _read(self, page_no: int, kind: int, what: str):
        """A verified page payload, or None (the problem is recorded)."""
        if not FIRST_DATA_PAGE <= page_no < self.sb.nr_meta_pages:
            self.problem("bounds", f"{what}: page number {page_no} is outside the metadata file")
            return None
        owner = self.page_kind.get(page_no)
        if owner is not None and owner != what.split()[0]:
            self.problem("bounds", f"{what}: page {page_no} is also used as {owner}")
        self.page_kind[page_no] = what.split()[0]
        try:
            return unpack_page(os.pread(self.fd, PAGE_SIZE, page_no * PAGE_SIZE), page_no, kind,
                               self.sb.transaction_id)
        except Corrupt as exc:
            self.problem("checksum", f"{what}: {exc}")
            return None

    def check_root_record(self) -> bool:
        blob = bytearray()
        for page_no in self.sb.root_pages:
            page = self._read(page_no, PAGE_ROOT, "root-record page")
            if page is None:
                return False
            blob += page[2]
        blob = bytes(blob[: self.sb.root_len])
        if xxhash.xxh64_intdigest(blob) != self.sb.root_checksum:
            self.problem("checksum", "root record: checksum mismatch")
            return False
        try:
            self.state, self.spacemap_pages = decode_root(blob)
        except Corrupt as exc:
            self.problem("root", str(exc))
            return False
        self.report.devices = len(self.state.get("devices", []))
        return True

    def check_device_table(self) -> None:
        """Unique ids and names; dm-thin's time model holds for every device."""
        ids, names = set(), set()
        pool_time = self.sb.time
        for dev in self.state["devices"]:
            dev_id, name = dev.get("dev_id"), dev.get("name")
            if not isinstance(dev_id, int) or not 0 <= dev_id <= MAX_DEV_ID:
                self.problem("device", f"device id {dev_id!r} is not a 24-bit number")
            if dev_id in ids:
                self.problem("device", f"device id {dev_id} appears twice")
            ids.add(dev_id)
            if not dev.get("deleted"):
                if name in names:
                    self.problem("device", f"volume name {name!r} appears twice")
                names.add(name)
            if not isinstance(dev.get("size"), int) or not 0 <= dev["size"] <= MAX_VOLUME_SIZE:
                self.problem("device", f"device {dev_id}: size {dev.get('size')!r} is out of range")
            if not dev["creation_time"] <= dev["snap_time"] <= pool_time:
                self.problem("time", f"device {dev_id}: creation_time {dev['creation_time']} <= "
                             f"snap_time {dev['snap_time']} <= pool time {pool_time} does not hold")

    def check_space_map(self) -> None:
        nr = self.sb.nr_data_blocks
        expected = (nr + COUNTS_PER_PAGE - 1) // COUNTS_PER_PAGE
        if len(self.spacemap_pages) != expected:
            self.problem("spacemap", f"space map has {len(self.spacemap_pages)} pages, "
                         f"{expected} needed for {nr} blocks")
        counts = array("I")
        for index, page_no in enumerate(self.spacemap_pages[:expected]):
            n = min(COUNTS_PER_PAGE, nr - index * COUNTS_PER_PAGE)
            page = self._read(page_no, PAGE_SPACEMAP, f"space-map page {index}")
            if page is None:
                counts.extend(array("I", bytes(4 * n)))
                continue
            counts.frombytes(page[2][: 4 * n])
        counts.extend(array("I", bytes(4 * (nr - len(counts)))))
        self.stored_counts = counts

    def walk_trees(self) -> None:
        """Read every node once; check levels and bounds; propagate device reach."""
        devices = self.state["devices"]
        pending: list[tuple[int, int | None, str]] = []  # (page, expected level, owner)
        for dev in devices:
            if dev["root"]:
                pending.append((dev["root"], None, f"device {dev['dev_id']}"))
        done = 0
        while pending:
            page_no, want_level, owner = pending.pop()
            if page_no in self.nodes or page_no in self.bad_subtrees:
                continue
            page = self._read(page_no, PAGE_NODE, f"node page {page_no} (of {owner})")
            if page is None:
                self.bad_subtrees[page_no] = "unreadable"
                continue
            level, _, payload = page
            if want_level is not None and level != want_level:
                self.problem("node", f"node page {page_no} (of {owner}) has level {level}, "
                                     f"expected {want_level}")
                self.bad_subtrees[page_no] = "wrong level"
                continue
            entries = array("Q")
            entries.frombytes(payload[: 8 * FANOUT])
            self.nodes[page_no] = _NodeInfo(level, entries)
            if level:
                pending.extend((c, level - 1, owner) for c in entries if c)
            done += 1
            if self.progress and done % 256 == 0:
                self.progress(done, 0)
        self.report.nodes = len(self.nodes)
        # Reach and smallest snap_time, parents before children (higher levels first).
        for dev in devices:
            info = self.nodes.get(dev["root"])
            if info is not None:
                blocks = max(1, (dev["size"] + self.block_size - 1) // self.block_size)
                info.reach += 1
                info.min_snap = min(info.min_snap, dev["snap_time"])
                info.min_blocks = min(info.min_blocks, blocks)
                if FANOUT ** (info.level + 1) < blocks:
                    self.problem("node", f"device {dev['dev_id']}: tree of height {info.level} "
                                 f"cannot address its {blocks} blocks")
        for page_no in sorted(self.nodes, key=lambda p: -self.nodes[p].level):
            info = self.nodes[page_no]
            if info.level:
                span = FANOUT ** info.level
                for i, child in enumerate(info.entries):
                    c = self.nodes.get(child) if child else None
                    if c is not None:
                        c.reach += info.reach
                        c.min_snap = min(c.min_snap, info.min_snap)
                        c.min_blocks = min(c.min_blocks, info.min_blocks)
                        c.base = info.base + i * span

    def _mapped(self, page_no: int) -> int:
        info = self.nodes.get(page_no)
        if info is None:
            return 0
        if info.mapped < 0:
            if info.level == 0:
                info.mapped = FANOUT - info.entries.count(UNMAPPED)
            else:
                info.mapped = sum(self._mapped(c) for c in info.entries if c)
        return info.mapped

    def check_mapped_counts(self) -> None:
        for dev in self.state["devices"]:
            if dev["root"] in self.bad_subtrees:
                continue
            found = self._mapped(dev["root"]) if dev["root"] else 0
            if found != dev["mapped_blocks"]:
                self.problem("count", f"device {dev['dev_id']} ({dev['name']}): records "
                             f"{dev['mapped_blocks']} mapped blocks, its tree maps {found}")
            self.report.mappings += found

    def check_references(self) -> None:
        """Reference counts equal references; shared blocks are seen as shared (time model)."""
        nr = self.sb.nr_data_blocks
        refs = array("I", bytes(4 * nr))  # leaves mapping each block (what the space map counts)
        dev_refs = array("I", bytes(4 * nr))  # devices mapping each block
        pool_time = self.sb.time
        leaves = [(p, i) for p, i in self.nodes.items() if i.level == 0]
        for page_no, info in leaves:
            for slot, entry in enumerate(info.entries):
                if entry == UNMAPPED:
                    continue
                if info.base + slot >= info.min_blocks:
                    self.problem("bounds", f"node page {page_no}: virtual block {info.base + slot} is "
                                 f"mapped beyond the end of a device ({info.min_blocks} blocks)")
                block, t = entry >> TIME_BITS, entry & TIME_MASK
                if block >= nr:
                    self.problem("bounds", f"node page {page_no} maps data block {block}, "
                                 f"beyond the pool's {nr} blocks")
                    continue
                if t > pool_time:
                    self.problem("time", f"data block {block}: mapping time {t} is after the pool "
                                         f"time {pool_time}")
                refs[block] += 1
                dev_refs[block] += info.reach
        time_problems = 0
        for _page_no, info in leaves:
            for entry in info.entries:
                if entry == UNMAPPED:
                    continue
                block, t = entry >> TIME_BITS, entry & TIME_MASK
                if block < nr and dev_refs[block] > 1 and t >= info.min_snap:
                    time_problems += 1
                    if time_problems <= 20:
                        self.problem("time", f"data block {block} is shared by {dev_refs[block]} device "
                                     f"mappings but mapped at time {t}, not before every sharer's "
                                     f"snap_time (min {info.min_snap}): a kernel would overwrite it in place")
        if time_problems > 20:
            self.problem("time", f"... and {time_problems - 20} more time-model problems")
        stored = self.stored_counts
        under = leaked = 0
        for block in range(nr):
            s, r = stored[block], refs[block]
            if s == r:
                continue
            if s < r:
                under += 1
                if under <= 20:
                    self.problem("refcount", f"data block {block}: reference count {s} but {r} "
                                 "references (under-counted: it could be reused while in use)")
            elif not self.bad_subtrees:
                leaked += 1
                if leaked <= 20:
                    self.problem("leak", f"data block {block}: reference count {s} but {r} references "
                                 "(leaked space; `fusepool repair` reclaims it)", fatal=False)
        if under > 20:
            self.problem("refcount", f"... and {under - 20} more under-counted blocks")
        if leaked > 20:
            self.problem("leak", f"... and {leaked - 20} more leaked blocks", fatal=False)
        self.report.used_blocks = nr - sum(1 for c in stored if not c)
        self.refs = refs


def _open_checked(pool_dir: str) -> tuple[PoolConfig, int]:
    config = PoolConfig.load(pool_dir)
    path = os.path.join(pool_dir, METADATA)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise PoolError(f"{path}: {exc.strerror}") from None
    return config, fd


def check_pool(pool_dir: str, progress: Progress | None = None, slot: int | None = None,
               superblock: Superblock | None = None) -> Report:
    """Check the pool at ``pool_dir``; the caller holds its lock, or the daemon holds the
    commit of ``superblock`` (see fusepool.engine.view).  The journal is checked on top
    of the newest commit, or of the held one."""
    config, fd = _open_checked(pool_dir)
    try:
        checker = Checker(fd, config.block_size, slot, progress, superblock)
        report = checker.run()
        if checker.state is not None and slot is None:
            check_journal(checker, os.path.join(pool_dir, JOURNAL))
        if report.needs_check:
            report.notes.append("the pool is flagged needs-check: an I/O error or an internal error "
                                "stopped it, and it stays read-only until a clean check of the "
                                "unmounted pool or `fusepool repair`")
        data_path = os.path.join(pool_dir, "data")
        if report.transaction is not None and os.path.exists(data_path):
            need = report.data_blocks * config.block_size
            have = os.stat(data_path).st_size
            if have < need:  # harmless: the missing part reads as zeros; opening grows it
                report.notes.append(f"data file is {have} bytes, the pool covers {need}")
        return report
    finally:
        os.close(fd)


def check_journal(checker: Checker, path: str) -> None:
    """Records waiting to be replayed must apply to the commit they follow."""
    sb, report = checker.sb, checker.report
    journal = Journal(path, readonly=True)
    try:
        records = journal.read(uuidlib.UUID(sb.uuid).bytes, sb.transaction_id)
    finally:
        journal.close()
    if not records:
        return
    sizes = {d["dev_id"]: d["size"] for d in checker.state["devices"]}
    for record in records:
        for problem in validate_record(record, sizes, checker.block_size, sb.nr_data_blocks, sb.time):
            checker.problem("journal", f"journal {problem}")
    mappings = sum(record.nr_mappings for record in records)
    report.notes.append(f"journal: {len(records)} record(s), {mappings} mapping change(s) synced "
                        f"after transaction {sb.transaction_id}; replayed when the pool opens")


def check_offline(pool_dir: str, progress: Progress | None = None) -> Report:
    """Check an unmounted pool; a clean check clears its needs-check flag.

    That is thin_check --clear-needs-check-flag, which LVM passes by default:
    the metadata holds nothing wrong, so the pool may be written again.  The
    flag is cleared by opening the pool and committing (journal replayed).
    """
    pool_dir = os.path.abspath(pool_dir)
    lock = PoolLock(pool_dir)
    try:
        report = check_pool(pool_dir, progress)
        if report.ok and report.needs_check:
            lock, held = None, lock
            _clear_needs_check(pool_dir, held, report)
        elif report.needs_check:
            report.notes.append("the pool is flagged needs-check and stays read-only: `fusepool "
                                "repair` clears the flag")
        return report
    finally:
        if lock is not None:
            lock.release()


def _clear_needs_check(pool_dir: str, lock: PoolLock, report: Report) -> None:
    """Open the pool under ``lock`` (released here) and commit without the flag."""
    from fusepool.engine import Pool  # (the engine does not import this module; keep it so)

    try:
        pool = Pool(pool_dir, PoolConfig.load(pool_dir), lock, False, clear_needs_check=True)
    except BaseException as exc:
        lock.release()
        if not isinstance(exc, PoolError):
            raise
        report.notes.append(f"the needs-check flag is still set: {exc}")
        return
    pool.close()
    report.needs_check = False
    report.notes.append(f"needs-check flag cleared: the pool is writable again (transaction "
                        f"{pool.transaction_id})")


# --- repair --------------------------------------------------------------------------------

def repair(pool_dir: str, progress: Progress | None = None) -> list[str]:
    """Rebuild the metadata from the best commit; returns what was done and dropped."""
    pool_dir = os.path.abspath(pool_dir)
    lock = PoolLock(pool_dir)
    try:
        return _repair_locked(pool_dir, progress)
    finally:
        lock.release()


def _repair_locked(pool_dir: str, progress: Progress | None) -> list[str]:
    config, fd = _open_checked(pool_dir)
    said: list[str] = []
    try:
        # 1. The tolerant read: the best commit, as far as it can be read.
        chosen, newest = _best_commit(fd, config.block_size, progress, said)
        fixed = [p.message for p in chosen.report.problems]
        # 2. What it read as device records and trees (restore's input too), made whole:
        # the journal's records applied, the time model reset, every mapping inside its device.
        state, roots = _rebuild(chosen, said)
        sb = chosen.sb
        _replay_journal(pool_dir, chosen, state, roots, newest, said)
        pool_time = _repair_times(state, roots, sb.time, said)
        _cover_mappings(state, roots, sb.block_size, said)
        _tall_enough(state, roots, sb.block_size, said)
        if sb.uuid != config.uuid:  # pool.json is the pool's identity (the journal is keyed by it)
            said.append(f"the metadata's uuid {sb.uuid} differed from pool.json's: set to {config.uuid}")
        # 3. Written as restore writes a pool (reference and mapped counts from the trees),
        # then swapped in.
        new_path = os.path.join(pool_dir, METADATA + ".repair")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(new_path)
        new_txn = sb.transaction_id + 1
        MetadataStore.write_new(new_path, uuid=config.uuid, transaction_id=new_txn, time=pool_time,
                                block_size=sb.block_size, nr_data_blocks=sb.nr_data_blocks,
                                nr_meta_pages=sb.nr_meta_pages, state=state, roots=roots)
        # The journal goes once the new metadata is in place (its records are in it, or
        # dropped above).  Rebuilt from the newest commit, the new transaction is newer
        # than any record's base, so the records could not replay on top of it even if a
        # crash kept them.  Rebuilt from an older one, the new transaction may equal the
        # newest, and records meant for that commit must not replay on this one: they
        # go first (they could not apply anyway).
        if sb.transaction_id != newest:
            _truncate_journal(pool_dir)
        old = os.path.join(pool_dir, METADATA)
        os.replace(old, os.path.join(pool_dir, METADATA + ".damaged"))
        os.replace(new_path, old)
        dir_fd = os.open(pool_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        _truncate_journal(pool_dir)
        for message in fixed:
            said.append(f"fixed: {message}")
        said.append(f"wrote new metadata at transaction {new_txn}; the old file "
                    f"is kept as {METADATA}.damaged")
        return said
    finally:
        os.close(fd)


def _best_commit(fd: int, block_size: int, progress: Progress | None,
                 said: list[str]) -> tuple[Checker, int]:
    """The checker of the commit to rebuild from, and the newest commit's transaction id.

    The newest commit whose structure reads whole, else the newest whose
    device table reads (salvaged: its unreadable subtrees are dropped).
    """
    candidates = sorted(((sb.transaction_id, slot) for slot, sb in read_superblocks(fd)
                         if isinstance(sb, Superblock)), reverse=True)
    if not candidates:
        raise Corrupt("no valid superblock: nothing to rebuild from")
    newest = candidates[0][0]
    for txn, slot in candidates:
        checker = Checker(fd, block_size, slot, progress)
        report = checker.run()
        structural = [p for p in report.problems if p.kind in ("checksum", "superblock", "root", "node")]
        if not structural and checker.state is not None:
            if txn != newest:
                said.append(f"the newest commit (transaction {newest}) is damaged; "
                            f"rebuilt from transaction {txn}")
            return checker, newest
    # Salvage: the newest commit with a readable root record, minus its damaged subtrees.
    for txn, slot in candidates:
        checker = Checker(fd, block_size, slot, progress)
        checker.run()
        if checker.state is not None:
            said.append(f"both commits are damaged; salvaging transaction {txn}")
            return checker, newest
    raise Corrupt("no commit has a readable device table: nothing to rebuild from")


def _replay_journal(pool_dir: str, checker: Checker, state: dict, roots: dict, newest_txn: int,
                    said: list[str]) -> int:
    """Apply the journal records that follow the commit being rebuilt; returns how many.

    Records follow the newest commit only: rebuilt from an older one, none can
    apply.  Each record is checked whole before it applies (as ``check``
    does); the first that does not fit ends the replay.  Entries are set as
    logged (shared nodes shadowed, as the write path does); reference and
    mapped-block counts are recomputed afterwards.
    """
    sb = checker.sb
    journal = Journal(os.path.join(pool_dir, JOURNAL), readonly=True)
    try:
        records = journal.read(uuidlib.UUID(sb.uuid).bytes, newest_txn)
    finally:
        journal.close()
    if not records:
        return 0
    if sb.transaction_id != newest_txn:
        said.append(f"dropped {len(records)} journal record(s): writes synced after transaction "
                    f"{newest_txn} are not in the repaired metadata")
        return 0
    bs = checker.block_size
    devices = {d["dev_id"]: d for d in state["devices"]}
    sizes = {dev_id: d["size"] for dev_id, d in devices.items()}
    tree = Tree(lambda block: None, lambda block: None, lambda page: None)  # write_new counts
    applied = mappings = 0
    for record in records:
        problems = validate_record(record, sizes, bs, sb.nr_data_blocks, sb.time)
        if problems:
            said.append(f"dropped {len(records) - applied} journal record(s): {problems[0]}")
            break
        for dev_id, size, mtime_ns in record.devices:
            dev = devices[dev_id]
            if size > dev["size"]:
                dev["size"] = size
                roots[dev_id] = tree.grow(roots.get(dev_id), _blocks(size, bs))
            dev["mtime"] = mtime_ns / 1e9
        words = record.mappings
        changes: dict[int, list[tuple[int, int]]] = {}
        for i in range(0, len(words), 3):
            changes.setdefault(words[i], []).append((words[i + 1], words[i + 2]))
        for dev_id, dev_changes in changes.items():
            cursor = WritableLeafCursor(tree, roots.get(dev_id),
                                        height_for(_blocks(devices[dev_id]["size"], bs)))
            for vb, entry in dev_changes:
                cursor.leaf_for(vb).entries[vb % FANOUT] = entry
            roots[dev_id] = cursor.root
        applied += 1
        mappings += record.nr_mappings
    if applied:
        said.append(f"replayed {applied} journal record(s), {mappings} mapping change(s) synced "
                    f"after transaction {newest_txn}")
    return applied


def _blocks(size: int, block_size: int) -> int:
    return max(1, -(-size // block_size))


def _truncate_journal(pool_dir: str) -> None:
    path = os.path.join(pool_dir, JOURNAL)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
            os.fsync(fd)
    finally:
        os.close(fd)


def _rebuild(checker: Checker, said: list[str]) -> tuple[dict, dict]:
    """In-memory trees (all dirty) from what the checker read, dropping what it could not."""

    # Keyed by page and position: a flipped child pointer can make two parents share a
    # subtree at different virtual blocks, which no real tree does; each position gets its own
    # copy.  Copies are capped at the number of pages read (forged sharing could otherwise ask
    # for one per block of the virtual space); past the cap such a reference is dropped.
    built: dict[tuple[int, int], Node] = {}
    placed: set[int] = set()
    copies = {"left": len(checker.nodes), "dropped": 0}

    def build(page_no: int, base: int) -> Node | None:
        if (page_no, base) in built:
            built[page_no, base].share += 1
            return built[page_no, base]
        info = checker.nodes.get(page_no)
        if info is None:
            return None
        if page_no in placed:
            if not copies["left"]:
                copies["dropped"] += 1
                return None
            copies["left"] -= 1
        placed.add(page_no)
        if info.level == 0:
            node = Node(0, array("Q", info.entries))
            for i, entry in enumerate(node.entries):
                if entry != UNMAPPED and entry >> TIME_BITS >= checker.sb.nr_data_blocks:
                    node.entries[i] = UNMAPPED
        else:
            span = FANOUT ** info.level
            node = Node(info.level, [build(c, base + i * span) if c else None
                                     for i, c in enumerate(info.entries)])
        built[page_no, base] = node
        return node

    devices, roots = [], {}
    seen_ids: set[int] = set()
    for dev in checker.state["devices"]:
        dev_id = dev.get("dev_id") if isinstance(dev, dict) else None
        if not isinstance(dev_id, int) or not 0 <= dev_id <= MAX_DEV_ID or dev_id in seen_ids:
            said.append(f"dropped a device record with no usable dev_id: {str(dev)[:80]}")
            continue
        seen_ids.add(dev_id)
        if not isinstance(dev.get("root"), int):
            dev = dict(dev, root=0)
            said.append(f"device {dev_id}: its root is unreadable; all its mappings are dropped")
        dev.setdefault("name", str(dev_id))
        root = build(dev["root"], 0) if dev["root"] else None
        if dev["root"] and root is None:
            said.append(f"dropped all mappings of device {dev['dev_id']} ({dev['name']}): "
                        "its root is unreadable")
        lost = _lost_subtrees(checker, dev["root"]) if dev["root"] else 0
        if lost:
            said.append(f"device {dev['dev_id']} ({dev['name']}): {lost} unreadable node page(s) dropped; "
                        "those ranges now read as zeros")
        devices.append(_normalised_record(dev))
        roots[dev["dev_id"]] = root
    if copies["dropped"]:
        said.append(f"{copies['dropped']} reference(s) to subtrees already placed elsewhere dropped "
                    "(damaged pointers); those ranges now read as zeros")
    state = dict(checker.state)
    state["devices"] = devices
    return state, roots


def _repair_times(state: dict, roots: dict, pool_time: int, said: list[str]) -> int:
    """Restore dm-thin's time model wherever it is broken, conservatively.

    When any mapping time, creation_time or snap_time is inconsistent, the pool
    time moves past every time seen and every device's snap_time is set to it:
    every existing block then counts as possibly shared and is copied on its
    next write, which is always safe.
    """
    newest = pool_time
    for root in roots.values():
        for _, leaf, _ in Tree.leaves(root):
            newest = max(newest, max((e & TIME_MASK for e in leaf.entries if e != UNMAPPED), default=0))
    # Always reset: a mapping time that verifies but is wrong is otherwise invisible here.
    pool_time = min(newest + 1, TIME_MASK)
    for dev in state["devices"]:
        dev["creation_time"] = min(dev["creation_time"], pool_time)
        dev["snap_time"] = pool_time
    said.append(f"reset the time model: pool time {pool_time}, every device's snap_time too "
                "(existing blocks are copied on their next write)")
    return pool_time


def _cover_mappings(state: dict, roots: dict, block_size: int, said: list[str]) -> None:
    """Grow a device whose tree maps blocks past its size, rather than drop data."""
    last: dict[int, int] = {}
    for dev_id, root in roots.items():
        for index, leaf, _ in Tree.leaves(root):
            for slot in range(FANOUT - 1, -1, -1):
                if leaf.entries[slot] != UNMAPPED:
                    last[dev_id] = index * FANOUT + slot  # (leaves come in order)
                    break
    for dev in state["devices"]:
        end = (last.get(dev["dev_id"], -1) + 1) * block_size
        if end > dev["size"]:
            said.append(f"device {dev['dev_id']} ({dev['name']}): grew from {dev['size']} to {end} "
                        "bytes to cover its mapped blocks")
            dev["size"] = end


def _tall_enough(state: dict, roots: dict, block_size: int, said: list[str]) -> None:
    """Give a tree too short for its device's size (a flipped level) the levels it lacks."""
    for dev in state["devices"]:
        root = roots.get(dev["dev_id"])
        blocks = max(1, -(-dev["size"] // block_size))
        if root is not None and root.level < height_for(blocks):
            roots[dev["dev_id"]] = grown(root, blocks)
            said.append(f"device {dev['dev_id']} ({dev['name']}): its tree of height {root.level} "
                        f"grew to {height_for(blocks)} to address its {blocks} blocks")


def _normalised_record(dev: dict) -> dict:
    """A device record with every field present and of the right type."""
    out = dict(dev)
    for key, kind, default in (("name", str, str(dev.get("dev_id"))), ("size", int, 0),
                               ("creation_time", int, 0), ("snap_time", int, 0),
                               ("transaction", int, 0), ("created", (int, float), 0.0),
                               ("mtime", (int, float), 0.0), ("deleted", bool, False)):
        if not isinstance(out.get(key), kind):
            out[key] = default
    if not isinstance(out.get("origin"), (int, type(None))):
        out["origin"] = None
    out["size"] = min(max(out["size"], 0), MAX_VOLUME_SIZE)
    return out


def _lost_subtrees(checker: Checker, root_page: int) -> int:
    lost, stack, seen = 0, [root_page], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        if p in checker.bad_subtrees:
            lost += 1
            continue
        info = checker.nodes.get(p)
        if info is not None and info.level:
            stack.extend(c for c in info.entries if c)
    return lost
