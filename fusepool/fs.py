"""The FUSE filesystem: a thin adapter from pyfuse3 requests to Pool calls.

One directory (the mount root) holds one regular file per visible volume.
Inode numbers derive from device ids, so they are stable across mounts and
need no table; file handles map to device ids.  Storage logic lives in
:class:`fusepool.engine.Pool`; this module only translates, and turns engine
errors into errnos in one place (:func:`fuse_errors`).
"""

import errno
import functools
import json
import logging
import os
import stat

import pyfuse3
import trio

from fusepool.engine import CONTROL_NAME, Pool
from fusepool.errors import PoolError, PoolFull
from fusepool.flushing import Flusher
from fusepool.metadata.format import MAX_DEV_ID

log = logging.getLogger(__name__)

INODE_BASE = 16  # inode = dev_id + INODE_BASE; the root is inode 1
# A hidden read-only file in the root (not listed by readdir; s3ql does the same)
# says which pool and daemon serve the mount.  Extended attributes would do, but
# answering getxattr makes the kernel ask for security.capability before every
# write; answering ENOSYS once makes it stop asking.
CONTROL_INODE = 2
CONTROL_FH = 0  # volume handles start at 1
ATTR_TIMEOUT = 1.0  # the kernel re-fetches size/blocks itself after every write
# Names are not cached, so volumes created or removed by `fusepool` commands show at
# once without invalidating kernel caches (which can block; see mount.py).
ENTRY_TIMEOUT = 0.0
NO_SPACE_POLL = 0.05  # seconds between retries of a write queued for space


def fuse_errors(handler):
    """The error boundary: engine errors become errnos; anything else is EIO.

    An exception escaping a pyfuse3 handler would kill the mount, so
    unexpected ones are logged with their traceback and reported as EIO, and
    they fail the pool (read-only, needs-check: Pool.fail_unexpected), since
    the engine may have stopped half-way through a change.  An OSError is not
    unexpected: the engine turns its own write and flush errors into PoolErrors
    (failing the pool itself), so what is left is an error to report, such as
    a read error, which fails the request and not the pool (dm-thin).
    """

    @functools.wraps(handler)
    async def wrapper(self, *args):
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except PoolError as exc:
            log.debug("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.error("%s: I/O error: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:
            log.exception("unexpected error in %s", handler.__name__)
            self.pool.fail_unexpected(f"{type(exc).__name__} in {handler.__name__}: {exc}")
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class FusepoolOperations(pyfuse3.Operations):
    def __init__(self, pool: Pool, no_space_timeout: float | None = None,
                 writeback_cache: bool = True, flusher: Flusher | None = None):
        super().__init__()
        # The kernel's writeback cache (the default; off with mount --write-through):
        # writes return once in the kernel's page cache, which then owns each open
        # volume's size.  The kernel then also reads through handles opened write-only
        # (to fill a page a write covers in part): read() must not check the open mode.
        self.enable_writeback_cache = writeback_cache
        self.pool = pool
        self.no_space_timeout = (pool.config.no_space_timeout if no_space_timeout is None
                                 else no_space_timeout)
        self.handles: dict[int, int] = {}  # fh -> dev_id
        self.queued_writes = 0  # writes waiting for data space (queue mode)
        self.next_fh = 1
        self.initialised = trio.Event()
        # FLUSH/commit ordering, shared with the NBD server when the daemon runs both.
        self.flusher = flusher or Flusher(pool)
        # Direct mode: reads and writes in worker threads, several at once (directio.py);
        # loop mode: on the loop (the page cache is faster than a thread hand-off).
        self.direct = self.flusher.direct
        self.flush_lock = self.flusher.lock
        self.uid = os.getuid()
        self.gid = os.getgid()

    def init(self):
        # Called while the kernel's INIT request is handled; the reply (which caps the
        # read-ahead) is written before any other trio task runs.
        self.initialised.set()

    # --- attributes --------------------------------------------------------------

    def _volume_attrs(self, dev_id: int) -> pyfuse3.EntryAttributes:
        dev = self.pool.device(dev_id)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = dev_id + INODE_BASE
        attr.generation = int(dev.created)
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = stat.S_IFREG | dev.mode
        attr.st_nlink = 0 if dev.deleted else 1
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_size = dev.size
        attr.st_blksize = self.pool.block_size
        attr.st_blocks = dev.mapped_blocks * (self.pool.block_size // 512)
        attr.st_mtime_ns = attr.st_ctime_ns = int(dev.mtime * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns
        attr.st_birthtime_ns = int(dev.created * 1e9)
        return attr

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.ROOT_INODE
        attr.entry_timeout = attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = stat.S_IFDIR | 0o755
        attr.st_nlink = 2
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_blksize = self.pool.block_size
        return attr

    def _dev_id(self, inode: int) -> int:
        dev_id = inode - INODE_BASE
        if dev_id not in self.pool.devices:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return dev_id

    def _name(self, name: bytes) -> str:
        return os.fsdecode(name)

    def quiesced(self, dev_id: int | None = None):
        """Direct mode: no write of ``dev_id`` (None: of any device) in flight inside."""
        return self.flusher.quiesced(dev_id)

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        if inode == pyfuse3.ROOT_INODE:
            return self._root_attrs()
        if inode == CONTROL_INODE:
            return self._control_attrs()
        return self._volume_attrs(self._dev_id(inode))

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._root_attrs()
        if name == CONTROL_NAME.encode():
            return self._control_attrs()
        dev_id = self.pool.names.get(self._name(name))
        if dev_id is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._volume_attrs(dev_id)

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        dev_id = self._dev_id(inode)
        dev = self.pool.device(dev_id)
        if fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)  # volumes belong to the daemon's user
        if fields.update_mode:  # (the kernel let only the owner or root get here)
            self.pool.set_mode(dev_id, stat.S_IMODE(attr.st_mode))
        if fields.update_size and attr.st_size != dev.size:
            if attr.st_size < dev.size:
                log.info("refused to shrink volume %s", dev.name)
                raise pyfuse3.FUSEError(errno.EPERM)
            async with self.quiesced(dev_id):  # (it zeroes the last block's tail)
                self.pool.resize(dev_id, attr.st_size)  # (by id: an unlinked volume may have a namesake)
        if fields.update_mtime:
            self.pool.set_mtime(dev_id, attr.st_mtime_ns / 1e9)
        return self._volume_attrs(dev_id)

    @fuse_errors
    async def statfs(self, ctx):
        st = self.pool.stats()
        bs = self.pool.block_size
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = bs
        out.f_blocks = st["data_blocks_total"]
        out.f_bfree = st["data_blocks_free"]
        out.f_bavail = st["data_blocks_available"]  # loop mode: capped by the host's free space
        out.f_files = MAX_DEV_ID
        out.f_ffree = out.f_favail = MAX_DEV_ID - len(self.pool.devices)
        out.f_namemax = 255
        return out

    def _control_data(self) -> bytes:
        return json.dumps({"pool": self.pool.path, "pid": os.getpid()}).encode()

    def _control_attrs(self) -> pyfuse3.EntryAttributes:
        attr = self._root_attrs()
        attr.st_ino = CONTROL_INODE
        attr.st_mode = stat.S_IFREG | 0o444
        attr.st_nlink = 1
        attr.st_size = len(self._control_data())
        return attr

    # --- the directory -------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        # Ordered by device id, so an offset stays valid while volumes come and go.
        for dev_id in sorted(self.pool.names.values()):
            if dev_id < start_id:
                continue
            dev = self.pool.devices[dev_id]
            if not pyfuse3.readdir_reply(token, os.fsencode(dev.name), self._volume_attrs(dev_id),
                                         dev_id + 1):
                break

    async def releasedir(self, fh):
        pass

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        # The creating process's mode and umask, as for any file it creates.
        dev = self.pool.create_volume(self._name(name), 0, mode & ~ctx.umask & 0o777)
        return self._open_handle(dev.dev_id), self._volume_attrs(dev.dev_id)

    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)  # a pool is flat: volumes only

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        async with self.quiesced():
            self.pool.remove(self._name(name))

    @fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old, new = self._name(name_old), self._name(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        # Replacing the target is part of the same commit (a crash shows both or neither).
        async with self.quiesced():
            self.pool.rename(old, new, replace=not flags & pyfuse3.RENAME_NOREPLACE)

    # --- files -------------------------------------------------------------------------

    def _open_handle(self, dev_id: int) -> pyfuse3.FileInfo:
        self.pool.open_device(dev_id)
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = dev_id
        return pyfuse3.FileInfo(fh=fh)

    @fuse_errors
    async def open(self, inode, flags, ctx):
        if inode == CONTROL_INODE:
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise pyfuse3.FUSEError(errno.EACCES)
            return pyfuse3.FileInfo(fh=CONTROL_FH, direct_io=True)
        dev_id = self._dev_id(inode)
        # libfuse passes O_TRUNC here (atomic_o_trunc) instead of a setattr: truncating
        # would shrink the volume, which is refused like any other shrink.
        if flags & os.O_TRUNC and self.pool.device(dev_id).size > 0:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._open_handle(dev_id)

    @fuse_errors
    async def read(self, fh, off, size):
        if fh == CONTROL_FH:
            return self._control_data()[off : off + size]
        if self.direct is not None:
            return await self.direct.read(self.handles[fh], off, size)
        return self.pool.read(self.handles[fh], off, size)

    async def _write(self, dev_id: int, off: int, buf) -> int:
        if self.direct is not None:
            return await self.direct.write(dev_id, off, buf)
        return self.pool.write(dev_id, off, buf)

    @fuse_errors
    async def write(self, fh, off, buf):
        try:
            return await self._write(self.handles[fh], off, buf)
        except PoolFull:
            if self.no_space_timeout <= 0:
                raise
        # Queue mode: wait for space (a remove, discard, extend or commit frees some).
        if not self.queued_writes:
            log.warning("pool is out of data space: writes wait up to %g s", self.no_space_timeout)
        self.queued_writes += 1
        deadline = trio.current_time() + self.no_space_timeout
        try:
            while True:
                await trio.sleep(NO_SPACE_POLL)
                try:
                    return await self._write(self.handles[fh], off, buf)
                except PoolFull:
                    if trio.current_time() >= deadline:
                        raise
        finally:
            self.queued_writes -= 1

    @fuse_errors
    async def fsync(self, fh, datasync):
        await self.flusher.flush()  # dm-thin's FLUSH (fusepool.flushing)

    async def run_flush_job(self, job) -> None:
        await self.flusher.run_flush_job(job)

    async def commit(self) -> None:
        await self.flusher.commit()

    async def flush(self, fh):
        pass  # sent at every close(): no commit needed (DESIGN.md)

    @fuse_errors
    async def release(self, fh):
        dev_id = self.handles.pop(fh, None)
        if dev_id is not None:
            async with self.quiesced(dev_id):  # (the last close of a removed volume drops it)
                self.pool.close_device(dev_id)
