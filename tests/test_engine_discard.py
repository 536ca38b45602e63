"""Engine, DESIGN.md section 1 "Thin volumes", discard and zero detection.

A discard unmaps the whole blocks inside its range (rounded inward, as
dm-thin); with zero detection a whole block of zeros unmaps too (the default,
zeros as data, is tests/test_zero_writes.py).  No FUSE: fusepool.engine.Pool
directly; every test ends by checking the engine's invariants.
"""

import pytest
from engine_helpers import BS, mapping_of, new_pool, pattern
from engine_model import check_invariants

from fusepool.engine import Pool
from fusepool.errors import InvalidArgument


def test_whole_block_zero_write_unmaps_and_frees(tmp_path):
    path = new_pool(tmp_path, zero_detection=True)  # (off by default: tests/test_zero_writes.py)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 8 * BS)
        pool.write(v.dev_id, 0, pattern(8, 8 * BS))
        pool.commit()
        free = pool.stats()["data_blocks_free"]
        assert v.mapped_blocks == 8
        assert pool.write(v.dev_id, 2 * BS, bytes(2 * BS)) == 2 * BS
        assert v.mapped_blocks == 6
        assert sorted(mapping_of(pool, v)) == [0, 1, 4, 5, 6, 7]
        assert pool.read(v.dev_id, 2 * BS, 2 * BS) == bytes(2 * BS)
        assert pool.space.used == 6
        assert pool.stats()["data_blocks_free"] == free  # not before the commit
        pool.commit()
        assert pool.stats()["data_blocks_free"] == free + 2
        # A partial write of zeros does not unmap.
        pool.write(v.dev_id, 5 * BS, bytes(BS - 1))
        assert v.mapped_blocks == 6
        # Unaligned zeros covering blocks 5..6 whole and 4, 7 partly: only 5 and 6 go.
        pool.write(v.dev_id, 4 * BS + 10, bytes(3 * BS))
        assert sorted(mapping_of(pool, v)) == [0, 1, 4, 7]
        # Whole zero blocks mixed with data in one write.
        pool.write(v.dev_id, 0, bytes(BS) + b"d" * BS)
        assert sorted(mapping_of(pool, v)) == [1, 4, 7]
        # A zero block over an unmapped block allocates nothing.
        used = pool.space.used
        pool.write(v.dev_id, 2 * BS, bytes(BS))
        assert pool.space.used == used and v.mapped_blocks == 3
        check_invariants(pool)
        # Zero write into a shared block unmaps it in the writer only.
        s = pool.snapshot("v", "s")
        pool.write(s.dev_id, BS, bytes(BS))
        assert pool.read(v.dev_id, BS, BS) == b"d" * BS
        assert sorted(mapping_of(pool, s)) == [4, 7]
        check_invariants(pool)


def test_discard_rounds_inward(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 8 * BS)
        data = pattern(9, 8 * BS)
        pool.write(v.dev_id, 0, data)
        # From the middle of block 1 to the middle of block 5: blocks 2, 3, 4 go.
        assert pool.discard(v.dev_id, BS + BS // 2, 4 * BS) == 3
        assert sorted(mapping_of(pool, v)) == [0, 1, 5, 6, 7]
        expect = bytearray(data)
        expect[2 * BS : 5 * BS] = bytes(3 * BS)
        assert pool.read(v.dev_id, 0, 8 * BS) == bytes(expect)  # edges keep their bytes
        # Inside one block: nothing.
        assert pool.discard(v.dev_id, 6 * BS + 1, BS - 2) == 0
        assert pool.discard(v.dev_id, 6 * BS, 0) == 0
        # Exactly one block.
        assert pool.discard(v.dev_id, 6 * BS, BS) == 1
        # Discarding unmapped blocks is a no-op.
        assert pool.discard(v.dev_id, 2 * BS, 3 * BS) == 0
        assert v.mapped_blocks == 4
        # Out of range is refused.
        for off, n in ((-1, 10), (0, -1), (0, 8 * BS + 1), (8 * BS, 1)):
            with pytest.raises(InvalidArgument):
                pool.discard(v.dev_id, off, n)
        # Discarding in a snapshot leaves the origin alone.
        s = pool.snapshot("v", "s")
        pool.discard(s.dev_id, 0, 8 * BS)
        assert s.mapped_blocks == 0
        assert pool.read(v.dev_id, 0, BS) == data[:BS]
        pool.commit()
        assert pool.space.used == 4
        check_invariants(pool)


def test_discard_unaligned_volume_size(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 2 * BS + 100)
        pool.write(v.dev_id, 0, b"x" * (2 * BS + 100))
        # The partial last block is never unmapped by a discard that ends at the size.
        assert pool.discard(v.dev_id, 0, 2 * BS + 100) == 2
        assert sorted(mapping_of(pool, v)) == [2]
        assert pool.read(v.dev_id, 2 * BS, 200) == b"x" * 100
        check_invariants(pool)
