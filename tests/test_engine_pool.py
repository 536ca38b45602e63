"""Engine, DESIGN.md section 1 "Pool": creating and opening a pool.

Block sizes, create arguments, what is not a pool, the exclusive lock,
read-only opens and closing.  No FUSE: fusepool.engine.Pool directly.
"""

import os

import pytest
from engine_helpers import BS, GiB, KiB, MiB, new_pool, pool_state

from fusepool.engine import Pool
from fusepool.errors import NotAPool, PoolBusy, PoolError, ReadOnlyPool, UsageError
from fusepool.metadata.format import PAGE_SIZE


@pytest.mark.parametrize("block_size", [0, 1000, 32 * KiB, 64 * KiB + 512, 96 * KiB, 2 * GiB, -BS])
def test_bad_block_size(tmp_path, block_size):
    path = tmp_path / "p"
    with pytest.raises(UsageError):
        Pool.create(str(path), data_size=64 * MiB, metadata_size=8 * MiB, block_size=block_size)
    assert not path.exists()


def test_good_block_sizes(tmp_path):
    for bs in (64 * KiB, 128 * KiB, 192 * KiB, 1 * MiB):
        path = new_pool(tmp_path, name=f"p{bs}", block_size=bs, data_size=16 * bs)
        with Pool.open(path) as pool:
            assert pool.block_size == bs == pool.stats()["block_size"]
            v = pool.create_volume("v", 3 * bs)
            pool.write(v.dev_id, bs - 1, b"xy")
            assert pool.read(v.dev_id, bs - 1, 2) == b"xy"


def test_bad_create_arguments(tmp_path):
    with pytest.raises(UsageError):
        Pool.create(str(tmp_path / "a"), data_size=BS - 1, metadata_size=8 * MiB)
    with pytest.raises(UsageError, match="too small"):
        Pool.create(str(tmp_path / "b"), data_size=64 * MiB, metadata_size=PAGE_SIZE)
    with pytest.raises(UsageError):
        Pool.create(str(tmp_path / "c"), data_size=64 * MiB, metadata_size=8 * MiB, base_size=0)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "precious").write_text("keep me")
    with pytest.raises(PoolError):
        Pool.create(str(tmp_path / "d"), data_size=64 * MiB, metadata_size=8 * MiB)
    assert os.listdir(tmp_path / "d") == ["precious"]
    (tmp_path / "f").write_text("a file")
    with pytest.raises(PoolError):
        Pool.create(str(tmp_path / "f"), data_size=64 * MiB, metadata_size=8 * MiB)
    # An existing pool is not overwritten.
    path = new_pool(tmp_path, name="e")
    with pytest.raises(PoolError):
        Pool.create(path, data_size=64 * MiB, metadata_size=8 * MiB)
    with Pool.open(path):
        pass


def test_opening_something_that_is_not_a_pool(tmp_path):
    with pytest.raises(NotAPool):
        Pool.open(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAPool):
        Pool.open(str(tmp_path / "empty"))
    assert os.listdir(tmp_path / "empty") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotAPool):
        Pool.open(str(tmp_path / "file"))
    path = new_pool(tmp_path)
    os.unlink(os.path.join(path, "metadata"))
    with pytest.raises(NotAPool):
        Pool.open(path)
    path = new_pool(tmp_path, name="badjson")
    with open(os.path.join(path, "pool.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(NotAPool):
        Pool.open(path)


def test_second_open_is_busy(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", BS)
        pool.write(v.dev_id, 0, b"x")
        state = pool_state(pool)
        with pytest.raises(PoolBusy, match=str(os.getpid())):
            Pool.open(path)
        assert pool_state(pool) == state
        pool.write(v.dev_id, 1, b"y")  # the first holder is unaffected
    with Pool.open(path) as pool:  # free after close
        assert pool.read(pool.volume("v").dev_id, 0, 2) == b"xy"


def test_readonly_open(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 2 * BS)
        pool.write(v.dev_id, 0, b"ro")
    meta = os.path.join(path, "metadata")
    mtime = os.stat(meta).st_mtime_ns
    with Pool.open(path, readonly=True) as pool:
        v = pool.volume("v")
        assert pool.read(v.dev_id, 0, 2) == b"ro"
        for call in (lambda: pool.write(v.dev_id, 0, b"x"), lambda: pool.create_volume("w", BS),
                     lambda: pool.discard(v.dev_id, 0, BS), lambda: pool.remove("v"),
                     lambda: pool.snapshot("v", "s"), lambda: pool.extend(data_size=128 * MiB)):
            with pytest.raises(ReadOnlyPool):
                call()
        with pytest.raises(PoolBusy):  # still exclusive
            Pool.open(path)
    assert os.stat(meta).st_mtime_ns == mtime


def test_close_twice_is_safe(tmp_path):
    path = new_pool(tmp_path)
    pool = Pool.open(path)
    pool.create_volume("v", BS)
    pool.close()
    pool.close()
    with Pool.open(path) as pool:
        assert "v" in pool.names
