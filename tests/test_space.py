"""Running out of space through real mounts, with writer threads running while it happens.

DESIGN.md "Space": out of data space an allocating write fails with ENOSPC
(or, in queue mode, waits up to --no-space-timeout for space); writes to
blocks a volume owns exclusively keep working; other volumes are unaffected;
removing volumes or extending the pool recovers.  Out of metadata space,
changes are refused cleanly, nothing committed is lost and extending the
metadata recovers.  In loop mode the host filesystem under the sparse files
can fill up too: that is ENOSPC as well, never EIO or a dead daemon.

Every mount is a daemon subprocess (conftest's ``make_mount``); the writers
are threads of this process.  Each writer keeps a model of what it wrote
(short writes included) and of what it fsync-ed; volumes are compared with
the models through reads that drop the kernel's page cache first.
"""

import errno
import os
import random
import re
import threading
import time

import pytest
from conftest import check_blocks, fusepool_json, read_all, run_fusepool, write_fully

from fusepool.check import check_pool
from fusepool.cli import pool_call
from fusepool.units import parse_size

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB  # the default pool block size
LEAF = 508  # mappings per leaf node: blocks LEAF*i .. LEAF*(i+1)-1 share one leaf


# --- helpers ------------------------------------------------------------------------------

def info(pool) -> dict:
    return pool_call(str(pool), "info")


def create(pool, name: str, size) -> None:
    pool_call(str(pool), "create", {"name": name, "size": parse_size(str(size))})





def assert_enospc(exc: BaseException | None, what: str) -> None:
    assert isinstance(exc, OSError), f"{what}: expected ENOSPC, got {exc!r}"
    assert exc.errno == errno.ENOSPC, f"{what}: expected ENOSPC, got {exc!r}"


def check_clean(pool) -> None:
    """``fusepool check`` (online through the daemon, or offline) finds nothing."""
    proc = run_fusepool("check", pool, check=False)
    assert proc.returncode == 0 and "clean" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def daemon_alive(m) -> bool:
    try:
        with open(f"/proc/{m.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def pool_log(pool) -> str:
    try:
        with open(os.path.join(pool, "fusepool.log")) as f:
            return f.read()[-4000:]
    except OSError:
        return ""


class Writer(threading.Thread):
    """Appends random chunks to one volume until an error (or ``limit`` bytes).

    ``model`` is what the volume holds from byte 0 (short writes included),
    ``synced`` how much of it a successful fsync covered, ``error`` the
    exception that stopped it (None if it reached the limit).
    """

    def __init__(self, path, seed: int, model: bytearray | None = None, chunk: int = 128 * KiB,
                 fsync_every: int = 4, limit: int = 256 * MiB):
        super().__init__(daemon=True)
        self.path = path
        self.rng = random.Random(seed)
        self.model = model if model is not None else bytearray()
        self.synced = len(self.model)
        self.chunk = chunk
        self.fsync_every = fsync_every
        self.limit = limit
        self.error: BaseException | None = None
        self.failed_in: str | None = None  # "write" or "fsync"
        self.writes = 0

    def run(self):
        try:
            fd = os.open(self.path, os.O_RDWR)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error, self.failed_in = exc, "open"
            return
        try:
            while len(self.model) < self.limit:
                data = self.rng.randbytes(self.chunk)
                try:
                    done = os.pwrite(fd, data, len(self.model))
                except BaseException as exc:  # noqa: BLE001
                    self.error, self.failed_in = exc, "write"
                    return
                self.model += data[:done]
                self.writes += 1
                if self.writes % self.fsync_every == 0 or done < len(data):
                    try:
                        os.fsync(fd)
                    except BaseException as exc:  # noqa: BLE001
                        self.error, self.failed_in = exc, "fsync"
                        return
                    self.synced = len(self.model)
        finally:
            os.close(fd)


def run_writers(writers, timeout: float = 60.0):
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout)
        assert not w.is_alive(), f"writer on {w.path} still running after {timeout} s"
    return writers


def verify(m, models: dict) -> None:
    """Every volume holds its model, and the block after it reads as zeros."""
    for name, model in models.items():
        check_blocks(read_all(m.vol(name), 0, len(model)), model, name)
        assert read_all(m.vol(name), len(model), BS) == bytes(BS), f"{name}: data past the model"


# --- 1. out of data space, error mode (the default) ---------------------------------------

@pytest.mark.parametrize("recovery", ["extend", "remove"])
def test_data_full_enospc_with_concurrent_writers(make_pool, make_mount, recovery):
    """Three writers fill a 16 MiB pool: ENOSPC, owned blocks stay writable, then recovery."""
    pool = make_pool("p", "--data-size", "16M", "--metadata-size", "8M", "--min-free-space", "0%")
    # each writer's ENOSPC at write() itself: --write-through (the default cache reports it
    # at fsync: test_writeback.py)
    m = make_mount(pool, "--write-through")
    rng = random.Random(11)
    create(pool, "other", "1M")
    other = bytearray(rng.randbytes(512 * KiB))
    write_fully(m.vol("other"), 0, other)
    names = ["a", "b", "c"]
    for name in names:
        create(pool, name, "64M")  # thin: each bigger than the whole pool

    writers = run_writers([Writer(m.vol(n), seed=i) for i, n in enumerate(names)])
    for w in writers:
        assert_enospc(w.error, f"writer on {w.path.name} ({w.failed_in})")
        assert w.failed_in == "write"
        assert w.synced >= 256 * KiB, f"{w.path.name} hardly wrote anything: {w.synced}"
    st = info(pool)
    assert st["data_blocks_free"] == 0 and st["data_space_used"] == st["data_space_total"] == 16 * MiB
    assert sum(len(w.model) for w in writers) + len(other) == 16 * MiB  # every block was used
    models = {"other": other} | {n: w.model for n, w in zip(names, writers, strict=False)}
    verify(m, models)

    # Error mode: an allocating write fails at once, in every volume.
    for name in names + ["other"]:
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            write_fully(m.vol(name), len(models[name]) + BS, b"needs a new block", fsync=False)
        assert_enospc(exc.value, f"allocating write to {name}")
        assert time.monotonic() - t0 < 2.0

    # Blocks a volume owns exclusively (written and fsync-ed, no snapshot) can still be
    # overwritten: aligned, unaligned and block-straddling, from threads at once.
    def overwrite(name, seed):
        r = random.Random(seed)
        model = models[name]
        try:
            for _ in range(20):
                length = r.randint(1, 3 * BS)
                offset = r.randrange(0, synced[name] - length)
                data = r.randbytes(length)
                write_fully(m.vol(name), offset, data, fsync=r.random() < 0.3)
                model[offset : offset + length] = data
        except BaseException as exc:  # noqa: BLE001
            errors.append((name, exc))

    synced = {"other": len(other)} | {n: w.synced for n, w in zip(names, writers, strict=False)}
    errors = []
    threads = [threading.Thread(target=overwrite, args=(n, 100 + i)) for i, n in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, f"overwrites of exclusively owned blocks failed: {errors}"
    assert info(pool)["data_blocks_free"] == 0
    verify(m, models)
    check_clean(pool)  # online

    if recovery == "extend":
        run_fusepool("extend", pool, "--data-size", "32M")
        assert info(pool)["data_space_total"] == 32 * MiB
        resumed = names
    else:
        run_fusepool("remove", pool, "a")
        assert "a" not in os.listdir(m.mountpoint)
        del models["a"]
        resumed = ["b", "c"]
    writers = run_writers([Writer(m.vol(n), seed=50 + i, model=models[n]) for i, n in enumerate(resumed)])
    for w in writers:
        assert_enospc(w.error, f"resumed writer on {w.path.name} ({w.failed_in})")
    for name, w in zip(resumed, writers, strict=False):
        assert w.writes > 0, f"{name}: no write succeeded after the {recovery}"
    st = info(pool)
    assert st["data_blocks_free"] == 0
    assert sum(len(v) for v in models.values()) == st["data_space_total"]
    verify(m, models)

    m.umount()
    check_clean(pool)  # offline
    m.mount()
    verify(m, models)
    assert sorted(os.listdir(m.mountpoint)) == sorted(models)


# --- 2. out of data space, queue mode ---------------------------------------------------------

TIMEOUT = 5.0


def fill_exactly(m, pool, name: str, seed: int) -> bytes:
    """Write exactly the pool's free blocks into a new volume ``name`` (no ENOSPC)."""
    free = info(pool)["data_blocks_free"]
    create(pool, name, "64M")
    data = random.Random(seed).randbytes(free * BS)
    write_fully(m.vol(name), 0, data)
    assert info(pool)["data_blocks_free"] == 0
    return data


class BlockedWrite(threading.Thread):
    """One allocating write (and fsync); records when it finished and how."""

    def __init__(self, path, offset: int, data: bytes):
        super().__init__(daemon=True)
        self.path, self.offset, self.data = path, offset, data
        self.error: BaseException | None = None
        self.started = self.finished = None

    def run(self):
        self.started = time.monotonic()
        try:
            write_fully(self.path, self.offset, self.data)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
        self.finished = time.monotonic()

    @property
    def elapsed(self) -> float:
        return self.finished - self.started


@pytest.mark.parametrize("where", ["init", "mount"])
def test_queue_mode_waits_for_space(make_pool, make_mount, where):
    """--no-space-timeout (set at init, or by the mount): writes wait for space, then ENOSPC.

    --write-through: this is about write() itself waiting (with the default cache the
    kernel's writeback of the cached pages waits instead)."""
    if where == "init":
        pool = make_pool("p", "--data-size", "8M", "--metadata-size", "8M", "--min-free-space", "0%",
                         "--no-space-timeout", str(TIMEOUT))
        m = make_mount(pool, "--write-through")
        assert info(pool)["no_space_timeout"] == TIMEOUT
    else:  # an error-mode pool, queued by this mount only
        pool = make_pool("p", "--data-size", "8M", "--metadata-size", "8M", "--min-free-space", "0%")
        m = make_mount(pool, "--no-space-timeout", str(TIMEOUT), "--write-through")
    rng = random.Random(21)
    create(pool, "keep", "1M")
    keep = rng.randbytes(BS)
    write_fully(m.vol("keep"), 0, keep)
    models = {"keep": keep}
    for name in ("w1", "w2"):
        create(pool, name, "64M")
        models[name] = bytearray()
    models["filler"] = fill_exactly(m, pool, "filler", 1)

    # Two writers block on the full pool; the daemon keeps serving everything else.
    blocked = [BlockedWrite(m.vol(n), 0, rng.randbytes(BS + 100)) for n in ("w1", "w2")]
    for t in blocked:
        t.start()
    wait_for(lambda: "writes wait up to" in pool_log(pool), 10, "the daemon to queue a write")
    time.sleep(0.5)
    assert all(t.is_alive() for t in blocked), "a writer did not wait for space: " + \
        repr([(t.error, t.finished and t.elapsed) for t in blocked])
    assert read_all(m.vol("keep"), 0, BS) == keep
    write_fully(m.vol("keep"), 10, b"in place while others wait")  # exclusive: no wait
    models["keep"] = keep = keep[:10] + b"in place while others wait" + keep[36:]
    assert fusepool_json("info", pool)["data_blocks_free"] == 0
    freed_at = time.monotonic()
    if where == "init":
        pool_call(str(pool), "remove", {"name": "filler"})  # another thread frees space
        del models["filler"]
    else:
        pool_call(str(pool), "extend", {"data_size": 16 * MiB})
    for t in blocked:
        t.join(TIMEOUT + 10)
        assert not t.is_alive()
        assert t.error is None, f"queued write failed although space was freed: {t.error!r}"
        assert t.finished > freed_at and t.elapsed < TIMEOUT, (t.finished - freed_at, t.elapsed)
        models[t.path.name] = t.data
    verify(m, models)

    # Fill up again; with nothing freed a queued write fails after the timeout.
    models["filler2"] = fill_exactly(m, pool, "filler2", 2)
    t = BlockedWrite(m.vol("w1"), 4 * BS, b"no space will come")
    t.start()
    t.join(TIMEOUT + 15)
    assert not t.is_alive()
    assert_enospc(t.error, "queued write after the timeout")
    assert TIMEOUT - 0.5 <= t.elapsed <= TIMEOUT + 5, t.elapsed
    verify(m, models)
    st = info(pool)
    assert st["data_blocks_free"] == 0 and st["read_only"] is None
    m.umount()
    check_clean(pool)
    m.mount()
    verify(m, models)


# --- 3. out of metadata space ---------------------------------------------------------------

def init_with_minimum_metadata(tmp_path, name: str, data_size: str) -> tuple:
    """A pool whose metadata is as small as ``init`` allows; returns (pool, metadata bytes)."""
    pool = tmp_path / name
    proc = run_fusepool("init", pool, "--data-size", data_size, "--metadata-size", "4K", check=False)
    assert proc.returncode == 2, proc
    match = re.search(r"use at least (\S+ \S+)", proc.stderr)
    assert match, proc.stderr
    assert not pool.exists() or not os.listdir(pool), "a refused init left files behind"
    size = parse_size(match.group(1)) // 4096 * 4096
    below = run_fusepool("init", pool, "--data-size", data_size, "--metadata-size", size - 4096,
                         "--min-free-space", "0%", check=False)
    assert below.returncode == 2, "init accepted less metadata than the minimum it named"
    for _ in range(16):  # the message rounds to 4 significant digits
        proc = run_fusepool("init", pool, "--data-size", data_size, "--metadata-size", size,
                            "--min-free-space", "0%", check=False)
        if proc.returncode == 0:
            return pool, size
        assert proc.returncode == 2, proc
        size += 4096
    raise AssertionError(f"init refuses every metadata size near the minimum: {proc.stderr}")


def test_metadata_full_enospc_and_extend(tmp_path, make_mount):
    """The smallest metadata init allows, filled by writes that each need a leaf (or a copy)."""
    pool, meta_size = init_with_minimum_metadata(tmp_path, "p", "64M")
    m = make_mount(pool)
    st = info(pool)
    assert st["metadata_space_total"] == meta_size
    vsize = 2048 * LEAF * BS  # room for 2048 leaves: a two-level tree
    for name in ("base", "spread"):
        create(pool, name, vsize)
    # Every write below touches a different leaf; `snap` shares base's first leaves, so
    # writes to base in those leaves copy them (and base's root node).
    synced: dict[str, dict[int, bytes]] = {"base": {}, "spread": {}, "snap": {}}
    for i in range(8):
        data = b"base%05d" % i
        write_fully(m.vol("base"), i * LEAF * BS, data)
        synced["base"][i * LEAF * BS] = data
    pool_call(str(pool), "snapshot", {"origin": "base", "name": "snap"})
    synced["snap"] = dict(synced["base"])

    class LeafWriter(threading.Thread):
        def __init__(self, name, offsets):
            super().__init__(daemon=True)
            self.name_, self.offsets = name, offsets
            self.error = None
            self.done = 0

        def run(self):
            fd = os.open(m.vol(self.name_), os.O_RDWR)
            try:
                for offset in self.offsets:
                    data = b"%s@%d" % (self.name_.encode(), offset)
                    os.pwrite(fd, data, offset)
                    os.fsync(fd)
                    synced[self.name_][offset] = data
                    self.done += 1
            except BaseException as exc:  # noqa: BLE001
                self.error = exc
            finally:
                os.close(fd)

    # base: first a block beside every shared leaf's block (a leaf copy each), then new leaves;
    # spread: a new leaf every write.  A snapshot of `spread` is taken while they run.
    base_offsets = [i * LEAF * BS + BS for i in range(8)] + [i * LEAF * BS for i in range(8, 2048)]
    spread_offsets = [i * LEAF * BS + 4096 for i in range(2048)]
    writers = [LeafWriter("base", base_offsets), LeafWriter("spread", spread_offsets)]
    for w in writers:
        w.start()
    while writers[1].is_alive() and writers[1].done < 10:
        time.sleep(0.01)
    proc = run_fusepool("snapshot", pool, "spread", "snap2", check=False)
    assert proc.returncode in (0, 1), proc  # taken, or refused for lack of space
    snap2 = proc.returncode == 0
    if not snap2:
        assert "space" in proc.stderr, proc.stderr
    for w in writers:
        w.join(120)
        assert not w.is_alive()
    for w in writers:
        assert_enospc(w.error, f"leaf writer on {w.name_} after {w.done} writes")
    assert writers[0].done >= 1 and writers[1].done >= 1
    if snap2:  # it holds what spread had when it was taken: at least its first 10 writes
        synced["snap2"] = dict(list(synced["spread"].items())[:10])
    st = info(pool)
    assert st["read_only"] is None, st["read_only"]
    assert st["data_blocks_free"] > 0  # it is the metadata that ran out, not the data

    def check_synced():
        for name, written in synced.items():
            for offset, data in written.items():
                got = read_all(m.vol(name), offset, len(data))
                assert got == data, f"{name} at {offset}: {got!r} != {data!r}"

    check_synced()
    for i in range(8):  # base's writes beside the blocks it shares did not reach the snapshot
        assert read_all(m.vol("snap"), i * LEAF * BS + BS, 64) == bytes(64)
    # Writes to new leaves stay refused.  (Whether one fits depends on the pages it needs,
    # and a commit frees the pages the commit before last held, so one more may fit.)
    refused = None
    for i in range(1000, 1040):
        data = b"more %d" % i
        try:
            write_fully(m.vol("spread"), i * LEAF * BS, data)
        except OSError as exc:
            refused = exc
            break
        synced["spread"][i * LEAF * BS] = data
    assert_enospc(refused, "writes to new leaves with the metadata full")
    # Overwriting a block base owns exclusively (written after the snapshot) needs no metadata.
    write_fully(m.vol("base"), base_offsets[0], b"overwritten")
    synced["base"][base_offsets[0]] = b"overwritten"
    check_synced()

    m.umount()
    check_clean(pool)
    m.mount()
    check_synced()
    assert sorted(os.listdir(m.mountpoint)) == sorted(synced)

    # Extending the metadata online brings writes back.
    run_fusepool("extend", pool, "--metadata-size", meta_size * 4)
    assert info(pool)["metadata_space_total"] == meta_size * 4
    for name in ("base", "spread"):
        for i in range(2000, 2012):
            data = b"after extend %d" % i
            write_fully(m.vol(name), i * LEAF * BS + 8192, data)
            synced[name][i * LEAF * BS + 8192] = data
    check_synced()
    check_clean(pool)
    m.umount()
    check_clean(pool)
    m.mount()
    check_synced()


# --- 4. the host filesystem under the sparse files fills up --------------------------------

@pytest.fixture
def hostfs_pool(small_hostfs, make_mount):
    """(pool on the small tmpfs, make_mount): the pool mounts are torn down before the tmpfs."""
    pool = small_hostfs / "pool"
    run_fusepool("init", pool, "--data-size", "256M", "--metadata-size", "8M", "--min-free-space", "0%")
    return pool, make_mount


def host_free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.root
def test_host_filesystem_full_under_data_file(hostfs_pool):
    """A 256 MiB pool on a 24 MiB tmpfs: the host fills before the pool does."""
    pool, make_mount = hostfs_pool
    # the host's ENOSPC at write() itself: --write-through (the default cache reports it at
    # fsync)
    m = make_mount(pool, "--write-through")
    create(pool, "other", "1M")
    other = random.Random(31).randbytes(256 * KiB)
    write_fully(m.vol("other"), 0, other)
    names = ["a", "b", "c"]
    for name in names:
        create(pool, name, "128M")
    writers = run_writers([Writer(m.vol(n), seed=40 + i) for i, n in enumerate(names)])
    for w in writers:
        assert_enospc(w.error, f"writer on {w.path.name} ({w.failed_in}); log:\n{pool_log(pool)}")
    assert daemon_alive(m), pool_log(pool)
    st = fusepool_json("info", pool)  # the daemon still answers
    assert st["read_only"] is None, st["read_only"]
    assert st["data_blocks_free"] > 0  # the pool itself is far from full
    models = {"other": bytearray(other)} | {n: w.model for n, w in zip(names, writers, strict=False)}
    # While the daemon runs, everything written (fsync-ed or not) reads back.
    verify(m, models)

    # Removing a volume punches its blocks out of the data file after the commit.
    free_before = host_free(pool)
    proc = run_fusepool("remove", pool, "a", check=False)
    assert proc.returncode == 0, f"remove on a full host filesystem failed: {proc.stderr}"
    assert host_free(pool) >= free_before + len(models["a"]) - MiB
    del models["a"]
    writers = run_writers([Writer(m.vol(n), seed=60 + i, model=models[n], limit=len(models[n]) + 2 * MiB)
                           for i, n in enumerate(["b", "c"])])
    for w in writers:
        assert w.error is None, f"write after remove failed: {w.error!r} ({w.failed_in})"
    verify(m, models)
    m.umount()
    check_clean(pool)
    m.mount()
    verify(m, models)


def fill_host(path, leave: int = 0) -> int:
    """Fill the filesystem of ``path`` (a new file) until ENOSPC, then give ``leave`` bytes back."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    size = 0
    try:
        for chunk in (MiB, 4096):
            buf = b"\xaa" * chunk
            while True:
                try:
                    done = os.pwrite(fd, buf, size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
                size += done
                if done < chunk:
                    break
        if leave:
            size -= leave
            os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return size


@pytest.mark.root
@pytest.mark.parametrize("leave_pages", [0, 1])
def test_host_filesystem_full_at_commit(hostfs_pool, leave_pages):
    """A commit (new pages of the sparse metadata file) meets a full host filesystem."""
    pool, make_mount = hostfs_pool
    m = make_mount(pool, "--commit-period", "3600")  # commits only when asked to
    rng = random.Random(71)
    models = {}
    for name in ("a", "b"):
        create(pool, name, "16M")
        models[name] = bytearray(rng.randbytes(MiB))
        write_fully(m.vol(name), 0, models[name])
    txn = info(pool)["transaction_id"]
    # Provision new blocks without fsync: the data is on the host, the metadata is dirty.
    for name in ("a", "b"):
        more = rng.randbytes(MiB)
        write_fully(m.vol(name), MiB, more, fsync=False)
        models[name] += more
    filler = pool.parent / "filler"
    fill_host(filler, leave=leave_pages * 4096)

    # fsync must report a failed commit (ENOSPC), and a commit it reports as done must be
    # whole; the daemon lives on, consistent and writable.
    failed = []
    for name in ("a", "b"):
        try:
            write_fully(m.vol(name), 0, models[name][:10])  # (an in-place overwrite, then fsync)
        except OSError as exc:
            assert_enospc(exc, f"fsync of {name} on a full host filesystem")
            failed.append(name)
        else:
            report = check_pool(str(pool))  # what is on disk now, read without the daemon
            assert report.ok, (
                f"fsync of {name} succeeded with {leave_pages} page(s) left free on the host, but the "
                f"commit it made is torn: {[p.message for p in report.problems]}")
    assert daemon_alive(m), pool_log(pool)
    report = check_pool(str(pool))
    assert report.ok, [p.message for p in report.problems]
    st = info(pool)
    assert st["read_only"] is None, st["read_only"]
    if failed == ["a", "b"]:
        assert st["transaction_id"] == txn
    verify(m, models)
    # In-place overwrites of committed exclusive blocks still work (their fsync does not).
    data = rng.randbytes(5000)
    write_fully(m.vol("a"), 3000, data, fsync=False)
    models["a"][3000:8000] = data
    verify(m, models)

    os.unlink(filler)
    for name in ("a", "b"):
        write_fully(m.vol(name), 0, models[name][:10])  # fsync works again
    st = info(pool)  # (the fsync made a commit, or a journal record on top of one)
    assert st["transaction_id"] > txn or st["journal_records"] > 0, st
    check_clean(pool)  # online
    m.umount()
    check_clean(pool)
    m.mount()
    verify(m, models)
