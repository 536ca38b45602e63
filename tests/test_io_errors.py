"""Errors are never swallowed: I/O errors, short reads and unexpected exceptions.

dm-thin's rules, as fusepool keeps them (docs/design.md, "Failure handling"):

- a failed flush of the data image fails the fsync (EIO) and turns the pool
  read-only with the needs-check flag set in the superblock of the last good
  commit; nothing is committed over it, and the flag keeps the pool read-only
  until ``fusepool check`` (clean) or ``fusepool repair`` clears it;
- only a failed journal append may fall back to a full commit;
- a read that stops short before the end of the data image is EIO, never
  zeros, and a read-modify-write never writes back after one;
- an unexpected exception in a FUSE handler fails the pool the same way;
- ``repair`` keeps the journaled writes; a rename over a volume is one commit;
  handles act on their device, whatever now has its name.

The fault layer (tests/faultfs.py) injects the I/O errors under the engine.
"""

import errno
import os
import random
import stat

import engine_helpers
import pyfuse3
import pytest
import trio
from conftest import read_all, run_fusepool
from engine_helpers import BS, mapping_of, pattern, read_superblocks_of, tracked_pool
from engine_model import crash
from faultfs import FaultFS, write_image

from fusepool.check import check_offline, check_pool, repair
from fusepool.cli import format_info
from fusepool.engine import Pool
from fusepool.errors import PoolError, ReadOnlyPool
from fusepool.fs import INODE_BASE, FusepoolOperations
from fusepool.metadata.format import FANOUT, FLAG_NEEDS_CHECK, PAGE_SIZE
from fusepool.mount import Daemon

FILES = ("data", "metadata", "journal")


SMALL = {"data_size": 8 << 20, "metadata_size": 2 << 20}


def new_pool(tmp_path, name="pool", **kw) -> str:
    return engine_helpers.new_pool(tmp_path, name, **SMALL | kw)


def faulty_pool(tmp_path, files=FILES, **kw):
    """``engine_helpers.tracked_pool`` with this module's small pool: ``with ... as (fs, path)``."""
    return tracked_pool(tmp_path, files, **SMALL | kw)


def newest_superblock(path: str):
    return max((sb for _, sb in read_superblocks_of(path) if not isinstance(sb, Exception)),
               key=lambda sb: sb.transaction_id)


def disk_image(fs: FaultFS, path: str, dest) -> str:
    """The pool as the disk holds it now (what a power cut would leave)."""
    return write_image(fs.crash_image(random.Random(0), "none"), path, str(dest))


def allow_warnings(caplog) -> None:
    caplog.allow_warnings = True  # opening a needs-check pool warns, as it should


def phys(pool: Pool, dev, vb: int) -> int:
    """Byte offset in the data image of a volume's virtual block."""
    return mapping_of(pool, dev)[vb] * pool.block_size


# --- 1. a failed data flush ---------------------------------------------------------------

@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("how", ["sync", "commit"])
def test_failed_data_flush_fails_the_pool_and_commits_nothing(tmp_path, caplog, how, err):
    allow_warnings(caplog)
    with faulty_pool(tmp_path) as (fs, path):
        pool = Pool.open(path)
        v = pool.create_volume("v", 16 * BS)
        pool.write(v.dev_id, 0, pattern(1, 2 * BS))
        pool.commit()
        good = pool.transaction_id
        pool.write(v.dev_id, 2 * BS, pattern(2, BS))  # a new block: its mapping is not durable yet
        pool.write(v.dev_id, 0, b"in place")  # an overwrite of an owned block
        fs.fail_next_sync("data", err)
        events = []
        fs.on_event = events.append
        with pytest.raises(PoolError) as raised:
            pool.sync() if how == "sync" else pool.commit()
        assert raised.value.errno == errno.EIO, raised.value
        assert fs.failed_syncs == 1
        assert pool.failed and pool.needs_check
        assert "fusepool check" in pool.failed and "fusepool repair" in pool.failed
        # Nothing committed over it: the only metadata writes are the flag in the
        # superblock slot of the last good commit; no journal record.
        meta = [e for e in events if e.name == "metadata" and e.kind.startswith("pwrite")]
        assert meta and all(e.offset == (good % 2) * PAGE_SIZE and e.length == PAGE_SIZE for e in meta), meta
        assert not [e for e in events if e.name == "journal" and e.kind.startswith("pwrite")]
        # The error is not forgotten: the next sync and commit fail too (a second
        # fdatasync would return 0), and every change is refused, naming the cause.
        with pytest.raises(PoolError) as again:
            pool.sync()
        assert again.value.errno in (errno.EIO, errno.EROFS)
        with pytest.raises(ReadOnlyPool, match="fusepool check"):
            pool.commit()
        with pytest.raises(ReadOnlyPool, match="flush"):
            pool.write(v.dev_id, 3 * BS, b"more")
        with pytest.raises(ReadOnlyPool):
            pool.create_volume("w", BS)
        assert pool.transaction_id == good
        assert "Read Only: " in format_info(pool.stats() | {"mounted": None})
        image = disk_image(fs, path, tmp_path / "image")
        fs.on_event = None
        pool.close()  # commits nothing
    assert newest_superblock(path).transaction_id == good

    for where in (path, image):  # the process went on, or the power failed
        sb = newest_superblock(where)
        assert sb.transaction_id == good and sb.flags & FLAG_NEEDS_CHECK, where
        with Pool.open(where) as pool:
            assert pool.needs_check and pool.failed
            v = pool.volume("v")
            assert pool.read(v.dev_id, 2 * BS, BS) == bytes(BS)  # never committed
            with pytest.raises(ReadOnlyPool, match="fusepool check"):
                pool.write(v.dev_id, 0, b"x")
            if where == image:  # the in-place overwrite never reached the disk
                assert pool.read(v.dev_id, 0, 2 * BS) == pattern(1, 2 * BS)
        assert newest_superblock(where).transaction_id == good  # opening committed nothing

    # A clean check clears the flag (thin_check --clear-needs-check-flag); repair does too.
    report = check_offline(path)
    assert report.ok and any("needs-check flag cleared" in n for n in report.notes), report.notes
    said = repair(image)
    assert check_pool(image).ok, said
    for where in (path, image):
        assert not newest_superblock(where).flags & FLAG_NEEDS_CHECK
        with Pool.open(where) as pool:
            assert not pool.failed and not pool.needs_check
            v = pool.volume("v")
            pool.write(v.dev_id, 3 * BS, b"writable again")
        with Pool.open(where) as pool:
            assert pool.read(pool.volume("v").dev_id, 3 * BS, 14) == b"writable again"


def test_failed_journal_append_falls_back_to_a_commit(tmp_path):
    with faulty_pool(tmp_path) as (fs, path):
        pool = Pool.open(path)
        v = pool.create_volume("v", 16 * BS)
        pool.commit()
        commits = pool.commits
        pool.write(v.dev_id, 0, pattern(1, 3 * BS))
        fs.fail_next_sync("journal", errno.EIO)
        pool.sync()  # succeeds: the commit made it durable
        assert fs.failed_syncs == 1
        assert pool.failed is None and not pool.needs_check
        assert pool.commits == commits + 1 and pool.journal_syncs == 0
        image = disk_image(fs, path, tmp_path / "image")
        crash(pool)
    with Pool.open(image) as pool:
        assert pool.read(pool.volume("v").dev_id, 0, 3 * BS) == pattern(1, 3 * BS)
        assert not pool.needs_check
    assert check_pool(image).ok


async def test_periodic_commits_stop_after_a_failed_flush(tmp_path, caplog):
    allow_warnings(caplog)
    with faulty_pool(tmp_path) as (fs, path):
        pool = Pool.open(path)
        v = pool.create_volume("v", 16 * BS)
        pool.write(v.dev_id, 0, pattern(1, BS))
        fs.fail_next_sync("data", errno.EIO)
        daemon = Daemon(pool, str(tmp_path / "mnt"), commit_period=0.01)
        with trio.move_on_after(0.3):
            await daemon._commit_timer()  # the first tick fails the pool; no later tick commits
        assert pool.needs_check
        syncs = fs.syncs
        good = pool.transaction_id
        with trio.move_on_after(0.1):
            await daemon._commit_timer()
        assert fs.syncs == syncs and pool.transaction_id == good
        crash(pool)


# --- 2. short reads ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["loop", "direct"])
def test_a_short_read_is_eio_not_zeros(tmp_path, mode):
    with faulty_pool(tmp_path, ("data", "metadata"), mode=mode) as (fs, path), Pool.open(path) as pool:
        v = pool.create_volume("v", 4 * BS)
        data = pattern(1, 2 * BS)
        pool.write(v.dev_id, 0, data)
        pool.commit()
        bad = phys(pool, v, 1) + 8192  # a media error inside the second block
        fs.short_reads("data", bad, bad + 512)
        with pytest.raises((OSError, PoolError)) as raised:
            pool.read(v.dev_id, 0, 2 * BS)
        assert raised.value.errno == errno.EIO
        with pytest.raises((OSError, PoolError)) as raised:
            pool.read(v.dev_id, BS + 8192, 10)
        assert raised.value.errno == errno.EIO
        assert pool.read(v.dev_id, 0, BS) == data[:BS]  # the rest of the volume reads
        assert pool.failed is None  # a read error fails the read, not the pool (dm-thin)
        fs.clear_read_faults()
        assert pool.read(v.dev_id, 0, 2 * BS) == data


def test_a_read_past_the_end_of_the_data_file_is_zeros(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 4 * BS)
        pool.write(v.dev_id, 0, pattern(1, BS))
        end = phys(pool, v, 0) + BS // 2
    os.truncate(os.path.join(path, "data"), end)  # (a read-only open does not grow it back)
    with Pool.open(path, readonly=True) as pool:
        assert pool.read(pool.volume("v").dev_id, 0, BS) == pattern(1, BS)[: BS // 2] + bytes(BS // 2)


def test_direct_mode_never_writes_back_after_a_short_read(tmp_path):
    with faulty_pool(tmp_path, ("data", "metadata"), mode="direct") as (fs, path), Pool.open(path) as pool:
        v = pool.create_volume("v", 4 * BS)
        data = pattern(1, BS)
        pool.write(v.dev_id, 0, data)
        pool.commit()
        base = phys(pool, v, 0)
        # An unaligned write reads its first and last sectors back first; make those reads short.
        fs.short_reads("data", base + 4096, base + 4096 + 512)
        events = []
        fs.on_event = events.append
        with pytest.raises((OSError, PoolError)) as raised:
            pool.write(v.dev_id, 4096 + 100, b"patch")
        assert raised.value.errno == errno.EIO
        assert not [e for e in events if e.name == "data" and e.kind.startswith("pwrite")]
        fs.on_event = None
        fs.clear_read_faults()
        assert pool.read(v.dev_id, 0, BS) == data
        assert pool.failed is None
    with open(os.path.join(path, "data"), "rb") as f:
        f.seek(base)
        assert f.read(BS) == data


# --- 3. an unexpected exception in a FUSE handler -----------------------------------------------

async def test_an_unexpected_exception_fails_the_pool_until_repair(tmp_path, monkeypatch, caplog):
    allow_warnings(caplog)
    path = new_pool(tmp_path)
    pool = Pool.open(path)
    v = pool.create_volume("v", 2 * FANOUT * BS)
    pool.write(v.dev_id, 0, pattern(1, BS))
    pool.commit()
    good = pool.transaction_id
    ops = FusepoolOperations(pool)
    fi = await ops.open(v.dev_id + INODE_BASE, os.O_RDWR, None)
    # A write across a leaf boundary remaps two leaves; the engine dies half-way
    # (a stand-in for a bug or a crash in the middle of a remap).
    real, calls = pool.tree.writable_leaf, []

    def dies_on_the_second_leaf(root, level, leaf_index):
        calls.append(leaf_index)
        if len(calls) == 2:
            raise RuntimeError("injected: died half-way through a remap")
        return real(root, level, leaf_index)

    monkeypatch.setattr(pool.tree, "writable_leaf", dies_on_the_second_leaf)
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await ops.write(fi.fh, (FANOUT - 1) * BS, pattern(2, 2 * BS))
    assert raised.value.errno == errno.EIO
    monkeypatch.undo()
    assert calls == [0, 1], "the injection did not hit the middle of the remap"
    assert pool.needs_check and "RuntimeError" in pool.failed
    # Read-only from now on, saying why and what to do.
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await ops.write(fi.fh, 0, b"x")
    assert raised.value.errno == errno.EROFS
    with pytest.raises(ReadOnlyPool, match=r"RuntimeError.*fusepool check.*fusepool repair"):
        pool.create_volume("w", BS)
    with pytest.raises(ReadOnlyPool):
        pool.commit()
    info = format_info(pool.stats() | {"mounted": None})
    assert "Read Only: " in info and "RuntimeError" in info
    assert pool.transaction_id == good
    await ops.release(fi.fh)
    pool.close()  # commits nothing

    sb = newest_superblock(path)
    assert sb.transaction_id == good and sb.flags & FLAG_NEEDS_CHECK
    with Pool.open(path) as pool:  # the last good commit, read-only
        assert pool.needs_check
        v = pool.volume("v")
        assert pool.read(v.dev_id, 0, BS) == pattern(1, BS)
        assert pool.read(v.dev_id, (FANOUT - 1) * BS, 2 * BS) == bytes(2 * BS)
        with pytest.raises(ReadOnlyPool, match="needs-check"):
            pool.write(v.dev_id, 0, b"x")
    said = repair(path)
    assert check_pool(path).ok, said
    with Pool.open(path) as pool:
        assert not pool.needs_check and not pool.failed
        pool.write(pool.volume("v").dev_id, BS, b"fine")


# --- 4. repair keeps the journal -----------------------------------------------------------------

def test_repair_replays_the_journal_before_dropping_it(tmp_path):
    path = new_pool(tmp_path)
    pool = Pool.open(path)
    v = pool.create_volume("v", 16 * BS)
    pool.write(v.dev_id, 0, pattern(1, 2 * BS))
    pool.snapshot("v", "s")
    pool.space.claim(pool.nr_blocks - 1)  # a leak: counted, mapped by nobody
    pool.transaction.metadata_changed = True
    pool.commit()
    pool.write(v.dev_id, 4 * BS, pattern(2, 2 * BS))  # new blocks
    pool.write(v.dev_id, 100, b"copied on write")  # breaks sharing with s
    pool.write(v.dev_id, 20 * BS, b"grown")  # past the end: the size is journaled too
    pool.sync()
    assert pool.journal_syncs == 1
    want_v, want_s = pool.read(v.dev_id, 0, 20 * BS + 5), pool.read(pool.volume("s").dev_id, 0, 16 * BS)
    crash(pool)
    report = check_pool(path)
    assert [p.kind for p in report.problems] == ["leak"], report.problems
    assert any("journal: 1 record" in n for n in report.notes), report.notes
    said = repair(path)
    assert any("replayed 1 journal record" in line for line in said), said
    assert check_pool(path).ok
    with Pool.open(path) as pool:
        assert pool.read(pool.volume("v").dev_id, 0, 20 * BS + 5) == want_v
        assert pool.read(pool.volume("s").dev_id, 0, 16 * BS) == want_s


# --- 5. rename over a volume: one commit ---------------------------------------------------------

async def test_rename_over_a_volume_commits_once(tmp_path):
    images = []
    with faulty_pool(tmp_path, data_size=2 << 20, metadata_size=1 << 20) as (fs, path):
        pool = Pool.open(path)
        a = pool.create_volume("a", 2 * BS)
        b = pool.create_volume("b", 2 * BS)
        pool.write(a.dev_id, 0, b"source")
        pool.write(b.dev_id, 0, b"target")
        pool.commit()
        ops = FusepoolOperations(pool)
        fi = await ops.open(b.dev_id + INODE_BASE, os.O_RDWR, None)  # the target is open
        rng = random.Random(1)
        fs.on_event = lambda e: images.append(fs.crash_image(rng, "all"))
        await ops.rename(pyfuse3.ROOT_INODE, b"a", pyfuse3.ROOT_INODE, b"b", 0, None)
        assert pool.names == {"b": a.dev_id} and pool.devices[b.dev_id].deleted
        assert await ops.read(fi.fh, 0, 6) == b"target"  # still readable through its handle
        await ops.release(fi.fh)  # now it goes
        fs.on_event = None
        assert b.dev_id not in pool.devices
        images.append(fs.crash_image(rng, "all"))
        pool.close()
    states = set()
    for i, image in enumerate(images):
        where = write_image(image, path, str(tmp_path / f"image{i}"))
        with Pool.open(where, readonly=True) as pool:
            names = {name: (dev_id, pool.read(dev_id, 0, 6)) for name, dev_id in pool.names.items()}
        state = tuple(sorted((name, dev_id) for name, (dev_id, _) in names.items()))
        states.add(state)
        assert state in ((("a", a.dev_id), ("b", b.dev_id)), (("b", a.dev_id),)), \
            f"image {i}: a crash here leaves {names}"
        assert names["b"][1] == (b"target" if state[0][0] == "a" else b"source")
    assert len(states) == 2


# --- 6. handles go by device id -------------------------------------------------------------------

def test_ftruncate_on_an_unlinked_volume_leaves_its_namesake_alone(pool, make_mount):
    m = make_mount(pool)
    run_fusepool("create", pool, "a", "--size", "1M")
    fd = os.open(m.vol("a"), os.O_RDWR)
    try:
        os.pwrite(fd, b"old a", 0)
        os.unlink(m.vol("a"))
        run_fusepool("create", pool, "a", "--size", "1M")
        os.ftruncate(fd, 2 << 20)
        assert os.fstat(fd).st_size == 2 << 20
        assert os.pread(fd, 5, 0) == b"old a"
    finally:
        os.close(fd)
    st = os.stat(m.vol("a"))
    assert stat.S_ISREG(st.st_mode) and st.st_size == 1 << 20
    assert read_all(m.vol("a"), 0, 5) == bytes(5)


# --- what the user sees ------------------------------------------------------------------------

def test_a_needs_check_pool_mounts_read_only_until_a_clean_check(pool, make_mount, caplog):
    allow_warnings(caplog)
    run_fusepool("create", pool, "v", "--size", "1M")
    with Pool.open(pool) as p:  # an I/O error or a bug stopped it earlier
        p.write(p.volume("v").dev_id, 0, b"kept")
        p.commit()
        p.fail_unexpected("injected for the test")
    # the errno of the refused write() itself: --write-through (the default cache reports it
    # at fsync)
    m = make_mount(pool, "--write-through")
    assert read_all(m.vol("v"), 0, 4) == b"kept"
    fd = os.open(m.vol("v"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as raised:
            os.pwrite(fd, b"new", 0)
        assert raised.value.errno == errno.EROFS
    finally:
        os.close(fd)
    proc = run_fusepool("create", pool, "w", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "read-only" in proc.stderr and "needs-check" in proc.stderr
    assert f"fusepool check {pool}" in proc.stderr and f"fusepool repair {pool}" in proc.stderr
    assert "Read Only: " in run_fusepool("info", pool).stdout
    online = run_fusepool("check", pool)  # through the mount: reports the flag, clears nothing
    assert "flagged needs-check" in online.stdout
    m.umount()
    offline = run_fusepool("check", pool)
    assert "needs-check flag cleared" in offline.stdout, offline.stdout
    assert "Read Only" not in run_fusepool("info", pool).stdout
    m.mount()
    fd = os.open(m.vol("v"), os.O_RDWR)
    try:
        os.pwrite(fd, b"new", 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert read_all(m.vol("v"), 0, 4) == b"newt"
