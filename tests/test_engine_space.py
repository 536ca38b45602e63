"""Engine, DESIGN.md section 1 "Space": out of data space, minimum free space, out of metadata.

A write that needs a new block on a full pool gets a short count or PoolFull
and changes nothing; owned blocks stay writable; removing and extending give
space back; the minimum free space refuses creates and snapshots; a full
metadata refuses changes cleanly (read-only), keeps every commit, and extending
it recovers in the same session.  No FUSE: fusepool.engine.Pool directly; every
test that changes a pool ends by checking the engine's invariants.
"""

import contextlib
import os

import pytest
from engine_helpers import BS, MiB, expect_logged, mapping_of, new_pool, pattern, pool_state
from engine_model import check_invariants, crash

from fusepool.engine import METADATA_RESERVE_PAGES, Pool, min_metadata_pages
from fusepool.errors import (
    BelowMinFreeSpace,
    InvalidArgument,
    MetadataFull,
    PoolFull,
    ReadOnlyPool,
    UsageError,
)
from fusepool.metadata.format import FANOUT, PAGE_SIZE


def test_pool_full(tmp_path):
    nr = 64
    # With zero detection, for the zero-unmap of a full pool below (without it a zero
    # write is an overwrite: tests/test_zero_writes.py covers a full pool then).
    path = new_pool(tmp_path, data_size=nr * BS, metadata_size=1 * MiB, zero_detection=True)
    with Pool.open(path) as pool:
        a = pool.create_volume("a", 32 * BS)
        a_data = pattern(10, 32 * BS)
        pool.write(a.dev_id, 0, a_data)
        b = pool.create_volume("b", 64 * BS)
        pool.write(b.dev_id, 0, pattern(11, 30 * BS))
        assert pool.space.free == 2
        # Part fits: a short count, exactly up to the last free block.
        assert pool.write(b.dev_id, 30 * BS, b"q" * 4 * BS) == 2 * BS
        assert pool.space.free == 0
        assert b.mapped_blocks == 32
        assert pool.read(b.dev_id, 30 * BS, 3 * BS) == b"q" * 2 * BS + bytes(BS)
        # Nothing fits: PoolFull, nothing changed.
        state = pool_state(pool)
        with pytest.raises(PoolFull):
            pool.write(b.dev_id, 40 * BS, b"r" * 10)
        with pytest.raises(PoolFull):
            pool.write(b.dev_id, 40 * BS, b"r" * 3 * BS)
        assert pool_state(pool) == state
        # Overwriting blocks a volume owns still works, partial or whole.
        pool.write(a.dev_id, 5, b"owned")
        pool.write(b.dev_id, BS, b"w" * BS)
        a_expect = bytearray(a_data)
        a_expect[5:10] = b"owned"
        assert pool.read(a.dev_id, 0, 32 * BS) == bytes(a_expect)
        # Zero blocks unmap without allocating, but the block only comes back at the commit.
        pool.write(b.dev_id, 2 * BS, bytes(BS))
        with pytest.raises(PoolFull):
            pool.write(b.dev_id, 40 * BS, b"r")
        pool.commit()
        assert pool.write(b.dev_id, 40 * BS, b"r") == 1
        check_invariants(pool)
        # A shared block cannot be copied when full.
        s = pool.snapshot("a", "s")
        with pytest.raises(PoolFull):
            pool.write(s.dev_id, 0, b"cow")
        with pytest.raises(PoolFull):
            pool.write(a.dev_id, 0, b"cow")
        assert pool.read(a.dev_id, 0, 32 * BS) == pool.read(s.dev_id, 0, 32 * BS) == bytes(a_expect)
        # Removing volumes frees space; writes work again.
        pool.remove("s")
        pool.remove("a")
        assert pool.stats()["data_blocks_free"] == 32
        assert pool.write(b.dev_id, 40 * BS, b"z" * 5 * BS) == 5 * BS
        check_invariants(pool)
    with Pool.open(path) as pool:
        b = pool.volume("b")
        assert pool.read(b.dev_id, 40 * BS, 5 * BS) == b"z" * 5 * BS
        check_invariants(pool)


def test_pool_full_short_write_with_unaligned_head(tmp_path):
    path = new_pool(tmp_path, data_size=8 * BS, metadata_size=1 * MiB)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 16 * BS)
        pool.write(v.dev_id, 0, b"a" * 7 * BS)
        used = pool.space.used
        # Starts half-way into block 7 (gets the last free block), then runs out.
        assert pool.write(v.dev_id, 7 * BS + BS // 2, b"b" * 2 * BS) == BS // 2
        assert pool.space.used == used + 1
        assert pool.read(v.dev_id, 7 * BS, BS) == bytes(BS // 2) + b"b" * (BS // 2)
        assert v.size == 16 * BS
        check_invariants(pool)


def test_pool_full_short_write_does_not_grow_past_what_was_written(tmp_path):
    path = new_pool(tmp_path, data_size=4 * BS, metadata_size=1 * MiB)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 0)
        assert pool.write(v.dev_id, 0, b"g" * 6 * BS) == 4 * BS
        assert v.size == 4 * BS
        with pytest.raises(PoolFull):
            pool.write(v.dev_id, 4 * BS, b"more")
        assert v.size == 4 * BS
        check_invariants(pool)


def test_growing_a_volume_in_a_full_pool(tmp_path):
    """Growing is a metadata change, as dm-thin's: it needs no data block, even when the
    volume's partial last block is shared with a snapshot (its tail is zeros already).  Only
    stale bytes past the end (a lost write past it, see test_powerloss) need that block
    copied to zero them, and a full pool then refuses the resize whole."""
    path = new_pool(tmp_path, data_size=4 * BS, metadata_size=1 * MiB)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", BS + 1000)
        pool.write(v.dev_id, 0, b"v" * (BS + 1000))
        pool.snapshot("v", "s")  # block 1 (the partial one) is shared now
        f = pool.create_volume("fill", 2 * BS)
        pool.write(f.dev_id, 0, b"f" * 2 * BS)
        assert pool.space.free == 0
        pool.resize(v.dev_id, 3 * BS)
        assert v.size == 3 * BS and pool.space.free == 0
        assert pool.read(v.dev_id, BS, 2 * BS) == b"v" * 1000 + bytes(2 * BS - 1000)
        # Stale bytes past the end of the shared block (as a crash leaves them): copying
        # the block to zero them needs space; refused whole.
        s = pool.volume("s")
        block = mapping_of(pool, s)[1]
        pool.data.write_one(block * BS + 1000, b"stale")
        with pytest.raises(PoolFull):
            pool.resize(s.dev_id, 2 * BS)
        assert s.size == BS + 1000
        pool.remove("fill")
        pool.resize(s.dev_id, 2 * BS)
        assert pool.read(s.dev_id, BS, BS) == b"v" * 1000 + bytes(BS - 1000)
        check_invariants(pool)


def test_extend_data_space(tmp_path):
    path = new_pool(tmp_path, data_size=8 * BS, metadata_size=1 * MiB)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 32 * BS)
        pool.write(v.dev_id, 0, b"1" * 8 * BS)
        with pytest.raises(PoolFull):
            pool.write(v.dev_id, 8 * BS, b"2")
        with pytest.raises(InvalidArgument):
            pool.extend(data_size=4 * BS)
        pool.extend(data_size=2000 * BS)  # crosses a space-map page boundary
        assert pool.stats()["data_blocks_total"] == 2000
        assert pool.write(v.dev_id, 8 * BS, b"2" * 24 * BS) == 24 * BS
        check_invariants(pool)
    with Pool.open(path) as pool:
        assert pool.nr_blocks == 2000
        assert os.path.getsize(os.path.join(path, "data")) == 2000 * BS
        v = pool.volume("v")
        assert pool.read(v.dev_id, 0, 32 * BS) == b"1" * 8 * BS + b"2" * 24 * BS
        check_invariants(pool)


def test_refused_extend_changes_nothing(tmp_path):
    """An extend refused for too little metadata must not grow the metadata either."""
    nb = 1024
    pages = min_metadata_pages(nb)
    path = new_pool(tmp_path, data_size=nb * BS, metadata_size=pages * PAGE_SIZE)
    with Pool.open(path) as pool:
        before = pool.stats()
        with pytest.raises(UsageError, match="metadata"):
            pool.extend(data_size=100 * nb * BS, metadata_size=(pages + 10) * PAGE_SIZE)
        after = pool.stats()
        for key in ("metadata_space_total", "data_space_total", "transaction_id"):
            assert after[key] == before[key], key
        assert not pool.dirty
    assert os.path.getsize(os.path.join(path, "metadata")) == pages * PAGE_SIZE


def test_min_free_space_refuses_create_and_snapshot(tmp_path):
    path = new_pool(tmp_path, data_size=100 * BS, metadata_size=1 * MiB, min_free_space=10)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 100 * BS)
        pool.write(v.dev_id, 0, b"x" * 90 * BS)  # 10 % free: still allowed
        pool.create_volume("ok", BS)
        pool.write(v.dev_id, 90 * BS, b"x")  # 9 % free
        state = pool_state(pool)
        with pytest.raises(BelowMinFreeSpace, match="extend|remove"):
            pool.create_volume("w", BS)
        with pytest.raises(BelowMinFreeSpace):
            pool.snapshot("v", "snap")
        assert pool_state(pool) == state
        # Writes into existing volumes are not subject to it.
        assert pool.write(v.dev_id, 91 * BS, b"y" * BS) == BS
        pool.remove("ok")  # removing is always allowed
        pool.discard(v.dev_id, 0, 20 * BS)
        pool.commit()
        pool.create_volume("w", BS)
        pool.snapshot("v", "snap")
        check_invariants(pool)


def test_min_free_space_for_metadata(tmp_path):
    nb = 1024
    path = new_pool(tmp_path, data_size=nb * BS, metadata_size=(min_metadata_pages(nb) + 40) * PAGE_SIZE,
                    min_free_space=40)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", nb * FANOUT * BS)
        i = 0
        with pytest.raises(BelowMinFreeSpace, match="metadata"):
            while True:  # one leaf per write: metadata fills long before data
                for k in range(4):
                    pool.write(v.dev_id, (4 * i + k) * FANOUT * BS, b"m")
                pool.commit()
                assert pool.space.free * 100 >= 40 * nb  # data is not the limit
                pool.snapshot("v", f"s{i}")
                pool.remove(f"s{i}")
                i += 1
        assert i > 3, i
        check_invariants(pool)


def test_write_failure_leaves_nothing_behind(tmp_path):
    path = new_pool(tmp_path, data_size=4 * BS, metadata_size=1 * MiB)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 8 * BS)
        pool.write(v.dev_id, 0, b"1" * 4 * BS)
        pool.commit()
        w = pool.create_volume("w", 8 * BS)
        for _ in range(3):
            with pytest.raises(PoolFull):
                pool.write(w.dev_id, 0, b"2" * 3 * BS)
        assert w.mapped_blocks == 0 and pool.space.used == 4
        pool.commit()
        check_invariants(pool)


def _tiny_metadata_pool(tmp_path, name="tiny", pages=None):
    nb = 1024
    smallest = pages is None
    pages = pages or min_metadata_pages(nb)
    path = new_pool(tmp_path, name=name, data_size=nb * BS, metadata_size=pages * PAGE_SIZE)
    with pytest.raises(UsageError) if smallest else contextlib.nullcontext():
        Pool.create(str(tmp_path / "smaller"), data_size=nb * BS, metadata_size=(pages - 1) * PAGE_SIZE,
                    min_free_space=0)
    return path, nb


def _fill_metadata(pool, v, start: int = 0) -> int:
    """One leaf per write until the metadata is full; returns the writes that worked."""
    i = start
    while True:
        try:
            assert pool.write(v.dev_id, i * FANOUT * BS, f"leaf{i:05}".encode()) == 9
        except (MetadataFull, ReadOnlyPool):
            return i
        i += 1
        assert i < 2000, "metadata never filled up"


def test_metadata_full_refuses_cleanly_and_extend_recovers(tmp_path):
    path, nb = _tiny_metadata_pool(tmp_path)
    pool = Pool.open(path)
    v = pool.create_volume("v", nb * FANOUT * BS)
    pool.write(v.dev_id, 0, b"committed")
    pool.commit()
    n = _fill_metadata(pool, v, start=1)
    assert n > 1
    state = pool_state(pool)
    with pytest.raises((MetadataFull, ReadOnlyPool)):
        pool.write(v.dev_id, n * FANOUT * BS, b"refused")
    assert pool_state(pool) == state  # a refused write changes nothing
    for i in range(1, n):  # everything accepted reads back
        assert pool.read(v.dev_id, i * FANOUT * BS, 9) == f"leaf{i:05}".encode()
    assert pool.read(v.dev_id, 0, 9) == b"committed"
    check_invariants(pool)
    # Extending the metadata recovers, in the same session.
    pool.extend(metadata_size=4 * MiB)
    assert pool.stats()["read_only"] is None
    m = n + 200  # (filling 4 MiB would run out of data blocks first)
    for i in range(n, m):
        assert pool.write(v.dev_id, i * FANOUT * BS, f"leaf{i:05}".encode()) == 9
    pool.close()
    with Pool.open(path) as pool:
        v = pool.volume("v")
        assert pool.stats()["metadata_space_total"] == 4 * MiB
        assert pool.read(v.dev_id, 0, 9) == b"committed"
        for i in range(1, m):
            assert pool.read(v.dev_id, i * FANOUT * BS, 9) == f"leaf{i:05}".encode()
        check_invariants(pool)


def test_metadata_full_keeps_committed_data_across_a_crash(tmp_path):
    path, nb = _tiny_metadata_pool(tmp_path)
    pool = Pool.open(path)
    v = pool.create_volume("v", nb * FANOUT * BS)
    pool.write(v.dev_id, 0, b"committed")
    pool.commit()
    committed_txn = pool.transaction_id
    n = _fill_metadata(pool, v, start=1)
    last_txn = pool.transaction_id
    assert last_txn > committed_txn  # the engine committed to make room
    crash(pool)
    with Pool.open(path) as pool:
        assert pool.transaction_id == last_txn
        v = pool.volume("v")
        assert pool.read(v.dev_id, 0, 9) == b"committed"
        mapped = sorted(mapping_of(pool, v))
        # The engine commits before it refuses, so every accepted write is durable.
        assert mapped == [i * FANOUT for i in range(n)]
        for vb in mapped:  # every mapping that survived reads its own data
            i = vb // FANOUT
            assert pool.read(v.dev_id, vb * BS, 9) == (f"leaf{i:05}".encode() if i else b"committed")
        check_invariants(pool)


def _go_read_only(pool, nb):
    """One operation that dirties more pages than the metadata reserve fails its commit.

    Writes and discards are refused up front when the metadata is nearly full;
    a single discard that un-shares ~100 leaves still gets past that check with
    ~80 pages free and then cannot be committed: the pool turns read-only.
    """
    shared_leaves = 100
    v = pool.create_volume("v", nb * FANOUT * BS)
    for i in range(shared_leaves):
        pool.write(v.dev_id, i * FANOUT * BS, b"k" * 10)
    pool.commit()
    s = pool.snapshot("v", "s")
    i = shared_leaves
    while pool.store.free_pages > METADATA_RESERVE_PAGES + 40:
        assert pool.write(v.dev_id, i * FANOUT * BS, f"leaf{i:05}".encode()) == 9
        pool.commit()  # keeps the free-page count exact between writes
        i += 1
        assert i < 2000, "metadata never filled up"
    with pytest.raises(ReadOnlyPool):
        pool.discard(s.dev_id, 0, s.size)
        pool.commit()
    assert pool.failed
    return v, s, i


def test_read_only_after_metadata_full_refuses_changes_and_keeps_commit(tmp_path, caplog):
    path, nb = _tiny_metadata_pool(tmp_path, pages=400)
    pool = Pool.open(path)
    v, s, n = _go_read_only(pool, nb)
    expect_logged(caplog, "is now read-only")
    assert pool.stats()["read_only"]
    for call in (lambda: pool.write(v.dev_id, 0, b"x"), lambda: pool.create_volume("new", BS),
                 lambda: pool.snapshot("v", "s2"), lambda: pool.remove("s"),
                 lambda: pool.discard(v.dev_id, 0, BS), lambda: pool.resize(v.dev_id, v.size + BS),
                 lambda: pool.commit()):
        with pytest.raises(ReadOnlyPool):
            call()
    pool.read(v.dev_id, 0, 10)  # reads still work
    pool.close()  # does not raise, does not commit
    with Pool.open(path) as pool:
        assert pool.stats()["read_only"] is None
        v, s = pool.volume("v"), pool.volume("s")
        for i in range(100):
            assert pool.read(s.dev_id, i * FANOUT * BS, 10) == b"k" * 10
        for i in range(100, n):
            assert pool.read(v.dev_id, i * FANOUT * BS, 9) == f"leaf{i:05}".encode()
        check_invariants(pool)
        pool.extend(metadata_size=4 * MiB)
        pool.discard(v.dev_id, 0, v.size)
        pool.discard(s.dev_id, 0, s.size)
        pool.commit()
        assert pool.space.used == 0
        check_invariants(pool)


def test_extend_metadata_recovers_read_only_pool_in_the_same_session(tmp_path, caplog):
    """DESIGN: "extending the metadata recovers" -- without closing the pool first."""
    path, nb = _tiny_metadata_pool(tmp_path, pages=400)
    pool = Pool.open(path)
    try:
        v, s, _ = _go_read_only(pool, nb)
        expect_logged(caplog, "is now read-only")
        pool.extend(metadata_size=4 * MiB)
        assert pool.failed is None
        pool.commit()
        assert pool.read(s.dev_id, 0, 10) == bytes(10)  # the discard went through
        assert pool.read(v.dev_id, 0, 10) == b"k" * 10  # the origin keeps its data
        pool.write(v.dev_id, 0, b"writable again")
    finally:
        pool.close()
