"""Crash consistency: SIGKILL the mount daemon under load, then prove the durability contract.

The contract (DESIGN.md "Durability and crash consistency", docs/design.md "Durability"):

- after a SIGKILL of the daemon at any moment the pool mounts again with no
  repair step and ``fusepool check`` (offline) is clean;
- every write that was fsync-ed before the kill reads back exactly;
- nothing reads bytes never written to that volume (or to its origin before
  the snapshot): each byte reads its durable value or a value written to that
  volume after its last durable point;
- namespace commands (create, snapshot, remove, resize, discard) are durable
  when they return, and they commit every write the daemon received before
  them.  With the kernel's writeback cache (the default mount) a write may
  still sit in the kernel's page cache: the CLI flushes the volume a snapshot,
  discard or resize names before sending the command (and resizes a cached
  volume through the kernel), and the writers here do the same; with
  ``--write-through`` every write returned has reached the daemon, so a
  command commits all of them.

Each volume is modelled by ``durable`` (its content at its last durable
point), ``current`` (what it holds now, as far as its writer knows) and
``pending`` (the writes since the durable point, in order).  After a crash a
byte is explained when it equals its durable byte or the byte of a pending
write covering it; the content read back then becomes the new durable state.

A namespace command that was in flight when the daemon died may or may not
have committed.  Its effect is visible after the crash (the snapshot exists,
the removed volume is gone, the size changed), and then the commit that made
it also made every earlier write of its thread durable: those volumes must
then read back exactly.  A command that returned is always visible.

``FUSEPOOL_SOAK=1`` runs the long variants; ``FUSEPOOL_REPORT_DIR`` receives a
JSON summary per test.
"""

import contextlib
import errno
import json
import os
import random
import signal
import struct
import subprocess
import threading
import time
import traceback
import warnings

import pytest
from conftest import daemon_pid, is_mounted, lazy_unmount, run_fusepool

from fusepool import control
from fusepool.cli import fsync_path, pool_call

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB  # the pool block size (the default)
SOAK = os.environ.get("FUSEPOOL_SOAK") == "1"
CRASH_POOL = ("--data-size", "256M", "--metadata-size", "64M", "--min-free-space", "0%")
ITERATIONS = 500 if SOAK else 50
CHURN_SECONDS = 60.0 if SOAK else 5.0
N_WRITERS = 4
MAX_VOLUMES_PER_WRITER = 8 if SOAK else 6
MAX_VOLUME_SIZE = (8 if SOAK else 3) * MiB


# --- I/O helpers ---------------------------------------------------------------------------

def pwrite_fd(fd: int, offset: int, data) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        assert done > 0, "pwrite wrote nothing"
        view, offset = view[done:], offset + done


def pread_fd(fd: int, offset: int, length: int) -> bytes:
    """What the daemon serves (the kernel's cached pages of the file are dropped first)."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    parts, pos, end = [], offset, offset + length
    while pos < end:
        chunk = os.pread(fd, min(end - pos, 4 * MiB), pos)
        if not chunk:
            break
        parts.append(chunk)
        pos += len(chunk)
    return b"".join(parts)


def read_volume(path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return pread_fd(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):  # ENOTCONN and friends on a dead mount
        os.close(fd)


def touched_zeros(n: int) -> bytearray:
    """A zero buffer with every page faulted in, so the kernel sends it as one write
    (see test_mount.zeros) and whole zero blocks reach the engine whole."""
    buf = bytearray(b"\1") * n
    buf[:] = bytes(n)
    return buf


def random_write(rng: random.Random, size: int) -> tuple[int, bytes]:
    """An offset and data inside ``size``: tiny, partial-block, straddling, multi-block,
    aligned whole blocks, whole zero blocks, or unaligned zeros."""
    kind = rng.choice(["tiny", "partial", "straddle", "multi", "aligned", "zero_blocks", "zeros"])
    nblocks = size // BS
    if kind == "tiny" or nblocks < 2:
        length = min(rng.randint(1, 64), size)
        return rng.randrange(size - length + 1), rng.randbytes(length)
    if kind == "partial":
        length = rng.randint(100, BS - 200)
        return rng.randrange(nblocks) * BS + rng.randint(1, BS - length - 1), rng.randbytes(length)
    if kind == "straddle":
        length = rng.randint(2, BS)
        boundary = rng.randrange(1, nblocks) * BS
        offset = boundary - rng.randint(1, length - 1)
        return offset, rng.randbytes(min(length, size - offset))
    if kind == "multi":
        length = min(rng.randint(BS + 1, 4 * BS), size - 1)
        return rng.randrange(size - length + 1), rng.randbytes(length)
    count = min(rng.randint(1, 3), nblocks)
    offset = rng.randrange(nblocks - count + 1) * BS
    if kind == "aligned":
        return offset, rng.randbytes(count * BS)
    if kind == "zero_blocks":  # whole blocks of zeros: data (unmapped with zero detection)
        return offset, bytes(touched_zeros(count * BS))
    length = min(rng.randint(1, 2 * BS), size)
    return rng.randrange(size - length + 1), bytes(touched_zeros(length))


# --- byte-level verification -------------------------------------------------------------

_ZERO_TO_ONE = bytes([1]) + bytes(255)  # translate table: byte 0 -> 1, anything else -> 0


def _equal_mask(a, b) -> bytes:
    """1 where ``a`` and ``b`` (same length) hold the same byte, else 0 (in C, not per byte)."""
    n = len(a)
    diff = int.from_bytes(a, "little") ^ int.from_bytes(b, "little")
    return diff.to_bytes(n, "little").translate(_ZERO_TO_ONE)


def unexplained(got: bytes, durable, pending) -> tuple[int, int, list[int]]:
    """``(count, first, blocks)`` of the bytes of ``got`` that equal neither their
    durable byte nor the byte of a pending write covering them; ``(0, -1, [])``
    when all do."""
    if got == durable:
        return 0, -1, []
    ok = bytearray(_equal_mask(got, durable))
    for offset, data in pending:
        n = min(len(data), len(got) - offset)
        if n <= 0:
            continue
        seg = _equal_mask(got[offset : offset + n], data[:n])
        merged = int.from_bytes(ok[offset : offset + n], "little") | int.from_bytes(seg, "little")
        ok[offset : offset + n] = merged.to_bytes(n, "little")
    bad = ok.count(0)
    blocks = [b for b in range(0, len(ok), BS) if ok.find(0, b, b + BS) >= 0] if bad else []
    return bad, ok.find(0), [b // BS for b in blocks]


class VolModel:
    """What one volume must hold: see the module docstring."""

    def __init__(self, name: str, size: int, content=None):
        self.name = name
        self.size = size
        self.current = bytearray(content) if content is not None else bytearray(size)
        self.durable = bytearray(self.current)
        self.pending: list[tuple[int, bytes]] = []
        self.fd: int | None = None
        self.since = "its creation"  # what made it durable last, for failure reports

    def write(self, offset: int, data: bytes) -> None:
        self.current[offset : offset + len(data)] = data

    def make_durable(self, why: str = "") -> None:
        self.durable = bytearray(self.current)
        self.pending = []
        if why:
            self.since = why

    def grow(self, size: int) -> None:
        extra = size - self.size
        self.current += bytes(extra)
        self.durable += bytes(extra)
        self.size = size

    def close(self) -> None:
        if self.fd is not None:
            close_quietly(self.fd)
            self.fd = None


# --- killing the daemon -----------------------------------------------------------------------

def daemon_state(pid: int) -> tuple[bool, dict[str, str]]:
    """``(gone, stacks)``: gone once every thread of ``pid`` has exited, so that its
    files (the /dev/fuse connection, the pool lock) are closed.  Nothing reaps the
    daemon here, and its main thread turns zombie while other threads may still
    be exiting and hold those files: gone = no process, or a zombie with one
    thread.  ``stacks`` are the kernel stacks of the threads still there."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except (FileNotFoundError, ProcessLookupError):
        return True, {}
    if fields.get("State", "").strip().startswith(("Z", "X")) and fields.get("Threads", "").strip() == "1":
        return True, {}
    stacks = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stack") as f:
                    stacks[tid] = f.read().split("\n")[0].replace("[<0>] ", "")
            except OSError:
                pass
    except OSError:
        pass
    return False, stacks


def wait_dead(pid: int, timeout: float = 10.0) -> dict[str, str] | None:
    """Wait until ``pid`` is gone (see daemon_state); None, or the stacks of the
    threads that are still there after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        gone, stacks = daemon_state(pid)
        if gone:
            return None
        if time.monotonic() > deadline:
            return stacks
        time.sleep(0.01)


def fuse_connection(mountpoint) -> str | None:
    """The FUSE connection number of a mount (its device minor), from mountinfo:
    the mount itself is not touched (it may hang)."""
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target and " - fuse" in line:
                return fields[2].split(":")[1]
    return None


def abort_fuse_connection(mountpoint) -> bool:
    """``echo 1 > /sys/fs/fuse/connections/N/abort``: fail every request of a mount whose
    daemon cannot answer any more (mounting fusectl if needed).  True if aborted."""
    conn = fuse_connection(mountpoint)
    if conn is None:
        return False
    ctl = "/sys/fs/fuse/connections"
    if not os.path.exists(f"{ctl}/{conn}"):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", ctl], capture_output=True, check=False)
    try:
        with open(f"{ctl}/{conn}/abort", "w") as f:
            f.write("1")
    except OSError:
        return False
    return True


def sigkill_daemon(m, timeout: float = 3.0) -> str | None:
    """SIGKILL the daemon of ``m`` and wait until it is gone for good.

    Returns None, or a description of a daemon that could not exit: then its
    FUSE connection has been aborted to set it free (the pool stays locked and
    the mount hangs until then)."""
    pid = m.pid
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # died and reaped already
        return None
    stacks = wait_dead(pid, timeout)
    if stacks is None:
        return None
    aborted = abort_fuse_connection(m.mountpoint)
    still = wait_dead(pid, 10)
    threads = ", ".join(f"{tid}: {stack or 'exited'}" for tid, stack in sorted(stacks.items()))
    return (f"daemon {pid} did not exit within {timeout:g} s of SIGKILL: its threads are stuck in "
            f"the kernel ({threads}); the pool stays locked and the mount hangs until the FUSE "
            "connection is aborted" + ("" if aborted and still is None else "; aborting it did not help"))


def kill_daemon(m) -> str | None:
    """A crash, as ``Mount.kill``: SIGKILL (see sigkill_daemon), then a lazy unmount of
    the dead mount.  (Not ``Mount.kill`` itself: a daemon started by ``remount`` is
    this process's child, reaped behind our back, and its pid may be gone.)"""
    stuck = sigkill_daemon(m)
    lazy_unmount(m.mountpoint)
    m.pid = None
    return stuck


def remount(m) -> None:
    """``Mount.mount``, but the CLI's mount command runs in this process (the daemon
    is still a fresh process): saves an interpreter start per iteration."""
    from fusepool.cli import build_parser

    args = build_parser().parse_args(["mount", str(m.pool), str(m.mountpoint), *map(str, m.extra)])
    with warnings.catch_warnings():  # the daemon outlives its Popen object, by design
        warnings.simplefilter("ignore", ResourceWarning)
        args.func(args)
    m.pid = daemon_pid(m.mountpoint)
    assert m.pid, "mounted, but the daemon does not answer"


# --- test 1: SIGKILL under a mixed workload ------------------------------------------------

def online_call(pool: str, op: str, args: dict):
    """``pool_call`` without its offline fallback: the command goes to the daemon's
    control socket, or fails.

    ``pool_call`` opens the pool itself when no daemon answers.  A command sent
    just as the daemon is killed would then run offline on the pool as of its
    last commit, and return: legitimately, but the writes this thread made
    through the mount since that commit are gone, so "the command returned, so
    every earlier write is durable" would no longer hold for the model.
    """
    return control.request(pool, op, args)


def writer_error(index: int, exc: Exception, killing: threading.Event) -> str | None:
    """What a writer thread's exception means: any failure before the kill is an error;
    after it only a failed check is (the daemon's death breaks every call)."""
    if not killing.is_set():
        return f"writer {index}: {exc!r}\n{traceback.format_exc()}"
    if isinstance(exc, AssertionError):
        return f"writer {index}: {exc!r}"
    return None


class CrashWriter:
    """One thread's workload on volumes it owns: writes, fsyncs and namespace commands.

    Runs until ``stop`` is set or an operation fails.  Once ``killing`` is set no
    new namespace command starts; data operations go on until they fail.
    """

    WEIGHTS = {"write": 70, "fsync": 10, "snapshot": 5, "remove": 5, "discard": 4, "resize": 4,
               "create": 2}

    def __init__(self, index: int, pool: str, mountpoint, seed: int, cached: bool = True):
        self.index = index
        self.cached = cached  # the mount has the kernel's writeback cache (the default)
        self.pool = pool
        self.mountpoint = mountpoint
        self.rng = random.Random(seed)
        self.lock = threading.Lock()  # serialises everything done to this writer's volumes
        self.vols: dict[str, VolModel] = {}
        self.counter = 0
        self.inflight: tuple | None = None  # the namespace command a crash interrupted
        self.error: str | None = None  # an unexpected failure (the daemon was alive)
        self.ops: dict[str, int] = dict.fromkeys(self.WEIGHTS, 0)
        self.journal: list[str] = []  # this iteration's operations, for failure reports

    def note(self, text: str) -> None:
        self.journal.append(text)

    def new_name(self, kind: str) -> str:
        self.counter += 1
        return f"w{self.index}-{kind}{self.counter}"

    def create(self, name: str, size: int) -> None:
        online_call(self.pool, "create", {"name": name, "size": size})
        self.commit_all(f"create {name}")
        self.vols[name] = VolModel(name, size)

    def commit_all(self, why: str = "a namespace command", flushed: VolModel | None = None) -> None:
        """A namespace command committed: every write the daemon received before it is
        durable.  Write-through: every write made before it.  Writeback cache: only the
        volume ``flush_like_the_cli`` flushed is known to have reached the daemon."""
        if self.cached:
            if flushed is not None:
                flushed.make_durable(why)
            return
        for vol in self.vols.values():
            vol.make_durable(why)

    def flush_like_the_cli(self, vol: VolModel, why: str) -> None:
        """What the CLI does before a snapshot, discard or resize of a cached volume:
        fsync it through the mount (cli.fsync_path), so the command sees every write."""
        if self.cached:
            self.note(f"fsync {vol.name} before {why}")
            os.fsync(self.fd(vol))
            vol.make_durable(f"the fsync before {why}")

    def fd(self, vol: VolModel) -> int:
        if vol.fd is None:
            vol.fd = os.open(self.mountpoint / vol.name, os.O_RDWR)  # never O_CREAT
        return vol.fd

    def close_all(self) -> None:
        for vol in self.vols.values():
            vol.close()

    def run(self, killing: threading.Event, stop: threading.Event) -> None:
        ops, weights = zip(*self.WEIGHTS.items(), strict=False)
        self.journal = []
        try:
            while not stop.is_set():
                op = self.rng.choices(ops, weights)[0]
                if op not in ("write", "fsync") and killing.is_set():
                    op = "write"
                with self.lock:
                    getattr(self, "op_" + op)()
                self.ops[op] += 1
        except Exception as exc:
            self.error = writer_error(self.index, exc, killing)
        finally:
            self.close_all()

    # Each op_* raises on failure; a namespace command sets ``inflight`` first and
    # clears it when it returned.

    def op_write(self) -> None:
        vol = self.rng.choice(list(self.vols.values()))
        offset, data = random_write(self.rng, vol.size)
        fd = self.fd(vol)
        vol.pending.append((offset, data))  # once issued, its bytes may be there
        kind = "zeros" if not any(data[:64]) and data == bytes(len(data)) else "data"
        self.note(f"write {vol.name} {offset}+{len(data)} {kind}")
        pwrite_fd(fd, offset, data)
        vol.write(offset, data)

    def op_fsync(self) -> None:
        vol = self.rng.choice(list(self.vols.values()))
        self.note(f"fsync {vol.name}")
        (os.fdatasync if self.rng.random() < 0.3 else os.fsync)(self.fd(vol))
        vol.make_durable("fsync")

    def op_snapshot(self) -> None:
        if len(self.vols) >= MAX_VOLUMES_PER_WRITER:
            return self.op_remove()
        origin = self.rng.choice(list(self.vols.values()))
        name = self.new_name("s")
        self.flush_like_the_cli(origin, f"snapshot {name}")
        self.inflight = ("snapshot", name, origin.name, bytes(origin.current))
        self.note(f"snapshot {origin.name} -> {name}")
        online_call(self.pool, "snapshot", {"origin": origin.name, "name": name})
        self.inflight = None
        self.commit_all(f"snapshot {origin.name} -> {name}")
        self.vols[name] = VolModel(name, origin.size, origin.current)
        self.vols[name].since = f"snapshot of {origin.name}"

    def op_create(self) -> None:
        if len(self.vols) >= MAX_VOLUMES_PER_WRITER:
            return self.op_remove()
        name = self.new_name("c")
        size = self.rng.randint(BS // 2, MAX_VOLUME_SIZE // 2)
        self.inflight = ("create", name, size)
        self.note(f"create {name} {size}")
        self.create(name, size)
        self.inflight = None

    def op_remove(self) -> None:
        if len(self.vols) <= 2:
            return self.op_snapshot()
        vol = self.rng.choice(list(self.vols.values()))
        if self.rng.random() < 0.5:
            vol.close()  # else it stays open: a deferred deletion
        self.inflight = ("remove", vol.name)
        self.note(f"remove {vol.name}" + (" (open)" if vol.fd is not None else ""))
        reply = online_call(self.pool, "remove", {"name": vol.name})
        self.inflight = None
        # (closed: the kernel sends RELEASE asynchronously, so it may still count as open)
        assert reply["deferred"] or vol.fd is None, f"remove of open {vol.name}: {reply}"
        del self.vols[vol.name]
        self.commit_all(f"remove {vol.name}")
        vol.close()

    def op_discard(self) -> None:
        vol = self.rng.choice(list(self.vols.values()))
        offset = self.rng.randrange(vol.size)
        length = self.rng.randint(0, min(vol.size - offset, 4 * BS + 1000))
        first, last = -(-offset // BS), (offset + length) // BS  # whole blocks inside
        zeros = bytes(max(0, (last - first) * BS))
        self.flush_like_the_cli(vol, "a discard")
        self.inflight = ("discard", vol.name, first * BS, zeros)
        self.note(f"discard {vol.name} {offset}+{length} (blocks {first}..{last - 1})")
        online_call(self.pool, "discard", {"name": vol.name, "offset": offset, "length": length})
        self.inflight = None
        if self.cached:  # (the CLI too) drop the cached pages of the old bytes, or a later
            # partial-page write would write them back around its own bytes
            os.posix_fadvise(self.fd(vol), 0, 0, os.POSIX_FADV_DONTNEED)
        vol.write(first * BS, zeros)
        self.commit_all(f"discard {vol.name}", flushed=vol)

    def op_resize(self) -> None:
        vol = self.rng.choice(list(self.vols.values()))
        if vol.size >= MAX_VOLUME_SIZE:
            return self.op_discard()
        size = min(vol.size + self.rng.randint(1, 300 * KiB), MAX_VOLUME_SIZE)
        self.flush_like_the_cli(vol, "a resize")
        self.inflight = ("resize", vol.name, size)
        self.note(f"resize {vol.name} {vol.size} -> {size}")
        if self.cached:  # the kernel owns a cached volume's size: the CLI resizes through it
            os.ftruncate(self.fd(vol), size)
        else:
            online_call(self.pool, "resize", {"name": vol.name, "size": size})
        self.inflight = None
        vol.grow(size)
        self.commit_all(f"resize {vol.name}", flushed=vol)

    # --- after the crash ---------------------------------------------------------------

    def verify(self, present: dict[str, int], problems: list[str]) -> tuple[int, int]:
        """Check this writer's volumes after a crash; the model becomes what was read.

        ``present`` maps the pool's volume names to sizes.  Returns (bytes verified,
        bytes unexplained)."""
        mine = {n: s for n, s in present.items() if n.startswith(f"w{self.index}-")}
        new_vols: dict[str, VolModel] = {}
        inflight, self.inflight = self.inflight, None
        kind = inflight[0] if inflight else None
        committed = False  # did the interrupted command reach its commit?
        if kind == "snapshot":
            _, name, origin, content = inflight
            committed = name in mine
            if committed:
                vol = VolModel(name, len(content), content)
                vol.pending = []
                new_vols[name] = vol
        elif kind == "create":
            _, name, size = inflight
            committed = name in mine
            if committed:
                new_vols[name] = VolModel(name, size)
        elif kind == "remove":
            committed = inflight[1] not in mine
            if committed:
                del self.vols[inflight[1]]
        elif kind == "resize":
            _, name, size = inflight
            committed = mine.get(name) == size
            if committed:
                self.vols[name].grow(size)
        elif kind == "discard":  # not observable: the zeros are one more possible write
            _, name, offset, zeros = inflight
            if zeros:
                self.vols[name].pending.append((offset, zeros))
        if committed:  # that commit made every earlier write durable
            self.commit_all(f"the interrupted {kind} (it committed)")
        self.vols.update(new_vols)
        unexpected = sorted(set(mine) - set(self.vols))
        if unexpected:
            problems.append(f"writer {self.index}: volumes {unexpected} exist but were never "
                            f"created (or their removal returned); in flight: {kind}")
        verified = lost = 0
        for name, vol in sorted(self.vols.items()):
            if name not in mine:
                problems.append(f"{name}: missing after the crash, but its creation returned")
                continue
            if mine[name] != vol.size:
                problems.append(f"{name}: size {mine[name]} after the crash, expected {vol.size}")
                continue
            got = read_volume(self.mountpoint / name)
            if len(got) != vol.size:
                problems.append(f"{name}: read {len(got)} bytes of {vol.size}")
                continue
            bad, first, blocks = unexplained(got, vol.durable, vol.pending)
            verified += len(got)
            if bad:
                lost += bad
                why = "fsync-ed/committed content lost" if not vol.pending else "unexplained bytes"
                zeros = all(got[b * BS : (b + 1) * BS] == bytes(len(got[b * BS : (b + 1) * BS]))
                            for b in blocks)
                extents = [(e["virtual_block"], e["data_block"], e["blocks"], e["shared"])
                           for e in pool_call(self.pool, "map", {"name": name})]
                problems.append(
                    f"{name}: {bad} byte(s) read neither their durable value nor a value written "
                    f"since ({why}); first at byte {first}: got {got[first:first + 8].hex()}, durable "
                    f"{bytes(vol.durable[first:first + 8]).hex()}; bad blocks {blocks}"
                    f"{' (all read as zeros)' if zeros else ''}; {len(vol.pending)} pending write(s); "
                    f"in flight: {kind}; durable since: {vol.since}; extents now "
                    f"(vblock, dblock, n, shared): {extents}")
            vol.current = bytearray(got)
            vol.make_durable("the verification after the previous crash")
        if lost:
            problems.append(f"writer {self.index}'s operations since the previous crash: "
                            + "; ".join(self.journal))
        return verified, lost


def write_report(name: str, **figures) -> None:
    summary = {"test": name, **figures}
    print(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    report_dir = os.environ.get("FUSEPOOL_REPORT_DIR")
    if report_dir:
        os.makedirs(report_dir, exist_ok=True)
        with open(os.path.join(report_dir, f"{name}.json"), "w") as f:
            json.dump(summary, f, indent=2)


def offline_check(pool) -> None:
    proc = run_fusepool("check", pool, check=False)
    assert proc.returncode == 0, f"fusepool check after the crash: {proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("cache", ["writeback", "write-through"])
def test_kill_under_mixed_workload(make_pool, make_mount, cache):
    """In the default mount (the kernel's writeback cache) and with --write-through,
    whose stronger promise (a command commits every write made before it) is checked."""
    seed = int(os.environ.get("FUSEPOOL_SEED", "20240611"))
    rng = random.Random(seed)
    pool = make_pool("crash", *CRASH_POOL)
    through = ("--write-through",) if cache == "write-through" else ()
    m = make_mount(pool, "--commit-period", "0.2", *through)
    writers = [CrashWriter(i, str(pool), m.mountpoint, seed * 100 + i, cached=not through)
               for i in range(N_WRITERS)]
    for w in writers:
        for _ in range(2):
            w.create(w.new_name("v"), rng.randint(MiB, 2 * MiB) + rng.choice([0, rng.randrange(BS)]))
    iterations = kills = verified = lost = 0
    interrupted: dict[str, int] = {}
    started = time.monotonic()
    problems: list[str] = []
    hangs: list[str] = []
    try:
        for it in range(ITERATIONS):
            killing, stop = threading.Event(), threading.Event()
            threads = [threading.Thread(target=w.run, args=(killing, stop), name=f"writer{w.index}",
                                        daemon=True) for w in writers]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 0.6))
            killing.set()
            stuck = kill_daemon(m)
            if stuck:  # (see test_sigkill_during_entry_invalidation) recorded, set free: go on
                hangs.append(f"iteration {it}: {stuck}")
            kills += 1
            stop.set()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads), "a writer hangs after the kill"
            errors = [w.error for w in writers if w.error]
            assert not errors, "\n".join(errors)
            for w in writers:
                if w.inflight:
                    interrupted[w.inflight[0]] = interrupted.get(w.inflight[0], 0) + 1
            offline_check(pool)  # no repair step: the last commit is clean
            # Alternate the commit period: timer commits inside the window, or only fsyncs.
            m.extra = ("--commit-period", rng.choice(["0.2", "1"]), *through)
            remount(m)
            present = {v["name"]: v["size"] for v in pool_call(str(pool), "list")}
            for w in writers:
                v, b = w.verify(present, problems)
                verified += v
                lost += b
            if problems:
                break
            iterations += 1
    finally:
        ops: dict[str, int] = {}
        for w in writers:
            for k, n in w.ops.items():
                ops[k] = ops.get(k, 0) + n
        write_report(f"test_kill_under_mixed_workload[{cache}]", iterations=iterations, kills=kills,
                     verified_bytes=verified, data_lost=lost, seconds=round(time.monotonic() - started, 1),
                     daemon_hangs=len(hangs), seed=seed, ops=ops, interrupted_commands=interrupted)
    assert not problems, f"iteration {iterations} (seed {seed}):\n" + "\n".join(problems)
    assert not hangs, (f"{len(hangs)} of {kills} SIGKILLs left a daemon that could not exit:\n"
                       + "\n".join(hangs))
    m.umount()
    offline_check(pool)


# --- test 2: concurrent writers and snapshot churn (no crash) --------------------------------

def test_concurrent_writers_and_snapshot_churn(make_pool, make_mount):
    pool = make_pool("churn", *CRASH_POOL)
    m = make_mount(pool)
    size = 2 * MiB + 12345
    names = [f"cw{i}" for i in range(8)]
    models = {n: bytearray(size) for n in names}
    locks = {n: threading.Lock() for n in names}
    for n in names:
        pool_call(str(pool), "create", {"name": n, "size": size})
    stop = threading.Event()
    errors: list[str] = []
    counts = {"writes": 0, "fsyncs": 0, "readbacks": 0, "snapshots": 0, "deferred_removes": 0}
    count_lock = threading.Lock()

    def bump(key):
        with count_lock:
            counts[key] += 1

    def writer(i: int):
        rng = random.Random(1000 + i)
        name = names[i]
        fd = os.open(m.vol(name), os.O_RDWR)
        try:
            while not stop.is_set():
                r = rng.random()
                with locks[name]:
                    if r < 0.85:
                        offset, data = random_write(rng, size)
                        pwrite_fd(fd, offset, data)
                        models[name][offset : offset + len(data)] = data
                        bump("writes")
                    elif r < 0.93:
                        os.fsync(fd)
                        bump("fsyncs")
                    else:  # read back a range from the daemon
                        offset = rng.randrange(size)
                        length = min(rng.randint(1, 3 * BS), size - offset)
                        got = pread_fd(fd, offset, length)
                        if got != models[name][offset : offset + length]:
                            raise AssertionError(f"{name}: read back {offset}+{length} differs")
                        bump("readbacks")
        except Exception as exc:
            errors.append(f"writer {name}: {exc!r}\n{traceback.format_exc()}")
        finally:
            os.close(fd)

    def churn():
        rng = random.Random(99)
        n = 0
        try:
            while not stop.is_set():
                origin = rng.choice(names)
                n += 1
                snap = f"snap{n}"
                with locks[origin]:  # no write of the origin is half-way
                    fsync_path(m.vol(origin))  # as `fusepool snapshot` does (writeback cache)
                    pool_call(str(pool), "snapshot", {"origin": origin, "name": snap})
                    expected = bytearray(models[origin])
                fd = os.open(m.vol(snap), os.O_RDWR)
                try:
                    if os.fstat(fd).st_size != size:
                        raise AssertionError(f"{snap} of {origin}: size {os.fstat(fd).st_size}")
                    for _ in range(rng.randint(1, 6)):
                        offset, data = random_write(rng, size)
                        pwrite_fd(fd, offset, data)
                        expected[offset : offset + len(data)] = data
                    got = pread_fd(fd, 0, size)
                    if got != expected:
                        first = next(i for i in range(size) if got[i] != expected[i])
                        raise AssertionError(f"{snap} of {origin} differs from the origin at the "
                                             f"snapshot plus its own writes, first at byte {first}")
                    deferred = rng.random() < 0.5
                    if deferred:  # removed while open: freed at the close below
                        reply = pool_call(str(pool), "remove", {"name": snap})
                        if not reply["deferred"]:
                            raise AssertionError(f"remove of open {snap} was not deferred: {reply}")
                        bump("deferred_removes")
                finally:
                    os.close(fd)
                if not deferred:
                    pool_call(str(pool), "remove", {"name": snap})
                bump("snapshots")
        except Exception as exc:
            errors.append(f"churn: {exc!r}\n{traceback.format_exc()}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=churn))
    started = time.monotonic()
    for t in threads:
        t.start()
    deadline = started + CHURN_SECONDS
    while time.monotonic() < deadline and not errors:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    assert not errors, "\n".join(errors)
    assert counts["snapshots"] > 0 and counts["writes"] > 0, counts

    def verify(when: str) -> int:
        verified = 0
        for n in names:
            got = read_volume(m.vol(n))
            assert len(got) == size, f"{n} {when}: {len(got)} bytes"
            bad, first, blocks = unexplained(got, models[n], [])
            assert not bad, f"{n} {when}: {bad} byte(s) differ, first at byte {first}, blocks {blocks}"
            verified += len(got)
        return verified

    verified = verify("after the churn")
    listed = {v["name"]: v for v in pool_call(str(pool), "list")}
    assert sorted(listed) == sorted(names), f"snapshots left behind: {sorted(set(listed) - set(names))}"
    m.umount()
    offline_check(pool)
    m.mount()
    verified += verify("after a remount")
    write_report("test_concurrent_writers_and_snapshot_churn", iterations=1, kills=0,
                 verified_bytes=verified, data_lost=0, seconds=round(time.monotonic() - started, 1),
                 **counts)


# --- test 3: busy unmount and stale mounts ---------------------------------------------------

ATTR_TIMEOUT = 1.0  # fusepool.fs.ATTR_TIMEOUT: the kernel answers stat from its cache this long


def assert_enotconn(path) -> None:
    """The dead mount answers ENOTCONN: at once for what always reaches the daemon
    (readdir, opening the hidden control file), and for stat once the kernel's cached attributes expire."""
    for probe in (os.listdir, lambda p: open(os.path.join(p, ".fusepool"), "rb").close()):
        try:
            probe(path)
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN, f"{path}: {exc!r}, expected ENOTCONN"
        else:
            raise AssertionError(f"{path} still answers although its daemon was killed")
    deadline = time.monotonic() + ATTR_TIMEOUT + 2
    while True:
        try:
            os.stat(path)
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN, f"stat {path}: {exc!r}, expected ENOTCONN"
            return
        assert time.monotonic() < deadline, f"stat {path} works long after its daemon was killed"
        time.sleep(0.05)


def test_unmount_while_busy_and_stale_mount(make_pool, make_mount):
    pool = make_pool("stale", "--data-size", "64M", "--metadata-size", "16M")
    m = make_mount(pool)
    mp = m.mountpoint
    pool_call(str(pool), "create", {"name": "v", "size": MiB})
    data = random.Random(3).randbytes(300 * KiB + 7)

    # (a) busy: refused with exit 1 while a volume is open, works once it is closed.
    fd = os.open(m.vol("v"), os.O_RDWR)
    try:
        pwrite_fd(fd, 1234, data)
        os.fsync(fd)
        proc = run_fusepool("umount", mp, check=False)
        assert proc.returncode == 1, f"umount of a busy mount: exit {proc.returncode}: {proc.stderr}"
        assert "busy" in proc.stderr, proc.stderr
        assert is_mounted(mp)
        assert pread_fd(fd, 1234, len(data)) == data  # the mount still serves
    finally:
        os.close(fd)
    m.umount()
    assert not is_mounted(mp)

    # (b) the daemon dies (SIGKILL) with a volume open: the mount point is dead
    # (ENOTCONN) until `fusepool mount` clears it itself.
    m.mount()
    more = random.Random(4).randbytes(2 * BS)
    fd = os.open(m.vol("v"), os.O_RDWR)
    try:
        pwrite_fd(fd, 5 * BS, more)
        os.fsync(fd)
        stuck = sigkill_daemon(m)  # not Mount.kill: the dead mount stays
        assert stuck is None, stuck
        assert_enotconn(mp)
        try:
            os.pread(fd, 10, 0)
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN, f"read through a dead mount: {exc!r}"
        else:
            raise AssertionError("a read through a dead mount worked")
        m.mount()  # no umount first
        assert is_mounted(mp)
    finally:
        close_quietly(fd)
    got = read_volume(m.vol("v"))
    assert got[1234 : 1234 + len(data)] == data, "data fsync-ed before the first kill is lost"
    assert got[5 * BS : 7 * BS] == more, "data fsync-ed before the kill is lost"

    # (c) a stale mount left behind: `fusepool umount` clears it; then mount works.
    stuck = sigkill_daemon(m)
    assert stuck is None, stuck
    proc = run_fusepool("umount", mp, check=False)  # at once: no waiting for caches to expire
    assert proc.returncode == 0, f"umount of a stale mount: exit {proc.returncode}: {proc.stderr}"
    assert "stale" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert not is_mounted(mp)
    assert os.listdir(mp) == []  # the plain directory again
    offline_check(pool)
    m.mount()
    got = read_volume(m.vol("v"))
    assert got[1234 : 1234 + len(data)] == data and got[5 * BS : 7 * BS] == more
    m.umount()


def test_mount_right_after_daemon_death(make_pool, make_mount, caplog):
    """DESIGN: "A dead daemon's stale mount is cleared ... by the next mount" --
    also right after the death, while the kernel still answers stat of the
    mount point from its attribute cache (for ATTR_TIMEOUT = 1 s).

    ``check_mountpoint`` (what ``fusepool mount`` runs before mounting) is called
    in-process so that it runs inside that window every time.
    """
    from fusepool.errors import PoolBusy
    from fusepool.mount import check_mountpoint

    caplog.allow_warnings = True  # "clearing the stale FUSE mount" is expected
    pool = make_pool("quick", "--data-size", "64M", "--metadata-size", "16M")
    m = make_mount(pool)
    mp = m.mountpoint
    pool_call(str(pool), "create", {"name": "v", "size": MiB})
    fd = os.open(m.vol("v"), os.O_RDWR)
    try:
        pwrite_fd(fd, 0, b"durable")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.stat(mp)  # the kernel caches the root's attributes for ATTR_TIMEOUT
    stuck = sigkill_daemon(m)
    assert stuck is None, stuck
    try:
        check_mountpoint(str(mp))
    except PoolBusy as exc:
        raise AssertionError(f"`fusepool mount` right after the daemon died refuses: {exc} "
                             "(the stale mount is not recognised while stat is cached)") from None
    assert not is_mounted(mp), "check_mountpoint passed but left the dead mount in place"
    m.mount()
    assert read_volume(m.vol("v"))[:7] == b"durable"
    m.umount()


def thread_wchans(pid: int) -> list[str]:
    """Where in the kernel each thread of ``pid`` sleeps."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                out.append(f.read())
        except OSError:
            pass
    return out


def test_sigkill_during_entry_invalidation(make_pool, make_mount):
    """A SIGKILLed daemon must exit, even right after a namespace command while
    lookups are in flight.

    The regression this guards against: after ``create`` (snapshot, remove,
    rename) the daemon told the kernel to forget the name
    (pyfuse3.invalidate_entry_async: a notification written to /dev/fuse by a
    helper thread).  The kernel takes the directory's lock for it, and waits
    while a lookup in that directory holds the lock waiting for the daemon's
    answer.  Killed in that window, the daemon could never answer: the helper
    thread stayed blocked in the kernel (uninterruptible), so the process never
    exited, /dev/fuse was never released, every lookup in the mount hung and the
    pool stayed locked (`fusepool mount` and `check` said busy) until someone
    aborted the connection in /sys/fs/fuse/connections.  Each attempt below
    kills the daemon while such a notification waits, if one is sent.
    """
    pool = make_pool("inval", "--data-size", "64M", "--metadata-size", "16M")
    m = make_mount(pool)
    for attempt in range(5):  # (each attempt hits the window 4 times out of 5 here)
        if attempt:
            remount(m)
        stop = threading.Event()

        def lookups(i, stop=stop):  # names that do not exist: every stat is a LOOKUP the daemon answers
            n = 0
            while not stop.is_set():
                n += 1
                with contextlib.suppress(OSError):
                    os.stat(m.mountpoint / f"absent{i}-{n}")

        threads = [threading.Thread(target=lookups, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        pool_call(str(pool), "create", {"name": f"v{attempt}", "size": MiB})
        # Kill while the notification waits for the directory (if it does, within 0.2 s).
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline and not any(
                w.startswith("fuse_reverse_inval") for w in thread_wchans(m.pid)):
            pass
        stuck = sigkill_daemon(m)  # (sets the daemon free again if it is stuck)
        stop.set()
        for t in threads:
            t.join(10)
        kill_daemon(m)
        assert stuck is None, f"attempt {attempt + 1}: {stuck}"
        offline_check(pool)


# --- test 5: SIGKILL of a daemon serving NBD ----------------------------------------------------

NBD_ITERATIONS = 200 if SOAK else 12


class NbdCrashWriter:
    """One thread over NBD: a connection per volume it owns; writes (some FUA), FLUSHes and
    snapshots.  Every write the daemon answered has reached it (NBD has no client cache), so
    a FLUSH or a command's commit makes all of this thread's answered writes durable."""

    def __init__(self, index: int, pool: str, sock: str, seed: int):
        self.index, self.pool, self.sock = index, pool, sock
        self.rng = random.Random(seed)
        self.vols: dict[str, VolModel] = {}
        self.conns: dict[str, object] = {}
        self.inflight: tuple | None = None
        self.error: str | None = None
        self.ops: dict[str, int] = {}
        self.serial = 0

    def conn(self, name: str):
        from fusepool.nbd_client import NbdVolume

        if name not in self.conns:
            self.conns[name] = NbdVolume(f"unix:{self.sock}", name)
        return self.conns[name]

    def close_all(self) -> None:
        for c in self.conns.values():
            with contextlib.suppress(Exception):
                c.sock.close()
        self.conns = {}

    def everything_durable(self) -> None:
        for vol in self.vols.values():
            vol.make_durable()

    def op_write(self, fua: bool = False) -> None:
        vol = self.rng.choice(list(self.vols.values()))
        offset, data = random_write(self.rng, vol.size)
        vol.pending.append((offset, data))  # once sent, its bytes may be there
        c = self.conn(vol.name)
        if fua:  # NBD_CMD_WRITE with NBD_CMD_FLAG_FUA: durable when answered, no FLUSH
            c.cookie += 1
            c.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 1, 1, c.cookie, offset, len(data)) + data)
            magic, error, cookie = struct.unpack(">IIQ", c._recv(16))
            assert (magic, error, cookie) == (0x67446698, 0, c.cookie)
        else:
            c.write(offset, data)
        vol.write(offset, data)
        if fua:  # (the FUA write itself; earlier answered writes may still be pending)
            vol.pending = [(o, d) for o, d in vol.pending if (o, d) != (offset, data)]
            vol.durable[offset : offset + len(data)] = data

    def op_write_fua(self) -> None:
        self.op_write(fua=True)

    def op_flush(self) -> None:
        vol = self.rng.choice(list(self.vols.values()))
        self.conn(vol.name).flush()
        self.everything_durable()  # the engine's FLUSH covers every connection's answered writes

    def op_snapshot(self) -> None:
        snaps = [n for n in self.vols if "-s" in n]
        if len(snaps) >= 3:  # remove one instead (its connection first: a clean removal)
            name = self.rng.choice(snaps)
            with contextlib.suppress(Exception):
                self.conns.pop(name).close()
            self.inflight = ("remove", name)
            online_call(self.pool, "remove", {"name": name})
            self.inflight = None
            del self.vols[name]
            self.everything_durable()
            return
        origin = self.rng.choice([v for n, v in self.vols.items() if "-s" not in n])
        self.serial += 1
        name = f"n{self.index}-s{self.serial}"
        self.inflight = ("snapshot", name, bytes(origin.current))
        online_call(self.pool, "snapshot", {"origin": origin.name, "name": name})
        self.inflight = None
        self.everything_durable()
        self.vols[name] = VolModel(name, origin.size, origin.current)

    def run(self, killing: threading.Event) -> None:
        ops = [(self.op_write, 70), (self.op_write_fua, 5), (self.op_flush, 15), (self.op_snapshot, 4)]
        funcs, weights = zip(*ops, strict=True)
        try:
            while True:
                op = self.rng.choices(funcs, weights)[0]
                op()
                self.ops[op.__name__] = self.ops.get(op.__name__, 0) + 1
        except Exception as exc:
            self.error = writer_error(self.index, exc, killing)
        finally:
            self.close_all()

    def verify(self, present: dict[str, int], problems: list[str]) -> int:
        """After the crash: each volume reads its durable bytes or pending ones; bytes verified."""
        inflight, self.inflight = self.inflight, None
        if inflight and inflight[0] == "snapshot" and inflight[1] in present:
            self.everything_durable()  # its commit made every answered write durable
            self.vols[inflight[1]] = VolModel(inflight[1], len(inflight[2]), inflight[2])
        elif inflight and inflight[0] == "remove" and inflight[1] not in present:
            self.everything_durable()
            del self.vols[inflight[1]]
        verified = 0
        for name, vol in sorted(self.vols.items()):
            if present.get(name) != vol.size:
                problems.append(f"{name}: size {present.get(name)} after the crash, expected {vol.size}")
                continue
            got = self.conn(name).read(0, vol.size)
            bad, first, blocks = unexplained(got, vol.durable, vol.pending)
            if bad:
                problems.append(f"{name}: {bad} byte(s) read neither their durable value nor a "
                                f"value written since; first at byte {first}: got "
                                f"{got[first:first + 8].hex()}, durable "
                                f"{bytes(vol.durable[first:first + 8]).hex()}; blocks {blocks}")
            verified += len(got)
            vol.current = bytearray(got)
            vol.make_durable()
        self.close_all()
        return verified


def test_kill_while_serving_nbd(make_pool, tmp_path):
    """SIGKILL of `fusepool serve --nbd` under NBD writers: what FLUSH (or FUA) acknowledged and
    what a returned command committed survive; nothing else appears; check is clean."""
    import shutil
    import tempfile

    seed = int(os.environ.get("FUSEPOOL_SEED", "20261205"))
    rng = random.Random(seed)
    pool = make_pool("crash", *CRASH_POOL)
    sockdir = tempfile.mkdtemp(prefix="fpcrash")  # (a unix socket path must fit in 108 bytes)
    sock = os.path.join(sockdir, "s.sock")
    writers = [NbdCrashWriter(i, str(pool), sock, seed * 100 + i) for i in range(N_WRITERS)]
    pid = None

    def serve() -> int:
        run_fusepool("serve", pool, "--nbd", f"unix:{sock}", "--commit-period", rng.choice(["0.2", "5"]))
        return control.request(str(pool), "status")["pid"]

    verified = 0
    problems: list[str] = []
    try:
        pid = serve()
        for w in writers:
            for k in range(2):
                name = f"n{w.index}-v{k}"
                size = rng.randint(MiB, 2 * MiB) + rng.choice([0, rng.randrange(BS)])
                online_call(str(pool), "create", {"name": name, "size": size})
                w.vols[name] = VolModel(name, size)
        for it in range(NBD_ITERATIONS):
            killing = threading.Event()
            threads = [threading.Thread(target=w.run, args=(killing,), daemon=True) for w in writers]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 0.5))
            killing.set()
            os.kill(pid, signal.SIGKILL)
            assert wait_dead(pid) is None, f"iteration {it}: the daemon did not die"
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads), "a writer hangs after the kill"
            errors = [w.error for w in writers if w.error]
            assert not errors, "\n".join(errors)
            offline_check(pool)  # no repair step: the last commit is clean
            pid = serve()
            present = {v["name"]: v["size"] for v in pool_call(str(pool), "list")}
            for w in writers:
                verified += w.verify(present, problems)
            assert not problems, f"iteration {it} (seed {seed}):\n" + "\n".join(problems)
    finally:
        for w in writers:
            w.close_all()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_dead(pid)
        shutil.rmtree(sockdir, ignore_errors=True)
        ops: dict[str, int] = {}
        for w in writers:
            for k, n in w.ops.items():
                ops[k] = ops.get(k, 0) + n
        write_report("test_kill_while_serving_nbd", iterations=NBD_ITERATIONS, verified_bytes=verified,
                     seed=seed, ops=ops)
