"""The mount daemon: lifecycle of a mounted pool (after s3ql's ``mount()``).

Order: open the pool (takes its lock) -> check the mountpoint -> pyfuse3.init
-> in one trio nursery: the control socket, the commit timer, the signal
handler and ``pyfuse3.main`` -> tell the parent "ready" -> serve.  Leaving
(``fusepool umount``, SIGTERM/SIGINT, or the kernel unmounting us) cancels the
nursery, unmounts, commits and releases the lock, in that order.
"""

import errno
import logging
import os
import signal

import pyfuse3
import trio

from fusepool import commands
from fusepool.control import Held
from fusepool.control_server import ControlServer
from fusepool.engine import Pool
from fusepool.engine.space import run_hook
from fusepool.errors import InvalidArgument, NotMounted, PoolBusy, PoolError, UsageError
from fusepool.flushing import Flusher
from fusepool.fs import FusepoolOperations
from fusepool.fuse_errors import init_fuse
from fusepool.mounts import find_mount, lazy_unmount, unescape_mount_path  # noqa: F401

log = logging.getLogger(__name__)

LOOP_FUSE_WORKERS = 8  # requests served at once in loop mode (a FLUSH must not stall the rest)
DIRECT_FUSE_WORKERS = 16  # requests served at once in direct mode (2 x directio.IO_THREADS)
# Control commands that change a device's mappings or existence: in direct mode they
# wait for the writes in flight (dm-thin/LVM suspend a device to snapshot it).
QUIESCE_OPS = frozenset({"snapshot", "remove", "resize", "discard"})


def check_mountpoint(mountpoint: str, nonempty: bool = False) -> None:
    """A usable, empty-of-mounts directory; clear a dead FUSE mount left behind.

    A directory holding files is refused unless ``nonempty``: the mount would hide
    them (fuse 2's ``nonempty`` option; fuse 3 dropped the check, we keep it).
    """
    try:
        st = os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a daemon died and left its mount
            log.warning("clearing the stale FUSE mount at %s", mountpoint)
            lazy_unmount(mountpoint)
            st = os.stat(mountpoint)
        else:
            raise UsageError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        try:  # stat may come from the kernel's cache; readdir always asks the daemon
            os.listdir(mountpoint)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            log.warning("clearing the stale FUSE mount at %s", mountpoint)
            lazy_unmount(mountpoint)
        else:
            raise PoolBusy(f"{mountpoint} is already a mount point")
    del st
    if not nonempty:
        try:
            with os.scandir(mountpoint) as entries:
                hidden = next(entries, None)
        except OSError as exc:
            raise UsageError(f"mountpoint {mountpoint}: {exc.strerror}") from None
        if hidden is not None:
            raise InvalidArgument(f"mountpoint {mountpoint} is not empty (it holds {hidden.name!r}): "
                                  "mounting would hide its files; use --nonempty to mount anyway")


# The kernel caps FUSE read-ahead at 128 KiB; 1 MiB made sequential reads 1.6x faster
# (docs/performance.md).  Only root may raise it, through the mount's backing device info.
READ_AHEAD_KB = 1024


def mount_device(mountpoint: str) -> str | None:
    """``major:minor`` of the filesystem mounted at ``mountpoint``, from mountinfo.

    Read from /proc rather than by stat(), which would ask this very daemon
    before it serves requests.
    """
    entry = find_mount(mountpoint)
    return entry.device if entry else None


def raise_read_ahead(mountpoint: str, kib: int = READ_AHEAD_KB) -> None:
    device = mount_device(mountpoint)
    if device is None:
        return
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as exc:  # not root: the kernel default stays
        log.debug("read-ahead of %s stays at the kernel default: %s", mountpoint, exc)


def fsname_option(pool_dir: str) -> str:
    """The pool's path as a FUSE ``fsname`` option value (libfuse unescapes '\\' and ',')."""
    return pool_dir.replace("\\", "\\\\").replace(",", "\\,")


class Daemon:
    """Serves a pool: a FUSE mount on ``mountpoint``, or none (None: `fusepool serve`),
    and NBD exports if ``nbd`` is set; commands through the control socket either way."""

    def __init__(self, pool: Pool, mountpoint: str | None, commit_period: float,
                 no_space_timeout: float | None = None, writeback_cache: bool = True):
        self.pool = pool
        self.mountpoint = mountpoint
        self.commit_period = commit_period
        self.flusher = Flusher(pool)  # FLUSH/commit ordering, shared by FUSE and NBD
        self.ops = (None if mountpoint is None else
                    FusepoolOperations(pool, no_space_timeout, writeback_cache, self.flusher))
        self.nbd = None  # a fusepool.nbd.NbdServer, set by serve() / serve_nbd()
        self.cancel_scope: trio.CancelScope | None = None

    async def run(self, on_ready) -> None:
        async with trio.open_nursery() as nursery:
            self.cancel_scope = nursery.cancel_scope
            # Low-water hooks run as tasks here: never on the path serving FUSE, and free
            # to call back into this daemon (`fusepool extend POOL`).
            self.pool.on_low_water = lambda command, env: nursery.start_soon(run_hook, command, env)
            await nursery.start(self._serve_control)
            if self.nbd is not None:
                await nursery.start(self.nbd.serve)
            nursery.start_soon(self._commit_timer)
            nursery.start_soon(self._signals)
            if self.ops is None:  # no FUSE: serve until terminate() cancels the nursery
                on_ready()
                return
            nursery.start_soon(self._after_init)
            on_ready()
            await pyfuse3.main(max_tasks=self.fuse_workers())
            nursery.cancel_scope.cancel()  # the kernel unmounted us, or terminate()
            if self.ops.direct is not None:
                d = self.ops.direct
                log.info("direct I/O steps: %d inline, %d in worker threads (device latency %.0f µs)",
                         d.inline, d.threaded, d.latency * 1e6)

    def terminate(self) -> None:
        """Stop serving: unmount (the nursery ends when pyfuse3.main returns), or, with no
        FUSE mount, end the nursery; the pool is committed and closed after it."""
        if self.ops is not None:
            pyfuse3.terminate()
        else:
            self.cancel_scope.cancel()

    def fuse_workers(self) -> int:
        """How many requests pyfuse3 may serve at once.

        The engine serves one request at a time, but a FLUSH waits for its
        fdatasyncs in a worker thread, and with one worker nothing else would be
        read from /dev/fuse meanwhile: one volume's fsync would stall every other
        volume (tools/bench-concurrency: 0.38 of the other jobs' IOPS with one
        worker, 0.80 with eight; single-stream 4 KiB IOPS the same within noise,
        docs/performance.md).  In queue mode a write may wait for space, and in
        direct mode for the device: more workers still.
        """
        override = os.environ.get("FUSEPOOL_FUSE_WORKERS", "")  # (for tools/bench-concurrency)
        if override.isdigit() and int(override) > 0:
            return int(override)
        if self.ops.no_space_timeout > 0:
            return 64
        # Direct mode: requests wait for the device in worker threads, and others are
        # served meanwhile (fusepool.directio).
        return DIRECT_FUSE_WORKERS if self.ops.direct is not None else LOOP_FUSE_WORKERS

    async def _commit_timer(self) -> None:
        while True:
            await trio.sleep(self.commit_period)
            if self.pool.dirty and self.pool.failed is None:
                try:
                    await self.flusher.commit()
                except PoolError as exc:
                    log.error("periodic commit failed: %s", exc)

    async def _after_init(self) -> None:
        await self.ops.initialised.wait()
        raise_read_ahead(self.mountpoint)  # the INIT reply set it to at most 128 KiB

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal %d: %s", signum, "unmounting" if self.ops else "stopping")
                self.terminate()

    async def _serve_control(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await ControlServer(self.pool.path, self._dispatch).serve(task_status=task_status)

    async def _dispatch(self, op: str, args: dict):
        if op == "status":
            return {"pid": os.getpid(), "mountpoint": self.mountpoint, "pool": self.pool.path,
                    "writeback_cache": self.ops is not None and self.ops.enable_writeback_cache,
                    "nbd": self.nbd.bound if self.nbd is not None else []}
        if op == "stop":
            return self._stop(args)
        if op == "unmount":
            # Asked by mountpoint (fusepool umount MNT): refuse if it is not ours, so a
            # forged mount that names this pool cannot unmount it.
            if "mountpoint" in args and args["mountpoint"] != self.mountpoint:
                raise NotMounted(f"{args['mountpoint']} is not where pool {self.pool.path} is "
                                 f"mounted ({self.mountpoint})")
            busy = sum(d.open_count for d in self.pool.devices.values())
            if busy and not args.get("force"):
                raise PoolBusy(f"{self.mountpoint} is busy: {busy} open file handle(s) on its volumes")
            if self.pool.failed is None:
                try:  # commit before saying yes, so a failure can still be reported
                    self.pool.commit()
                except PoolError as exc:
                    if not args.get("force"):
                        raise PoolError(f"not unmounting {self.mountpoint}: {exc} (--force unmounts "
                                        "anyway and loses what is not committed)") from None
            pyfuse3.terminate()
            return {"pid": os.getpid()}
        if op == "reserve_metadata_snap":
            return await self._reserve_metadata_snap()
        if op == "check":
            from fusepool.check import check_pool

            if self.pool.failed is None:  # (a failed pool's memory is not to be committed)
                self.pool.commit()  # check what is in memory, as committed
            return check_pool(self.pool.path).to_json()
        # No cache invalidation here: directory entries are not cached (entry_timeout 0),
        # and a kernel invalidation blocks in the kernel while a request is pending; a
        # daemon killed in that window could not exit (seen in the kill tests).
        if op in QUIESCE_OPS:
            async with self.flusher.quiesced():  # (every device: these commands are rare)
                return commands.run(self.pool, op, args)
        return commands.run(self.pool, op, args)


    def _stop(self, args: dict) -> dict:
        """`fusepool stop POOL`: whichever way the daemon serves (FUSE, NBD, both).

        As `umount`: refused while volumes are open (FUSE handles, NBD clients)
        unless forced, and the pool is committed before saying yes, so a failure
        can still be reported.
        """
        busy = sum(d.open_count for d in self.pool.devices.values())
        what = self.mountpoint or f"pool {self.pool.path}"
        if busy and not args.get("force"):
            raise PoolBusy(f"{what} is busy: {busy} open handle(s) or NBD client(s) on its volumes "
                           "(--force stops anyway)")
        if self.pool.failed is None:
            try:
                self.pool.commit()
            except PoolError as exc:
                if not args.get("force"):
                    raise PoolError(f"not stopping: {exc} (--force stops anyway and loses what "
                                    "is not committed)") from None
        if self.ops is not None:
            self.terminate()  # (pyfuse3.main returns later: the reply goes out first)
            return {"pid": os.getpid()}
        # Ending the nursery now would cut this very reply: end it once the client has it.
        return Held({"pid": os.getpid()}, self.terminate)

    async def _reserve_metadata_snap(self):
        """Commit and hold that commit for a reader (see fusepool.engine.view).

        A failed pool's memory may be ahead of its last commit, and is never
        committed: the reader is told to ask the daemon to walk it instead.
        """
        if self.pool.failed is not None:
            return {"transaction": None}
        await self.flusher.commit()  # (its I/O in a worker thread)
        superblock = self.pool.reserve_metadata_snap()  # nothing changed since: no commit
        open_counts = {str(d.dev_id): d.open_count for d in self.pool.devices.values()
                       if d.open_count}
        return Held({"transaction": self.pool.transaction_id, "superblock": superblock.hex(),
                     "open_counts": open_counts}, self.pool.release_metadata_snap)


def serve(pool_dir: str, mountpoint: str, commit_period: float = 1.0, on_ready=None,
          allow_other: bool = False, debug_fuse: bool = False,
          no_space_timeout: float | None = None, writeback_cache: bool = True,
          nonempty: bool = False, nbd: list[str] | None = None, nbd_read_only: bool = False) -> None:
    """Mount ``pool_dir`` on ``mountpoint`` and serve until unmounted.

    ``writeback_cache`` (the default, ``mount --write-through`` turns it off): the
    kernel caches writes, as it does for a kernel thin volume's block device.
    ``nbd``: also serve the volumes over NBD on these addresses (unix:PATH, tcp:HOST:PORT).
    """
    mountpoint = os.path.realpath(mountpoint)  # as mountinfo will show it
    pool = Pool.open(pool_dir)
    try:
        check_mountpoint(mountpoint, nonempty)
        daemon = Daemon(pool, mountpoint, commit_period, no_space_timeout, writeback_cache)
        if nbd:  # (listening before the mount: a bad address fails with one line)
            daemon.nbd = nbd_server(daemon, nbd, nbd_read_only, no_space_timeout)
        # The mount's source names its pool (`fusepool umount` reads it from mountinfo and
        # then asks that pool's daemon; see cli.find_mount).  default_permissions: the kernel
        # checks each access against the volume's mode and owner (what makes --allow-other
        # safe: volumes are 0600 unless chmodded).
        options = set(pyfuse3.default_options) | {f"fsname={fsname_option(pool.path)}",
                                                   "subtype=fusepool", "default_permissions"}
        if allow_other:
            options.add("allow_other")
        if debug_fuse:
            options.add("debug")
        try:
            init_fuse(daemon.ops, mountpoint, options)  # a failure: one line naming cause and fix
            try:
                trio.run(daemon.run, on_ready or (lambda: None))
            finally:
                pyfuse3.close(unmount=True)
        finally:
            if daemon.nbd is not None:
                daemon.nbd.close()
    finally:
        pool.close()
    log.info("unmounted %s; pool %s committed at transaction %d", mountpoint, pool.path,
             pool.transaction_id)


def nbd_server(daemon: Daemon, addresses: list[str], read_only: bool,
               no_space_timeout: float | None = None):
    """The daemon's NBD server, sharing its FLUSH/commit ordering (addresses checked here,
    before anything is served: a usage error is one line)."""
    from fusepool.nbd import NbdServer, parse_address

    server = NbdServer(daemon.pool, daemon.flusher, [parse_address(a) for a in addresses],
                       read_only, no_space_timeout)
    server.bind()
    return server


def serve_nbd(pool_dir: str, nbd: list[str], commit_period: float = 1.0, on_ready=None,
              read_only: bool = False, no_space_timeout: float | None = None) -> None:
    """`fusepool serve`: the pool's volumes over NBD, with no FUSE mount (no /dev/fuse needed).

    The same lifecycle as a mount's: the pool is opened (locked), the control
    socket, the commit timer and the signal handler run in one nursery with the
    NBD server; `fusepool stop POOL` or SIGTERM/SIGINT cancel it, and the pool is
    committed and closed.
    """
    if not nbd:
        raise UsageError("serve needs --nbd unix:PATH or --nbd tcp:[HOST:]PORT")
    pool = Pool.open(pool_dir)
    try:
        daemon = Daemon(pool, None, commit_period, no_space_timeout)
        daemon.nbd = nbd_server(daemon, nbd, read_only, no_space_timeout)
        try:
            trio.run(daemon.run, on_ready or (lambda: None))
        finally:
            daemon.nbd.close()
    finally:
        pool.close()
    log.info("stopped serving pool %s; committed at transaction %d", pool.path, pool.transaction_id)
