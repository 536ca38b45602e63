"""Block I/O on the data image: data block N lives at byte N * block_size.

That is the layout of a dm-thin data device, so the image can be handed to
the kernel's thin target together with exported metadata.  Two kinds:

- :class:`DataStore` (loop mode): a sparse file, buffered I/O.  Blocks cost
  host space only once written, and blocks freed by the pool are given back
  to the host with FALLOC_FL_PUNCH_HOLE (dm-thin's discard passdown) after
  the commit that freed them.
- :class:`DirectDataStore` (direct mode): a block device or a file
  preallocated in full, opened with O_DIRECT, so data never sits in the host
  page cache (no double caching under the volumes' own page cache) and the
  space is reserved up front (no hole punching: freed blocks go back to the
  pool, not to the host, as on a block device).  O_DIRECT needs buffers,
  offsets and lengths aligned to the device's sector: I/O goes through
  page-aligned buffers, and the sectors at the edges of an unaligned write
  are read, patched and written back.  Calls may come from several threads
  at once (each takes its own buffers); the caller keeps two writes to one
  block apart (fusepool.directio's bio prison).  O_DIRECT is not durable by itself:
  :meth:`flush` still fdatasyncs (the device cache, a file's extent map).
"""

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import stat
import threading

from fusepool.errors import PoolError
from fusepool.units import bytes_size

log = logging.getLogger(__name__)

_IOV_MAX = 1024  # buffers one pwritev may take
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class DataStoreError(PoolError):
    """The data file or device cannot be used as asked."""


class DataReadError(PoolError):
    """Reading the data image failed, or stopped short before its end (a media error).

    Never served as zeros: the read (or the write whose edges needed it) fails
    with EIO.  The pool stays writable: like dm-thin, a read error fails the
    request, not the pool.
    """

    errno = errno.EIO


class DataStoreFull(PoolError):
    """The host has no room for a preallocated data file."""

    errno = errno.ENOSPC


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class DataStore:
    """Loop mode: the sparse data file."""

    direct = False

    def __init__(self, path: str, block_size: int, readonly: bool = False):
        self.path = path
        self.block_size = block_size
        self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        self.can_punch = True

    @staticmethod
    def open(pool_dir: str, config, readonly: bool = False) -> "DataStore":
        """The data store a pool's config describes."""
        if config.mode == "direct":
            return DirectDataStore(config.data_device or os.path.join(pool_dir, "data"),
                                   config.block_size, readonly)
        return DataStore(os.path.join(pool_dir, "data"), config.block_size, readonly)

    @staticmethod
    def create(path: str, size: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, block: int, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` inside data block ``block`` (may span blocks)."""
        pos = block * self.block_size + offset
        try:
            data = os.pread(self.fd, length, pos)
        except OSError as exc:
            raise self._read_error(pos, exc) from None
        if len(data) < length:
            return self._read_rest(data, pos, length)
        return data

    def _read_rest(self, data: bytes, pos: int, length: int) -> bytes:
        """After a short read: the rest, as zeros only past the end of the image."""
        parts = [data]
        got = len(data)
        while got < length:
            try:
                more = os.pread(self.fd, length - got, pos + got)
            except OSError as exc:
                raise self._read_error(pos + got, exc) from None
            if not more:
                break
            parts.append(more)
            got += len(more)
        if got < length:
            self._check_end(pos + got, length - got)
            parts.append(bytes(length - got))  # past the end of a sparse image: zeros
        return b"".join(parts)

    def _check_end(self, pos: int, missing: int) -> None:
        """A read stopped at ``pos``: fine at the end of the image, EIO before it."""
        size = self.size() if self.direct else os.fstat(self.fd).st_size
        if pos < size:
            raise DataReadError(f"short read from the data {self.path} at byte {pos}: {missing} "
                                f"bytes missing before its end ({size} bytes); a media error?")

    def _read_error(self, pos: int, exc: OSError) -> DataReadError:
        return DataReadError(f"reading the data {self.path} at byte {pos} failed: "
                             f"{exc.strerror or exc}")

    def write(self, position: int, buffers: list) -> None:
        """One pwritev of ``buffers`` at byte ``position`` of the image."""
        for i in range(0, len(buffers), _IOV_MAX):
            chunk = buffers[i : i + _IOV_MAX]
            total = sum(len(b) for b in chunk)
            done = os.pwritev(self.fd, chunk, position)
            if done != total:  # short write: the host filesystem filled up mid-way
                raise OSError(errno.ENOSPC, "short write to the data image")
            position += total

    def write_one(self, position: int, buffer) -> None:
        """One pwrite (the hot path: an overwrite inside one block)."""
        if os.pwrite(self.fd, buffer, position) != len(buffer):
            raise OSError(errno.ENOSPC, "short write to the data image")

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def grow(self, size: int) -> None:
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)

    def punch(self, blocks: list[int]) -> None:
        """Give the host space of free blocks back (runs coalesced)."""
        if not self.can_punch or not blocks:
            return
        blocks = sorted(blocks)
        start = prev = blocks[0]
        for block in blocks[1:] + [None]:
            if block is not None and block == prev + 1:
                prev = block
                continue
            bs = self.block_size
            if _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                               start * bs, (prev - start + 1) * bs) != 0:
                err = ctypes.get_errno()
                if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                    self.can_punch = False
                    log.info("host filesystem cannot punch holes: freed blocks keep their space")
                    return
                raise OSError(err, os.strerror(err))
            if block is not None:
                start = prev = block

    def is_hole(self, block: int) -> bool:
        """Whether a block is unwritten in the image, so that it reads as zeros.

        A hole needs no zeroing before a partial write: fresh blocks of a sparse
        image, and freed ones once punched.  Anything uncertain counts as data.
        """
        start = block * self.block_size
        try:
            return os.lseek(self.fd, start, os.SEEK_DATA) >= start + self.block_size
        except OSError as exc:
            return exc.errno == errno.ENXIO  # no data from here to the end

    def host_free_bytes(self) -> int:
        """Free space an unprivileged writer can use on the image's filesystem."""
        st = os.fstatvfs(self.fd)
        return st.f_bavail * st.f_frsize

    def host_bfree_bytes(self) -> int:
        """Free space as Docker's devicemapper counts it under a loop file (Bfree * Bsize)."""
        st = os.fstatvfs(self.fd)
        return st.f_bfree * st.f_bsize

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512


ALIGN = 4096  # O_DIRECT alignment: a multiple of every sector size in use (512, 4096)
CHUNK = 4 << 20  # bytes per aligned buffer; larger I/O goes in several pieces


class AlignedBuffers:
    """A small pool of page-aligned buffers (anonymous mmaps) for O_DIRECT I/O.

    Taking and giving back is cheap and reuses the same memory, so the data
    path does not map and unmap per request.  Direct mode's I/O runs in
    several worker threads at once (fusepool.directio): each call takes its
    own buffers, under a lock.
    """

    def __init__(self, size: int = CHUNK, keep: int = 4):
        self.size = size
        self.keep = keep
        self.free: list[mmap.mmap] = []
        self.lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self.lock:
            if self.free:
                return self.free.pop()
        return mmap.mmap(-1, self.size)

    def give(self, buf: mmap.mmap) -> None:
        with self.lock:
            if len(self.free) < self.keep:
                self.free.append(buf)


class DirectDataStore(DataStore):
    """Direct mode: a block device or a preallocated file, through O_DIRECT."""

    direct = True

    def __init__(self, path: str, block_size: int, readonly: bool = False):
        self.path = path
        self.block_size = block_size
        self.can_punch = False  # the space stays reserved, like a block device's
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataStoreError(f"data {'device' if path.startswith('/dev/') else 'file'} {path}: "
                                 f"{exc.strerror}") from None
        self.is_device = stat.S_ISBLK(st.st_mode)
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if self.is_device and not readonly:
            flags |= os.O_EXCL  # a block device: nobody may mount or claim it while we use it
        self.fd = open_direct(path, flags)
        self.buffers = AlignedBuffers(keep=8)  # (IO_THREADS at once)
        self.sectors = AlignedBuffers(ALIGN, keep=16)  # edge sectors of unaligned writes

    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END) if self.is_device else os.fstat(self.fd).st_size

    def read(self, block: int, offset: int, length: int) -> bytes:
        pos = block * self.block_size + offset
        start = pos - pos % ALIGN
        end = -(-(pos + length) // ALIGN) * ALIGN
        buf = self.buffers.take()
        try:
            parts = []
            while start < end:
                n = min(end - start, CHUNK)
                with memoryview(buf) as view:
                    got = self._pread_aligned(view[:n], start)
                    if got < n:  # past the end: zeros, as in a sparse image
                        view[got:n] = bytes(n - got)
                    lo = max(pos - start, 0)
                    hi = min(pos + length - start, n)
                    parts.append(bytes(view[lo:hi]))
                start += n
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            self.buffers.give(buf)

    def write_one(self, position: int, buffer) -> None:
        self.write(position, [buffer])  # alignment: see write

    def write(self, position: int, buffers: list) -> None:
        """Write ``buffers`` at ``position``: copied into aligned memory, edges read back first."""
        buf = self.buffers.take()
        first, last = self.sectors.take(), self.sectors.take()
        try:
            with memoryview(buf) as out:
                head = position % ALIGN
                start = position - head  # the image offset of out[0]
                fill = head
                # Both edges are read before anything is written: a failed read fails
                # the write with nothing changed.
                end = position + sum(memoryview(piece).nbytes for piece in buffers)
                if end % ALIGN:  # keep the bytes after the write in its last sector
                    self._read_sector(end - end % ALIGN, last)
                if head:  # keep the bytes before the write in its first sector
                    self._read_sector(start, first)
                    out[:head] = first[:head]
                for piece in buffers:
                    with memoryview(piece) as src:
                        src = src.cast("B") if src.format != "B" or src.ndim != 1 else src
                        done = 0
                        while done < len(src):
                            n = min(len(src) - done, CHUNK - fill)
                            out[fill : fill + n] = src[done : done + n]
                            fill += n
                            done += n
                            if fill == CHUNK:
                                self._write_aligned(out, CHUNK, start)
                                start += CHUNK
                                fill = 0
                tail = fill % ALIGN
                if tail:
                    out[fill : fill + ALIGN - tail] = last[tail:]
                    fill += ALIGN - tail
                if fill:
                    self._write_aligned(out, fill, start)
        finally:
            self.buffers.give(buf)
            self.sectors.give(first)
            self.sectors.give(last)

    def _pread_aligned(self, view: memoryview, position: int) -> int:
        """One O_DIRECT read; short only at the end of the device or file (else EIO)."""
        try:
            got = os.preadv(self.fd, [view], position)
        except OSError as exc:
            raise self._read_error(position, exc) from None
        if got < len(view):
            self._check_end(position + got, len(view) - got)
        return got

    def _read_sector(self, position: int, into: mmap.mmap) -> None:
        """An edge sector of an unaligned write (zeros past the end of the data)."""
        with memoryview(into) as view:
            got = self._pread_aligned(view, position)
            if got < ALIGN:
                view[got:] = bytes(ALIGN - got)

    def _write_aligned(self, out: memoryview, length: int, position: int) -> None:
        done = os.pwrite(self.fd, out[:length], position)
        if done != length:
            raise OSError(errno.ENOSPC, "short write to the data device")

    def grow(self, size: int) -> None:
        """A file grows by allocating (ENOSPC if the host lacks room); a device cannot grow here."""
        have = self.size()
        if have >= size:
            return
        if self.is_device:
            raise DataStoreError(f"the data device {self.path} holds {bytes_size(have)}, the pool "
                                 f"needs {bytes_size(size)}: grow the device first")
        try:
            os.posix_fallocate(self.fd, have, size - have)
        except OSError as exc:
            os.ftruncate(self.fd, have)  # nothing half-allocated left behind
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DataStoreFull(f"the host filesystem has no room to preallocate "
                                    f"{bytes_size(size - have)} more for {self.path}") from None
            raise

    def punch(self, blocks: list[int]) -> None:
        """Direct mode keeps its space: freed blocks return to the pool only."""

    def host_free_bytes(self) -> int:
        return 0 if self.is_device else super().host_free_bytes()

    def allocated_bytes(self) -> int:
        return self.size() if self.is_device else super().allocated_bytes()

    @staticmethod
    def create_preallocated(path: str, size: int) -> None:
        """A data file with every byte allocated (refused, leaving nothing, if the host is short)."""
        directory = os.path.dirname(path) or "."
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        if free < size:
            raise DataStoreFull(f"the host filesystem under {directory} has {bytes_size(free)} free; a "
                                f"preallocated data file of {bytes_size(size)} does not fit")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DataStoreFull(f"the host filesystem under {directory} ran out of space "
                                        f"preallocating {bytes_size(size)}") from None
                raise DataStoreError(f"cannot preallocate {path}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        os.close(open_direct(path, os.O_RDWR))  # fail now if the filesystem lacks O_DIRECT


def open_direct(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise DataStoreError(f"{path}: the filesystem does not support O_DIRECT, which direct "
                                 "mode needs (use loop mode there)") from None
        if exc.errno == errno.EBUSY:
            raise DataStoreError(f"{path} is in use (mounted, or held by another program)") from None
        raise DataStoreError(f"{path}: {exc.strerror}") from None


def check_data_device(path: str, force: bool = False) -> int:
    """Validate a block device for a new direct-mode pool; returns its size in bytes.

    Refused: a path that is not a block device, a device in use (mounted,
    part of another device, or held open exclusively: the kernel's O_EXCL
    open says so), and, unless ``force``, a device carrying a filesystem,
    partition table or other signature ``blkid`` knows (its data would be
    overwritten block by block as the pool fills).
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataStoreError(f"data device {path}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise DataStoreError(f"data device {path} is not a block device (for a data file in the pool "
                             "directory use --preallocate)")
    fd = open_direct(path, os.O_RDONLY | os.O_EXCL)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if not force:
        signature = device_signature(path)
        if signature:
            raise DataStoreError(f"data device {path} is not empty (blkid finds {signature}): the pool "
                                 f"would overwrite it; wipe it (wipefs -a {path}) or use --force")
    return size


def device_signature(path: str) -> str | None:
    """What ``blkid -p`` finds on a device ("TYPE=ext4", "PTTYPE=gpt", ...), or None."""
    import subprocess

    try:
        proc = subprocess.run(["blkid", "-p", "-o", "export", path], capture_output=True, text=True,
                              timeout=30)
    except FileNotFoundError:
        raise DataStoreError(f"cannot check data device {path} for existing data: blkid is missing "
                             "(Debian package util-linux); use --force to skip the check") from None
    if proc.returncode == 2:  # nothing found
        return None
    if proc.returncode != 0:
        raise DataStoreError(f"blkid could not probe {path}: {proc.stderr.strip() or proc.returncode}")
    fields = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    for key in ("TYPE", "PTTYPE"):
        if key in fields:
            return f"{key}={fields[key]}"
    return "a signature"
