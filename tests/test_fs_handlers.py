"""FUSE handlers called directly: fusepool.fs.FusepoolOperations over a real Pool, no mount.

The layer between the engine tests (tests/test_engine_*.py) and the mounted
ones: each handler's contract and its errno mapping, checked on the engine's
state after the call.  The handlers run inside trio (pytest-trio) as pyfuse3
would run them, without the kernel: what only a mount shows (the kernel's page
cache, readdir's reply buffer, invalidations) is in tests/test_mount.py and
tests/test_writeback.py.

pyfuse3's SetattrFields and RequestContext cannot be filled in from Python
(read-only attributes of C types), so the requests carry SimpleNamespace
stand-ins with the same fields: they are the request, not the thing under test.
"""

import errno
import json
import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
from engine_helpers import BS, MiB, expect_logged, new_pool, pattern, pool_state, tracked_pool
from engine_model import check_invariants, crash

from fusepool.check import check_offline
from fusepool.engine import CONTROL_NAME, MAX_VOLUME_SIZE, Pool
from fusepool.fs import FusepoolOperations

ROOT = pyfuse3.ROOT_INODE
CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), umask=0o022)
SETATTR_FIELDS = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
                  "update_gid", "update_size")


def fields(*names: str) -> SimpleNamespace:
    """A setattr request's SetattrFields with ``names`` set."""
    assert set(names) <= set(SETATTR_FIELDS), names
    return SimpleNamespace(**{f: f in names for f in SETATTR_FIELDS})


def attrs(**values) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    for k, v in values.items():
        setattr(a, k, v)
    return a


async def fuse_errno(call) -> int:
    """The errno a handler answers with (it must answer with one)."""
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await call
    return raised.value.errno


@pytest.fixture
def make_ops(tmp_path):
    """``make_ops(**pool_args)`` -> FusepoolOperations over a freshly created and opened Pool.

    At teardown the pool is closed (unless the test dropped it) and the offline
    checker must find it consistent.
    """
    made = []

    def make(name="pool", no_space_timeout=0.0, **pool_args):
        path = new_pool(tmp_path, name, **{"data_size": 16 * BS, "metadata_size": 1 * MiB} | pool_args)
        ops = FusepoolOperations(Pool.open(path), no_space_timeout=no_space_timeout)
        made.append(ops)
        return ops

    yield make
    for ops in made:
        if ops.pool.lock.fd >= 0:
            ops.pool.close()
        report = check_offline(ops.pool.path)
        assert report.ok, f"fusepool check {ops.pool.path}: {report.problems}"


@pytest.fixture
def ops(make_ops):
    return make_ops()


async def inode_of(ops, name: str) -> int:
    return (await ops.lookup(ROOT, os.fsencode(name))).st_ino


# --- lookup, getattr -------------------------------------------------------------------------

async def test_lookup_and_getattr_describe_the_volume(ops):
    pool = ops.pool
    v = pool.create_volume("vol é", 3 * BS + 100)
    pool.write(v.dev_id, BS, pattern(1, 2 * BS))
    found = await ops.lookup(ROOT, "vol é".encode())
    got = await ops.getattr(found.st_ino)
    for a in (found, got):
        assert stat.S_ISREG(a.st_mode) and stat.S_IMODE(a.st_mode) == v.mode
        assert a.st_size == 3 * BS + 100
        assert a.st_blocks * 512 == 2 * BS  # mapped blocks: what du shows
        assert a.st_blksize == BS and a.st_nlink == 1
        assert (a.st_uid, a.st_gid) == (os.getuid(), os.getgid())
    assert found.st_ino == got.st_ino != ROOT
    # Inodes derive from device ids: another volume, another inode; stable across lookups.
    pool.create_volume("w", BS)
    assert await inode_of(ops, "w") != found.st_ino == await inode_of(ops, "vol é")
    # A write changes what getattr reports (the kernel asks again after its attr timeout).
    pool.write(v.dev_id, 4 * BS, b"grows")
    a = await ops.getattr(found.st_ino)
    assert a.st_size == 4 * BS + 5 and a.st_blocks * 512 == 3 * BS


async def test_lookup_and_getattr_of_the_root(ops):
    root = await ops.getattr(ROOT)
    assert stat.S_ISDIR(root.st_mode) and root.st_ino == ROOT
    assert (await ops.lookup(ROOT, b".")).st_ino == ROOT


async def test_lookup_and_getattr_errors(ops):
    pool = ops.pool
    pool.create_volume("v", BS)
    ino = await inode_of(ops, "v")
    assert await fuse_errno(ops.lookup(ROOT, b"nope")) == errno.ENOENT
    assert await fuse_errno(ops.lookup(ino, b"v")) == errno.ENOTDIR  # a volume is no directory
    assert await fuse_errno(ops.getattr(ino + 1000)) == errno.ENOENT
    pool.remove("v")
    assert await fuse_errno(ops.lookup(ROOT, b"v")) == errno.ENOENT
    assert await fuse_errno(ops.getattr(ino)) == errno.ENOENT


async def test_the_control_file_is_read_only_and_names_the_pool(ops):
    a = await ops.lookup(ROOT, CONTROL_NAME.encode())
    assert stat.S_ISREG(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o444
    assert await fuse_errno(ops.open(a.st_ino, os.O_RDWR, CTX)) == errno.EACCES
    assert await fuse_errno(ops.open(a.st_ino, os.O_WRONLY, CTX)) == errno.EACCES
    fi = await ops.open(a.st_ino, os.O_RDONLY, CTX)
    data = await ops.read(fi.fh, 0, 4096)
    assert len(data) == a.st_size
    assert json.loads(data) == {"pool": ops.pool.path, "pid": os.getpid()}
    await ops.release(fi.fh)
    assert ops.pool.names == {}  # nothing was made of it


# --- create, open, release ---------------------------------------------------------------------

async def test_create_makes_an_empty_open_volume_with_the_callers_mode(ops):
    pool = ops.pool
    txn = pool.transaction_id
    fi, a = await ops.create(ROOT, b"new", stat.S_IFREG | 0o666, os.O_RDWR | os.O_CREAT, CTX)
    v = pool.volume("new")
    assert v.size == 0 and v.mapped_blocks == 0 and v.open_count == 1
    assert v.mode == 0o644  # 0o666 less the creator's umask
    assert a.st_ino == await inode_of(ops, "new") and a.st_size == 0
    assert pool.transaction_id > txn  # a namespace change is durable at once
    assert await ops.write(fi.fh, 10, b"first") == 5
    assert pool.read(v.dev_id, 0, 15) == bytes(10) + b"first"
    await ops.release(fi.fh)
    assert v.open_count == 0 and "new" in pool.names
    check_invariants(pool)


async def test_create_errors_change_nothing(make_ops):
    ops = make_ops(data_size=20 * BS, min_free_space=10)
    pool = ops.pool
    v = pool.create_volume("v", 20 * BS)
    state = pool_state(pool)
    flags = os.O_RDWR | os.O_CREAT
    assert await fuse_errno(ops.create(ROOT, b"v", 0o600, flags, CTX)) == errno.EEXIST
    for bad in (b"x" * 256, CONTROL_NAME.encode(), b"line\nbreak", b"\xff\xfe"):
        assert await fuse_errno(ops.create(ROOT, bad, 0o600, flags, CTX)) == errno.EINVAL, bad
    ino = await inode_of(ops, "v")
    assert await fuse_errno(ops.create(ino, b"w", 0o600, flags, CTX)) == errno.ENOTDIR
    assert pool_state(pool) == state
    # Below the minimum free space a new volume is refused: ENOSPC, as for `fusepool create`.
    pool.write(v.dev_id, 0, pattern(2, 19 * BS))
    state = pool_state(pool)
    assert await fuse_errno(ops.create(ROOT, b"w", 0o600, flags, CTX)) == errno.ENOSPC
    assert pool_state(pool) == state
    assert not ops.handles


async def test_open_and_release_hold_the_device(ops):
    pool = ops.pool
    v = pool.create_volume("v", 2 * BS)
    ino = await inode_of(ops, "v")
    a = await ops.open(ino, os.O_RDWR, CTX)
    b = await ops.open(ino, os.O_RDONLY, CTX)
    assert a.fh != b.fh and v.open_count == 2
    await ops.release(a.fh)
    assert v.open_count == 1
    await ops.release(b.fh)
    assert v.open_count == 0
    assert await fuse_errno(ops.open(ino + 1000, os.O_RDWR, CTX)) == errno.ENOENT


async def test_open_with_o_trunc_never_shrinks(ops):
    pool = ops.pool
    v = pool.create_volume("v", 2 * BS)
    pool.write(v.dev_id, 0, b"keep")
    state = pool_state(pool)
    ino = await inode_of(ops, "v")
    assert await fuse_errno(ops.open(ino, os.O_RDWR | os.O_TRUNC, CTX)) == errno.EPERM
    assert pool_state(pool) == state and v.open_count == 0
    pool.create_volume("empty", 0)  # nothing to cut: fine
    fi = await ops.open(await inode_of(ops, "empty"), os.O_WRONLY | os.O_TRUNC, CTX)
    await ops.release(fi.fh)


# --- read, write -------------------------------------------------------------------------------

async def test_read_and_write_go_to_the_device(ops):
    pool = ops.pool
    v = pool.create_volume("v", 4 * BS)
    fi = await ops.open(await inode_of(ops, "v"), os.O_RDWR, CTX)
    data = pattern(3, BS + 300)
    assert await ops.write(fi.fh, BS - 100, data) == len(data)
    assert pool.read(v.dev_id, BS - 100, len(data)) == data
    assert v.mapped_blocks == 3
    assert await ops.read(fi.fh, BS - 100, len(data)) == data
    assert await ops.read(fi.fh, 3 * BS, BS) == bytes(BS)  # never written: zeros
    assert await ops.read(fi.fh, 4 * BS - 2, 10) == bytes(2)  # clipped at the size
    assert await ops.read(fi.fh, 5 * BS, 10) == b""
    # A write past the end grows the volume.
    assert await ops.write(fi.fh, 5 * BS, b"tail") == 4
    assert v.size == 5 * BS + 4 == (await ops.getattr(await inode_of(ops, "v"))).st_size
    assert await fuse_errno(ops.write(fi.fh, MAX_VOLUME_SIZE, b"x")) == errno.EINVAL
    await ops.release(fi.fh)
    check_invariants(pool)


async def test_write_on_a_full_pool_is_enospc_and_changes_nothing(make_ops):
    ops = make_ops(data_size=4 * BS)
    pool = ops.pool
    v = pool.create_volume("v", 8 * BS)
    fi = await ops.open(await inode_of(ops, "v"), os.O_RDWR, CTX)
    assert await ops.write(fi.fh, 0, b"f" * 4 * BS) == 4 * BS
    state = pool_state(pool)
    assert await fuse_errno(ops.write(fi.fh, 4 * BS, b"no room")) == errno.ENOSPC
    assert pool_state(pool) == state
    # Blocks the volume owns are still writable; the pool has not failed.
    assert await ops.write(fi.fh, 100, b"owned") == 5
    assert pool.failed is None
    # A write that fits in part returns a short count (the kernel retries the rest).
    pool.discard(v.dev_id, 0, BS)
    pool.commit()
    assert await ops.write(fi.fh, 4 * BS, b"g" * 2 * BS) == BS
    await ops.release(fi.fh)
    check_invariants(pool)


async def test_queued_write_waits_for_space_then_succeeds(make_ops, caplog, autojump_clock):
    ops = make_ops(data_size=4 * BS, no_space_timeout=60)
    pool = ops.pool
    v = pool.create_volume("v", 8 * BS)
    pool.create_volume("other", 2 * BS)
    pool.write(pool.volume("other").dev_id, 0, b"o" * 2 * BS)
    pool.write(v.dev_id, 0, b"v" * 2 * BS)
    fi = await ops.open(await inode_of(ops, "v"), os.O_RDWR, CTX)
    done = []

    async def writer():
        done.append(await ops.write(fi.fh, 4 * BS, b"queued"))

    with trio.fail_after(60):  # (virtual seconds: a write that never returns fails the test)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.sleep(10)
            assert not done and ops.queued_writes == 1  # waiting, not failed
            pool.remove("other")  # frees two blocks
            await trio.sleep(1)
            assert done == [6]
    expect_logged(caplog, "out of data space")
    assert ops.queued_writes == 0
    assert pool.read(v.dev_id, 4 * BS, 6) == b"queued"
    await ops.release(fi.fh)


async def test_queued_write_gives_up_with_enospc_after_the_timeout(make_ops, caplog, autojump_clock):
    ops = make_ops(data_size=2 * BS, no_space_timeout=30)
    pool = ops.pool
    v = pool.create_volume("v", 8 * BS)
    pool.write(v.dev_id, 0, b"v" * 2 * BS)
    state = pool_state(pool)
    fi = await ops.open(await inode_of(ops, "v"), os.O_RDWR, CTX)
    start = trio.current_time()
    with trio.fail_after(60):  # (virtual seconds: a write that never gives up fails the test)
        assert await fuse_errno(ops.write(fi.fh, 4 * BS, b"never")) == errno.ENOSPC
    assert 30 <= trio.current_time() - start < 31
    expect_logged(caplog, "out of data space")
    assert ops.queued_writes == 0 and pool_state(pool) == state
    await ops.release(fi.fh)


# --- fsync, flush ------------------------------------------------------------------------------

async def test_fsync_makes_the_writes_durable(make_ops):
    ops = make_ops()
    pool, path = ops.pool, ops.pool.path
    v = pool.create_volume("v", 4 * BS)
    fi = await ops.open(await inode_of(ops, "v"), os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, b"synced" * 100)
    await ops.fsync(fi.fh, True)
    await ops.write(fi.fh, 2 * BS, b"not synced")  # a new block, not made durable
    crash(pool)  # SIGKILL: the mapping of what fsync did not cover is lost
    with Pool.open(path) as pool:
        v = pool.volume("v")
        assert pool.read(v.dev_id, 0, 600) == b"synced" * 100
        assert pool.read(v.dev_id, 2 * BS, 10) == bytes(10)
        check_invariants(pool)


async def test_flush_at_close_does_not_commit(ops):
    pool = ops.pool
    v = pool.create_volume("v", 4 * BS)
    fi = await ops.open(await inode_of(ops, "v"), os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, b"x")
    txn, syncs = pool.transaction_id, pool.journal_syncs
    await ops.flush(fi.fh)  # (sent at every close: DESIGN.md, only fsync is dm-thin's FLUSH)
    assert (pool.transaction_id, pool.journal_syncs) == (txn, syncs) and pool.dirty
    await ops.release(fi.fh)
    assert pool.read(v.dev_id, 0, 1) == b"x"


async def test_fsync_after_a_failed_data_flush_is_eio_and_the_pool_turns_read_only(tmp_path, caplog):
    with tracked_pool(tmp_path, data_size=16 * BS, metadata_size=1 * MiB) as (fs, path):
        pool = Pool.open(path)
        ops = FusepoolOperations(pool, no_space_timeout=0)
        pool.create_volume("v", 4 * BS)
        fi = await ops.open(await inode_of(ops, "v"), os.O_RDWR, CTX)
        await ops.write(fi.fh, 0, b"lost?")
        fs.fail_next_sync("data", errno.EIO)
        assert await fuse_errno(ops.fsync(fi.fh, True)) == errno.EIO  # never swallowed
        expect_logged(caplog, "needs checking")
        assert pool.needs_check and pool.failed
        assert await fuse_errno(ops.write(fi.fh, 0, b"more")) == errno.EROFS
        assert await fuse_errno(ops.fsync(fi.fh, True)) in (errno.EIO, errno.EROFS)
        await ops.release(fi.fh)
        pool.close()  # commits nothing
    assert not check_offline(path).problems


# --- setattr -----------------------------------------------------------------------------------

async def test_setattr_grows_and_never_shrinks(ops):
    pool = ops.pool
    v = pool.create_volume("v", 2 * BS)
    pool.write(v.dev_id, 0, b"data")
    ino = await inode_of(ops, "v")
    a = await ops.setattr(ino, attrs(st_size=5 * BS + 1), fields("update_size"), None, CTX)
    assert a.st_size == v.size == 5 * BS + 1
    txn = pool.transaction_id
    state = pool_state(pool)
    for size in (BS, 0):
        assert await fuse_errno(ops.setattr(ino, attrs(st_size=size), fields("update_size"), None,
                                            CTX)) == errno.EPERM
    assert await fuse_errno(ops.setattr(ino, attrs(st_size=MAX_VOLUME_SIZE + 1), fields("update_size"),
                                        None, CTX)) == errno.EINVAL
    await ops.setattr(ino, attrs(st_size=5 * BS + 1), fields("update_size"), None, CTX)  # no change
    assert pool_state(pool) == state and pool.transaction_id == txn
    assert pool.read(v.dev_id, 0, 4) == b"data"
    check_invariants(pool)


async def test_setattr_mode_is_durable_and_owner_changes_are_refused(ops):
    pool = ops.pool
    v = pool.create_volume("v", BS)
    ino = await inode_of(ops, "v")
    a = await ops.setattr(ino, attrs(st_mode=stat.S_IFREG | 0o640), fields("update_mode"), None, CTX)
    assert stat.S_IMODE(a.st_mode) == v.mode == 0o640
    for f in ("update_uid", "update_gid"):
        assert await fuse_errno(ops.setattr(ino, attrs(st_uid=0, st_gid=0), fields(f), None,
                                            CTX)) == errno.EPERM
    assert await fuse_errno(ops.setattr(ROOT, attrs(st_mode=0o777), fields("update_mode"), None,
                                        CTX)) == errno.EPERM
    assert await fuse_errno(ops.setattr(ino + 1000, attrs(st_size=BS), fields("update_size"), None,
                                        CTX)) == errno.ENOENT
    a = await ops.setattr(ino, attrs(st_mtime_ns=1_500_000_000 * 10**9), fields("update_mtime"), None, CTX)
    assert a.st_mtime_ns == 1_500_000_000 * 10**9
    path = pool.path
    pool.close()
    with Pool.open(path) as pool:
        assert pool.volume("v").mode == 0o640


async def test_setattr_mtime_is_durable(ops):
    pool = ops.pool
    pool.create_volume("v", BS)
    ino = await inode_of(ops, "v")
    when = 1_500_000_000 * 10**9
    await ops.setattr(ino, attrs(st_mtime_ns=when), fields("update_mtime"), None, CTX)
    path = pool.path
    pool.close()
    with Pool.open(path) as pool:
        assert int(pool.volume("v").mtime * 1e9) == when


async def test_setattr_mtime_on_a_failed_pool_is_erofs(ops, caplog):
    pool = ops.pool
    v = pool.create_volume("v", BS)
    ino = await inode_of(ops, "v")
    pool.fail_unexpected("injected for the test")
    expect_logged(caplog, "injected for the test")
    mtime = v.mtime
    when = 1_500_000_000 * 10**9
    try:
        assert await fuse_errno(ops.setattr(ino, attrs(st_mtime_ns=when), fields("update_mtime"), None,
                                            CTX)) == errno.EROFS
    finally:
        assert v.mtime == mtime


async def test_setattr_on_an_unlinked_open_volume_acts_on_that_device(ops):
    pool = ops.pool
    old = pool.create_volume("v", BS)
    ino = await inode_of(ops, "v")
    fi = await ops.open(ino, os.O_RDWR, CTX)
    await ops.unlink(ROOT, b"v", CTX)
    new = pool.create_volume("v", BS)  # a namesake
    a = await ops.setattr(ino, attrs(st_size=3 * BS), fields("update_size"), fi.fh, CTX)
    assert a.st_size == old.size == 3 * BS and a.st_nlink == 0
    assert new.size == BS
    await ops.release(fi.fh)
    assert old.dev_id not in pool.devices


# --- unlink, rename ------------------------------------------------------------------------------

async def test_unlink_removes_the_volume_and_frees_its_blocks(ops):
    pool = ops.pool
    v = pool.create_volume("v", 4 * BS)
    pool.write(v.dev_id, 0, pattern(4, 4 * BS))
    pool.commit()
    free = pool.space.free
    await ops.unlink(ROOT, b"v", CTX)
    assert "v" not in pool.names and v.dev_id not in pool.devices
    pool.commit()
    assert pool.space.free == free + 4
    assert await fuse_errno(ops.unlink(ROOT, b"v", CTX)) == errno.ENOENT
    check_invariants(pool)


async def test_unlink_of_an_open_volume_is_deferred_to_the_last_release(ops):
    pool = ops.pool
    v = pool.create_volume("v", 2 * BS)
    pool.write(v.dev_id, 0, b"still here")
    ino = await inode_of(ops, "v")
    fi = await ops.open(ino, os.O_RDWR, CTX)
    await ops.unlink(ROOT, b"v", CTX)
    assert "v" not in pool.names and v.dev_id in pool.devices  # gone from the directory only
    assert await fuse_errno(ops.lookup(ROOT, b"v")) == errno.ENOENT
    assert (await ops.getattr(ino)).st_nlink == 0
    assert await ops.read(fi.fh, 0, 10) == b"still here"
    assert await ops.write(fi.fh, 0, b"STILL") == 5
    await ops.release(fi.fh)
    assert v.dev_id not in pool.devices and pool.space.used == 0
    check_invariants(pool)


async def test_rename(ops):
    pool = ops.pool
    a = pool.create_volume("a", BS)
    b = pool.create_volume("b", BS)
    pool.write(b.dev_id, 0, b"b's data")
    await ops.rename(ROOT, b"a", ROOT, b"c", 0, CTX)
    assert pool.names == {"c": a.dev_id, "b": b.dev_id}
    state = pool_state(pool)
    assert await fuse_errno(ops.rename(ROOT, b"c", ROOT, b"b", pyfuse3.RENAME_NOREPLACE, CTX)) == errno.EEXIST
    assert await fuse_errno(ops.rename(ROOT, b"c", ROOT, b"b", pyfuse3.RENAME_EXCHANGE, CTX)) == errno.EINVAL
    assert await fuse_errno(ops.rename(ROOT, b"nope", ROOT, b"x", 0, CTX)) == errno.ENOENT
    assert await fuse_errno(ops.rename(ROOT, b"c", ROOT, b"x" * 256, 0, CTX)) == errno.EINVAL
    assert pool_state(pool) == state
    # Over an existing volume: the target goes, in the same commit.
    txn = pool.transaction_id
    await ops.rename(ROOT, b"b", ROOT, b"c", 0, CTX)
    assert pool.names == {"c": b.dev_id} and a.dev_id not in pool.devices
    assert pool.transaction_id >= txn + 1
    assert pool.read(b.dev_id, 0, 8) == b"b's data"
    check_invariants(pool)


# --- statfs, directories -------------------------------------------------------------------------

async def test_statfs_reports_the_pools_data_space(ops):
    pool = ops.pool
    st = await ops.statfs(CTX)
    assert st.f_bsize == st.f_frsize == BS
    assert st.f_blocks == pool.nr_blocks == 16 and st.f_bfree == 16
    assert st.f_namemax == 255
    files = st.f_ffree
    v = pool.create_volume("v", 4 * BS)
    pool.write(v.dev_id, 0, pattern(5, 3 * BS))
    pool.commit()
    st = await ops.statfs(CTX)
    assert st.f_bfree == 13 == pool.stats()["data_blocks_free"]
    assert st.f_bavail <= st.f_bfree
    assert st.f_ffree == files - 1


async def test_directories_are_refused(ops):
    ops.pool.create_volume("v", BS)
    state = pool_state(ops.pool)
    assert await fuse_errno(ops.mkdir(ROOT, b"d", 0o755, CTX)) == errno.EPERM
    assert await fuse_errno(ops.opendir(await inode_of(ops, "v"), CTX)) == errno.ENOTDIR
    assert await ops.opendir(ROOT, CTX) == ROOT
    assert pool_state(ops.pool) == state


# --- a failed pool ---------------------------------------------------------------------------------

async def test_a_failed_pool_answers_changes_with_erofs_and_still_reads(ops, caplog):
    pool = ops.pool
    v = pool.create_volume("v", 2 * BS)
    pool.create_volume("w", BS)
    pool.write(v.dev_id, 0, b"readable")
    pool.commit()
    ino = await inode_of(ops, "v")
    fi = await ops.open(ino, os.O_RDWR, CTX)
    pool.fail_unexpected("injected for the test")
    expect_logged(caplog, "injected for the test")
    state = pool_state(pool)
    calls = {
        "write": lambda: ops.write(fi.fh, 0, b"x"),
        "create": lambda: ops.create(ROOT, b"new", 0o600, os.O_RDWR | os.O_CREAT, CTX),
        "unlink": lambda: ops.unlink(ROOT, b"w", CTX),
        "rename": lambda: ops.rename(ROOT, b"w", ROOT, b"z", 0, CTX),
        "grow": lambda: ops.setattr(ino, attrs(st_size=4 * BS), fields("update_size"), None, CTX),
        "chmod": lambda: ops.setattr(ino, attrs(st_mode=0o600), fields("update_mode"), None, CTX),
    }
    for what, call in calls.items():
        assert await fuse_errno(call()) == errno.EROFS, what
    assert pool_state(pool) == state
    assert await ops.read(fi.fh, 0, 8) == b"readable"
    assert (await ops.getattr(ino)).st_size == 2 * BS
    assert (await ops.statfs(CTX)).f_blocks == pool.nr_blocks
    await ops.release(fi.fh)
