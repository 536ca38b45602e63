"""Writes of zeros: provisioned like any write (the kernel's dm-thin) unless the pool
has zero detection (``init --zero-detection``, ``set --zero-detection on``; like
qemu's detect-zeroes=unmap).

The same operation sequences run in both modes; each case checks what reads back
(always zeros where zeros were written) and the mapping counts thin_ls would show
(MAPPED, EXCLUSIVE, SHARED), which is where the two modes differ:

- off (the default, as dm-thin): a write of zeros, whole-block or sub-block, into a
  hole provisions a block; over a mapped block it overwrites in place (exclusive) or
  breaks sharing (shared) like any other data;
- on: zeros into a hole store nothing; a whole block of zeros unmaps; zeros that
  leave a block all zeros (a shared block's copy, or the end of an exclusive block)
  unmap it.

Engine level (no FUSE), plus the settings' CLI: ``init``, ``set``, ``info``.
"""

import json
import os

import engine_helpers
import pytest
from conftest import run_fusepool
from engine_helpers import BS, MiB, mapping_of, pattern
from engine_model import check_invariants

from fusepool.config import CONFIG, BadConfig, PoolConfig
from fusepool.engine import Pool
from fusepool.errors import PoolFull

MODES = pytest.mark.parametrize("detect", [False, True], ids=["default", "zero-detection"])


def new_pool(tmp_path, detect: bool, **kw) -> str:
    return engine_helpers.new_pool(tmp_path, zero_detection=detect,
                                   **{"data_size": 16 * MiB, "metadata_size": 4 * MiB} | kw)


def read_conf(path) -> dict:
    with open(os.path.join(path, CONFIG)) as f:
        return json.load(f)


def usage(pool, dev) -> tuple[int, int, int]:
    """(mapped, exclusive, shared) blocks: thin_ls's MAPPED/EXCLUSIVE/SHARED columns."""
    exclusive, shared = pool.device_usage(dev)
    return dev.mapped_blocks, exclusive, shared


def mapped_vbs(pool, dev) -> list[int]:
    return sorted(mapping_of(pool, dev))


@MODES
def test_whole_block_zeros_into_a_hole(tmp_path, detect):
    with Pool.open(new_pool(tmp_path, detect)) as pool:
        v = pool.create_volume("v", 4 * BS)
        assert pool.write(v.dev_id, BS, bytes(2 * BS)) == 2 * BS
        assert pool.read(v.dev_id, 0, 4 * BS) == bytes(4 * BS)
        if detect:
            assert usage(pool, v) == (0, 0, 0) and pool.space.used == 0
        else:  # dm-thin provisions the blocks a write touches, whatever it writes
            assert usage(pool, v) == (2, 2, 0) and pool.space.used == 2
            assert mapped_vbs(pool, v) == [1, 2]
        pool.commit()
        check_invariants(pool)


@MODES
def test_sub_block_zeros_into_a_hole(tmp_path, detect):
    with Pool.open(new_pool(tmp_path, detect)) as pool:
        v = pool.create_volume("v", 4 * BS)
        assert pool.write(v.dev_id, 2 * BS + 512, bytes(4096)) == 4096
        assert pool.read(v.dev_id, 0, 4 * BS) == bytes(4 * BS)
        assert usage(pool, v) == ((0, 0, 0) if detect else (1, 1, 0))
        if not detect:
            assert mapped_vbs(pool, v) == [2]
        check_invariants(pool)


@MODES
def test_zeros_over_a_mapped_exclusive_block(tmp_path, detect):
    with Pool.open(new_pool(tmp_path, detect)) as pool:
        v = pool.create_volume("v", 4 * BS)
        pool.write(v.dev_id, 0, pattern(1, 4 * BS))
        pool.commit()
        before = mapping_of(pool, v)
        # A whole block of zeros over block 1; sub-block zeros that zero block 2 whole
        # in two pieces (the second ends the block: the case detection looks at).
        pool.write(v.dev_id, BS, bytes(BS))
        pool.write(v.dev_id, 2 * BS, bytes(BS // 2))
        pool.write(v.dev_id, 2 * BS + BS // 2, bytes(BS // 2))
        pool.write(v.dev_id, 3 * BS + 100, bytes(100))  # leaves block 3 with data
        want = bytearray(pattern(1, 4 * BS))
        want[BS : 3 * BS] = bytes(2 * BS)
        want[3 * BS + 100 : 3 * BS + 200] = bytes(100)
        assert pool.read(v.dev_id, 0, 4 * BS) == bytes(want)
        if detect:
            assert mapped_vbs(pool, v) == [0, 3] and usage(pool, v) == (2, 2, 0)
            pool.commit()
            assert pool.space.used == 2
        else:  # overwritten in place: the same data blocks, still mapped
            assert mapping_of(pool, v) == before
            assert usage(pool, v) == (4, 4, 0) and pool.space.used == 4
        check_invariants(pool)


@MODES
def test_zeros_over_a_shared_block(tmp_path, detect):
    with Pool.open(new_pool(tmp_path, detect)) as pool:
        v = pool.create_volume("v", 4 * BS)
        data = pattern(2, 4 * BS)
        pool.write(v.dev_id, 0, data)
        s = pool.snapshot("v", "s")
        assert usage(pool, s) == (4, 0, 4)
        # Into the snapshot: a whole block of zeros over block 0; zeros over the only
        # data of block 1 (a sub-block write whose copy is all zeros).
        pool.write(v.dev_id, BS, bytes(BS))  # (make block 1 all zeros in v, sharing broken)
        pool.write(s.dev_id, 0, bytes(BS))
        pool.write(s.dev_id, 2 * BS, bytes(100))  # a sub-block of zeros: the copy keeps data
        assert pool.read(v.dev_id, 0, BS) == data[:BS]  # the origin keeps its bytes
        want = bytearray(data)
        want[0:BS] = bytes(BS)
        want[2 * BS : 2 * BS + 100] = bytes(100)
        assert pool.read(s.dev_id, 0, 4 * BS) == bytes(want)
        if detect:
            # Whole zero blocks unmap in the writer only: v's block 1, s's block 0; s's
            # block 2 is a copy.  What the other side kept is now exclusive to it.
            assert mapped_vbs(pool, v) == [0, 2, 3] and usage(pool, v) == (3, 2, 1)
            assert mapped_vbs(pool, s) == [1, 2, 3] and usage(pool, s) == (3, 2, 1)
        else:
            # Every write broke the sharing of its block: the writer got a new block.
            assert usage(pool, v) == (4, 3, 1)
            assert usage(pool, s) == (4, 3, 1)
        pool.commit()
        check_invariants(pool)


@MODES
def test_unaligned_zeros_over_mixed_blocks(tmp_path, detect):
    """One write of zeros covering two blocks whole and two partly, over a hole and data."""
    with Pool.open(new_pool(tmp_path, detect)) as pool:
        v = pool.create_volume("v", 6 * BS)
        pool.write(v.dev_id, 0, pattern(3, 3 * BS))  # blocks 0-2 mapped, 3-5 holes
        pool.write(v.dev_id, BS + 10, bytes(3 * BS))  # blocks 2, 3 whole; 1 and 4 partly
        want = bytearray(pattern(3, 3 * BS) + bytes(3 * BS))
        want[BS + 10 : 4 * BS + 10] = bytes(3 * BS)
        assert pool.read(v.dev_id, 0, 6 * BS) == bytes(want)
        assert mapped_vbs(pool, v) == ([0, 1] if detect else [0, 1, 2, 3, 4])
        check_invariants(pool)


@MODES
def test_zeros_in_a_full_pool(tmp_path, detect):
    """Out of data space: zeros into a hole need a block like any data (ENOSPC, as
    dm-thin), unless zero detection stores nothing for them; zeros over a block the
    volume owns succeed in both modes."""
    with Pool.open(new_pool(tmp_path, detect, data_size=4 * BS, metadata_size=1 * MiB)) as pool:
        v = pool.create_volume("v", 8 * BS)
        pool.write(v.dev_id, 0, pattern(4, 4 * BS))
        assert pool.space.free == 0
        assert pool.write(v.dev_id, BS, bytes(BS)) == BS
        assert pool.write(v.dev_id, 2 * BS + 7, bytes(100)) == 100
        if detect:
            assert pool.write(v.dev_id, 5 * BS, bytes(BS)) == BS
            assert pool.write(v.dev_id, 6 * BS + 1, bytes(10)) == 10
        else:
            with pytest.raises(PoolFull):
                pool.write(v.dev_id, 5 * BS, bytes(BS))
            with pytest.raises(PoolFull):
                pool.write(v.dev_id, 6 * BS + 1, bytes(10))
        assert pool.read(v.dev_id, BS, BS) == bytes(BS)
        assert v.mapped_blocks == (3 if detect else 4)
        check_invariants(pool)


def test_the_setting_is_stored_changed_and_reported(tmp_path):
    path = new_pool(tmp_path, False)
    assert PoolConfig.load(path).zero_detection is False
    with Pool.open(path) as pool:
        assert pool.stats()["zero_detection"] is False
        pool.configure(zero_detection=True)
        assert pool.stats()["zero_detection"] is True
        v = pool.create_volume("v", 2 * BS)
        pool.write(v.dev_id, 0, bytes(BS))  # takes effect at once
        assert v.mapped_blocks == 0
    assert read_conf(path)["zero_detection"] is True
    with Pool.open(path) as pool:
        assert pool.config.zero_detection is True
        pool.configure(zero_detection=False)
        v = pool.volume("v")
        pool.write(v.dev_id, 0, bytes(BS))
        assert v.mapped_blocks == 1


def test_a_pool_json_without_the_field_is_off(tmp_path):
    """Pools made before the option keep working, now with the kernel's behaviour."""
    path = new_pool(tmp_path, True)
    conf = read_conf(path)
    del conf["zero_detection"]
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(conf, f)
    assert PoolConfig.load(path).zero_detection is False


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_non_boolean_in_pool_json_is_refused(tmp_path, value):
    path = new_pool(tmp_path, False)
    conf = read_conf(path)
    conf["zero_detection"] = value
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(conf, f)
    with pytest.raises(BadConfig, match="zero_detection: .* is not true or false"):
        PoolConfig.load(path)


# --- the CLI: init, set, info ------------------------------------------------------------

def info(pool) -> tuple[str, dict]:
    text = run_fusepool("info", pool).stdout
    return text, json.loads(run_fusepool("info", pool, "--json").stdout)


def test_cli_init_set_and_info(tmp_path):
    plain, detecting = tmp_path / "plain", tmp_path / "detecting"
    run_fusepool("init", plain, "--data-size", "16M", "--metadata-size", "8M")
    run_fusepool("init", detecting, "--data-size", "16M", "--metadata-size", "8M", "--zero-detection")
    text, st = info(plain)
    assert " Zero Detection: off\n" in text and st["zero_detection"] is False
    text, st = info(detecting)
    assert " Zero Detection: on\n" in text and st["zero_detection"] is True
    out = run_fusepool("set", plain, "--zero-detection", "on").stdout
    assert "zero detection: on" in out
    assert info(plain)[1]["zero_detection"] is True
    run_fusepool("set", plain, "--zero-detection", "off")
    assert info(plain)[1]["zero_detection"] is False


def test_cli_set_refuses_a_bad_value(tmp_path):
    pool = tmp_path / "p"
    run_fusepool("init", pool, "--data-size", "16M", "--metadata-size", "8M")
    before = (pool / CONFIG).read_text()
    r = run_fusepool("set", pool, "--zero-detection", "maybe", check=False)
    assert r.returncode == 2 and r.stderr.startswith("fusepool: error: ")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert (pool / CONFIG).read_text() == before


def test_cli_set_online_takes_effect_in_the_daemon(pool, make_mount):
    """`set` on a mounted pool changes the running daemon's writes, not just pool.json."""
    m = make_mount(pool)
    run_fusepool("create", pool, "v", "--size", "1M")
    zeros = bytearray(4 * BS)
    fd = os.open(m.vol("v"), os.O_RDWR)
    try:
        os.pwrite(fd, zeros, 0)
        os.fsync(fd)
        run_fusepool("set", pool, "--zero-detection", "on")
        os.pwrite(fd, zeros, 8 * BS)
        os.fsync(fd)
    finally:
        os.close(fd)
    vols = json.loads(run_fusepool("list", pool, "--json").stdout)
    assert vols[0]["mapped_blocks"] == 4  # the first write's blocks only
