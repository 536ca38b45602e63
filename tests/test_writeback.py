"""The kernel's writeback cache, `fusepool mount`'s default: the pool's semantics hold.

As for a kernel thin volume used through its block device, buffered writes
return once in the kernel's page cache (`mount --write-through` turns that off).
Snapshots and discards must see every write made before them (the CLI flushes
the volume through the mount first), fsync must still make data durable, online
resizes must reach the kernel (which owns a cached volume's size), and running
out of space must still be reported (at fsync instead of at write).  Reads the
kernel makes through a write-only handle (to fill a page a write covers in part)
must be served.  `--writeback-cache` is still accepted and means the default.
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
    return make_mount(pool)  # the default


@pytest.mark.parametrize("options, cached", [((), True), (("--writeback-cache",), True),
                                             (("--write-through",), False)])
def test_status_says_whether_the_writeback_cache_is_on(pool, make_mount, options, cached):
    from fusepool import control

    make_mount(pool, *options)
    assert control.request(str(pool), "status")["writeback_cache"] is cached


def test_write_through_and_writeback_cache_exclude_each_other(pool, tmp_path):
    (tmp_path / "mnt").mkdir()
    r = run_fusepool("mount", pool, tmp_path / "mnt", "--write-through", "--writeback-cache",
                     check=False)
    assert r.returncode == 2 and r.stderr.startswith("fusepool: error: ")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(tmp_path / "mnt")


def test_a_write_only_open_can_write_part_of_a_page(pool, wb_mount):
    """The kernel reads the rest of the page through the write-only handle first.

    The volume is write-only for its owner (0200), so under default_permissions
    only an O_WRONLY open passes: the daemon must still answer that handle's
    reads (libfuse: with writeback caching, reads come on write-only handles).
    """
    run_fusepool("create", pool, "v", "--size", "1M")
    data = pattern(5, 3 * 4096)
    with open(wb_mount.vol("v"), "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # so the kernel must read
    os.chmod(wb_mount.vol("v"), 0o200)
    fd = os.open(wb_mount.vol("v"), os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"middle", 4096 + 100) == 6
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(wb_mount.vol("v"), 0o600)
    want = bytearray(data)
    want[4096 + 100 : 4096 + 106] = b"middle"
    assert read_all(wb_mount.vol("v"), 0, len(data)) == bytes(want)


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
    m = make_mount(pool, *(["--write-through"] if cache == "write-through" else []))
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
    m = make_mount(pool)
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
