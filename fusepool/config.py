"""The pool directory: file names, the config file and the exclusive lock.

Layout (Docker's loop-lvm names where it costs nothing)::

    POOL/data           the data image (block N at N * block_size); absent when the
                        data lives on a block device (direct mode, ``data_device``)
    POOL/metadata       the metadata file (see fusepool.metadata.format)
    POOL/pool.json      settings fixed at init or changed by commands
    POOL/lock           flock()ed by whoever has the pool open (daemon or command)
    POOL/control.sock   the mount daemon's control socket, while mounted
    POOL/fusepool.log   the mount daemon's log when it runs in the background
"""

import contextlib
import fcntl
import json
import logging
import math
import os
import stat
from dataclasses import asdict, dataclass

from fusepool.errors import NotAPool, PoolBusy
from fusepool.layout import CONFIG, DATA, JOURNAL, LOCK, LOG, METADATA, SOCKET  # noqa: F401

log = logging.getLogger(__name__)

# A pool belongs to its owner (DESIGN.md 4): every file of it is owner-only whatever
# the umask.  The control socket's mode and peer check are mount.py's and control.py's.
DIR_MODE = 0o700
FILE_MODE = 0o600


@dataclass
class PoolConfig:
    """Settings in ``pool.json``; each is what the matching ``init`` option set."""

    uuid: str
    block_size: int  # bytes, a multiple of 64 KiB; fixed for the life of the pool
    base_size: int = 10 << 30  # default virtual size of new volumes (Docker's dm.basesize)
    min_free_space: float = 10.0  # percent (Docker's dm.min_free_space)
    skip_block_zeroing: bool = False  # dm-thin's skip_block_zeroing feature
    # Out of data space: 0 fails allocating writes at once (dm-thin's error_if_no_space);
    # N > 0 makes them wait up to N seconds for space (dm-thin's queue mode, 60 s there).
    no_space_timeout: float = 0.0
    # loop: a sparse data file, buffered I/O, freed blocks punched out (space promised);
    # direct: a block device or a preallocated file, O_DIRECT (space reserved up front).
    mode: str = "loop"
    version: int = 1
    data_device: str | None = None  # direct mode on a block device: its path (no POOL/data)
    preallocated: bool = False  # direct mode on POOL/data: the whole data size fallocated
    # LVM's thin_pool_autoextend_threshold/_percent (loop mode only): when data use reaches
    # the threshold (percent; 100 = off, as in LVM) the data grows by percent of its size,
    # never past max_data_size (bytes; 0 = only the host's free space limits it).
    autoextend_threshold: float = 100.0
    autoextend_percent: float = 20.0
    max_data_size: int = 0
    # dm-thin's low_water_mark (free data blocks; 0 = off): falling below it is logged and
    # runs on_low_water (a shell command) once per crossing, as dmeventd would be told.
    low_water_mark: int = 0
    on_low_water: str | None = None
    # Writes of zeros: off (dm-thin) provisions and writes them like any data; on (qemu's
    # detect-zeroes=unmap) stores nothing for zeros into holes and unmaps blocks they zero.
    zero_detection: bool = False

    @classmethod
    def load(cls, pool_dir: str) -> "PoolConfig":
        """Read and validate ``pool.json`` (see :func:`_validate`); never a traceback.

        Every refusal is ``POOL/pool.json: FIELD: what is wrong`` (BadConfig, exit 1).
        """
        path = os.path.join(pool_dir, CONFIG)
        if not os.path.exists(pool_dir):
            raise NotAPool(f"{pool_dir}: no such pool directory")
        if not os.path.isdir(pool_dir):
            raise NotAPool(f"{pool_dir} is not a pool directory")
        try:
            with open(path, "rb") as f:
                text = f.read(1 << 20)
        except FileNotFoundError:
            raise NotAPool(f"{pool_dir} is not a fusepool pool (no {CONFIG}; create one with "
                           f"`fusepool init {pool_dir}`)") from None
        except OSError as exc:
            raise BadConfig(f"{path}: {exc.strerror}") from None
        try:
            # NaN/Infinity are not JSON; read them as floats so the field check names them
            raw = json.loads(text.decode("utf-8"), parse_constant=float)
        except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
            raise BadConfig(f"{path}: not a JSON config ({str(exc)[:100]})") from None
        if not isinstance(raw, dict):
            raise BadConfig(f"{path}: not a JSON object")
        return cls(**_validate(raw, path))

    def save(self, pool_dir: str) -> None:
        write_atomic(os.path.join(pool_dir, CONFIG), json.dumps(asdict(self), indent=2) + "\n")


class BadConfig(NotAPool):
    """``pool.json`` is there but holds something fusepool never writes."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:  # a float field also takes an integer, never a bool
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _between(lo, hi, lo_open=False):
    return lambda v: (lo < v if lo_open else lo <= v) and v <= hi


# field -> (type check, type name, range check or None, range rule)
_SCHEMA = {
    "uuid": (lambda v: isinstance(v, str), "a string", None, ""),
    "block_size": (_is_int, "an integer", lambda v: v % (64 << 10) == 0 and (64 << 10) <= v <= 1 << 30,
                   "a multiple of 64 KiB from 64 KiB to 1 GiB"),
    "base_size": (_is_int, "an integer", _between(0, 1 << 60, lo_open=True),
                  "from 1 byte to 2^60 bytes"),
    "min_free_space": (_is_number, "a finite number", lambda v: 0 <= v < 100, "a percentage from 0 to 99"),
    "skip_block_zeroing": (lambda v: isinstance(v, bool), "true or false", None, ""),
    "no_space_timeout": (_is_number, "a finite number", lambda v: v >= 0, "seconds, not negative"),
    "mode": (lambda v: isinstance(v, str), "a string", lambda v: v in ("loop", "direct"),
             '"loop" or "direct"'),
    "version": (_is_int, "an integer", lambda v: v == 1, "1 (this fusepool's pool format)"),
    "data_device": (lambda v: v is None or isinstance(v, str), "a path or null",
                    lambda v: v is None or os.path.isabs(v), "an absolute path"),
    "preallocated": (lambda v: isinstance(v, bool), "true or false", None, ""),
    "autoextend_threshold": (_is_number, "a finite number", _between(1, 100), "a percentage from 1 to 100"),
    "autoextend_percent": (_is_number, "a finite number", _between(0, 1000, lo_open=True),
                           "a percentage above 0 and at most 1000"),
    "max_data_size": (_is_int, "an integer", _between(0, (1 << 63) - 1), "bytes, not negative"),
    "low_water_mark": (_is_int, "an integer", lambda v: 0 <= v < 1 << 40,
                       "a block count from 0 to 2^40-1"),
    "on_low_water": (lambda v: v is None or isinstance(v, str), "a string or null", None, ""),
    "zero_detection": (lambda v: isinstance(v, bool), "true or false", None, ""),
}


def _validate(raw: dict, path: str) -> dict:
    """Exact types (a bool is not an int; an int is a float only for float fields), ranges,
    enums, the version and the rules across fields.  Unknown keys are refused: fusepool
    never writes them, and a misspelt setting must not be ignored silently."""
    import uuid as uuidlib

    def bad(name: str, what: str):
        return BadConfig(f"{path}: {name}: {what}")

    for name in raw:
        if name not in _SCHEMA:
            raise bad(str(name)[:60], "unknown field (fusepool writes no such field)")
    for name in ("uuid", "block_size"):
        if name not in raw:
            raise bad(name, "missing")
    for name, value in raw.items():
        is_type, type_name, in_range, rule = _SCHEMA[name]
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        if not is_type(value):
            raise bad(name, f"{shown} is not {type_name}")
        if in_range is not None and not in_range(value):
            raise bad(name, f"{shown} is not {rule}")
    try:
        uuidlib.UUID(raw["uuid"])
    except ValueError:
        raise bad("uuid", f"{raw['uuid'][:60]!r} is not a UUID") from None
    mode = raw.get("mode", "loop")
    if raw.get("data_device") is not None and mode != "direct":
        raise bad("data_device", f"a data device is for direct mode only (mode is {mode!r})")
    if raw.get("preallocated") and (mode != "direct" or raw.get("data_device") is not None):
        raise bad("preallocated", "a preallocated data file is for direct mode without a data device")
    if mode != "loop" and (raw.get("autoextend_threshold", 100) < 100 or raw.get("max_data_size", 0)):
        raise bad("autoextend_threshold", "autoextend works in loop mode only")
    return raw


def write_atomic(path: str, text: str) -> None:
    """temp file + fsync + rename + fsync of the directory; the file is owner-only (0600)."""
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a crash: never write through whatever is there
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    with open(fd, "w") as f:
        os.fchmod(fd, FILE_MODE)  # explicit: the umask only ever takes bits away
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class PoolLock:
    """An exclusive flock on ``POOL/lock``; the holder's pid is written into it."""

    def __init__(self, pool_dir: str):
        self.path = os.path.join(pool_dir, LOCK)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise PoolBusy(f"pool {pool_dir} is busy: it is open by pid {holder}") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1


def make_pool_dir(path: str) -> bool:
    """Create ``path`` (or take an existing empty directory) as a pool directory: mode 0700.

    Returns True if it was made here.
    """
    made = not os.path.exists(path)
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    os.chmod(path, DIR_MODE)  # makedirs' mode goes through the umask; an existing one keeps its own
    return made


def tighten_pool_dir(pool_dir: str) -> None:
    """Make an existing pool owner-only: the directory 0700, its regular files 0600.

    For pools made before this rule, or loosened by hand; each change is
    logged at INFO.  Files are changed through a descriptor opened without
    following symlinks, so a link planted in the directory changes nothing
    else; anything this process may not change is left as it is (it cannot
    open the pool then either).
    """
    def tighten(fd: int, name: str, want: int) -> None:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, want)
            log.info("pool %s: %s was mode %04o, now %04o (a pool is owner-only)", pool_dir, name,
                     stat.S_IMODE(st.st_mode), want)

    try:
        dir_fd = os.open(pool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            tighten(dir_fd, "the pool directory", DIR_MODE)
        for name in os.listdir(dir_fd):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dir_fd)
            except OSError:  # a symlink, a socket, or not ours to open
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    tighten(fd, name, FILE_MODE)
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
