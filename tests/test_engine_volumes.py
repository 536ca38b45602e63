"""Engine, DESIGN.md section 1 "Thin volumes": names, sizes, isolation, zeroing, delete.

A volume never shows another volume's bytes; a partial write to a newly
provisioned block leaves the rest reading as zeros (unless skip-block-zeroing);
writes past the end grow; rename keeps the identity; deletion of an open volume
is deferred; bad names, sizes and offsets are refused and change nothing.
No FUSE: fusepool.engine.Pool directly; every test that changes a pool ends by
checking the engine's invariants (``engine_model.check_invariants``).
"""

import pytest
from engine_helpers import BS, GiB, MiB, mapping_of, new_pool, pattern, pool_state
from engine_model import check_invariants

from fusepool.engine import MAX_VOLUME_SIZE, Pool
from fusepool.errors import InvalidArgument, NoSuchVolume, PoolError, UsageError, VolumeExists
from fusepool.metadata.format import FANOUT


def test_volumes_never_see_each_others_writes(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        vols = [pool.create_volume(f"v{i}", 4 * BS) for i in range(4)]
        for i, v in enumerate(vols):
            pool.write(v.dev_id, i * 1000, bytes([65 + i]) * 3000)
        for i, v in enumerate(vols):
            expect = bytearray(4 * BS)
            expect[i * 1000 : i * 1000 + 3000] = bytes([65 + i]) * 3000
            assert pool.read(v.dev_id, 0, 4 * BS) == bytes(expect)
        datablocks = [set(mapping_of(pool, v).values()) for v in vols]
        for i in range(4):
            for j in range(i + 1, 4):
                assert datablocks[i].isdisjoint(datablocks[j])


def _write_reuse_cycle(pool, fill: bytes):
    """Fill the whole pool with ``fill`` through a volume, remove it, keep the stale bytes."""
    pool.data.can_punch = False  # keep stale bytes in the image (as a host without punch would)
    n = pool.nr_blocks
    v = pool.create_volume("filler", n * BS)
    pool.write(v.dev_id, 0, fill * (n * BS // len(fill)))
    assert pool.space.free == 0
    pool.remove("filler")
    pool.commit()
    assert pool.space.free == n


def test_partial_write_to_new_block_reads_zeros(tmp_path):
    path = new_pool(tmp_path, data_size=16 * BS, metadata_size=1 * MiB)
    with Pool.open(path) as pool:
        _write_reuse_cycle(pool, b"\xaa")
        v = pool.create_volume("v", 4 * BS)
        pool.write(v.dev_id, BS + 1000, b"hello")
        pool.write(v.dev_id, 3 * BS - 2, b"edge")  # straddles blocks 2 and 3
        expect = bytearray(4 * BS)
        expect[BS + 1000 : BS + 1005] = b"hello"
        expect[3 * BS - 2 : 3 * BS + 2] = b"edge"
        assert pool.read(v.dev_id, 0, 4 * BS) == bytes(expect)
        # Even reading the data blocks directly: the whole block was zeroed.
        for vb, block in mapping_of(pool, v).items():
            assert pool.data.read(block, 0, BS) == bytes(expect[vb * BS : (vb + 1) * BS])
        check_invariants(pool)


def test_partial_write_to_a_hole_writes_only_the_piece(tmp_path):
    """A fresh or punched block reads as zeros already: no 64 KiB of zeros is written."""
    path = new_pool(tmp_path, data_size=16 * BS, metadata_size=1 * MiB)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 4 * BS)
        before = pool.data.allocated_bytes()
        pool.write(v.dev_id, BS + 4096, b"x" * 4096)
        assert pool.data.allocated_bytes() - before <= 2 * 4096  # (a page or two, not a block)
        pool.write(v.dev_id, 2 * BS, pattern(3, BS))
        pool.discard(v.dev_id, 2 * BS, BS)
        pool.commit()  # the freed block is punched: a hole again
        block = pool.space.busy.find(0)
        assert pool.data.is_hole(block)
        pool.space.cursor = block  # the next allocation takes it
        before = pool.data.allocated_bytes()
        pool.write(v.dev_id, 3 * BS + 10, b"again")
        assert pool.data.allocated_bytes() - before <= 2 * 4096
        assert mapping_of(pool, v)[3] == block
        expect = bytearray(4 * BS)
        expect[BS + 4096 : BS + 8192] = b"x" * 4096
        expect[3 * BS + 10 : 3 * BS + 15] = b"again"
        assert pool.read(v.dev_id, 0, 4 * BS) == bytes(expect)
        check_invariants(pool)


def test_skip_block_zeroing_may_show_stale_bytes(tmp_path):
    """Documents dm-thin's skip_block_zeroing: only the written bytes are guaranteed.

    The rest of a newly provisioned block may show whatever the data block held
    before (here: another, deleted volume's bytes).
    """
    path = new_pool(tmp_path, data_size=16 * BS, metadata_size=1 * MiB, skip_block_zeroing=True)
    with Pool.open(path) as pool:
        assert pool.stats()["skip_block_zeroing"] is True
        _write_reuse_cycle(pool, b"\xaa")
        v = pool.create_volume("v", 2 * BS)
        pool.write(v.dev_id, 1000, b"hello")
        got = pool.read(v.dev_id, 0, BS)
        assert got[1000:1005] == b"hello"
        rest = got[:1000] + got[1005:]
        # Allowed: zeros or the stale bytes of the deleted volume, nothing else.
        assert set(rest) <= {0x00, 0xAA}
        # Whole-block writes never expose anything stale.
        pool.write(v.dev_id, BS, b"w" * BS)
        assert pool.read(v.dev_id, BS, BS) == b"w" * BS
        check_invariants(pool)


def test_deferred_deletion(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 4 * BS)
        pool.write(v.dev_id, 0, b"v" * 4 * BS)
        pool.open_device(v.dev_id)
        pool.open_device(v.dev_id)
        assert pool.remove("v") is True
        assert "v" not in pool.names and [d.name for d in pool.volumes()] == []
        # The name is free at once.
        w = pool.create_volume("v", BS)
        assert w.dev_id != v.dev_id
        assert pool.read(v.dev_id, 0, 4 * BS) == b"v" * 4 * BS
        pool.close_device(v.dev_id)
        assert v.dev_id in pool.devices
        pool.close_device(v.dev_id)
        assert v.dev_id not in pool.devices
        assert pool.space.used == 0
        pool.close_device(v.dev_id)  # a stray close is harmless
        check_invariants(pool)
        # Not deferred when not open.
        pool.open_device(w.dev_id)
        pool.close_device(w.dev_id)
        assert pool.remove("v") is False


BAD_NAMES = ["", ".", "..", "a/b", "/", "a\0b", "x" * 256, "é" * 128, None, 5]


@pytest.fixture
def busy_pool(tmp_path):
    path = new_pool(tmp_path)
    pool = Pool.open(path)
    v = pool.create_volume("v", 4 * BS)
    pool.write(v.dev_id, 0, b"v" * 4 * BS)
    pool.create_volume("w", 4 * BS)
    pool.commit()
    yield pool
    pool.close()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_refused(busy_pool, name):
    pool = busy_pool
    state = pool_state(pool)
    with pytest.raises(UsageError):
        pool.create_volume(name, BS)
    with pytest.raises(UsageError):
        pool.snapshot("v", name)
    with pytest.raises(UsageError):
        pool.rename("v", name)
    assert pool_state(pool) == state


def test_longest_valid_names(tmp_path):
    path = new_pool(tmp_path)
    names = ("x" * 255, "é" * 127 + "x", "-", "a b", "...", ".hidden", "名前")
    with Pool.open(path) as pool:
        for name in names:
            pool.create_volume(name, BS)
            assert pool.volume(name).name == name
    with Pool.open(path) as pool:
        assert sorted(pool.names) == sorted(names)


def test_duplicate_names_are_refused(busy_pool):
    pool = busy_pool
    state = pool_state(pool)
    with pytest.raises(VolumeExists):
        pool.create_volume("v", BS)
    with pytest.raises(VolumeExists):
        pool.snapshot("w", "v")
    with pytest.raises(VolumeExists):
        pool.rename("w", "v")
    assert pool_state(pool) == state
    pool.rename("v", "v")  # renaming to itself is a no-op
    assert pool_state(pool) == state


def test_unknown_volumes(busy_pool):
    pool = busy_pool
    state = pool_state(pool)
    for call in (lambda: pool.volume("nope"), lambda: pool.remove("nope"),
                 lambda: pool.snapshot("nope", "x"), lambda: pool.rename("nope", "x"),
                 lambda: pool.resize(9999, BS), lambda: pool.read(9999, 0, 1),
                 lambda: pool.write(9999, 0, b"x"), lambda: pool.discard(9999, 0, 1),
                 lambda: pool.open_device(9999)):
        with pytest.raises(NoSuchVolume):
            call()
    assert pool_state(pool) == state


def test_bad_sizes_and_offsets(busy_pool):
    pool = busy_pool
    v = pool.volume("v")
    state = pool_state(pool)
    with pytest.raises(InvalidArgument, match="shrink"):
        pool.resize(pool.volume("v").dev_id, 4 * BS - 1)
    with pytest.raises(InvalidArgument):
        pool.resize(pool.volume("v").dev_id, 0)
    for size in (-1, MAX_VOLUME_SIZE + 1, 1.5, "10G"):
        with pytest.raises(UsageError):
            pool.create_volume("new", size)
        with pytest.raises(UsageError):
            pool.resize(pool.volume("v").dev_id, size)
    with pytest.raises(InvalidArgument):
        pool.write(v.dev_id, -1, b"x")
    with pytest.raises(InvalidArgument):
        pool.read(v.dev_id, -1, 1)
    with pytest.raises(InvalidArgument):
        pool.read(v.dev_id, 0, -1)
    assert pool_state(pool) == state
    pool.resize(pool.volume("v").dev_id, 4 * BS)  # same size: fine, no change
    assert pool_state(pool) == state


def test_write_past_the_maximum_volume_size_leaks_nothing(busy_pool):
    pool = busy_pool
    v = pool.volume("v")
    state = pool_state(pool)
    with pytest.raises(PoolError):
        pool.write(v.dev_id, MAX_VOLUME_SIZE - 10, b"x" * 100)
    assert pool_state(pool) == state, "a refused write left allocated blocks behind"
    check_invariants(pool)


def test_reads_clip_at_the_size(busy_pool):
    pool = busy_pool
    v = pool.volume("v")
    assert pool.read(v.dev_id, 4 * BS, 10) == b""
    assert pool.read(v.dev_id, 10 * BS, 10) == b""
    assert pool.read(v.dev_id, 4 * BS - 3, 10) == b"vvv"
    assert pool.read(v.dev_id, 0, 0) == b""
    assert pool.write(v.dev_id, 0, b"") == 0


def test_huge_sparse_volume(tmp_path):
    """A 40 GiB thin volume on a 64 MiB pool: a three-level tree, sparse writes."""
    path = new_pool(tmp_path)
    size = 40 * GiB
    with Pool.open(path) as pool:
        v = pool.create_volume("huge", size)
        spots = [0, BS - 1, FANOUT * BS - 2, FANOUT * FANOUT * BS - 5, 17 * GiB + 12345, size - 7]
        for i, off in enumerate(spots):
            pool.write(v.dev_id, off, f"<{i}>".encode() + b"@" * 3)
        assert v.size == size
        s = pool.snapshot("huge", "huge-snap")
        pool.write(s.dev_id, size - 7, b"snapped")
        for i, off in enumerate(spots):
            assert pool.read(v.dev_id, off, 6) == f"<{i}>".encode() + b"@" * 3
        assert pool.read(s.dev_id, size - 7, 10) == b"snapped"
        assert pool.read(v.dev_id, 9 * GiB, 3 * BS) == bytes(3 * BS)
        expected_blocks = sorted({(o + k) // BS for o in spots for k in range(6) if o + k < size})
        assert sorted(mapping_of(pool, v)) == expected_blocks
        check_invariants(pool)
    with Pool.open(path) as pool:
        v = pool.volume("huge")
        for i, off in enumerate(spots[:-1]):
            assert pool.read(v.dev_id, off, 6) == f"<{i}>".encode() + b"@" * 3
        assert pool.read(v.dev_id, size - 7, 10) == b"<5>@@@\0"
        pool.remove("huge")
        pool.remove("huge-snap")
        assert pool.space.used == 0
        check_invariants(pool)


def test_write_past_the_end_grows_the_volume(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 0)
        assert pool.read(v.dev_id, 0, 10) == b""
        assert pool.write(v.dev_id, 3 * BS + 5, b"tail") == 4
        assert v.size == 3 * BS + 9
        assert pool.read(v.dev_id, 0, 4 * BS) == bytes(3 * BS + 5) + b"tail"
        assert pool.write(v.dev_id, (FANOUT + 3) * BS, b"far") == 3
        assert v.size == (FANOUT + 3) * BS + 3
        assert pool.read(v.dev_id, 3 * BS + 5, 4) == b"tail"
        check_invariants(pool)
    with Pool.open(path) as pool:
        v = pool.volume("v")
        assert v.size == (FANOUT + 3) * BS + 3
        assert pool.read(v.dev_id, (FANOUT + 3) * BS, 10) == b"far"


def test_rename_keeps_identity_and_data(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("old", 2 * BS)
        pool.write(v.dev_id, 0, b"data")
        s = pool.snapshot("old", "snap")
        pool.rename("old", "new")
        assert pool.volume("new") is v and "old" not in pool.names
        assert pool.describe(s)["origin"] == "new"
        pool.create_volume("old", BS)  # the old name is free
    with Pool.open(path) as pool:
        assert pool.volume("new").dev_id == v.dev_id
        assert pool.read(pool.volume("new").dev_id, 0, 4) == b"data"
