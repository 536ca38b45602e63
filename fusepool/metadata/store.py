"""The metadata file: page allocation, commit and recovery (shadow paging).

A page is in one of these states, kept in ``page_state`` (one byte a page):

- bit ``CURRENT``: referenced by the last commit (N);
- bit ``PREVIOUS``: referenced by the commit before (N-1), kept so that a
  damaged latest commit can fall back to the one before it (``repair``);
- bit ``PENDING``: written by the commit in progress;
- bit ``HELD``: referenced by a commit that a reader is walking on disk (a
  reserved metadata snapshot, dm-thin's ``reserve_metadata_snap``): kept
  until every reservation is released.

A page with none of them is free.  Commit N+1 only writes free pages, so both
N and N-1 stay intact on disk until the superblock of N+1 is durable.
"""

import errno
import logging
import os
from array import array
from dataclasses import dataclass

import xxhash

from fusepool.errors import Corrupt, MetadataFull
from fusepool.metadata.format import (
    COUNTS_PER_PAGE,
    FANOUT,
    FIRST_DATA_PAGE,
    FLAG_NEEDS_CHECK,
    HEADER_SIZE,
    PAGE_NODE,
    PAGE_ROOT,
    PAGE_SIZE,
    PAGE_SPACEMAP,
    SUPERBLOCK_SLOTS,
    TIME_BITS,
    UNMAPPED,
    Superblock,
    decode_root,
    encode_root,
    pack_page,
    unpack_page,
)
from fusepool.metadata.spacemap import DataSpaceMap
from fusepool.metadata.tree import Node

log = logging.getLogger(__name__)

CURRENT, PREVIOUS, PENDING, HELD = 1, 2, 4, 8
_ROOT_PAYLOAD = PAGE_SIZE - HEADER_SIZE
_IOV_MAX = 1024  # buffers one pwritev may take
RESERVE_PAGES = 256  # host-backed metadata pages kept beyond the highest in use (1 MiB)
# After a commit: CURRENT|PENDING -> CURRENT, CURRENT -> PREVIOUS as well; HELD stays.
_AFTER_COMMIT = bytes(((v & CURRENT) << 1) | (CURRENT if v & (CURRENT | PENDING) else 0)
                      | (v & HELD) for v in range(256))
_DROP_PENDING = bytes(v & (CURRENT | PREVIOUS | HELD) for v in range(256))
_HOLD_CURRENT = bytes(v | HELD if v & CURRENT else v for v in range(256))
_UNHOLD = bytes(v & ~HELD for v in range(256))


@dataclass
class CommitWrite:
    """A commit serialised by MetadataStore.prepare_commit, to be written."""

    superblock: Superblock
    super_page: bytes
    writes: list[tuple[int, bytes]]  # (page number, page)
    dirty: list[Node]  # the nodes given pages
    dirty_sm: list[int]  # space map page indexes written
    old_sm: list[int]  # the space map page numbers before
    released: list[int]  # pages the state stopped referencing before the commit was taken


@dataclass
class Loaded:
    """Everything a commit holds, as read back from the metadata file."""

    superblock: Superblock
    state: dict  # pool counters and the device table (see Pool._root_state)
    roots: dict[int, Node | None]  # dev_id -> mapping tree root
    counts: array  # data block reference counts
    nodes: int  # distinct node pages loaded


def read_superblocks(fd: int) -> list[tuple[int, Superblock | Corrupt]]:
    """Both superblock slots, parsed or with the reason they are unusable."""
    found = []
    for slot in SUPERBLOCK_SLOTS:
        page = os.pread(fd, PAGE_SIZE, slot * PAGE_SIZE)
        try:
            found.append((slot, Superblock.unpack(page, slot)))
        except Corrupt as exc:
            found.append((slot, exc))
    return found


class MetadataStore:
    def __init__(self, path: str, fd: int, superblock: Superblock):
        self.path = path
        self.fd = fd
        self.superblock = superblock
        self.page_state = bytearray(superblock.nr_meta_pages)
        self.page_state[0 : FIRST_DATA_PAGE] = bytes([CURRENT]) * FIRST_DATA_PAGE
        self.released: list[int] = []  # CURRENT pages no longer referenced in memory
        self.spacemap_pages: list[int] = []
        self.cursor = FIRST_DATA_PAGE
        self._free: int | None = None  # cached count of free pages
        self.backed = 0  # pages [0, backed) have host space reserved (see keep_reserve)
        self.readonly_fd = False
        self.holds = 0  # reserved metadata snapshots not yet released

    # --- creating and opening ------------------------------------------------

    @classmethod
    def write_new(cls, path: str, *, uuid: str, transaction_id: int, time: int, block_size: int,
                  nr_data_blocks: int, nr_meta_pages: int, state: dict | None = None,
                  roots: dict[int, Node | None] | None = None) -> None:
        """Write a new metadata file holding one commit: ``transaction_id``, ``state``, ``roots``.

        The one way a metadata file is made: by ``Pool.create`` (no devices),
        by ``repair`` (the trees salvaged from a damaged file) and by
        ``restore`` (the trees built from thin_dump XML).  ``state`` is the root
        record (``{"devices": [...], ...}``); every node of ``roots`` is
        written afresh (shared nodes once).  What follows from the trees is
        computed here, never taken from the caller: the data blocks' reference
        counts and each device's ``mapped_blocks``.  The file is created
        (never overwritten) owner-only, and removed again if writing fails.
        """
        if transaction_id < 1:
            raise ValueError(f"transaction id {transaction_id}: a commit's id is at least 1")
        state = dict(state or {"devices": []})
        roots = roots or {}
        counts, mapped = _count_references(roots, nr_data_blocks)
        state["devices"] = [dict(dev, mapped_blocks=mapped.get(dev["dev_id"], 0))
                            for dev in state["devices"]]
        sb = Superblock(uuid, transaction_id - 1, time, block_size, nr_data_blocks, nr_meta_pages)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nr_meta_pages * PAGE_SIZE)
            store = cls(path, fd, sb)
            spacemap = DataSpaceMap(nr_data_blocks, counts)
            store.spacemap_pages = [0] * spacemap.nr_pages
            spacemap.dirty_pages = set(range(spacemap.nr_pages))
            store.commit(state, roots, spacemap, time, nr_data_blocks, flags=0)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)

    @classmethod
    def open(cls, path: str, readonly: bool = False,
             use_slot: int | None = None) -> tuple["MetadataStore", Loaded]:
        """Open at the newest valid commit (or at ``use_slot``, for repair)."""
        fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        try:
            candidates = [(sb.transaction_id, slot, sb) for slot, sb in read_superblocks(fd)
                          if isinstance(sb, Superblock) and (use_slot is None or slot == use_slot)]
            if not candidates:
                raise Corrupt("no valid superblock in the metadata file")
            _, _, superblock = max(candidates)
            store = cls(path, fd, superblock)
            store.readonly_fd = readonly
            try:
                loaded = store._load()
            except (KeyError, TypeError, ValueError, IndexError, RecursionError) as exc:
                raise Corrupt(f"metadata is internally inconsistent ({type(exc).__name__}: {exc})") from None
            try:  # pages before the first hole already have host space
                store.backed = os.lseek(fd, 0, os.SEEK_HOLE) // PAGE_SIZE
            except OSError:
                store.backed = 0
        except BaseException:
            os.close(fd)
            raise
        return store, loaded

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _read_page(self, page_no: int, kind: int) -> tuple[int, int, memoryview]:
        if not FIRST_DATA_PAGE <= page_no < self.superblock.nr_meta_pages:
            raise Corrupt(f"metadata page number {page_no} out of range")
        return unpack_page(os.pread(self.fd, PAGE_SIZE, page_no * PAGE_SIZE), page_no, kind,
                           self.superblock.transaction_id)

    def _load(self) -> Loaded:
        sb = self.superblock
        blob = bytearray()
        for page_no in sb.root_pages:
            blob += self._read_page(page_no, PAGE_ROOT)[2]
            self.page_state[page_no] = CURRENT
        blob = bytes(blob[: sb.root_len])
        if len(blob) != sb.root_len or xxhash.xxh64_intdigest(blob) != sb.root_checksum:
            raise Corrupt("root record checksum mismatch")
        state, self.spacemap_pages = decode_root(blob)

        counts = array("I")
        for index, page_no in enumerate(self.spacemap_pages):
            payload = self._read_page(page_no, PAGE_SPACEMAP)[2]
            n = min(COUNTS_PER_PAGE, sb.nr_data_blocks - index * COUNTS_PER_PAGE)
            counts.frombytes(payload[: 4 * n])
            self.page_state[page_no] = CURRENT
        if len(counts) != sb.nr_data_blocks:
            raise Corrupt(f"space map covers {len(counts)} blocks, superblock says {sb.nr_data_blocks}")

        by_page: dict[int, Node] = {}
        roots = {}
        for dev in state["devices"]:
            page_no = dev["root"]
            roots[dev["dev_id"]] = self._load_node(page_no, by_page) if page_no else None
        return Loaded(sb, state, roots, counts, len(by_page))

    def _load_node(self, page_no: int, by_page: dict[int, Node], want_level: int | None = None) -> Node:
        """Load a subtree; a page reached twice is one shared node (share counted)."""
        node = by_page.get(page_no)
        if node is not None:
            if want_level is not None and node.level != want_level:
                raise Corrupt(f"metadata page {page_no} is used at two tree levels")
            node.share += 1
            return node
        level, _, payload = self._read_page(page_no, PAGE_NODE)
        if want_level is not None and level != want_level:  # (levels also rule out cycles)
            raise Corrupt(f"metadata page {page_no}: tree level {level}, expected {want_level}")
        entries = array("Q")
        entries.frombytes(payload[: 8 * FANOUT])
        if level:
            entries = [self._load_node(p, by_page, level - 1) if p else None for p in entries]
        node = by_page[page_no] = Node(level, entries, page_no)
        self.page_state[page_no] = CURRENT
        return node

    # --- page allocation ------------------------------------------------------

    @property
    def free_pages(self) -> int:
        if self._free is None:
            self._free = self.page_state.count(0)
        return self._free

    @property
    def used_pages(self) -> int:
        return len(self.page_state) - self.free_pages

    def release(self, page_no: int) -> None:
        """A committed page is no longer referenced by the in-memory state."""
        self.released.append(page_no)

    def _allocate(self) -> int:
        i = self.page_state.find(0, self.cursor)
        if i < 0:
            i = self.page_state.find(0, FIRST_DATA_PAGE, self.cursor)
            if i < 0:
                raise MetadataFull("metadata space exhausted")
        self.page_state[i] = PENDING
        self.cursor = i + 1
        if self._free is not None:
            self._free -= 1
        return i

    def grow(self, nr_meta_pages: int) -> None:
        os.ftruncate(self.fd, nr_meta_pages * PAGE_SIZE)
        self.page_state.extend(bytes(nr_meta_pages - len(self.page_state)))
        self.superblock.nr_meta_pages = nr_meta_pages
        self._free = None

    def hold(self) -> None:
        """Keep the last commit's pages from reuse until :meth:`unhold` (a reader walks them).

        Pages of several held commits are kept until the last hold goes: one
        bit, not a bitmap per hold, since holds are short and rarely overlap.
        """
        self.page_state = bytearray(self.page_state.translate(_HOLD_CURRENT))
        self.holds += 1
        self._free = None

    def unhold(self) -> None:
        self.holds -= 1
        if self.holds == 0:
            self.page_state = bytearray(self.page_state.translate(_UNHOLD))
            self._free = None

    # --- commit ----------------------------------------------------------------

    def commit(self, state: dict, roots: dict[int, Node | None], spacemap, time: int,
               nr_data_blocks: int, flags: int | None = None) -> int:
        """Write a new transaction; return its id.

        The caller has already flushed the data device.  ``state['devices']``
        gets each device's root page filled in here.  Nothing may change the
        trees or the space map during the call; :meth:`prepare_commit`,
        :meth:`write_commit` and :meth:`finish_commit` are the same in steps
        for a caller that lets them change during the writes.
        """
        job = self.prepare_commit(state, roots, spacemap, time, nr_data_blocks, flags)
        try:
            self.write_commit(job)
        except BaseException:
            self.abort_commit(job, spacemap)
            raise
        self.finish_commit(job)
        return job.superblock.transaction_id

    def prepare_commit(self, state: dict, roots: dict[int, Node | None], spacemap, time: int,
                       nr_data_blocks: int, flags: int | None = None) -> "CommitWrite":
        """Serialise a new transaction and allocate its pages; write nothing.

        From here on the commit is taken: nodes and space map pages changed
        afterwards belong to the next one (a node dirtied again releases the
        page given to it here, which the next commit retires).
        """
        dirty = _dirty_nodes(roots.values())
        dirty_sm = sorted(spacemap.dirty_pages)
        if len(self.spacemap_pages) < spacemap.nr_pages:
            self.spacemap_pages.extend([0] * (spacemap.nr_pages - len(self.spacemap_pages)))
        root_estimate = 2 + (len(dirty_sm) + len(self.spacemap_pages)) * 8 // _ROOT_PAYLOAD \
            + len(state["devices"]) * 400 // _ROOT_PAYLOAD
        if len(dirty) + len(dirty_sm) + root_estimate > self.free_pages:
            raise MetadataFull(
                f"metadata space exhausted: the commit needs about "
                f"{len(dirty) + len(dirty_sm) + root_estimate} pages, {self.free_pages} are free")
        txn = self.superblock.transaction_id + 1
        self.cursor = FIRST_DATA_PAGE  # lowest free pages first: keeps the file compact
        writes: list[tuple[int, bytes]] = []
        old_sm = list(self.spacemap_pages)
        try:
            for node in dirty:  # children come before their parents
                node.page = self._allocate()
                if node.level == 0:
                    payload = node.entries.tobytes()
                else:
                    payload = array("Q", [c.page if c is not None else 0 for c in node.entries]).tobytes()
                writes.append((node.page, pack_page(PAGE_NODE, node.page, txn, payload, node.level)))
            for index in dirty_sm:
                page_no = self._allocate()
                self.spacemap_pages[index] = page_no
                writes.append((page_no, pack_page(PAGE_SPACEMAP, page_no, txn, spacemap.page_payload(index))))
            for dev in state["devices"]:
                root = roots.get(dev["dev_id"])
                dev["root"] = root.page if root is not None else 0
            blob = encode_root(state, self.spacemap_pages)
            root_pages = []
            for start in range(0, len(blob), _ROOT_PAYLOAD):
                page_no = self._allocate()
                root_pages.append(page_no)
                piece = blob[start : start + _ROOT_PAYLOAD]
                writes.append((page_no, pack_page(PAGE_ROOT, page_no, txn, piece)))
            sb = Superblock(self.superblock.uuid, txn, time, self.superblock.block_size, nr_data_blocks,
                            self.superblock.nr_meta_pages,
                            self.superblock.flags if flags is None else flags,
                            len(blob), xxhash.xxh64_intdigest(blob), root_pages)
            super_page = sb.pack()
        except BaseException:
            self._drop_pending(dirty, old_sm)
            raise
        job = CommitWrite(sb, super_page, writes, dirty, dirty_sm, old_sm, self.released)
        self.released = []  # released from now on: retired by the next commit
        spacemap.dirty_pages = set()
        return job

    def write_commit(self, job: "CommitWrite") -> None:
        """The blocking part: the pages, a flush, the superblock, a flush.

        Touches only the file (safe in a worker thread while the event loop
        changes the trees); on an error the caller aborts or fails the pool.
        """
        self._write_pages(job.writes)
        os.fdatasync(self.fd)
        os.pwrite(self.fd, job.super_page, (job.superblock.transaction_id % 2) * PAGE_SIZE)
        os.fdatasync(self.fd)

    def write_is_reserved(self, job: "CommitWrite") -> bool:
        """True when every page the commit writes has host space already (no ENOSPC)."""
        return all(page_no < self.backed for page_no, _ in job.writes)

    def abort_commit(self, job: "CommitWrite", spacemap) -> None:
        """Undo :meth:`prepare_commit` (nothing changed since): the state is as before."""
        self._drop_pending(job.dirty, job.old_sm)
        self.released = job.released + self.released
        spacemap.dirty_pages |= set(job.dirty_sm)

    def _drop_pending(self, dirty: list[Node], old_sm: list[int]) -> None:
        for node in dirty:
            node.page = None
        self.spacemap_pages = old_sm
        self.page_state = bytearray(self.page_state.translate(_DROP_PENDING))
        self._free = None

    def finish_commit(self, job: "CommitWrite") -> None:
        """The new commit is durable: retire what it no longer references."""
        self.page_state = bytearray(self.page_state.translate(_AFTER_COMMIT))
        retired = list(job.released)
        retired += [job.old_sm[index] for index in job.dirty_sm
                    if index < len(job.old_sm) and job.old_sm[index]]
        retired += self.superblock.root_pages
        for page_no in retired:
            self.page_state[page_no] &= ~CURRENT
        self._free = None
        self.superblock = job.superblock
        self.keep_reserve()

    def mark_needs_check(self) -> None:
        """Set the needs-check flag in the superblock of the last commit, in place.

        Only that page is written, so the flag lands on the state the last
        commit made durable and never on anything changed in memory since.  A
        commit that failed after writing the next superblock (its last flush
        failed) may have left a newer one that opening would prefer: it is
        flagged too.  Later commits carry the flag on (``superblock.flags``).
        """
        base = self.superblock.transaction_id
        for slot, sb in read_superblocks(self.fd):
            if (isinstance(sb, Superblock) and sb.uuid == self.superblock.uuid
                    and sb.transaction_id >= base and not sb.flags & FLAG_NEEDS_CHECK):
                sb.flags |= FLAG_NEEDS_CHECK
                if os.pwrite(self.fd, sb.pack(), slot * PAGE_SIZE) != PAGE_SIZE:
                    raise OSError(errno.ENOSPC, "short write to the metadata file")
        os.fdatasync(self.fd)
        self.superblock.flags |= FLAG_NEEDS_CHECK

    def keep_reserve(self) -> None:
        """Keep RESERVE_PAGES of host space allocated beyond the highest page in use.

        The metadata file is sparse; a commit on a full host filesystem can then
        still be written from the reserve (e.g. the one that removes a volume and
        gives the host its space back).
        """
        if self.readonly_fd:
            return
        top = len(self.page_state.rstrip(b"\0"))
        want = min(top + RESERVE_PAGES, self.superblock.nr_meta_pages)
        if want <= self.backed:
            return
        try:
            os.posix_fallocate(self.fd, self.backed * PAGE_SIZE, (want - self.backed) * PAGE_SIZE)
            self.backed = want
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.warning("host filesystem full: metadata reserve is %d pages", self.backed - top)
            elif exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.backed = self.superblock.nr_meta_pages  # cannot reserve here: stop trying
            else:
                raise

    def _write_pages(self, writes: list[tuple[int, bytes]]) -> None:
        """pwritev runs of consecutive pages: one syscall per contiguous run."""
        writes.sort()
        i = 0
        while i < len(writes):
            j = i + 1
            while j < len(writes) and writes[j][0] == writes[j - 1][0] + 1 and j - i < _IOV_MAX:
                j += 1
            done = os.pwritev(self.fd, [w[1] for w in writes[i:j]], writes[i][0] * PAGE_SIZE)
            if done != (j - i) * PAGE_SIZE:  # the host filesystem filled up mid-way
                raise OSError(errno.ENOSPC, "short write to the metadata file")
            i = j


def _dirty_nodes(roots) -> list[Node]:
    """Dirty nodes reachable from ``roots``, children before parents, each once."""
    order: list[Node] = []
    seen: set[int] = set()
    for root in roots:
        if root is None or root.page is not None or id(root) in seen:
            continue
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            if node.level:
                for child in node.entries:
                    if child is not None and child.page is None and id(child) not in seen:
                        stack.append((child, False))
    return order


def _count_references(roots: dict[int, Node | None], nr_data_blocks: int) -> tuple[array, dict[int, int]]:
    """Each data block's reference count (leaves that map it, a shared leaf once) and
    each device's mapped blocks (a shared subtree counted once, memoised)."""
    counts = array("I", bytes(4 * nr_data_blocks))
    per_node: dict[int, int] = {}  # id(node) -> mapped entries below it

    def mapped_below(node: Node) -> int:
        found = per_node.get(id(node))
        if found is not None:
            return found
        if node.level == 0:
            found = 0
            for entry in node.entries:
                if entry != UNMAPPED:
                    block = entry >> TIME_BITS
                    if block >= nr_data_blocks:
                        raise ValueError(f"a mapping to data block {block}, beyond the pool's "
                                         f"{nr_data_blocks}")
                    counts[block] += 1
                    found += 1
        else:
            found = sum(mapped_below(child) for child in node.entries if child is not None)
        per_node[id(node)] = found
        return found

    mapped = {dev_id: mapped_below(root) if root is not None else 0 for dev_id, root in roots.items()}
    return counts, mapped
