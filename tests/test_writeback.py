"""`fusepool mount --writeback-cache`: the kernel caches writes; the pool's semantics hold.

Snapshots and discards must see every write made before them (the CLI flushes
the volume through the mount first), fsync must still make data durable, online
resizes must reach the kernel (which owns a cached volume's size), and running
out of space must still be reported (at fsync instead of at write).
"""

import errno
import os
import random

import pytest
from conftest import read_all, run_fusepool

from fusepool.check import check_offline

MiB = 1 << 20


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def wb_mount(pool, make_mount):
    return make_mount(pool, "--writeback-cache")


def test_status_says_the_writeback_cache_is_on(pool, wb_mount):
    from fusepool import control

    assert control.request(str(pool), "status")["writeback_cache"] is True


def test_snapshot_sees_writes_still_in_the_kernel_cache(pool, wb_mount):
    # The kernel usually starts writing a FUSE mount's dirty pages back at once (its
    # dirty limits for FUSE are strict), so this mostly checks the outcome; what
    # guarantees it is the CLI's fsync of the origin through the mount.
    run_fusepool("create", pool, "origin", "--size", "8M")
    data = pattern(1, 64 << 10)  # (small enough to stay in the cache until flushed)
    with open(wb_mount.vol("origin"), "r+b") as f:
        f.write(data)  # buffered, no fsync: in the kernel's page cache
        f.flush()
        run_fusepool("snapshot", pool, "origin", "snap")
        f.seek(0)
        f.write(pattern(2, 4096))  # after the snapshot: the origin only
        f.flush()
    assert read_all(wb_mount.vol("snap"), 0, len(data)) == data
    os.sync()
    assert read_all(wb_mount.vol("origin"), 0, 4096) == pattern(2, 4096)


def test_fsync_is_durable_across_a_daemon_kill(pool, wb_mount):
    run_fusepool("create", pool, "v", "--size", "8M")
    data = pattern(3, 3 * MiB)
    fd = os.open(wb_mount.vol("v"), os.O_RDWR)
    try:
        os.pwrite(fd, data, MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    wb_mount.kill()
    wb_mount.mount()
    assert read_all(wb_mount.vol("v"), MiB, 3 * MiB) == data


def test_online_resize_reaches_the_kernel(pool, wb_mount):
    run_fusepool("create", pool, "v", "--size", "1M")
    with open(wb_mount.vol("v"), "rb") as f:  # an open, cached inode
        assert os.fstat(f.fileno()).st_size == MiB
        run_fusepool("resize", pool, "v", "3M")
        assert os.fstat(f.fileno()).st_size == 3 * MiB
        run_fusepool("resize", pool, "v", "+1M")
        assert os.fstat(f.fileno()).st_size == 4 * MiB
    result = run_fusepool("resize", pool, "v", "2M", check=False)
    assert result.returncode != 0 and "cannot shrink" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert run_fusepool("list", pool, "--json").stdout.count(str(4 * MiB)) == 1


@pytest.mark.parametrize("cache", ["writeback", "write-through"])
def test_discard_after_buffered_writes_reads_zeros(pool, make_mount, cache):
    m = make_mount(pool, *(["--writeback-cache"] if cache == "writeback" else []))
    run_fusepool("create", pool, "v", "--size", "4M")
    with open(m.vol("v"), "r+b") as f:
        f.write(pattern(4, 4 * MiB))
        f.flush()
        f.seek(0)
        assert f.read(MiB) == pattern(4, MiB)  # the kernel caches these pages now
        run_fusepool("discard", pool, "v", "0", "2M")
        f.seek(0)
        got = f.read(4 * MiB)  # through the same open file, no cache dropping
    assert got[: 2 * MiB] == bytes(2 * MiB)
    assert got[2 * MiB :] == pattern(4, 4 * MiB)[2 * MiB :]


def test_out_of_space_is_reported_at_fsync(tmp_path, make_pool, make_mount):
    pool = make_pool("small", "--data-size", "8M", "--metadata-size", "8M", "--min-free-space", "0")
    m = make_mount(pool, "--writeback-cache")
    run_fusepool("create", pool, "v", "--size", "16M")
    fd = os.open(m.vol("v"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as failed:
            for offset in range(0, 16 * MiB, MiB):
                os.pwrite(fd, pattern(offset, MiB), offset)  # may succeed: only cached
            os.fsync(fd)
        assert failed.value.errno in (errno.ENOSPC, errno.EIO), failed.value
    finally:
        os.close(fd)
    m.umount()
    report = check_offline(str(pool))
    assert report.ok, report.problems
