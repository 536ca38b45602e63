"""Host-side figures: what the page cache holds (mincore), extents, allocation, loop devices.

tools/compare-modes reads them to show what lies under a volume: the pool's data file or a
kernel thin volume's loop backing files.
"""

import ctypes
import ctypes.util
import mmap
import os
import re
import subprocess
from contextlib import suppress

from .env import KiB

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
MAP_FAILED = ctypes.c_void_p(-1).value


def file_size(path: str) -> int:
    """Bytes in a regular file or a block device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def resident_bytes(path: str, offset: int = 0, length: int | None = None, fd: int | None = None) -> int:
    """Bytes of ``path`` (a file or a block device) in the host page cache: mincore(2).

    ``offset`` (page-aligned) and ``length`` restrict it to a range.  util-linux's
    fincore does the same for whole files, but sees a block device as empty.  The
    kernel drops a block device's page cache when its last user closes it: pass
    the ``fd`` the device was read through, still open.
    """
    if length is None:
        length = file_size(path) - offset
    if length <= 0:
        return 0
    page = mmap.PAGESIZE
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {path}: {os.strerror(err)}")
        try:
            vec = ctypes.create_string_buffer((length + page - 1) // page)
            if _libc.mincore(addr, length, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore of {path}: {os.strerror(err)}")
            return sum(b & 1 for b in vec.raw) * page
        finally:
            _libc.munmap(addr, length)
    finally:
        if own:
            os.close(fd)


def evict(path: str) -> None:
    """Drop ``path``'s clean pages from the page cache (works without root, unlike drop_caches)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def meminfo_cached() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * KiB
    raise RuntimeError("no Cached line in /proc/meminfo")


def extent_count(filefrag: str, path: str) -> int:
    """Extents of a file on the host filesystem, as `filefrag` counts them."""
    proc = subprocess.run([filefrag, path], capture_output=True, text=True)
    found = re.search(r": (\d+) extents? found", proc.stdout)
    if proc.returncode or not found:
        raise RuntimeError(f"filefrag {path} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return int(found.group(1))


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def loop_backing_files(device: str) -> list[dict]:
    """The files under a block device: loop devices found through sysfs ``slaves``, recursively.

    A kernel loop-lvm thin volume sits on a thin-pool whose data and metadata
    are loop devices over files; direct-lvm has none.  ``dio`` says whether the
    loop device bypasses the host page cache (losetup --direct-io).
    """
    name = os.path.basename(os.path.realpath(device))
    seen, found, todo = set(), [], [name]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        sys_dir = f"/sys/class/block/{name}"
        try:
            with open(f"{sys_dir}/loop/backing_file") as f:
                backing = f.read().strip()
            try:
                with open(f"{sys_dir}/loop/dio") as f:
                    dio = f.read().strip() == "1"
            except OSError:
                dio = False
            found.append({"device": f"/dev/{name}", "file": backing, "dio": dio})
        except OSError:
            pass
        with suppress(OSError):  # not every block device has holders below it
            todo += os.listdir(f"{sys_dir}/slaves")
    return found
