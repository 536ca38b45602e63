"""Block I/O on the data image: data block N lives at byte N * block_size.

That is the layout of a dm-thin data device, so the file can be handed to the
kernel's thin target together with exported metadata.  In loop mode the image
is a sparse file: blocks cost host space only once written, and blocks freed
by the pool are given back to the host with FALLOC_FL_PUNCH_HOLE (dm-thin's
discard passdown) after the commit that freed them.
"""

import ctypes
import ctypes.util
import errno
import logging
import os

log = logging.getLogger(__name__)

_IOV_MAX = 1024  # buffers one pwritev may take
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class DataStore:
    def __init__(self, path: str, block_size: int, readonly: bool = False):
        self.path = path
        self.block_size = block_size
        self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        self.can_punch = True

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
        data = os.pread(self.fd, length, block * self.block_size + offset)
        if len(data) < length:  # past the end of a sparse image: zeros
            data += bytes(length - len(data))
        return data

    def write(self, position: int, buffers: list) -> None:
        """One pwritev of ``buffers`` at byte ``position`` of the image."""
        for i in range(0, len(buffers), _IOV_MAX):
            chunk = buffers[i : i + _IOV_MAX]
            total = sum(len(b) for b in chunk)
            done = os.pwritev(self.fd, chunk, position)
            if done != total:  # short write: the host filesystem filled up mid-way
                raise OSError(errno.ENOSPC, "short write to the data image")
            position += total

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

    def host_free_bytes(self) -> int:
        st = os.fstatvfs(self.fd)
        return st.f_bavail * st.f_frsize

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512
