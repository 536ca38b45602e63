"""Transactions: commit, the sync journal and its replay, and the failure state.

A room of :class:`fusepool.engine.Pool` (it works on the pool's state: devices,
trees, space map, metadata store, journal).  The durable order is data first,
then the metadata that points at it; a failed data flush fails the pool
(needs-check) and is never committed over.
"""

import enum
import errno
import logging
from array import array
from dataclasses import dataclass

from fusepool.engine.device import (
    Device,
)
from fusepool.errors import (
    Corrupt,
    MetadataFull,
    PoolError,
    PoolFailed,
    PoolFull,
    ReadOnlyPool,
)
from fusepool.metadata.format import (
    FANOUT,
    TIME_BITS,
    UNMAPPED,
)
from fusepool.metadata.journal import validate_record
from fusepool.metadata.store import CommitWrite
from fusepool.metadata.tree import LeafCursor, WritableLeafCursor, height_for

log = logging.getLogger(__name__)

METADATA_RESERVE_PAGES = 64  # kept free so a commit can always be written
# Past these an fsync takes a full commit instead of a journal record (a long journal
# would make a crash's replay slow and hold freed blocks back too long).
JOURNAL_MAX_MAPPINGS = 100_000
JOURNAL_MAX_BYTES = 16 << 20


class Health(enum.Enum):
    """Whether the pool takes changes (dm-thin's pool modes)."""

    WRITABLE = "writable"
    # Out of metadata space: read-only until the metadata is extended (online).
    METADATA_FULL = "metadata full"
    # An I/O error or an internal error: read-only, flagged needs-check on disk,
    # until a clean `fusepool check` or `fusepool repair` (dm-thin's needs_check).
    NEEDS_CHECK = "needs check"


@dataclass
class SyncJob:
    """One FLUSH the journal takes: whether to fdatasync the data, and the record."""

    flush_data: bool
    record: tuple | None  # Journal.append's arguments; None: a data flush only
    data_error: OSError | None = None
    journal_error: OSError | None = None
    superseded: bool = False  # a commit came first and made it all durable
    commit: "CommitJob | None" = None  # a full commit instead (the journal cannot take it)


@dataclass
class CommitJob:
    """One commit between Transactions.prepare_commit and finish_commit."""

    write: CommitWrite  # the serialised metadata
    freed: list[int]  # data blocks freed in the transaction: allocatable once it is durable
    transaction: "Transaction"  # what it commits (restored if a synchronous commit fails)
    dirtied: int  # the tree's dirtied-node count it took
    data_error: OSError | None = None
    error: OSError | None = None
    ran: bool = False
    finished: bool = False
    failed: bool = False


class Transaction:
    """What the running transaction changed since the last commit (one per pool)."""

    __slots__ = ("metadata_changed", "structure_changed", "data_written", "remapped")

    def __init__(self):
        self.metadata_changed = False  # a commit (or, for mappings alone, a journal record) is due
        self.structure_changed = False  # devices, names, pool time: only a commit carries them
        self.data_written = False  # data written since the last data flush
        # What the next journal record must carry: per device, the virtual blocks
        # remapped since the last commit or record (an empty set: just the size).
        self.remapped: dict[int, set[int]] = {}

    @property
    def pending(self) -> bool:
        """Anything a FLUSH would have to make durable."""
        return self.metadata_changed or self.data_written

    def change_structure(self) -> None:
        self.metadata_changed = self.structure_changed = True

    def remapped_blocks(self, dev_id: int) -> set[int]:
        """The set to add a device's remapped virtual blocks to (the metadata changes)."""
        self.metadata_changed = True
        return self.remapped.setdefault(dev_id, set())

    def take_remapped(self) -> dict[int, set[int]]:
        """What a journal record carries; the next record starts empty."""
        remapped, self.remapped = self.remapped, {}
        return remapped

    def committed(self) -> None:
        self.metadata_changed = self.structure_changed = False
        self.remapped = {}


class Transactions:
    """Commit, sync, journal replay, failure (a room of Pool)."""

    @property
    def dirty(self) -> bool:
        """The metadata changed since the last commit."""
        return self.transaction.metadata_changed


    def commit(self) -> int:
        """Make every change so far durable: data first, then metadata.

        Returns the transaction id (unchanged when nothing was dirty).  Holds
        ``io_lock``, so it never interleaves with I/O running in a worker
        thread (:meth:`run_sync`, :meth:`run_commit`); on the event loop that
        wait is at most one journal append or one commit's writes.
        """
        with self.io_lock:
            job = self.prepare_commit()
            if job is None:
                return self.store.superblock.transaction_id
            self.run_commit(job)
            return self.finish_commit(job, undo=True)

    def prepare_commit(self) -> "CommitJob | None":
        """Take the commit (serialise it, allocate its pages); None if nothing changed.

        The same in three steps as :meth:`commit`, for a caller that runs the
        blocking middle one in a worker thread (the mount daemon).  Changes
        made after this call belong to the next commit: the running
        :class:`Transaction` starts anew, the blocks freed so far become
        allocatable only when this commit is durable, and a tree node changed
        again releases the page given to it here (the next commit retires it).
        A commit still in flight is finished first.
        """
        self._finish_commit_in_flight()
        if not self.dirty:
            if self.transaction.data_written and not self.readonly:  # in-place overwrites: FLUSH the data
                if self.needs_check:  # (their earlier flush failed: never report them durable)
                    raise PoolFailed(f"the pool is read-only: {self.failed}")
                self._flush_data()
            return None
        self._check_writable()
        state = {"next_dev_id": self.next_dev_id,
                 "devices": [d.to_record() for d in self.devices.values()]}
        roots = {d.dev_id: d.root for d in self.devices.values()}
        try:
            write = self.store.prepare_commit(state, roots, self.space, self.time, self.nr_blocks)
        except MetadataFull as exc:
            self._fail(Health.METADATA_FULL,
                       f"{exc}; extend the metadata with `fusepool extend POOL --metadata-size SIZE`")
            raise ReadOnlyPool(self.failed) from None
        job = CommitJob(write, self.space.take_freed(), self.transaction, self.tree.dirtied)
        self.transaction = Transaction()
        self.tree.dirtied = 0
        self.commit_in_flight = job
        return job

    def run_commit(self, job: "CommitJob") -> None:
        """The blocking part: fdatasync the data, then write the metadata (data first).

        A failed flush is never retried: Linux reports a writeback error once,
        and the next fdatasync would return 0.  Errors are kept in ``job``.
        """
        with self.io_lock:
            if job.ran:  # (finished early by a commit on the loop: see _finish_commit_in_flight)
                return
            job.ran = True
            try:
                self.data.flush()
            except OSError as exc:
                job.data_error = exc
                return
            try:
                self.store.write_commit(job.write)
            except OSError as exc:
                job.error = exc

    def finish_commit(self, job: "CommitJob", undo: bool = False) -> int:
        """Back on the loop: retire what the commit replaced, or fail.

        ``undo``: nothing changed since :meth:`prepare_commit` (the synchronous
        path), so a failed commit can be rolled back: the host filesystem being
        full then leaves the pool writable.  Without it a failure fails the pool.
        """
        if job.finished:
            if job.failed:
                raise PoolFailed(self.failed or "the commit failed")
            return job.write.superblock.transaction_id
        job.finished = True
        self.commit_in_flight = None
        if job.data_error is not None or job.error is not None:
            job.failed = True
            if undo:
                self.store.abort_commit(job.write, self.space)
                self.space.freed = job.freed + self.space.freed
                self.transaction, self.tree.dirtied = job.transaction, job.dirtied
            if job.data_error is not None:
                raise self._data_flush_failed(job.data_error)
            exc = job.error
            if undo and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # The host filesystem is full under the sparse files.  The commit was
                # rolled back, so nothing is damaged: stay writable and retry later.
                job.failed = False
                raise PoolFull(f"the host filesystem under {self.path} is full: metadata not "
                               "committed (free space on the host)") from None
            self._fail_needs_check(f"writing the metadata failed ({exc.strerror or exc})")
            raise PoolFailed(self.failed) from None
        self.store.finish_commit(job.write)
        self.commits += 1
        self.journal.reset()  # its records are in this commit now
        freed = self.space.release_freed(job.freed)
        if freed:
            self._arm_space_watch()  # free space came back: the low-water event re-arms
        try:
            self.data.punch(freed)
        except OSError as exc:  # space stays allocated on the host: harmless
            log.warning("could not punch holes for %d freed blocks: %s", len(freed), exc)
        return job.write.superblock.transaction_id

    def _finish_commit_in_flight(self) -> None:
        """A commit is asked for while another one's I/O is in a worker thread: that
        one comes first (its I/O done here if the thread has not started it yet)."""
        job = self.commit_in_flight
        if job is not None:
            self.run_commit(job)
            self.finish_commit(job)

    def sync(self) -> None:
        """What a FLUSH (fsync) needs: everything written so far made durable.

        Data-path changes since the last commit (writes, discards) go to the
        journal: one append and two fdatasyncs, whatever the size of the trees.
        Anything else, a journal grown too long or a journal write that fails
        takes a full commit.  A failed flush of the data fails the sync (EIO)
        and the pool (see :meth:`_flush_data`): it never falls back to a commit.

        The same in three steps, for a caller that runs the blocking middle one
        in a worker thread (the FUSE adapter): :meth:`prepare_sync` on the event
        loop, :meth:`run_sync` anywhere, :meth:`finish_sync` on the loop again.
        """
        job = self.prepare_sync()
        if job is not None:
            self.run_sync(job)
            self.finish_sync(job)

    def prepare_sync(self) -> "SyncJob | None":
        """Take what the FLUSH must make durable, as of now; None if a commit did it.

        The record's mappings are read here, on the loop, so they point only at
        data written before this call; the data fdatasync in :meth:`run_sync`
        starts after it, so that data is durable before the record is (data
        before metadata).  Writes made meanwhile go to the next record or
        commit.  Blocks they free are not reused before a commit, which resets
        the journal, so a record never names a block that holds another
        device's data.  Callers must run the FLUSHes one at a time, in the
        order they were prepared (records replay in append order).
        """
        if self.needs_check and self.transaction.pending:
            raise PoolFailed(f"the pool is read-only: {self.failed}")
        if not self.dirty:  # only overwrites in place (or nothing): a data flush is all
            return self.prepare_data_flush()
        if not self._journal_fits():  # a full commit, its writes in the worker thread too
            job = self.prepare_commit()
            if job is not None and not self.store.write_is_reserved(job.write):
                # It may meet a full host: only a commit undone at once can say so safely.
                self.run_commit(job)
                self.finish_commit(job, undo=True)
                return None
            return None if job is None else SyncJob(False, None, commit=job)
        self._check_writable()
        job = SyncJob(self.transaction.data_written,
                      (self._uuid_bytes, self.store.superblock.transaction_id, self.time,
                       *self._journal_payload(self.transaction.take_remapped())))
        self.transaction.data_written = False  # (an fdatasync with nothing new still flushes)
        return job

    def prepare_data_flush(self) -> "SyncJob | None":
        """A job that only fdatasyncs the data written so far (None if there is none).

        For a FLUSH after overwrites in place (no mapping changed).
        """
        if not self.transaction.data_written or self.readonly:
            return None
        if self.needs_check:  # (their earlier flush failed: never report them durable)
            raise PoolFailed(f"the pool is read-only: {self.failed}")
        self.transaction.data_written = False
        return SyncJob(True, None)

    def run_sync(self, job: "SyncJob") -> None:
        """The blocking part: fdatasync of the data, then the record's append.

        Touches only the data file's descriptor and the journal, under
        ``io_lock``; errors are kept in ``job`` for :meth:`finish_sync`.
        """
        if job.commit is not None:
            self.run_commit(job.commit)
            return
        with self.io_lock:
            if job.record is not None and job.record[1] != self.store.superblock.transaction_id:
                # A commit ran between prepare and now (create, snapshot...): it flushed the
                # data and holds these mappings, and it reset the journal.  The record would
                # be stale there (and, stamped anew, would take back newer mappings).
                job.superseded = True
                return
            if job.flush_data:
                try:
                    self.data.flush()
                except OSError as exc:
                    job.data_error = exc
                    return
            if job.record is None:
                return
            try:
                self.journal.append(*job.record)
            except OSError as exc:
                job.journal_error = exc

    def finish_sync(self, job: "SyncJob") -> None:
        """Back on the loop: a failed data flush fails the pool; a failed append commits."""
        if job.commit is not None:
            self.finish_commit(job.commit)
            return
        if job.data_error is not None:
            raise self._data_flush_failed(job.data_error)
        if job.journal_error is not None:  # only the journal failed: the commit makes it durable
            log.info("journal append failed (%s): committing instead", job.journal_error)
            self.commit()
            return
        if job.record is not None and not job.superseded:
            self.journal_syncs += 1

    def _journal_fits(self) -> bool:
        if self.transaction.structure_changed or self.readonly or self.failed is not None:
            return False
        if self.time != self.store.superblock.time:
            return False
        changed = sum(len(vbs) for vbs in self.transaction.remapped.values())
        return changed <= JOURNAL_MAX_MAPPINGS and self.journal.end + 24 * changed <= JOURNAL_MAX_BYTES

    def _journal_payload(self, remapped: dict[int, set[int]]
                         ) -> tuple[list[tuple[int, int, int]], array]:
        devices = []
        mappings = array("Q")
        for dev_id, vbs in remapped.items():
            dev = self.devices.get(dev_id)
            if dev is None:  # (dropped: a structure change, so never here)
                continue
            devices.append((dev_id, dev.size, int(dev.mtime * 1e9)))
            cursor = LeafCursor(dev.root)
            for vb in sorted(vbs):
                mappings.extend((dev_id, vb, cursor.entry(vb)))
        return devices, mappings

    def _replay_journal(self, sb) -> None:
        """Apply the journal records that follow the commit just opened (after a crash)."""
        records = self.journal.read(self._uuid_bytes, sb.transaction_id)
        if not records:
            return
        nr_mappings = sum(r.nr_mappings for r in records)
        sizes = {dev_id: dev.size for dev_id, dev in self.devices.items()}
        try:
            for record in records:
                problems = validate_record(record, sizes, self.block_size, self.nr_blocks, self.time)
                if problems:
                    raise Corrupt(problems[0])
                self._apply_record(record)
        except Corrupt as exc:
            raise Corrupt(f"the journal of pool {self.path} does not apply to its metadata ({exc}); "
                          f"run `fusepool check {self.path}` and `fusepool repair {self.path}`") from None
        log.info("pool %s: replayed %d journal record(s), %d mapping(s), on top of transaction %d",
                 self.path, len(records), nr_mappings, sb.transaction_id)
        self.transaction.take_remapped()  # (durable in the journal already)

    def _apply_record(self, record) -> None:
        """Apply a record that validate_record has passed."""
        for dev_id, size, mtime_ns in record.devices:
            dev = self.devices[dev_id]
            if size > dev.size:
                self._grow_device(dev, size)
            dev.mtime = mtime_ns / 1e9
        words = record.mappings
        changes: dict[int, list[tuple[int, int]]] = {}
        for i in range(0, len(words), 3):
            dev_id, vb, entry = words[i], words[i + 1], words[i + 2]
            changes.setdefault(dev_id, []).append((vb, entry))
        for dev_id, dev_changes in changes.items():
            self._set_entries(self.devices[dev_id], dev_changes)

    def _set_entries(self, dev: Device, changes: list[tuple[int, int]]) -> None:
        """Set mapping entries as a journal logged them; reference counts follow."""
        cursor = WritableLeafCursor(self.tree, dev.root, height_for(self._blocks_for(dev.size)))
        space = self.space
        for vb, entry in changes:
            leaf = cursor.leaf_for(vb)
            dev.root = cursor.root
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
        self.transaction.metadata_changed = True

    def reserve_metadata_snap(self) -> bytes:
        """Commit, and keep that commit's metadata pages until :meth:`release_metadata_snap`.

        dm-thin's ``reserve_metadata_snap``: a reader outside the engine
        (:class:`fusepool.engine.view.CommittedView`) can then walk the commit
        on disk while the pool goes on changing.  Returns its superblock page (its slot
        is rewritten two commits later, while the pages it points at are held).
        """
        self.commit()
        self.store.hold()
        return self.store.superblock.pack()

    def release_metadata_snap(self) -> None:
        self.store.unhold()

    @property
    def failed(self) -> str | None:
        """Why the pool takes no changes (None while it is writable)."""
        return None if self.health is Health.WRITABLE else self.failure

    @property
    def needs_check(self) -> bool:
        return self.health is Health.NEEDS_CHECK

    def _fail(self, health: Health, reason: str) -> None:
        """Stop accepting changes (dm-thin's read-only mode); reads still work."""
        if self.health is Health.WRITABLE:
            log.error("pool %s is now read-only: %s", self.path, reason)
        self.health, self.failure = health, reason

    def _recover_metadata_full(self) -> None:
        """The metadata grew: a pool read-only only for lack of metadata space takes changes again."""
        if self.health is Health.METADATA_FULL:
            log.info("metadata extended: pool %s is writable again", self.path)
            self.health, self.failure = Health.WRITABLE, None

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
            return  # (the first cause is the one to report; a metadata-full one is superseded)
        self._fail(Health.NEEDS_CHECK, f"{reason}; the pool needs checking: {self._check_advice()}")
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
            raise self._data_flush_failed(exc) from None
        self.transaction.data_written = False

    def _data_flush_failed(self, exc: OSError) -> PoolError:
        self._fail_needs_check(f"flushing the data to {self.data.path} failed "
                               f"({exc.strerror or exc}): writes since the last commit may be lost")
        return PoolFailed(self.failed)

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

