"""FLUSH and commit ordering, and direct mode's I/O driver, shared by every front end
of one daemon (FUSE, NBD).

One ``Flusher`` per daemon: its ``lock`` (a fair ``trio.Lock``) lets FLUSHes and
the daemon's commits run one at a time, in arrival order, whoever asked (a
FUSE fsync, an NBD FLUSH or FUA write, the commit timer), so journal records
land in the order their mappings were taken (docs/design.md, "Await points").
The engine's FLUSH makes every write the daemon has received durable, whichever
front end or connection it came through.  In direct mode ``direct`` (one
:class:`fusepool.directio.DirectIO`) is the one way both front ends read and
write, so its bio prison and pins see every request.
"""

import os
from contextlib import asynccontextmanager

import trio

from fusepool.directio import DirectIO
from fusepool.engine import Pool


class Flusher:
    def __init__(self, pool: Pool):
        self.pool = pool
        self.lock = trio.Lock()
        self.direct: DirectIO | None = None
        if pool.data.direct:
            # (FUSEPOOL_DIRECT_INLINE_US=0: every I/O step in a thread; tests, tools/bench)
            inline_us = os.environ.get("FUSEPOOL_DIRECT_INLINE_US", "")
            self.direct = (DirectIO(pool, inline_below=int(inline_us) / 1e6) if inline_us.isdigit()
                           else DirectIO(pool))

    @asynccontextmanager
    async def quiesced(self, dev_id: int | None = None):
        """Direct mode: no write of ``dev_id`` (None: of any device) in flight inside."""
        if self.direct is None:
            yield
        else:
            async with self.direct.quiesce(dev_id):
                yield

    async def flush(self) -> None:
        """dm-thin's FLUSH: every write received so far is durable when this returns.

        Its two fdatasyncs run in a worker thread, so other requests go on
        meanwhile (see Pool.prepare_sync for why that is safe).
        """
        async with self.lock:
            await self.run_flush_job(self.pool.prepare_sync())

    async def run_flush_job(self, job) -> None:
        """Run a prepared FLUSH's blocking I/O in a worker thread, then finish it here."""
        if job is not None:
            await trio.to_thread.run_sync(self.pool.run_sync, job)
            self.pool.finish_sync(job)

    async def commit(self) -> None:
        """A commit whose fdatasyncs and metadata writes run in a worker thread.

        Requests go on meanwhile; their changes belong to the next commit (see
        Pool.prepare_commit).  A commit that could meet a full host filesystem
        (pages without reserved host space) runs here instead, where a failure
        can still be undone and the pool stay writable.
        """
        async with self.lock:
            job = self.pool.prepare_commit()
            if job is None:
                return
            if self.pool.store.write_is_reserved(job.write):
                await trio.to_thread.run_sync(self.pool.run_commit, job)
                self.pool.finish_commit(job)
            else:
                self.pool.run_commit(job)
                self.pool.finish_commit(job, undo=True)
