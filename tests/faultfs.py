"""Power-loss simulation for the engine's file I/O: a volatile write cache.

The engine does all its file I/O through ``os.pread/pwrite/pwritev/fdatasync/
fsync/ftruncate`` called as ``os.X`` in a few modules, plus hole punching
through ``fallocate`` (``fusepool.datastore._libc``).  :class:`FaultFS`
replaces the ``os`` name (and ``_libc``) in those modules with proxies that
forward every call to the real thing, and keep, for each *tracked* file:

- ``durable``: the file's contents as a disk would hold them after the last
  ``fdatasync``/``fsync`` of that file;
- ``pending``: the writes (``pwrite``/``pwritev``), truncations and hole
  punches made since, in order: what sits in the volatile cache.

At a power cut (:meth:`FaultFS.crash_image`) each file becomes what a disk
might hold: the durable contents plus, for every 4 KiB page the pending
operations touched, one of that page's *historical versions* (the page as
it was after the first k pending operations touching it, k chosen at random:
page-cache writeback writes whole pages, in any order), and optionally one
page *torn* between two consecutive versions at a 512-byte sector boundary
(a drive that persisted only a prefix of a write).  Policies:

- ``"none"``: nothing pending reached the disk;
- ``"all"``: everything did (what a process crash leaves);
- ``"prefix"``: the operations before a random point, in order;
- ``"pages"``: an independent random version for every page;
- ``"torn"``: like ``pages``, plus one torn page.

A hook (:attr:`FaultFS.on_event`) is called *before* every tracked
operation, so a test can take a crash image at any point of a workload
without stopping it (the image is a side copy; the run goes on).

I/O errors, beyond power cuts:

- :meth:`FaultFS.fail_next_sync`: the next ``fdatasync``/``fsync`` of a tracked
  file fails with a given errno.  As on Linux, the error is reported once:
  the writes pending at that moment are dropped (the page cache marks them
  clean after the failed writeback), so they never become durable, and the
  syncs after it return 0.
- :meth:`FaultFS.short_reads`: a ``pread``/``preadv`` of a tracked file that
  reaches into a bad byte range stops short before it (a media error part-way
  through a read).
"""

from __future__ import annotations

import bisect
import contextlib
import errno as _errno
import importlib
import os as _os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

PAGE = 4096
SECTOR = 512
POLICIES = ("none", "all", "prefix", "pages", "torn")
_PUNCH_HOLE = 0x02
_CHUNK = 64 << 10

# Modules whose ``os`` name is replaced (the engine's file I/O lives there).
ENGINE_MODULES = ("fusepool.datastore", "fusepool.metadata.store", "fusepool.metadata.journal",
                  "fusepool.config")


@dataclass
class Event:
    """One tracked operation, reported to the hook before it runs."""

    index: int  # 0, 1, 2, ... over the life of the FaultFS
    kind: str  # pwrite, pwritev, fdatasync, fsync, ftruncate, punch
    name: str  # the tracked file's name ("data", "metadata")
    offset: int = 0
    length: int = 0
    data: bytes = b""  # what a pwrite/pwritev is about to write


@dataclass
class TrackedFile:
    name: str
    path: str
    durable: bytearray
    pending: list = field(default_factory=list)  # ("w", off, bytes) | ("z", off, len) | ("t", size)

    def sync(self) -> None:
        for op in self.pending:
            _apply(self.durable, op)
        self.pending = []


def _apply(buf: bytearray, op, lo: int = 0, hi: int | None = None) -> None:
    """Apply one pending operation to ``buf``, restricted to bytes [lo, hi) of the file."""
    kind = op[0]
    if kind == "t":
        size = op[1]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
        return
    off = op[1]
    length = len(op[2]) if kind == "w" else op[2]
    start = max(off, lo)
    end = off + length if hi is None else min(off + length, hi)
    if start >= end:
        return
    if kind == "z" and start >= len(buf):  # punching past the end (KEEP_SIZE): nothing
        return
    if kind == "z":
        end = min(end, len(buf))
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    if kind == "w":
        buf[start:end] = op[2][start - off : end - off]
    else:
        buf[start:end] = bytes(end - start)


def _pages(op) -> range:
    if op[0] == "t":
        return range(0)
    off = op[1]
    length = len(op[2]) if op[0] == "w" else op[2]
    if length <= 0:
        return range(0)
    return range(off // PAGE, (off + length - 1) // PAGE + 1)


def crashed_contents(f: TrackedFile, rng: random.Random, policy: str) -> bytearray:
    """What a disk could hold for ``f`` if the power failed now (see the module doc)."""
    content = bytearray(f.durable)
    ops = f.pending
    if policy == "none" or not ops:
        return content
    if policy == "all":
        for op in ops:
            _apply(content, op)
        return content
    # Which pending operations touch each page, in order.
    touches: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        for p in _pages(op):
            touches.setdefault(p, []).append(i)
    if policy == "prefix":
        k = rng.randint(0, len(ops))
        cutoff = {p: bisect.bisect_left(idx, k) for p, idx in touches.items()}
        keep_trunc = [i < k for i in range(len(ops))]
    elif policy in ("pages", "torn"):
        cutoff = {p: rng.randint(0, len(idx)) for p, idx in touches.items()}
        keep_trunc = [rng.random() < 0.5 for _ in ops]
    else:
        raise ValueError(f"unknown policy {policy!r}")
    torn_page = None
    if policy == "torn":
        candidates = [p for p, idx in touches.items() if cutoff[p] < len(idx)]
        if candidates:
            torn_page = rng.choice(candidates)
    for i, op in enumerate(ops):
        if op[0] == "t":
            if keep_trunc[i]:
                _apply(content, op)
            continue
        for p in _pages(op):
            pos = touches[p].index(i)
            lo, hi = p * PAGE, (p + 1) * PAGE
            if pos < cutoff[p]:
                _apply(content, op, lo, hi)
            elif pos == cutoff[p] and p == torn_page:
                # Torn: only a prefix of this operation's part of the page (whole sectors).
                off = op[1]
                length = len(op[2]) if op[0] == "w" else op[2]
                start, end = max(off, lo), min(off + length, hi)
                first = start // SECTOR
                last = (end - 1) // SECTOR + 1
                if last - first > 1:
                    kept = rng.randint(1, last - first - 1)
                    _apply(content, op, lo, (first + kept) * SECTOR)
    return content


class _OsProxy:
    """Stands in for the ``os`` module: forwards everything, watches tracked fds."""

    def __init__(self, fs: FaultFS):
        self._fs = fs
        self.pread = _os.pread  # the hot read path goes straight through (until short_reads)

    def __getattr__(self, name):
        return getattr(_os, name)

    def _pread_checked(self, fd, length, offset):
        data = _os.pread(fd, length, offset)
        cut = self._fs._read_cut(fd, offset, len(data))
        return data if cut is None else data[:cut]

    def preadv(self, fd, buffers, offset, *args):
        got = _os.preadv(fd, buffers, offset, *args)
        cut = self._fs._read_cut(fd, offset, got)
        return got if cut is None else cut

    def open(self, path, flags, mode=0o777, *, dir_fd=None):
        fd = _os.open(path, flags, mode, dir_fd=dir_fd)
        self._fs._opened(fd, path)
        return fd

    def close(self, fd):
        self._fs._fds.pop(fd, None)
        return _os.close(fd)

    def pwrite(self, fd, data, offset):
        f = self._fs._fds.get(fd)
        if f is None:
            return _os.pwrite(fd, data, offset)
        copy = bytes(data)
        self._fs._event("pwrite", f, offset, len(copy), copy)
        n = _os.pwrite(fd, data, offset)  # the caller's buffer: O_DIRECT needs its alignment
        f.pending.append(("w", offset, copy[:n]))
        return n

    def pwritev(self, fd, buffers, offset, *args):
        f = self._fs._fds.get(fd)
        if f is None:
            return _os.pwritev(fd, buffers, offset, *args)
        data = b"".join(bytes(b) for b in buffers)
        self._fs._event("pwritev", f, offset, len(data), data)
        n = _os.pwritev(fd, buffers, offset, *args)
        f.pending.append(("w", offset, data[:n]))
        return n

    def write(self, fd, data):  # not used by the engine on tracked files; refuse silently wrong use
        if fd in self._fs._fds:
            raise AssertionError("faultfs: os.write on a tracked file is not modelled")
        return _os.write(fd, data)

    def ftruncate(self, fd, length):
        f = self._fs._fds.get(fd)
        if f is None:
            return _os.ftruncate(fd, length)
        self._fs._event("ftruncate", f, length, 0)
        _os.ftruncate(fd, length)
        f.pending.append(("t", length))

    def fdatasync(self, fd):
        return self._sync(fd, "fdatasync", _os.fdatasync)

    def fsync(self, fd):
        if not isinstance(fd, int):
            fd = fd.fileno()
        return self._sync(fd, "fsync", _os.fsync)

    def _sync(self, fd, kind, real):
        f = self._fs._fds.get(fd)
        if f is None:
            return real(fd) if self._fs.real_sync else None
        self._fs._event(kind, f, 0, 0)
        fault = self._fs._sync_faults.pop(f.name, None)
        if fault is not None:
            err, lose_pending = fault
            if lose_pending:
                f.pending = []
            self._fs.failed_syncs += 1
            raise OSError(err, _os.strerror(err))
        if self._fs.real_sync:
            real(fd)
        f.sync()
        self._fs.syncs += 1


class _LibcProxy:
    """Stands in for ``fusepool.datastore._libc``: records hole punches as zero writes."""

    def __init__(self, fs: FaultFS, real):
        self._fs = fs
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def fallocate(self, fd, mode, offset, length):
        f = self._fs._fds.get(fd)
        if f is not None and mode & _PUNCH_HOLE:
            self._fs._event("punch", f, offset, length)
        rc = self._real.fallocate(fd, mode, offset, length)
        if f is not None and rc == 0 and mode & _PUNCH_HOLE:
            f.pending.append(("z", offset, length))
        return rc


class FaultFS:
    """Track the files of one pool directory through the engine's ``os`` calls.

    Use as a context manager (installs and uninstalls the proxies).  Call
    :meth:`track` with the pool directory *before* the engine opens it.
    """

    def __init__(self, names: tuple[str, ...] = ("data", "metadata"), real_sync: bool = False):
        self.names = names
        # The power cuts are simulated: the host's own flushes only cost time (and the
        # engine's fsync/fdatasync calls are still seen, modelled and counted).
        self.real_sync = real_sync
        self.files: dict[str, TrackedFile] = {}  # real path -> state
        self._fds: dict[int, TrackedFile] = {}
        self.events = 0
        self.syncs = 0
        self.on_event: Callable[[Event], None] | None = None
        self._saved: list[tuple[object, str, object]] = []
        self._in_hook = False
        self._proxy: _OsProxy | None = None
        self._sync_faults: dict[str, tuple[int, bool]] = {}  # file name -> (errno, lose pending)
        self.failed_syncs = 0
        self._bad_ranges: dict[str, tuple[int, int]] = {}  # file name -> [start, end) that reads stop at

    # --- installing ------------------------------------------------------------

    def install(self) -> FaultFS:
        proxy = self._proxy = _OsProxy(self)
        for name in ENGINE_MODULES:
            module = importlib.import_module(name)
            self._saved.append((module, "os", module.os))
            module.os = proxy
        datastore = importlib.import_module("fusepool.datastore")
        self._saved.append((datastore, "_libc", datastore._libc))
        datastore._libc = _LibcProxy(self, datastore._libc)
        return self

    def uninstall(self) -> None:
        while self._saved:
            module, attr, value = self._saved.pop()
            setattr(module, attr, value)

    def __enter__(self) -> FaultFS:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # --- tracking ----------------------------------------------------------------

    def track(self, directory: str) -> None:
        """Start tracking ``directory``'s files; their current contents count as durable."""
        if self._fds:
            raise AssertionError(f"faultfs: tracked files still open: {[f.name for f in self._fds.values()]}")
        self.files = {}
        for name in self.names:
            path = _os.path.realpath(_os.path.join(directory, name))
            with open(path, "rb") as fh:
                self.files[path] = TrackedFile(name, path, bytearray(fh.read()))

    def file(self, name: str) -> TrackedFile:
        return next(f for f in self.files.values() if f.name == name)

    def _opened(self, fd: int, path) -> None:
        if not isinstance(path, str):
            path = _os.fsdecode(path)
        f = self.files.get(_os.path.realpath(path))
        if f is not None:
            self._fds[fd] = f

    def _event(self, kind: str, f: TrackedFile, offset: int, length: int, data: bytes = b"") -> None:
        event = Event(self.events, kind, f.name, offset, length, data)
        self.events += 1
        if self.on_event is not None and not self._in_hook:
            self._in_hook = True
            try:
                self.on_event(event)
            finally:
                self._in_hook = False

    # --- I/O errors --------------------------------------------------------------

    def fail_next_sync(self, name: str, err: int = _errno.EIO, lose_pending: bool = True) -> None:
        """The next fdatasync/fsync of tracked file ``name`` raises OSError(``err``).

        With ``lose_pending`` the writes pending then are dropped, never to be
        durable (Linux: pages whose writeback failed are marked clean); later
        syncs succeed, as Linux reports a writeback error once per open file.
        """
        self._sync_faults[name] = (err, lose_pending)

    def short_reads(self, name: str, start: int, end: int) -> None:
        """Reads of tracked file ``name`` reaching into bytes [start, end) stop short at ``start``."""
        self._bad_ranges[name] = (start, end)
        if self._proxy is not None:
            self._proxy.pread = self._proxy._pread_checked

    def clear_read_faults(self) -> None:
        self._bad_ranges = {}
        if self._proxy is not None:
            self._proxy.pread = _os.pread

    def _read_cut(self, fd: int, offset: int, got: int) -> int | None:
        """How many of ``got`` bytes read at ``offset`` a read fault lets through (None: all)."""
        f = self._fds.get(fd)
        bad = self._bad_ranges.get(f.name) if f is not None else None
        if bad is None or not got:
            return None
        start, end = bad
        if offset + got <= start or offset >= end:
            return None
        return max(0, start - offset)

    def pending_ops(self) -> int:
        return sum(len(f.pending) for f in self.files.values())

    # --- power cuts ----------------------------------------------------------------

    def crash_image(self, rng: random.Random, policy: str | None = None) -> dict[str, bytes]:
        """File name -> contents a disk could hold if the power failed right now."""
        policy = policy or rng.choice(POLICIES)
        return {f.name: bytes(crashed_contents(f, rng, policy)) for f in self.files.values()}


def write_image(image: dict[str, bytes], source_dir: str, dest_dir: str,
                extra: tuple[str, ...] = ("pool.json",)) -> str:
    """Materialise a crash image as a pool directory (``extra`` files copied from ``source_dir``)."""
    _os.makedirs(dest_dir)
    zero = bytes(_CHUNK)
    for name, content in image.items():
        with open(_os.path.join(dest_dir, name), "wb") as fh:  # sparse: zero chunks are holes
            for pos in range(0, len(content), _CHUNK):
                chunk = content[pos : pos + _CHUNK]  # (bytes compare with memcmp)
                if chunk != zero[: len(chunk)]:
                    _os.pwrite(fh.fileno(), chunk, pos)
            fh.truncate(len(content))
    for name in extra:
        with (contextlib.suppress(FileNotFoundError), open(_os.path.join(source_dir, name), "rb") as src,
              open(_os.path.join(dest_dir, name), "wb") as dst):
            dst.write(src.read())
    return dest_dir
