"""Direct mode's data path off the event loop: the bio prison and the I/O threads.

In direct mode (O_DIRECT) every read and write waits for the device, so the
daemon runs each as dm-thin does: *plan* on the event loop (mapping lookups,
allocation: the engine's plan_read / prepare_write), the *I/O* in a worker
thread (run_read / run_write: only the data store is touched), *apply* on the
loop again (finish_read / finish_write).  Requests to different blocks
overlap; the engine stays synchronous and every engine call stays atomic.

- :class:`Prison` (dm-thin's bio prison): a write holds a cell per virtual
  block it touches, from plan to apply, taken in ascending order (no
  deadlock), so two writes to one block never interleave (two partial-block
  copies-on-write would each copy the old block and lose one piece; two
  unaligned O_DIRECT writes would read-modify-write one edge sector).  Reads
  take no cell: a read racing a write sees either, as on a disk.
- Quiesce (dm-thin/LVM suspend the origin to snapshot it): commands that
  change a device's mappings or existence (snapshot, remove, resize, discard)
  wait until its writes in flight are done, and hold new ones back meanwhile.
- Pins (in the engine's space map) keep a data block under I/O from being
  reused if it is freed meanwhile, even past a commit.

Loop mode does not come here: the page cache answers faster than the 60-110 µs
a thread hand-off costs.  Neither does a direct-mode device that answers as
fast (a VM disk backed by the host's cache: 4 KiB O_DIRECT in ~50 µs here,
where threads halved the IOPS, docs/performance.md): the I/O step runs inline
on the loop while the device's latency (the shortest of the last 8 inline I/O
steps, requests of up to 64 KiB) is below ``INLINE_BELOW``, and in
a worker thread once it is above; then one request every ``PROBE_EVERY``
seconds, when no thread is busy, runs inline to see whether the device got
fast again (a step timed in a thread, or next to one, would count its wait
for the GIL).  Larger requests always go to a thread.  Inline or not, the steps, cells and
pins are the same.
"""

import time
from collections import deque
from contextlib import asynccontextmanager

import trio

from fusepool.engine import Pool

IO_THREADS = 8  # data I/O in worker threads at once
INLINE_BELOW = 250e-6  # seconds: below this device latency the I/O step runs inline (measured crossover)
LATENCY_SAMPLES = 8  # inline steps the latency is the minimum of
PROBE_EVERY = 0.25  # seconds between inline steps while the device is slow
SMALL = 64 << 10  # bytes: larger steps always run in a thread (and are not timed)


class Prison:
    """Per (device, virtual block) cells for writes, and per-device quiesce."""

    def __init__(self):
        self.cells: dict[tuple[int, int], trio.Event] = {}  # held cell -> set on release
        self.inflight: dict[int, int] = {}  # dev_id -> writes inside the prison
        self.total = 0
        self.draining: dict[int | None, int] = {}  # dev_id (None: every device) -> quiesces
        self.changed = trio.Event()  # a write left, or a quiesce ended

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    @asynccontextmanager
    async def cells_of(self, dev_id: int, blocks):
        """Hold the cells of ``blocks`` (virtual blocks of ``dev_id``) for a write."""
        while self.draining.get(dev_id) or self.draining.get(None):
            await self.changed.wait()
        self.inflight[dev_id] = self.inflight.get(dev_id, 0) + 1
        self.total += 1
        taken = []
        try:
            for vb in sorted(blocks):  # ascending: two writes never wait on each other
                key = (dev_id, vb)
                while key in self.cells:
                    await self.cells[key].wait()
                self.cells[key] = trio.Event()
                taken.append(key)
            yield
        finally:
            for key in taken:
                self.cells.pop(key).set()
            n = self.inflight[dev_id] - 1
            if n:
                self.inflight[dev_id] = n
            else:
                del self.inflight[dev_id]
            self.total -= 1
            self._notify()

    @asynccontextmanager
    async def quiesce(self, dev_id: int | None = None):
        """Wait until ``dev_id`` (None: every device) has no write in flight; hold new
        ones back until the block ends (run the command synchronously inside it)."""
        self.draining[dev_id] = self.draining.get(dev_id, 0) + 1
        try:
            while self.total if dev_id is None else self.inflight.get(dev_id):
                await self.changed.wait()
            yield
        finally:
            n = self.draining[dev_id] - 1
            if n:
                self.draining[dev_id] = n
            else:
                del self.draining[dev_id]
            self._notify()


class DirectIO:
    """Reads and writes of a direct-mode pool, their I/O in worker threads."""

    def __init__(self, pool: Pool, threads: int = IO_THREADS, inline_below: float = INLINE_BELOW):
        self.pool = pool
        self.prison = Prison()
        self.limiter = trio.CapacityLimiter(threads)
        self.inline_below = inline_below
        # The device's latency: the shortest of the last inline steps (seconds).  Noise
        # (a descheduled process, a thread holding the GIL) only ever adds to a step.
        self.samples: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.latency = 0.0
        self.next_probe = 0.0  # while slow: when to run a step inline again (trio clock)
        self.inline = self.threaded = 0  # I/O steps run each way (for tests and tools)

    async def _io(self, step, job, nbytes: int):
        if nbytes > SMALL or self.latency >= self.inline_below:
            now = trio.current_time()
            # A probe times a small step inline, and only while no thread runs: a thread
            # holding the GIL when the syscall returns would count in its duration.
            if (nbytes > SMALL or now < self.next_probe or self.limiter.borrowed_tokens
                    or self.latency < self.inline_below):
                self.threaded += 1
                return await trio.to_thread.run_sync(step, job, limiter=self.limiter)
            self.next_probe = now + PROBE_EVERY
        self.inline += 1
        start = time.perf_counter()
        try:
            return step(job)
        finally:
            self.samples.append(time.perf_counter() - start)
            self.latency = min(self.samples)

    async def read(self, dev_id: int, offset: int, length: int) -> bytes:
        pool = self.pool
        job = pool.plan_read(dev_id, offset, length)
        try:
            if not pool.needs_reading(job):  # holes only: nothing to wait for
                return pool.run_read(job)
            return await self._io(pool.run_read, job, length)
        finally:
            pool.finish_read(job)

    async def write(self, dev_id: int, offset: int, data) -> int:
        pool = self.pool
        if not len(data):
            pool.device(dev_id)
            return 0
        bs = pool.block_size
        while True:
            dev = pool.device(dev_id)
            blocks = set(range(offset // bs, (offset + len(data) - 1) // bs + 1))
            tail = dev.size // bs if offset > dev.size else None
            if tail is not None:
                blocks.add(tail)  # its rest is zeroed first (see DataPath.tail_zeros)
            async with self.prison.cells_of(dev_id, blocks):
                if offset > dev.size and dev.size // bs not in blocks:
                    continue  # the volume grew meanwhile: another last block; again
                zeros = pool.tail_zeros(dev_id, offset)
                if zeros is not None:
                    await self._run(pool.prepare_write(dev_id, zeros[0], bytes(zeros[1]), grow=False))
                return await self._run(pool.prepare_write(dev_id, offset, data))

    async def _run(self, plan) -> int:
        pool = self.pool
        try:
            if plan.io or plan.maybe_zero:
                await self._io(pool.run_write, plan, plan.written or len(plan.io))
            else:
                plan.ran = True
        finally:
            if not plan.ran:  # cancelled before the thread started: nothing was written
                pool.abandon_write(plan)
        return pool.finish_write(plan)

    def quiesce(self, dev_id: int | None = None):
        return self.prison.quiesce(dev_id)
