"""Integration tests through a real FUSE mount: the semantic contract of DESIGN.md section 1.

Every mount is served by a daemon subprocess (the ``make_mount`` fixture), never
by this process.  Data is checked against plain ``bytearray`` models.  Reads go
through :func:`read_all`, which first drops the kernel's page cache for the
file (the mount keeps it across opens), so what is compared is what the daemon
serves, not what the kernel remembers from our own writes; remounts check the
same from a cold start.
"""

import errno
import json
import mmap
import os
import random
import re
import subprocess
import time

import pytest
from conftest import check_blocks, fusepool_json, is_mounted, lazy_unmount, read_all, run_fusepool

from fusepool.cli import pool_call
from fusepool.units import parse_size

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB  # the default pool block size
TINY = ("--data-size", "64M", "--metadata-size", "16M")


# --- helpers ----------------------------------------------------------------------------

def pwrite_all(path, offset: int, data) -> None:
    """Write ``data`` at ``offset`` (looping over short writes) without fsync."""
    fd = os.open(path, os.O_RDWR)
    try:
        _pwrite_fd(fd, offset, data)
    finally:
        os.close(fd)


def _pwrite_fd(fd: int, offset: int, data) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        assert done > 0
        view, offset = view[done:], offset + done




def fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def zeros(n: int) -> bytearray:
    """A zero buffer whose pages are all touched.

    The kernel splits a FUSE write at every page of an unaligned user buffer
    that is not yet faulted in (a fresh ``bytes(n)`` can be one); a
    buffer written to once is sent whole, as dd's or a filesystem's would be.
    See test_zero_write_from_untouched_buffer_unmaps for that case.
    """
    buf = bytearray(b"\1") * n
    buf[:] = bytes(n)
    return buf


def vols(pool) -> dict:
    """``list`` by name, asked in-process: through the control socket while the
    pool is mounted (what the CLI does), else from the pool directly.  Far
    cheaper than a CLI subprocess; the CLI's own ``--json`` is checked too."""
    return {v["name"]: v for v in pool_call(str(pool), "list")}


def create(pool, name: str, size) -> None:
    """A volume, made in-process (the CLI's ``create`` is tested on its own)."""
    pool_call(str(pool), "create", {"name": name, "size": parse_size(str(size))})


def info(pool) -> dict:
    return pool_call(str(pool), "info")


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def random_write(rng: random.Random, size: int) -> tuple[int, bytes]:
    """An offset and data: tiny, partial-block, block-straddling or multi-block."""
    kind = rng.choice(["tiny", "partial", "straddle", "multi", "aligned"])
    if kind == "tiny":
        length = rng.randint(1, 64)
        offset = rng.randrange(size - length)
    elif kind == "partial":
        length = rng.randint(100, BS - 200)
        offset = rng.randrange(size // BS) * BS + rng.randint(1, BS - length - 1)
    elif kind == "straddle":
        length = rng.randint(2, BS)
        boundary = rng.randrange(1, size // BS) * BS
        offset = boundary - rng.randint(1, length - 1)
    elif kind == "multi":
        length = rng.randint(BS + 1, 5 * BS)
        offset = rng.randrange(size - length)
    else:
        length = rng.randint(1, 3) * BS
        offset = rng.randrange((size - length) // BS + 1) * BS
    return offset, rng.randbytes(length)



def extents_blocks(pool, name) -> set:
    out = set()
    for e in pool_call(str(pool), "map", {"name": name}):
        out.update(range(e["virtual_block"], e["virtual_block"] + e["blocks"]))
    return out


# --- 1. sparse reads and persistence ------------------------------------------------------

def test_sparse_reads_zero_and_data_persists_across_remount(make_pool, make_mount):
    pool = make_pool("p", *TINY)
    m = make_mount(pool)
    size = 8 * MiB
    create(pool, "v", size)
    assert os.path.getsize(m.vol("v")) == size
    assert read_all(m.vol("v")) == bytes(size)  # never written: all zeros
    model = bytearray(size)
    rng = random.Random(1)
    writes = [
        (0, rng.randbytes(1)),  # first byte
        (BS - 3, rng.randbytes(7)),  # straddles a block boundary
        (12345, rng.randbytes(3 * MiB + 17)),  # multi-MiB, unaligned both ends
        (5 * MiB, rng.randbytes(BS)),  # exactly one aligned block
        (6 * MiB + 999, rng.randbytes(100)),  # inside one block
        (size - 10, rng.randbytes(10)),  # the last bytes of the volume
    ]
    for offset, data in writes:
        pwrite_all(m.vol("v"), offset, data)
        model[offset : offset + len(data)] = data
    check_blocks(read_all(m.vol("v")), model, "v before remount")
    assert os.path.getsize(m.vol("v")) == size  # writes inside the volume do not grow it
    m.umount()
    m.mount()
    check_blocks(read_all(m.vol("v")), model, "v after remount")
    # Unwritten parts of touched blocks and untouched blocks read as zeros.
    assert read_all(m.vol("v"), 7 * MiB, BS) == bytes(BS)
    assert read_all(m.vol("v"), 6 * MiB, 999) == bytes(999)


# --- 2. snapshots --------------------------------------------------------------------------

def test_snapshots_copy_on_write_and_space_accounting(make_pool, make_mount):
    pool = make_pool("p", *TINY)
    m = make_mount(pool)
    rng = random.Random(2)
    size = 4 * MiB
    # A bystander volume whose figures must come back exactly.
    create(pool, "keep", "1M")
    pwrite_all(m.vol("keep"), 1000, rng.randbytes(300 * KiB))
    fsync_path(m.vol("keep"))
    keep_content = read_all(m.vol("keep"))
    before_used = info(pool)["data_space_used"]
    before_keep = vols(pool)["keep"]

    create(pool, "a", size)
    models = {"a": bytearray(size)}
    # A random pattern over most of the volume, leaving some holes.
    for b in range(size // BS):
        if b % 7 != 3:
            data = rng.randbytes(BS)
            pwrite_all(m.vol("a"), b * BS, data)
            models["a"][b * BS : (b + 1) * BS] = data
    fsync_path(m.vol("a"))
    a_blocks = vols(pool)["a"]["mapped_blocks"]
    assert a_blocks == sum(1 for b in range(size // BS) if b % 7 != 3)

    run_fusepool("snapshot", pool, "a", "s")  # online
    models["s"] = bytearray(models["a"])
    v = vols(pool)
    assert v["s"]["origin"] == "a" and v["s"]["size"] == size
    assert v["s"]["mapped_blocks"] == v["a"]["mapped_blocks"] == a_blocks
    assert v["s"]["shared_blocks"] == v["a"]["shared_blocks"] == a_blocks
    assert v["a"]["exclusive_blocks"] == 0
    check_blocks(read_all(m.vol("s")), models["s"], "fresh snapshot")

    def scribble(names, count):
        for _ in range(count):
            name = rng.choice(names)
            offset, data = random_write(rng, size)
            pwrite_all(m.vol(name), offset, data)
            models[name][offset : offset + len(data)] = data

    def verify(where):
        for name, model in models.items():
            check_blocks(read_all(m.vol(name)), model, f"{name} ({where})")

    scribble(["a", "s"], 60)
    verify("after writes to origin and snapshot")
    v = vols(pool)
    for name in ("a", "s"):
        assert v[name]["exclusive_blocks"] + v[name]["shared_blocks"] == v[name]["mapped_blocks"]
    assert v["a"]["exclusive_blocks"] > 0 and v["s"]["exclusive_blocks"] > 0

    # A snapshot of a snapshot, then writes to all three.
    run_fusepool("snapshot", pool, "s", "ss")
    models["ss"] = bytearray(models["s"])
    check_blocks(read_all(m.vol("ss")), models["ss"], "snapshot of snapshot")
    scribble(["a", "s", "ss"], 45)
    verify("after writes to three devices")
    m.umount()
    m.mount()
    verify("after remount")

    # Removing the origin leaves its snapshots intact.
    run_fusepool("remove", pool, "a")
    del models["a"]
    assert not m.vol("a").exists()
    verify("after removing the origin")
    scribble(["s", "ss"], 10)
    verify("after more writes")

    pool_call(str(pool), "remove", {"name": "ss"})
    pool_call(str(pool), "remove", {"name": "s"})
    assert sorted(os.listdir(m.mountpoint)) == ["keep"]
    fsync_path(m.vol("keep"))
    # The CLI's own JSON, online and then offline (the committed state).
    assert fusepool_json("info", pool)["data_space_used"] == before_used
    assert fusepool_json("list", pool) == [before_keep]
    m.umount()
    assert fusepool_json("info", pool)["data_space_used"] == before_used
    assert fusepool_json("list", pool) == [before_keep]
    m.mount()
    assert read_all(m.vol("keep")) == keep_content


# --- 3. partial writes -------------------------------------------------------------------------

def _fill_data_image(pool, byte: int) -> None:
    """Make every (unused) block of a fresh pool's data image hold stale bytes."""
    path = pool / "data"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(bytes([byte]) * size)


def test_partial_write_to_new_block_zero_fills(make_pool, make_mount):
    pool = make_pool("p", *TINY)
    _fill_data_image(pool, 0xAA)  # stale data a reused disk would hold
    m = make_mount(pool)
    create(pool, "v", "1M")
    pwrite_all(m.vol("v"), BS + 1000, b"hello")
    pwrite_all(m.vol("v"), 3 * BS - 2, b"wxyz")  # straddles blocks 2 and 3
    expect = bytearray(4 * BS)
    expect[BS + 1000 : BS + 1005] = b"hello"
    expect[3 * BS - 2 : 3 * BS + 2] = b"wxyz"
    assert read_all(m.vol("v"), 0, 4 * BS) == expect
    assert vols(pool)["v"]["mapped_blocks"] == 3
    m.umount()
    m.mount()
    assert read_all(m.vol("v"), 0, 4 * BS) == expect


def test_partial_write_to_shared_block_keeps_the_rest(make_pool, make_mount):
    pool = make_pool("p", *TINY)
    m = make_mount(pool)
    rng = random.Random(3)
    create(pool, "a", "1M")
    old = rng.randbytes(4 * BS)
    pwrite_all(m.vol("a"), 0, old)
    run_fusepool("snapshot", pool, "a", "s")
    pwrite_all(m.vol("s"), BS + 5000, b"snapshot side")  # into shared block 1
    pwrite_all(m.vol("a"), 2 * BS + 77, b"origin side")  # into shared block 2
    exp_s, exp_a = bytearray(old), bytearray(old)
    exp_s[BS + 5000 : BS + 5013] = b"snapshot side"
    exp_a[2 * BS + 77 : 2 * BS + 88] = b"origin side"
    for where in ("online", "after remount"):
        assert read_all(m.vol("s"), 0, 4 * BS) == exp_s, where
        assert read_all(m.vol("a"), 0, 4 * BS) == exp_a, where
        v = vols(pool)
        assert (v["a"]["shared_blocks"], v["a"]["exclusive_blocks"]) == (2, 2)
        assert (v["s"]["shared_blocks"], v["s"]["exclusive_blocks"]) == (2, 2)
        m.umount()
        m.mount()


def test_partial_write_with_skip_block_zeroing(make_pool, make_mount):
    """skip_block_zeroing (dm-thin): the written bytes read back; the rest of a
    newly provisioned block may show stale bytes of the data image (documented
    behaviour), so only the written range and untouched blocks are asserted."""
    pool = make_pool("p", *TINY, "--skip-block-zeroing")
    _fill_data_image(pool, 0xAA)
    m = make_mount(pool)
    create(pool, "v", "1M")
    pwrite_all(m.vol("v"), BS + 1000, b"hello")
    got = read_all(m.vol("v"), 0, 4 * BS)
    assert got[BS + 1000 : BS + 1005] == b"hello"
    assert got[:BS] == bytes(BS) and got[2 * BS :] == bytes(2 * BS)  # unmapped blocks: zeros
    rest = got[BS : BS + 1000] + got[BS + 1005 : 2 * BS]
    assert set(rest) <= {0x00, 0xAA}  # stale (0xAA) or zero: both allowed
    m.umount()
    m.mount()
    assert read_all(m.vol("v"), BS + 1000, 5) == b"hello"


# --- 4. zero detection (init --zero-detection) and discard ---------------------------------

def test_zero_block_writes_unmap_and_discard_frees(make_pool, make_mount):
    # Zero detection is off by default (zeros are data, as dm-thin): tests/test_zero_writes.py.
    pool = make_pool("p", *TINY, "--zero-detection")
    m = make_mount(pool)
    rng = random.Random(4)
    create(pool, "v", "2M")
    model = bytearray(rng.randbytes(MiB))
    pwrite_all(m.vol("v"), 0, model)
    fsync_path(m.vol("v"))
    used0 = info(pool)["data_space_used"]
    assert os.stat(m.vol("v")).st_blocks * 512 == 16 * BS
    assert extents_blocks(pool, "v") == set(range(16))

    # Whole blocks of zeros (blocks 2..5) unmap them.
    pwrite_all(m.vol("v"), 2 * BS, zeros(4 * BS))
    model[2 * BS : 6 * BS] = bytes(4 * BS)
    # A partial block of zeros is ordinary data: block 8 stays mapped.
    pwrite_all(m.vol("v"), 8 * BS, zeros(BS - 1))
    model[8 * BS : 9 * BS - 1] = bytes(BS - 1)
    fsync_path(m.vol("v"))
    assert extents_blocks(pool, "v") == set(range(16)) - {2, 3, 4, 5}
    assert vols(pool)["v"]["mapped_bytes"] == 12 * BS
    assert info(pool)["data_space_used"] == used0 - 4 * BS
    assert os.stat(m.vol("v")).st_blocks * 512 == 12 * BS
    du = subprocess.run(["du", "-B1", str(m.vol("v"))], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) == 12 * BS
    check_blocks(read_all(m.vol("v"), 0, MiB), model, "v after zero writes")

    # discard 600000+300000 unmaps only the whole blocks inside: 10, 11, 12.
    out = run_fusepool("discard", pool, "v", "600000", "300000").stdout
    assert "3 block" in out
    model[10 * BS : 13 * BS] = bytes(3 * BS)
    assert extents_blocks(pool, "v") == set(range(16)) - {2, 3, 4, 5, 10, 11, 12}
    assert info(pool)["data_space_used"] == used0 - 7 * BS
    check_blocks(read_all(m.vol("v"), 0, MiB), model, "v after online discard")
    wait_for(lambda: os.stat(m.vol("v")).st_blocks * 512 == 9 * BS, 3, "st_blocks after discard")

    # Offline discard of a sub-block range unmaps nothing; a wide one frees the rest.
    m.umount()
    assert "0 block" in run_fusepool("discard", pool, "v", "1000", "60000").stdout
    assert "9 block" in run_fusepool("discard", pool, "v", "0", "2M").stdout
    assert info(pool)["data_space_used"] == used0 - 16 * BS
    assert vols(pool)["v"]["mapped_blocks"] == 0
    m.mount()
    assert read_all(m.vol("v")) == bytes(2 * MiB)
    assert os.stat(m.vol("v")).st_blocks == 0


def test_zero_write_from_untouched_buffer_unmaps(make_pool, make_mount):
    """Zeroing whole blocks from a never-touched buffer must unmap them too.

    When the user buffer is not page-aligned and its pages were never touched
    (a fresh ``bytes(1 << 20)`` often is: calloc'ed memory), the kernel hands
    the write to the daemon in pieces that end at every user page boundary
    (here 304 + 3792 bytes, ...), so no single FUSE write covers a whole block.
    The zeros still cover whole blocks, and zero detection promises that a write
    of a whole block of zeros unmaps it (the only way to punch holes through FUSE);
    the engine has to recognise zero blocks that arrive in pieces.  An
    anonymous mmap sliced at an odd offset reproduces the case every time.
    (With zero detection, which is off by default.)
    """
    pool = make_pool("p", *TINY, "--zero-detection")
    m = make_mount(pool)
    create(pool, "v", "4M")
    pwrite_all(m.vol("v"), 0, random.Random(5).randbytes(MiB))
    fsync_path(m.vol("v"))
    used0 = info(pool)["data_space_used"]
    buf, buf2 = mmap.mmap(-1, 4 * MiB), mmap.mmap(-1, 4 * MiB)  # fresh: never touched
    try:
        with open(m.vol("v"), "r+b", buffering=0) as f:
            assert f.write(memoryview(buf)[304 : 304 + MiB]) == MiB  # zero the mapped 1st MiB
            f.seek(2 * MiB)
            assert f.write(memoryview(buf2)[304 : 304 + MiB]) == MiB  # unmapped: no allocation
            os.fsync(f.fileno())
    finally:
        buf.close()
        buf2.close()
    assert read_all(m.vol("v")) == bytes(4 * MiB)
    mapped = sorted(extents_blocks(pool, "v"))
    assert mapped == [], f"blocks still mapped after writing zeros over them: {mapped}"
    assert info(pool)["data_space_used"] == used0 - MiB


# --- 5. out of space --------------------------------------------------------------------------

def test_pool_full_enospc_and_recovery(make_pool, make_mount):
    pool = make_pool("p", "--data-size", "16M", "--metadata-size", "8M", "--min-free-space", "0%")
    # ENOSPC at write() itself: --write-through (the default cache reports it at fsync:
    # test_writeback.py)
    m = make_mount(pool, "--write-through")
    rng = random.Random(6)
    create(pool, "other", "1M")
    other = bytearray(1 * MiB)
    other[: 512 * KiB] = rng.randbytes(512 * KiB)
    pwrite_all(m.vol("other"), 0, other[: 512 * KiB])
    create(pool, "filler", "64M")  # thin: bigger than the pool

    filler = bytearray()
    fd = os.open(m.vol("filler"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            while True:
                chunk = rng.randbytes(MiB)
                done = os.pwrite(fd, chunk, len(filler))  # a short write just before ENOSPC
                filler += chunk[:done]
                assert len(filler) <= 16 * MiB
        assert exc.value.errno == errno.ENOSPC
        assert len(filler) == 16 * MiB - 512 * KiB  # every free block was used
        st = info(pool)
        assert st["data_space_used"] == st["data_space_total"] == 16 * MiB
        assert st["data_space_available"] == 0
        # Blocks the volume already owns can still be overwritten.
        again = rng.randbytes(MiB + 12345)
        _pwrite_fd(fd, 4321, again)
        filler[4321 : 4321 + len(again)] = again
        os.fsync(fd)
    finally:
        os.close(fd)
    check_blocks(read_all(m.vol("filler"), 0, len(filler)), filler, "filler")
    # The other volume: its data intact, its own blocks writable, no new block.
    check_blocks(read_all(m.vol("other")), other, "other")
    pwrite_all(m.vol("other"), 100, b"in place")
    other[100:108] = b"in place"
    with pytest.raises(OSError) as exc:
        pwrite_all(m.vol("other"), 900 * KiB, b"needs a new block")
    assert exc.value.errno == errno.ENOSPC
    check_blocks(read_all(m.vol("other")), other, "other after ENOSPC")

    # Removing the filler frees the space; writes allocate again.
    run_fusepool("remove", pool, "filler")
    assert info(pool)["data_space_used"] == 512 * KiB
    data = rng.randbytes(2 * MiB)
    pool_call(str(pool), "resize", {"name": "other", "size": 4 * MiB})
    pwrite_all(m.vol("other"), MiB, data)
    other += bytes(3 * MiB)
    other[MiB : 3 * MiB] = data
    m.umount()
    m.mount()
    check_blocks(read_all(m.vol("other")), other, "other after recovery")


def test_min_free_space_refuses_create_and_snapshot(make_pool, make_mount):
    pool = make_pool("p", "--data-size", "16M", "--metadata-size", "8M")  # default 10 %
    m = make_mount(pool)
    create(pool, "v", "32M")
    run_fusepool("snapshot", pool, "v", "early")  # fine while the pool is empty
    pwrite_all(m.vol("v"), 0, random.Random(7).randbytes(15 * MiB))  # 93.75 % used
    for args in (("create", pool, "x"), ("snapshot", pool, "v", "snap")):
        proc = run_fusepool(*args, check=False)
        assert proc.returncode == 1, proc
        assert "minimum free space" in proc.stderr
        assert "fusepool extend" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(vols(pool)) == ["early", "v"]
    assert sorted(os.listdir(m.mountpoint)) == ["early", "v"]
    # Writes to existing volumes still work under the limit (it guards new devices only).
    pwrite_all(m.vol("early"), 0, b"still writable")
    run_fusepool("extend", pool, "--data-size", "64M")
    run_fusepool("create", pool, "x", "--size", "1M")
    run_fusepool("snapshot", pool, "v", "snap")
    assert sorted(os.listdir(m.mountpoint)) == ["early", "snap", "v", "x"]


# --- 6. crash consistency ---------------------------------------------------------------------

def test_fsync_survives_sigkill(make_pool, make_mount):
    pool = make_pool("p", *TINY)
    m = make_mount(pool, "--commit-period", "1000")  # only fsync commits
    create(pool, "v", "4M")
    data = random.Random(8).randbytes(2 * MiB + 333)
    fd = os.open(m.vol("v"), os.O_RDWR)
    try:
        _pwrite_fd(fd, 4097, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.kill()
    assert not is_mounted(m.mountpoint)
    m.mount()  # no repair step
    assert read_all(m.vol("v"), 4097, len(data)) == data
    assert read_all(m.vol("v"), 0, 4097) == bytes(4097)
    assert vols(pool)["v"]["mapped_blocks"] == (4097 + len(data) + BS - 1) // BS


def test_sigkill_without_fsync_keeps_old_or_new_per_block(make_pool, make_mount):
    pool = make_pool("p", *TINY)
    m = make_mount(pool, "--commit-period", "1000")
    rng = random.Random(9)
    size = 2 * MiB
    create(pool, "v", size)
    old = {"v": bytearray(size)}
    for b in range(0, size // BS, 2):  # every other block mapped, the rest holes
        old["v"][b * BS : (b + 1) * BS] = rng.randbytes(BS)
    pwrite_all(m.vol("v"), 0, old["v"])
    fsync_path(m.vol("v"))
    run_fusepool("snapshot", pool, "v", "s")  # commits
    old["s"] = bytearray(old["v"])
    for _ in range(20):  # committed writes: some blocks become exclusive again
        name = rng.choice(["v", "s"])
        offset, data = random_write(rng, size)
        pwrite_all(m.vol(name), offset, data)
        old[name][offset : offset + len(data)] = data
    fsync_path(m.vol("v"))
    new = {name: bytearray(model) for name, model in old.items()}
    for _ in range(80):  # in place, into holes, into shared blocks; no fsync
        name = rng.choice(["v", "s"])
        offset, data = random_write(rng, size)
        pwrite_all(m.vol(name), offset, data)
        new[name][offset : offset + len(data)] = data
    m.kill()
    m.mount()
    assert sorted(vols(pool)) == ["s", "v"]
    assert run_fusepool("list", pool).returncode == 0
    for name in ("v", "s"):
        got = read_all(m.vol(name))
        assert len(got) == size
        for b in range(0, size, BS):
            blk = got[b : b + BS]
            ok = blk in (old[name][b : b + BS], new[name][b : b + BS])
            assert ok, f"{name} block {b // BS}: neither the old nor the new content"
    # The pool is usable: writes and a clean remount work.
    pwrite_all(m.vol("v"), 0, b"after the crash")
    m.umount()
    m.mount()
    assert read_all(m.vol("v"), 0, 15) == b"after the crash"


def test_sigkill_after_unsynced_write_to_formerly_shared_block(make_pool, make_mount):
    """A block shared in the last commit must not be overwritten in place.

    Origin and snapshot share block 0 (committed).  The origin's partial write
    copies it (uncommitted); now the old block has one reference in memory, so
    the snapshot's partial write to it looks exclusive.  Overwriting it in place
    changes what the *committed* origin maps: after a crash the origin reads the
    snapshot's bytes.  dm-thin copies such a block again: a mapping older than
    the device's snapshot time may be shared (its "shared" lookup result).
    """
    pool = make_pool("p", *TINY)
    m = make_mount(pool, "--commit-period", "1000")
    create(pool, "v", "1M")
    old = b"A" * BS
    pwrite_all(m.vol("v"), 0, old)
    fsync_path(m.vol("v"))
    run_fusepool("snapshot", pool, "v", "s")  # commits: v and s share block 0
    pwrite_all(m.vol("v"), 100, b"from v")
    pwrite_all(m.vol("s"), 200, b"from s")
    new_v = bytearray(old)
    new_v[100:106] = b"from v"
    new_s = bytearray(old)
    new_s[200:206] = b"from s"
    assert read_all(m.vol("v"), 0, BS) == new_v and read_all(m.vol("s"), 0, BS) == new_s
    m.kill()
    m.mount()
    got_v = read_all(m.vol("v"), 0, BS)
    got_s = read_all(m.vol("s"), 0, BS)
    v_ok, s_ok = got_v in (old, new_v), got_s in (old, new_s)  # (no 64 KiB reprs)
    assert v_ok, f"v after the crash shows {got_v[195:210]} at 195..210: the snapshot's write"
    assert s_ok, f"s after the crash shows {got_s[95:110]} at 95..110"


# --- 7. file operations in the mount ------------------------------------------------------------

def test_truncate_grows_and_refuses_to_shrink(make_pool, make_mount):
    pool = make_pool("p", *TINY)
    m = make_mount(pool)
    create(pool, "v", "1M")
    pwrite_all(m.vol("v"), 0, b"x" * 1000)
    os.truncate(m.vol("v"), 3 * MiB)
    assert os.path.getsize(m.vol("v")) == 3 * MiB
    assert vols(pool)["v"]["size"] == 3 * MiB
    subprocess.run(["truncate", "-s", "5M", str(m.vol("v"))], check=True)
    assert os.path.getsize(m.vol("v")) == 5 * MiB
    assert read_all(m.vol("v"), 0, 1001) == b"x" * 1000 + b"\0"
    with pytest.raises(OSError) as exc:
        os.truncate(m.vol("v"), MiB)
    assert exc.value.errno in (errno.EPERM, errno.EINVAL)
    proc = subprocess.run(["truncate", "-s", "1M", str(m.vol("v"))], capture_output=True)
    assert proc.returncode != 0
    proc = run_fusepool("resize", pool, "v", "1M", check=False)
    assert proc.returncode == 1 and "shrink" in proc.stderr
    assert run_fusepool("resize", pool, "v", "-1M", check=False).returncode == 2
    assert os.path.getsize(m.vol("v")) == 5 * MiB
    assert vols(pool)["v"]["size"] == 5 * MiB
    assert read_all(m.vol("v"), 0, 1000) == b"x" * 1000


def test_open_with_o_trunc_is_refused(make_pool, make_mount, tmp_path):
    """O_TRUNC is a shrink to 0 and must fail like ``truncate`` does.

    libfuse 3 enables atomic_o_trunc, so the kernel passes O_TRUNC to open()
    instead of sending a setattr(size=0); ignoring the flag silently turns
    ``cp small.img VOLUME`` into a merge of the new bytes over the old ones.
    """
    pool = make_pool("p", *TINY)
    m = make_mount(pool)
    create(pool, "v", "1M")
    pwrite_all(m.vol("v"), 0, b"A" * 20)
    small = tmp_path / "small"
    small.write_bytes(b"BBBB")
    proc = subprocess.run(["cp", str(small), str(m.vol("v"))], capture_output=True, text=True)
    content = read_all(m.vol("v"), 0, 24)
    assert proc.returncode != 0, f"cp over a volume 'succeeded' and left {content!r}"
    with pytest.raises(OSError) as exc:
        os.close(os.open(m.vol("v"), os.O_WRONLY | os.O_TRUNC))
    assert exc.value.errno in (errno.EPERM, errno.EINVAL)
    assert os.path.getsize(m.vol("v")) == MiB
    assert read_all(m.vol("v"), 0, 21) == b"A" * 20 + b"\0"
    # A volume of size 0 has nothing to lose: O_TRUNC on it is harmless.
    fd = os.open(m.vol("empty"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    os.close(os.open(m.vol("empty"), os.O_WRONLY | os.O_TRUNC))


def test_rm_of_open_volume_is_deferred(make_pool, make_mount):
    pool = make_pool("p", *TINY)
    m = make_mount(pool)
    create(pool, "keep", "1M")
    create(pool, "v", "1M")
    used0 = info(pool)["data_space_used"]
    pwrite_all(m.vol("v"), 0, b"y" * (3 * BS))
    fd = os.open(m.vol("v"), os.O_RDWR)
    try:
        os.unlink(m.vol("v"))
        assert not m.vol("v").exists()
        assert os.listdir(m.mountpoint) == ["keep"]
        assert "v" not in vols(pool)
        st = info(pool)
        assert st["deferred_deleted_device_count"] == 1
        assert st["data_space_used"] == used0 + 3 * BS  # not freed while open
        assert os.pread(fd, 10, 0) == b"y" * 10  # the open handle still works
        assert os.pwrite(fd, b"z" * BS, 3 * BS) == BS
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 2, 3 * BS - 1) == b"yz"
        create(pool, "v", "1M")  # the name is free again
        assert read_all(m.vol("v"), 0, 10) == bytes(10)
    finally:
        os.close(fd)
    # FUSE sends RELEASE asynchronously after close().
    wait_for(lambda: info(pool)["deferred_deleted_device_count"] == 0, what="the deferred deletion")
    assert info(pool)["data_space_used"] == used0
    run_fusepool("remove", pool, "v")
    assert os.listdir(m.mountpoint) == ["keep"]
    m.umount()
    st = info(pool)
    assert st["deferred_deleted_device_count"] == 0 and st["data_space_used"] == used0


def test_rename_create_cp_and_write_past_end(make_pool, make_mount, tmp_path):
    pool = make_pool("p", *TINY)
    m = make_mount(pool)
    rng = random.Random(10)
    create(pool, "a", "1M")
    pwrite_all(m.vol("a"), 0, b"AAAA")
    os.rename(m.vol("a"), m.vol("b"))
    assert sorted(os.listdir(m.mountpoint)) == ["b"]
    assert sorted(vols(pool)) == ["b"]
    assert read_all(m.vol("b"), 0, 4) == b"AAAA"
    # rename over an existing volume replaces it (POSIX rename)
    create(pool, "c", "1M")
    pwrite_all(m.vol("c"), 0, b"CCCC")
    os.rename(m.vol("c"), m.vol("b"))
    assert sorted(vols(pool)) == ["b"]
    assert read_all(m.vol("b"), 0, 4) == b"CCCC"

    # O_CREAT makes an empty volume; writing past the end grows it.
    fd = os.open(m.vol("new"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        assert os.fstat(fd).st_size == 0
        assert vols(pool)["new"]["size"] == 0
        os.pwrite(fd, b"tail", MiB)
    finally:
        os.close(fd)
    assert os.path.getsize(m.vol("new")) == MiB + 4
    assert vols(pool)["new"]["size"] == MiB + 4
    assert read_all(m.vol("new")) == bytes(MiB) + b"tail"
    with pytest.raises(FileExistsError):
        os.close(os.open(m.vol("new"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))

    # cp of a host file (with a hole) creates a volume with the same bytes.
    src = tmp_path / "src.img"
    content = rng.randbytes(300 * KiB) + bytes(2 * MiB) + rng.randbytes(5000)
    src.write_bytes(content)
    subprocess.run(["cp", "--sparse=always", str(src), str(m.vol("copied"))], check=True)
    subprocess.run(["cp", str(src), str(m.vol("copied2"))], check=True)
    v = vols(pool)
    for name in ("copied", "copied2"):
        assert v[name]["size"] == len(content)
        assert read_all(m.vol(name)) == content
    assert v["copied"]["mapped_blocks"] == 5 + 1  # ceil(300K / 64K) blocks + the tail block
    with pytest.raises(OSError):
        os.mkdir(m.mountpoint / "dir")  # a pool is flat
    m.umount()
    m.mount()
    assert read_all(m.vol("copied")) == content
    assert sorted(os.listdir(m.mountpoint)) == ["b", "copied", "copied2", "new"]


# --- 8. df and st_blocks ---------------------------------------------------------------------------

def test_statvfs_and_st_blocks_match_pool_figures(make_pool, make_mount):
    pool = make_pool("p", *TINY)
    m = make_mount(pool)
    create(pool, "v", "8M")
    pwrite_all(m.vol("v"), 100, random.Random(11).randbytes(3 * MiB))
    run_fusepool("snapshot", pool, "v", "s")
    pwrite_all(m.vol("s"), 5 * MiB, b"s" * 200 * KiB)
    fsync_path(m.vol("s"))
    st = os.statvfs(m.mountpoint)
    pinfo = info(pool)
    assert st.f_blocks * st.f_frsize == 64 * MiB == pinfo["data_space_total"]
    assert st.f_bfree * st.f_frsize == pinfo["data_space_total"] - pinfo["data_space_used"]
    assert st.f_bavail <= st.f_bfree
    df = subprocess.run(["df", "-B1", "--output=size,used", str(m.mountpoint)],
                        capture_output=True, text=True, check=True).stdout.split()
    assert int(df[-2]) == 64 * MiB
    assert int(df[-1]) == pinfo["data_space_used"]
    v = vols(pool)
    for name in ("v", "s"):
        wait_for(lambda name=name: os.stat(m.vol(name)).st_blocks * 512 == v[name]["mapped_bytes"], 3,
                 f"st_blocks of {name}")
    assert v["v"]["mapped_bytes"] == 49 * BS  # 100 + 3 MiB spans 49 blocks
    assert v["s"]["mapped_bytes"] == (49 + 4) * BS
    ls = subprocess.run(["ls", "-s", "--block-size=1", str(m.mountpoint)], capture_output=True,
                        text=True, check=True).stdout
    assert f"{49 * BS} v" in ls


# --- 9. online and offline commands ---------------------------------------------------------

def _exercise_all_commands(pool, m=None) -> None:
    """Every pool command through the CLI, its effect checked (in the mount when given)."""
    run_fusepool("create", pool, "c1", "--size", "1M")
    if m:
        assert os.path.getsize(m.vol("c1")) == MiB
        pwrite_all(m.vol("c1"), 0, b"c" * (2 * BS))
    run_fusepool("snapshot", pool, "c1", "c2")
    run_fusepool("resize", pool, "c2", "+1M")
    v = {d["name"]: d for d in fusepool_json("list", pool)}
    assert v["c2"]["size"] == 2 * MiB and v["c2"]["origin"] == "c1"
    assert "Pool Blocksize" in run_fusepool("info", pool).stdout
    ins = json.loads(run_fusepool("inspect", pool, "c2").stdout)
    assert ins["Data"]["DeviceName"] == "c2" and ins["Data"]["DeviceSize"] == str(2 * MiB)
    if m:
        assert os.path.getsize(m.vol("c2")) == 2 * MiB
        assert read_all(m.vol("c2"), 0, 4) == b"cccc"
        assert [e["blocks"] for e in fusepool_json("map", pool, "c2")] == [2]
    else:
        assert fusepool_json("map", pool, "c2") == []
    run_fusepool("discard", pool, "c2", "0", "1M")
    assert extents_blocks(pool, "c2") == set()
    if m:
        assert read_all(m.vol("c2"), 0, 4) == bytes(4)
        assert read_all(m.vol("c1"), 0, 4) == b"cccc"
    total = info(pool)["data_space_total"]
    run_fusepool("extend", pool, "--data-size", total + 16 * MiB)
    assert info(pool)["data_space_total"] == total + 16 * MiB
    run_fusepool("remove", pool, "c2")
    assert sorted(vols(pool)) == ["c1"]
    if m:
        assert os.listdir(m.mountpoint) == ["c1"]
    pool_call(str(pool), "remove", {"name": "c1"})


def test_every_command_online_and_offline(make_pool, make_mount):
    pool = make_pool("p", *TINY)
    m = make_mount(pool)
    _exercise_all_commands(pool, m)  # the daemon holds the pool's lock: these went online
    proc = run_fusepool("resize", pool, "nosuch", "1G", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "nosuch" in proc.stderr
    m.umount()
    _exercise_all_commands(pool)
    proc = run_fusepool("resize", pool, "nosuch", "1G", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "nosuch" in proc.stderr
    m.mount()
    assert os.listdir(m.mountpoint) == []


def _expect_mount_failure(pool, mountpoint, *needles):
    proc = run_fusepool("mount", pool, mountpoint, check=False, timeout=60)
    if proc.returncode == 0:  # must not happen; do not leave a mount behind
        run_fusepool("umount", mountpoint, "--force", check=False)
        lazy_unmount(mountpoint)
    assert proc.returncode == 1, proc
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_double_mount_and_busy_mountpoint_fail(make_pool, make_mount, tmp_path):
    pool = make_pool("p", *TINY)
    other = make_pool("q", *TINY)
    m = make_mount(pool)
    create(pool, "v", "1M")
    second = tmp_path / "second"
    second.mkdir()
    _expect_mount_failure(pool, second, "already mounted", str(m.mountpoint))
    assert not is_mounted(second)
    _expect_mount_failure(other, m.mountpoint, "already a mount point")
    assert os.listdir(m.mountpoint) == ["v"]  # the first mount is untouched
    # The failed attempt released the other pool: it mounts elsewhere.
    m2 = make_mount(other)
    assert os.listdir(m2.mountpoint) == []
    m2.umount()


# --- 10. info and inspect ---------------------------------------------------------------------

DOCKER_FIELDS = [
    "Pool Name", "Pool Blocksize", "Base Device Size", "Backing Filesystem", "Data file",
    "Metadata file", "Data Space Used", "Data Space Total", "Data Space Available",
    "Metadata Space Used", "Metadata Space Total", "Metadata Space Available",
    "Thin Pool Minimum Free Space", "Deferred Removal Enabled", "Deferred Deletion Enabled",
    "Deferred Deleted Device Count", "Library Version",
]


def _info_fields(text: str) -> dict:
    fields = {}
    for line in text.splitlines():
        match = re.match(r"^ ([A-Za-z ]+): (.*)$", line)
        if match:
            fields[match.group(1)] = match.group(2)
    return fields


def test_info_text_and_inspect_json(make_pool, make_mount):
    pool = make_pool("p", *TINY, "--block-size", "512K")
    m = make_mount(pool)
    run_fusepool("create", pool, "v")  # the base size
    for where in ("online", "offline"):
        fields = _info_fields(run_fusepool("info", pool).stdout)
        missing = [f for f in DOCKER_FIELDS if f not in fields]
        assert not missing, f"{where}: missing {missing}"
        assert fields["Pool Blocksize"] == "524.3 kB"
        assert fields["Base Device Size"] == "10.74 GB"
        assert fields["Data Space Total"] == "67.11 MB"
        assert fields["Pool Name"] == "p"
        assert fields["Data file"] == str(pool / "data")
        assert fields["Metadata file"] == str(pool / "metadata")
        assert fields["Deferred Removal Enabled"] == "true"
        assert fields["Deferred Deleted Device Count"] == "0"
        ins = json.loads(run_fusepool("inspect", pool, "v").stdout)
        assert ins["Name"] == "fusepool"
        data = ins["Data"]
        assert all(isinstance(data[k], str) for k in ("DeviceId", "DeviceName", "DeviceSize"))
        assert data["DeviceName"] == "v"
        assert data["DeviceSize"] == str(10 << 30)
        assert data["DeviceId"] == str(vols(pool)["v"]["dev_id"])
        if where == "online":
            m.umount()
    proc = run_fusepool("inspect", pool, "nosuch", check=False)
    assert proc.returncode == 1 and "nosuch" in proc.stderr


@pytest.mark.root
def test_read_ahead_is_raised_to_one_mebibyte(pool, make_mount, tmp_path):
    # A mountpoint whose name mountinfo escapes: the daemon must still find its mount.
    m = make_mount(pool, name="mnt with space é")
    dev = os.stat(m.mountpoint).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        assert f.read().strip() == "1024"
