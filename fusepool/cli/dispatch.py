"""Where a command runs: through the mount daemon, or on the pool opened here.

This is the CLI's one online/offline branch point; no handler asks whether the
pool is mounted.  When it is, its daemon owns it: commands travel over the
control socket, volume data goes through the mount, and the kernel's writeback
cache is flushed where a command must see every write.  When it is not, the CLI
opens the pool itself (under its lock) and runs the same code,
:func:`fusepool.commands.run`, in-process.

- :func:`call` runs one command either way (the daemon is tried first, so a
  mounted pool costs one round trip);
- :func:`connect` gives a session (:class:`Online` or :class:`Offline`) for the
  commands that are more than one request (``snapshot``, ``resize``,
  ``discard``, ``export``, ``import``, ``info``, ``repair``): the same methods
  whichever way the pool is reachable."""

import contextlib
import os

from fusepool import control
from fusepool.errors import InvalidArgument, PoolError

_NO_DAEMON = (FileNotFoundError, ConnectionRefusedError)


def require_pool(pool_dir: str):
    """The pool's config (a clear "not a pool" error otherwise)."""
    from fusepool.config import PoolConfig

    return PoolConfig.load(os.path.abspath(pool_dir))


def daemon_status(pool_dir: str) -> dict | None:
    """The daemon's status, or None if none answers within 5 s (``mount``'s "already
    mounted" check; commands use :func:`call` or :func:`connect`)."""
    try:
        return control.request(pool_dir, "status", timeout=5)
    except (OSError, PoolError):
        return None


def call(pool_dir: str, op: str, args: dict | None = None, output=None, offline=None):
    """Run pool command ``op`` online (through the daemon) or offline (directly).

    A command that streams its output (``dump``) writes it to ``output``, a
    binary file object, and returns the rest of its result.  ``offline``: what
    to run instead of opening the pool when no daemon answers (``check`` reads
    the pool's files its own tolerant way).
    """
    pool_dir = os.path.abspath(pool_dir)
    require_pool(pool_dir)
    try:
        if op in control.SNAPSHOT_OPS:  # walked here, on a commit the daemon holds for us
            from fusepool.reporting import run_on_snapshot

            return run_on_snapshot(pool_dir, op, args or {}, output=output)
        return control.request(pool_dir, op, args or {}, output=output)
    except _NO_DAEMON:
        pass  # no daemon: open the pool ourselves
    if offline is not None:
        return offline()
    with Offline(pool_dir) as session:
        return session.call(op, args, output)


@contextlib.contextmanager
def connect(pool_dir: str):
    """An :class:`Online` or :class:`Offline` session on the pool, for the commands that
    differ beyond "where does the request go": volume data, or the kernel's cache.

    Nothing is opened before the session is first used, so a command can check
    its arguments (knowing ``session.mountpoint``) before it takes the pool's lock.
    A daemon that exists but does not answer is an error, as for :func:`call`
    (not a reason to try the pool's lock).
    """
    pool_dir = os.path.abspath(pool_dir)
    require_pool(pool_dir)
    try:
        status = control.request(pool_dir, "status")
    except _NO_DAEMON:
        status = None
    with Online(pool_dir, status) if status else Offline(pool_dir) as session:
        yield session


def fsync_path(path: str) -> None:
    """fsync one file, also when its mode lets us only write it (a volume ``chmod 200``)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:  # fsync needs an open file, of any access mode
        fd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Session:
    """The steps of the commands that are more than one request: the same methods
    whether the daemon or this process has the pool."""

    pool_dir: str
    mountpoint: str | None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def call(self, op: str, args: dict | None = None, output=None):
        raise NotImplementedError

    def sync(self, name: str) -> None:
        """Make every write to volume ``name`` made so far visible to the pool's commands."""

    def snapshot(self, origin: str, name: str) -> dict:
        self.sync(origin)  # as LVM suspends (flushes) an origin before snapshotting it
        return self.call("snapshot", {"origin": origin, "name": name})

    def resize(self, name: str, size: int, relative: bool) -> dict:
        return self.call("resize", {"name": name, "size": size, "relative": relative})

    def discard(self, name: str, offset: int, length: int) -> dict:
        self.sync(name)  # or a cached write would land after the discard
        return self.call("discard", {"name": name, "offset": offset, "length": length})

    @contextlib.contextmanager
    def frozen(self, name: str):
        """The name of a volume with ``name``'s content that nothing changes while held."""
        yield name

    @contextlib.contextmanager
    def new_volume(self, name: str, size: int):
        """Create volume ``name`` and open it for writing; removed again if the block fails,
        so a failed import leaves no half-made volume."""
        dev = self.call("create", {"name": name, "size": size})
        try:
            with self.open_volume(dev, writable=True) as volume:
                yield volume
        except BaseException:
            self.call("remove", {"name": name})
            raise

    def open_volume(self, dev: dict, writable: bool = False):
        """Volume ``dev`` (as ``list`` describes it) to read, or write, by offset."""
        raise NotImplementedError


class Online(_Session):
    """The pool's mount daemon runs the commands; volume data goes through its mount.

    With the kernel's writeback cache (the mount's default) the kernel holds
    writes the daemon has not seen yet, and owns the size of an open volume: a
    command that must see every write flushes the volume through the mount
    first, and a resize goes through the mount.
    """

    def __init__(self, pool_dir: str, status: dict):
        self.pool_dir = pool_dir
        self.status = status
        self.mountpoint = status["mountpoint"]
        self.cached = bool(status.get("writeback_cache"))

    def call(self, op: str, args: dict | None = None, output=None):
        if op in control.SNAPSHOT_OPS:  # walked here, on a commit the daemon holds for us
            from fusepool.reporting import run_on_snapshot

            return run_on_snapshot(self.pool_dir, op, args or {}, output=output)
        return control.request(self.pool_dir, op, args or {}, output=output)

    def path(self, name: str) -> str | None:
        """Volume ``name``'s file in the mount (None if there is none, or no mount)."""
        if self.mountpoint is None:  # `fusepool serve`: no kernel cache to flush
            return None
        path = os.path.join(self.mountpoint, name)
        return path if os.path.isfile(path) else None

    def sync(self, name: str) -> None:
        path = self.path(name) if self.cached else None
        if path is not None:
            fsync_path(path)

    def resize(self, name: str, size: int, relative: bool) -> dict:
        path = self.path(name) if self.cached else None
        if path is None:
            return super().resize(name, size, relative)
        fsync_path(path)  # the resize's commit covers every write made before it
        current = os.stat(path).st_size
        size = current + size if relative else size
        if size < current:  # (the engine's error, as when the daemon refuses it)
            raise InvalidArgument(f"cannot shrink volume {name!r} from {current} to {size} "
                                  "bytes: volumes only grow")
        try:
            os.truncate(path, size)
        except OSError as exc:
            raise PoolError(f"cannot resize volume {name!r} to {size} bytes: {exc.strerror}") from None
        return {"name": name, "size": size}

    def discard(self, name: str, offset: int, length: int) -> dict:
        result = super().discard(name, offset, length)
        path = self.path(name)
        if path is not None:  # pages the kernel still caches would show the old bytes
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return result

    @contextlib.contextmanager
    def frozen(self, name: str):
        # The origin stays writable through the mount: copy a temporary snapshot of it.
        temp = f"{name}.export-{os.getpid()}"
        self.snapshot(name, temp)
        try:
            yield temp
        finally:
            self.call("remove", {"name": temp})

    @contextlib.contextmanager
    def open_volume(self, dev: dict, writable: bool = False):
        if self.mountpoint is None:  # `fusepool serve`: the volume's NBD export
            from fusepool.nbd_client import NbdVolume

            if not self.status.get("nbd"):
                raise PoolError(f"the daemon of {self.pool_dir} serves neither a mount nor NBD")
            volume = NbdVolume(self.status["nbd"][0], dev["name"])
            try:
                yield volume
            finally:
                volume.close()
            return
        fd = os.open(os.path.join(self.mountpoint, dev["name"]), os.O_WRONLY if writable else os.O_RDONLY)
        try:
            yield MountedVolume(fd)
        finally:
            os.close(fd)


class MountedVolume:
    """A volume file in the mount."""

    def __init__(self, fd: int):
        self.fd = fd

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def flush(self) -> None:
        os.fsync(self.fd)


class Offline(_Session):
    """The pool opened here, under its lock (taken at first use, released at exit);
    commands run in-process through :func:`fusepool.commands.run`."""

    mountpoint = None

    def __init__(self, pool_dir: str):
        self.pool_dir = pool_dir
        self._pool = None

    @property
    def pool(self):
        if self._pool is None:
            import logging

            if not logging.getLogger().handlers:
                logging.basicConfig(level=logging.WARNING, format="fusepool: %(message)s")
            from fusepool.engine import Pool

            self._pool = Pool.open(self.pool_dir)
        return self._pool

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.__exit__(*exc)

    def call(self, op: str, args: dict | None = None, output=None):
        from fusepool import commands

        result = commands.run(self.pool, op, args or {})
        if isinstance(result, control.Streamed):
            for piece in result.chunks:
                output.write(piece.encode() if isinstance(piece, str) else piece)
            result = result.result
        return result

    @contextlib.contextmanager
    def open_volume(self, dev: dict, writable: bool = False):
        yield EngineVolume(self.pool, dev["dev_id"])


class EngineVolume:
    """A volume read and written through the engine."""

    def __init__(self, pool, dev_id: int):
        self.pool, self.dev_id = pool, dev_id

    def read(self, offset: int, length: int) -> bytes:
        return self.pool.read(self.dev_id, offset, length)

    def write(self, offset: int, data: bytes) -> None:
        from fusepool.errors import PoolFull

        view = memoryview(data)
        while view:
            n = self.pool.write(self.dev_id, offset, view)
            if not n:
                raise PoolFull("pool is out of data space")
            view, offset = view[n:], offset + n

    def flush(self) -> None:
        self.pool.commit()
