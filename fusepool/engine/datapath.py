"""The data path: read, write and discard of a device's blocks.

A room of :class:`fusepool.engine.Pool`.  A write is plan -> I/O -> apply:
every block's fate is decided (and data blocks allocated) touching no mapping,
then the data is written (one pwritev per physically contiguous run), and only
then do sizes and mappings change, so a failed write leaves no trace.

In loop mode the three steps run in one call (:meth:`DataPath.read`,
:meth:`DataPath.write`): the page cache answers faster than a thread
hand-off.  In direct mode (O_DIRECT) the caller runs them apart, the I/O in a
worker thread (fusepool.directio): :meth:`DataPath.plan_read` /
:meth:`DataPath.run_read` / :meth:`DataPath.finish_read`, and
:meth:`DataPath.prepare_write` / :meth:`DataPath.run_write` /
:meth:`DataPath.finish_write`.  The run steps touch only the data store and
the job; the others run on the event loop.  Between them, data blocks under
I/O are *pinned* (freed meanwhile, they are not reused, even past a commit)
and blocks a write allocated are *reserved* (a commit meanwhile stores them
free).  Writes to the same block must not overlap (the caller's bio prison).
"""

import logging
import time as wallclock
from dataclasses import dataclass, field

from fusepool.engine.device import (
    Device,
)
from fusepool.errors import (
    InvalidArgument,
    MetadataFull,
    PoolError,
    PoolFull,
)
from fusepool.metadata.format import (
    FANOUT,
    MAX_VOLUME_SIZE,
    TIME_BITS,
    TIME_MASK,
    UNMAPPED,
)
from fusepool.metadata.tree import LeafCursor, Tree, WritableLeafCursor, height_for

log = logging.getLogger(__name__)


@dataclass
class WritePlan:
    """What a write will do, decided before any of it is done."""

    io: list[tuple[int, object]] = field(default_factory=list)  # (byte in the data image, buffer)
    remap: list[tuple[int, int]] = field(default_factory=list)  # (virtual block, data block or UNMAPPED)
    allocated: list[int] = field(default_factory=list)  # data blocks taken for it (undone on failure)
    maybe_zero: list[tuple[int, int]] = field(default_factory=list)  # exclusive blocks maybe all zeros now
    written: int = 0  # bytes of the write the plan covers (less than asked: the pool filled up)
    # Direct mode's job (prepare_write -> run_write -> finish_write):
    deferred: bool = False  # allocations are reserved, copies are read in run_write
    dev: Device | None = None
    offset: int = 0
    grow: bool = True  # False: a zero-filled tail, the size stays (see tail_zeros)
    in_place: bool = False  # one overwrite in place, nothing to remap
    pinned: list[int] = field(default_factory=list)  # mapped data blocks under I/O
    copies: list["Copy"] = field(default_factory=list)
    ran: bool = False  # run_write is over
    error: Exception | None = None  # what run_write met (raised by finish_write)


@dataclass
class Copy:
    """A copy-on-write in a deferred plan: read ``src``, patch ``piece`` in at ``lo``."""

    vb: int
    src: int  # the shared data block copied (pinned)
    lo: int
    piece: object
    size: int  # the block size
    zero: bool  # the piece is zeros and zero detection is on: all zeros unmaps instead
    remap_index: int = -1  # its (vb, new) in WritePlan.remap
    became_zero: bool = False

    def __len__(self) -> int:
        return self.size


@dataclass
class ReadJob:
    """A planned read: (data position, length) runs and zero fills, in order."""

    segments: list = field(default_factory=list)
    pinned: list[int] = field(default_factory=list)


class DataPath:
    """read/write/discard (a room of Pool)."""


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
        cursor = LeafCursor(dev.root)
        parts: list = []
        run_pos = run_len = 0  # a pending run of physically contiguous mapped bytes
        vb = offset // bs
        pos = offset
        while pos < end:
            lo = pos - vb * bs
            hi = min(end - vb * bs, bs)
            entry = cursor.entry(vb)
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
        if offset + length > MAX_VOLUME_SIZE:
            raise InvalidArgument(f"write beyond the largest volume size ({MAX_VOLUME_SIZE} bytes)")
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)  # startswith below needs the object itself
        if self._overwrite_in_place(dev, offset, data):
            return length
        if offset > dev.size:
            self._zero_tail(dev)
        plan = self._plan_write(dev, offset, data)
        self._write_planned(plan)
        self._apply_write(dev, offset, plan)
        return plan.written

    def _overwrite_in_place(self, dev: Device, offset: int, data) -> bool:
        """The common case, taken first: a write inside one block the volume owns.

        False: not that case.
        """
        block = self._in_place_block(dev, offset, data)
        if block < 0:
            return False
        bs = self.block_size
        self.transaction.data_written = True
        try:
            self.data.write_one(block * bs + offset % bs, data)
        except OSError as exc:
            raise self._data_write_error(exc) from None
        dev.mtime = wallclock.time()
        return True

    def _in_place_block(self, dev: Device, offset: int, data) -> int:
        """The data block a write inside one block the volume owns goes to, or -1.

        The same tests as the in-place case of :meth:`_plan_write`; with zero
        detection, all-zero data goes the long way.
        """
        bs = self.block_size
        end = offset + len(data)
        vb = offset // bs
        if (end > dev.size or (end - 1) // bs != vb
                or (self.config.zero_detection
                    and data.startswith(memoryview(self.zero_block)[: end - offset]))):
            return -1
        leaf = Tree.leaf(dev.root, vb // FANOUT)
        entry = leaf.entries[vb % FANOUT] if leaf is not None else UNMAPPED
        block = entry >> TIME_BITS
        if (entry == UNMAPPED or self.space.counts[block] != 1 or entry & TIME_MASK < dev.snap_time
                or Tree.leaf_is_shared(dev.root, vb // FANOUT)):
            return -1
        return block

    def _plan_write(self, dev: Device, offset: int, data, defer: bool = False) -> WritePlan:
        """Decide every block's fate and allocate, touching no mapping."""
        bs = self.block_size
        end = offset + len(data)
        view = memoryview(data)
        zeros = memoryview(self.zero_block)
        detect = self.config.zero_detection
        zeroing = not self.config.skip_block_zeroing
        counts = self.space.counts
        snap_time = dev.snap_time
        cursor = LeafCursor(dev.root, with_sharing=True)
        plan = WritePlan(deferred=defer)
        copy = None
        vb = offset // bs
        pos = offset
        while pos < end:
            lo = pos - vb * bs
            hi = min(end - vb * bs, bs)
            piece = view[pos - offset : pos - offset + hi - lo]
            entry = cursor.entry(vb)
            block = entry >> TIME_BITS
            whole = hi - lo == bs
            # In place, no copy: a memoryview compared with bytes goes byte by byte.
            # Without zero detection zeros are data (dm-thin provisions them too).
            zero = detect and not piece[0] and data.startswith(zeros[: hi - lo], pos - offset)
            if entry == UNMAPPED:
                if zero:  # unmapped blocks read as zeros already: nothing to store
                    plan.written += hi - lo
                    pos = (vb + 1) * bs
                    vb += 1
                    continue
                buf = piece if whole else None
            elif zero and whole:
                self._plan_unmap(plan, vb)
                buf = False
            elif not cursor.shared and counts[block] == 1 and entry & TIME_MASK >= snap_time:
                # Exclusive: overwrite in place.  dm-thin's time rule (mapped before the
                # last snapshot => shared) also covers sharing that only the last *commit*
                # still has, so a crash can never show this write in a snapshot.
                plan.io.append((block * bs + lo, piece))
                if zero and hi == bs:  # zeros ending a block: it may be all zeros now
                    plan.maybe_zero.append((vb, block))
                if defer:
                    self.space.pin(block)
                    plan.pinned.append(block)
                buf = False
            elif whole:  # shared, and all of it rewritten: nothing to copy
                buf = piece
            elif defer:  # shared: the copy is read in run_write, off the event loop
                buf = copy = Copy(vb, block, lo, piece, bs, zero)
            else:  # shared: copy the block, unless the copy would be all zeros
                try:
                    buf = bytearray(self.data.read(block, 0, bs))
                except PoolError:  # a read error (EIO): this write fails, nothing changed
                    self._undo_plan(plan)
                    raise
                buf[lo:hi] = piece
                if zero and buf == self.zero_block:
                    self._plan_unmap(plan, vb)
                    buf = False
            if buf is not False:
                try:
                    if not plan.remap and not plan.allocated:
                        self._ensure_metadata_room()
                    new = self.space.allocate() if self.space.free else self._allocate_grown()
                except (PoolFull, MetadataFull):
                    if not plan.written:
                        self._undo_plan(plan)
                        raise
                    break
                if defer:
                    self.space.reserve(new)
                plan.allocated.append(new)
                if copy is not None:
                    self.space.pin(copy.src)
                    plan.pinned.append(copy.src)
                    copy.remap_index = len(plan.remap)
                    plan.copies.append(copy)
                    copy = None
                if buf is not None:
                    plan.io.append((new * bs, buf))
                elif zeroing and not self.data.is_hole(new):
                    buf = bytearray(bs)
                    buf[lo:hi] = piece
                    plan.io.append((new * bs, buf))
                else:  # a hole (never written, or punched) reads as zeros; or skip_block_zeroing
                    plan.io.append((new * bs + lo, piece))
                plan.remap.append((vb, new))
            plan.written += hi - lo
            pos = (vb + 1) * bs
            vb += 1
        return plan

    def _plan_unmap(self, plan: WritePlan, vb: int) -> None:
        if not plan.remap and not plan.allocated:
            self._ensure_metadata_room()
        plan.remap.append((vb, UNMAPPED))

    def _write_planned(self, plan: WritePlan) -> None:
        """The I/O: one pwritev per physically contiguous run; on failure, nothing changed."""
        try:
            self.transaction.data_written = True
            self._write_runs(plan.io)
            bs = self.block_size
            for vb, block in plan.maybe_zero:  # (the kernel splits zero writes at page boundaries)
                if self.data.read(block, 0, bs) == self.zero_block:
                    plan.remap.append((vb, UNMAPPED))
        except OSError as exc:
            self._undo_allocations(plan.allocated)
            raise self._data_write_error(exc) from None
        except PoolError:  # a read failed (DataReadError): nothing remapped
            self._undo_allocations(plan.allocated)
            raise

    def _apply_write(self, dev: Device, offset: int, plan: WritePlan) -> None:
        """Only now do size and mappings change (no I/O can fail after this point)."""
        if offset + plan.written > dev.size:
            self._grow_device(dev, offset + plan.written)
        if plan.remap:
            self._remap(dev, plan.remap)
        dev.mtime = wallclock.time()
        if self.space.free < self.space_watch:  # the one space check per write: see _space_low
            self._space_low()

    def _undo_allocations(self, blocks: list[int]) -> None:
        for block in blocks:
            self.space.unallocate(block)

    def _undo_plan(self, plan: WritePlan) -> None:
        """Give back what a plan took: its allocations (reserved ones too) and pins."""
        if plan.deferred:
            for block in plan.allocated:
                self.space.unreserve(block)
        else:
            self._undo_allocations(plan.allocated)
        plan.allocated = []
        self._unpin(plan.pinned)

    def _unpin(self, blocks: list[int]) -> None:
        unpin = self.space.unpin
        for block in blocks:
            unpin(block)
        blocks.clear()

    # --- direct mode: the same in steps, the I/O in a worker thread -----------------------

    def plan_read(self, dev_id: int, offset: int, length: int) -> ReadJob:
        """On the loop: the runs :meth:`run_read` will read; their blocks are pinned.

        The caller must :meth:`finish_read` the job, whatever happens.
        """
        dev = self.device(dev_id)
        if offset < 0 or length < 0:
            raise InvalidArgument("negative offset or length")
        job = ReadJob()
        end = min(offset + length, dev.size)
        bs = self.block_size
        zero = memoryview(self.zero_block)
        cursor = LeafCursor(dev.root)
        segments, pinned, pin = job.segments, job.pinned, self.space.pin
        run_pos = run_len = 0
        vb = offset // bs
        pos = offset
        while pos < end:
            lo = pos - vb * bs
            hi = min(end - vb * bs, bs)
            entry = cursor.entry(vb)
            if entry == UNMAPPED:
                if run_len:
                    segments.append((run_pos, run_len))
                    run_len = 0
                segments.append(zero[: hi - lo])
            else:
                block = entry >> TIME_BITS
                pin(block)
                pinned.append(block)
                phys = block * bs + lo
                if run_len and run_pos + run_len == phys:
                    run_len += hi - lo
                else:
                    if run_len:
                        segments.append((run_pos, run_len))
                    run_pos, run_len = phys, hi - lo
            pos = (vb + 1) * bs
            vb += 1
        if run_len:
            segments.append((run_pos, run_len))
        return job

    def run_read(self, job: ReadJob) -> bytes:
        """In a worker thread: the reads (DataReadError on a media error)."""
        read = self.data.read
        parts = [read(0, *seg) if isinstance(seg, tuple) else seg for seg in job.segments]
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    def finish_read(self, job: ReadJob) -> None:
        """On the loop: the blocks read may be reused once freed."""
        self._unpin(job.pinned)

    def needs_reading(self, job: ReadJob) -> bool:
        """Whether a read job reads the data at all (all holes: no thread needed)."""
        return bool(job.pinned)

    def tail_zeros(self, dev_id: int, offset: int) -> tuple[int, int] | None:
        """Before a write at ``offset`` past the end in steps: the (offset, length) of
        the zeros to write first over the rest of the last block (see _zero_tail),
        written with ``prepare_write(..., grow=False)``; None if none."""
        dev = self.device(dev_id)
        bs = self.block_size
        tail = dev.size % bs
        if offset <= dev.size or not tail:
            return None
        leaf = Tree.leaf(dev.root, dev.size // bs // FANOUT)
        if leaf is None or leaf.entries[dev.size // bs % FANOUT] == UNMAPPED:
            return None
        return dev.size, bs - tail

    def prepare_write(self, dev_id: int, offset: int, data, grow: bool = True) -> WritePlan:
        """On the loop: decide and allocate (reserved), pin the blocks under I/O.

        The caller holds the cells of every virtual block the write touches,
        has written :meth:`tail_zeros` first, runs :meth:`run_write` and then
        :meth:`finish_write`, or :meth:`abandon_write` if run_write never ran.
        """
        dev = self.device(dev_id)
        self._check_writable()
        if offset < 0:
            raise InvalidArgument("negative offset")
        if offset + len(data) > MAX_VOLUME_SIZE:
            raise InvalidArgument(f"write beyond the largest volume size ({MAX_VOLUME_SIZE} bytes)")
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        block = self._in_place_block(dev, offset, data) if data else -1
        if block >= 0:
            self.space.pin(block)
            plan = WritePlan(io=[(block * self.block_size + offset % self.block_size, data)],
                             written=len(data), deferred=True, in_place=True, pinned=[block])
        elif data:
            plan = self._plan_write(dev, offset, data, defer=True)
        else:
            plan = WritePlan(deferred=True)
        plan.dev, plan.offset, plan.grow = dev, offset, grow
        return plan

    def run_write(self, plan: WritePlan) -> None:
        """In a worker thread: the copies' reads, the writes, the zero check.

        Touches only the data store and the plan; an error is kept in the plan.
        """
        try:
            io = plan.io
            if plan.copies:
                io = []
                for pos, buf in plan.io:
                    if isinstance(buf, Copy):
                        block = bytearray(self.data.read(buf.src, 0, buf.size))
                        block[buf.lo : buf.lo + len(buf.piece)] = buf.piece
                        if buf.zero and block == self.zero_block:
                            buf.became_zero = True  # unmapped instead (finish_write)
                            continue
                        buf = block
                    io.append((pos, buf))
            self._write_runs(io)
            bs = self.block_size
            for vb, block in plan.maybe_zero:
                if self.data.read(block, 0, bs) == self.zero_block:
                    plan.remap.append((vb, UNMAPPED))
        except (OSError, PoolError) as exc:
            plan.error = exc
        finally:
            plan.ran = True

    def finish_write(self, plan: WritePlan) -> int:
        """On the loop: apply the mappings (or undo, and raise what run_write met)."""
        try:
            if plan.io:
                self.transaction.data_written = True  # (now: a FLUSH from here on covers it)
            if plan.error is not None:
                self._undo_plan(plan)
                if isinstance(plan.error, OSError):
                    raise self._data_write_error(plan.error) from None
                raise plan.error
            dev = plan.dev
            if plan.in_place:
                dev.mtime = wallclock.time()
                return plan.written
            for copy in plan.copies:
                if copy.became_zero:
                    plan.remap[copy.remap_index] = (copy.vb, UNMAPPED)
            mapped = {new for _vb, new in plan.remap if new != UNMAPPED}
            for block in plan.allocated:
                if block in mapped:
                    self.space.claim_reserved(block)
                else:
                    self.space.unreserve(block)
            if not plan.grow:
                plan.written = min(plan.written, max(dev.size - plan.offset, 0))
            self._apply_write(dev, plan.offset, plan)
            return plan.written
        finally:
            self._unpin(plan.pinned)

    def abandon_write(self, plan: WritePlan) -> None:
        """A prepared write whose run_write never ran (cancelled): nothing happened."""
        self._undo_plan(plan)

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
        cursor = WritableLeafCursor(self.tree, dev.root, height_for(self._blocks_for(dev.size)))
        stamp = self.time & TIME_MASK
        unsynced = self.transaction.remapped_blocks(dev.dev_id)
        for vb, new in changes:
            unsynced.add(vb)
            leaf = cursor.leaf_for(vb)
            dev.root = cursor.root
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

