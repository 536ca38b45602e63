"""Raw images in and out of volumes, and thin_delta-style comparisons.

Export copies only mapped extents (``fusepool map``), so holes cost nothing;
import skips blocks that are all zeros, so they are never provisioned.  Both
work on an open pool (offline) or through a mount (online): the caller hands
in a ``read``/``write`` function and the extents.
"""

import errno
import os
import stat
from collections.abc import Callable

from fusepool.errors import PoolError

CHUNK = 1 << 20  # I/O size for copying


def export_image(extents: list[dict], size: int, read: Callable[[int, int], bytes], path: str,
                 sparse: bool, progress=None, pool_dir: str | None = None) -> int:
    """Write a volume's bytes to ``path``; returns the bytes of data copied.

    With ``sparse`` only mapped extents are written and the rest stays a hole;
    without, every byte is written (zeros included), as ``dd`` would.  ``path``
    is opened by :func:`fusepool.outputs.open_output`: never through a symlink,
    0600, and never a file of ``pool_dir`` (the pool exported from).
    """
    from fusepool.outputs import open_output

    copied = 0
    fd = open_output(path, pool_dir)
    try:
        os.ftruncate(fd, size)
        if not sparse:
            zeros = bytes(CHUNK)
            for pos in range(0, size, CHUNK):
                os.pwrite(fd, zeros[: min(CHUNK, size - pos)], pos)
        for e in extents:
            start, end = e["offset"], min(e["offset"] + e["length"], size)
            for pos in range(start, end, CHUNK):
                data = read(pos, min(CHUNK, end - pos))
                os.pwrite(fd, data, pos)
                copied += len(data)
            if progress:
                progress(copied, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return copied


def data_extents(fd: int, size: int):
    """``(start, end)`` ranges of a file that hold data (SEEK_DATA/SEEK_HOLE)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a hole up to the end (or the file shrank: see caller)
                return
            yield pos, size  # no hole information (a block device, some filesystems): all data
            return
        yield start, end
        pos = end


def import_image(path: str, block_size: int, write: Callable[[int, bytes], None], progress=None,
                 size: int | None = None) -> int:
    """Copy a raw image's non-zero blocks through ``write``; returns bytes stored.

    ``size``: the image size the caller sized the volume by (default: the file's).
    A file that is not that size any more, or whose reads end before it, changed
    under the import: PoolError, never zeros taken for its data or a retry forever.
    """
    stored = 0
    zero = bytes(block_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        if size is None:
            size = _current_size(fd)
        _check_size(path, fd, size)
        done = 0  # everything before this offset is copied
        for start, end in data_extents(fd, size):
            # whole blocks, so zero detection sees whole blocks; a block two extents
            # share is read once
            pos = max(start - start % block_size, done)
            stop = min(-(-end // block_size) * block_size, size)
            while pos < stop:
                n = min(max(CHUNK - CHUNK % block_size, block_size), stop - pos)
                data = os.pread(fd, n, pos)
                if len(data) < n:  # end of file before its size: it shrank while read
                    raise PoolError(f"image {path} ended at byte {pos + len(data)} of {size} while "
                                    "being read (did it shrink?); nothing imported")
                # write runs of non-zero blocks; skip zero blocks entirely
                run_start = None
                for off in range(0, len(data), block_size):
                    piece = data[off : off + block_size]
                    if piece == zero[: len(piece)]:
                        if run_start is not None:
                            write(pos + run_start, data[run_start:off])
                            stored += off - run_start
                            run_start = None
                    elif run_start is None:
                        run_start = off
                if run_start is not None:
                    write(pos + run_start, data[run_start:])
                    stored += len(data) - run_start
                pos += len(data)
                if progress:
                    progress(pos, size)
            done = max(done, pos)
        _check_size(path, fd, size)  # a hole at the end may be a truncation SEEK_DATA skipped
    finally:
        os.close(fd)
    return stored


def _current_size(fd: int) -> int:
    """A file's size, or a block device's (whose st_size is 0)."""
    st = os.fstat(fd)
    return st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)


def _check_size(path: str, fd: int, size: int) -> None:
    now = _current_size(fd)
    if now != size:
        raise PoolError(f"image {path} changed size while being imported ({size} -> {now} bytes); "
                        "nothing imported")


def delta(left: list[tuple[int, int]], right: list[tuple[int, int]]) -> list[dict]:
    """thin_delta: compare two devices' ``(virtual_block, data_block)`` mappings (sorted).

    Returns ranges ``{"kind", "begin", "length"}`` with kind ``same``,
    ``different``, ``left_only`` or ``right_only``, merged where adjacent.
    """
    out: list[dict] = []

    def emit(kind: str, vb: int) -> None:
        last = out[-1] if out else None
        if last and last["kind"] == kind and last["begin"] + last["length"] == vb:
            last["length"] += 1
        else:
            out.append({"kind": kind, "begin": vb, "length": 1})

    i = j = 0
    while i < len(left) or j < len(right):
        if j >= len(right) or (i < len(left) and left[i][0] < right[j][0]):
            emit("left_only", left[i][0])
            i += 1
        elif i >= len(left) or right[j][0] < left[i][0]:
            emit("right_only", right[j][0])
            j += 1
        else:
            emit("same" if left[i][1] == right[j][1] else "different", left[i][0])
            i += 1
            j += 1
    return out


def delta_xml(ranges: list[dict], left: int, right: int, header: dict) -> str:
    """The (non-verbose) XML thin_delta prints."""
    lines = [f'<superblock uuid="{header["uuid"]}" time="{header["time"]}" '
             f'transaction="{header["transaction"]}" data_block_size="{header["data_block_size"]}" '
             f'nr_data_blocks="{header["nr_data_blocks"]}">',
             f'  <diff left="{left}" right="{right}">']
    for r in ranges:
        lines.append(f'    <{r["kind"]} begin="{r["begin"]}" length="{r["length"]}"/>')
    lines += ["  </diff>", "</superblock>"]
    return "\n".join(lines)
