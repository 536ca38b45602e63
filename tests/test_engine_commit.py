"""Engine, DESIGN.md section 1 "Durability and crash consistency": commits and crashes.

After a crash (``engine_model.crash`` drops an open pool without committing,
as SIGKILL would) the pool opens at its last commit: committed data intact,
uncommitted blocks unmapped; namespace changes are durable at once; a block
freed in the running transaction is never reused before the commit; commit
flushes the data image.  No FUSE: fusepool.engine.Pool directly.  The mounted
and power-loss versions are tests/test_crash.py and tests/test_powerloss.py.
"""

import pytest
from engine_helpers import BS, MiB, mapping_of, new_pool, pattern
from engine_model import check_invariants, crash

from fusepool.engine import Pool
from fusepool.errors import PoolFull


def test_crash_keeps_committed_data_and_drops_uncommitted_blocks(tmp_path):
    path = new_pool(tmp_path, zero_detection=True)  # (for the uncommitted zero-unmap)
    pool = Pool.open(path)
    v = pool.create_volume("v", 16 * BS)
    committed = pattern(12, 8 * BS)
    pool.write(v.dev_id, 0, committed)
    pool.commit()
    txn = pool.transaction_id
    used = pool.space.used
    pool.write(v.dev_id, 8 * BS, b"new" * 1000)  # newly provisioned, not committed
    pool.write(v.dev_id, 12 * BS, b"N" * 2 * BS)
    pool.discard(v.dev_id, 0, BS)  # not committed either
    pool.write(v.dev_id, 2 * BS, bytes(BS))  # zero-unmap, not committed
    pool.write(v.dev_id, 20 * BS, b"grow")  # size change, not committed
    crash(pool)
    with Pool.open(path) as pool:
        assert pool.transaction_id == txn
        v = pool.volume("v")
        assert v.size == 16 * BS
        assert pool.read(v.dev_id, 0, 8 * BS) == committed
        assert pool.read(v.dev_id, 8 * BS, 8 * BS) == bytes(8 * BS)
        assert sorted(mapping_of(pool, v)) == list(range(8))
        assert pool.space.used == used
        check_invariants(pool)
        # The blocks the lost transaction provisioned are free again.
        pool.write(v.dev_id, 8 * BS, b"again" * 10)
        pool.commit()
        assert pool.read(v.dev_id, 8 * BS, 50) == b"again" * 10


def test_crash_before_any_commit_of_a_new_pool(tmp_path):
    path = new_pool(tmp_path)
    crash(Pool.open(path))
    with Pool.open(path) as pool:
        assert pool.names == {} and pool.space.used == 0
        check_invariants(pool)


def test_namespace_changes_are_durable_at_once(tmp_path):
    path = new_pool(tmp_path)
    pool = Pool.open(path)
    pool.create_volume("a", BS)
    pool.create_volume("b", BS)
    pool.snapshot("a", "a-snap")
    pool.rename("b", "c")
    pool.resize(pool.volume("c").dev_id, 5 * BS)
    pool.create_volume("gone", BS)
    pool.remove("gone")
    crash(pool)
    with Pool.open(path) as pool:
        assert sorted(pool.names) == ["a", "a-snap", "c"]
        assert pool.volume("c").size == 5 * BS
        check_invariants(pool)


def test_block_freed_in_running_transaction_is_not_reused(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 16 * BS)
        pool.write(v.dev_id, 0, b"old" * 1000)
        pool.commit()
        freed = mapping_of(pool, v)[0]
        pool.discard(v.dev_id, 0, BS)  # frees it in the running transaction
        assert 0 not in mapping_of(pool, v)
        for vb in range(1, 16):
            pool.write(v.dev_id, vb * BS, b"n")
            assert mapping_of(pool, v)[vb] != freed
        pool.write(v.dev_id, 0, b"n")
        assert mapping_of(pool, v)[0] != freed
        check_invariants(pool)


def test_freed_block_not_reused_even_when_it_is_the_only_free_one(tmp_path):
    path = new_pool(tmp_path, data_size=8 * BS, metadata_size=1 * MiB)
    pool = Pool.open(path)
    v = pool.create_volume("v", 16 * BS)
    old = pattern(13, 8 * BS)
    pool.write(v.dev_id, 0, old)
    pool.commit()
    pool.discard(v.dev_id, 3 * BS, 2 * BS)
    assert pool.space.free == 0
    with pytest.raises(PoolFull):
        pool.write(v.dev_id, 10 * BS, b"must not land on a freed block")
    crash(pool)
    with Pool.open(path) as pool:
        v = pool.volume("v")
        assert pool.read(v.dev_id, 0, 8 * BS) == old  # the committed blocks were never reused
        pool.discard(v.dev_id, 3 * BS, BS)
        pool.commit()
        assert pool.space.free == 1
        assert pool.write(v.dev_id, 10 * BS, b"now it may") == 10
        check_invariants(pool)


def test_crash_does_not_leak_writes_into_a_snapshot(tmp_path):
    """After a crash the snapshot must read what it held at the last commit.

    Origin ``a`` and snapshot ``s`` share data block X at the last commit.  A
    write to ``s`` breaks the sharing in memory (X's count drops back to 1), so
    a later write to ``a`` overwrites X *in place*, although the committed
    metadata still maps X into ``s`` as well.  After a crash ``s`` shows data
    written to ``a`` after the snapshot.  dm-thin avoids this with its time
    model: a mapping older than the device's snap_time is treated as shared.
    """
    path = new_pool(tmp_path)
    pool = Pool.open(path)
    a = pool.create_volume("a", 4 * BS)
    pool.write(a.dev_id, 0, b"a" * BS)
    s = pool.snapshot("a", "s")  # commits: X is shared by a and s
    pool.write(s.dev_id, 0, b"b" * 10)  # s gets its own copy (uncommitted)
    pool.write(a.dev_id, 0, b"c" * BS)  # must not overwrite X in place
    crash(pool)
    with Pool.open(path) as pool:
        s = pool.volume("s")
        assert pool.read(s.dev_id, 0, BS) == b"a" * BS, "snapshot shows its origin's uncommitted write"
        check_invariants(pool)


def test_commit_flushes_data_of_in_place_overwrites(tmp_path):
    """commit() is what fsync maps to: it must flush the data image even when
    the only changes since the last commit were in-place overwrites (which
    leave the metadata clean)."""
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 4 * BS)
        pool.write(v.dev_id, 0, b"x" * BS)
        pool.commit()
        flushes = []
        real_flush = pool.data.flush
        pool.data.flush = lambda: (flushes.append(1), real_flush())
        try:
            pool.write(v.dev_id, 0, b"y" * 100)  # in place: no metadata change
            pool.commit()
        finally:
            del pool.data.flush
        assert flushes, "data written in place was not flushed by commit()"


def test_crash_with_a_deferred_deletion_pending(tmp_path):
    path = new_pool(tmp_path)
    pool = Pool.open(path)
    v = pool.create_volume("v", 4 * BS)
    pool.write(v.dev_id, 0, b"v" * 4 * BS)
    pool.open_device(v.dev_id)
    assert pool.remove("v") is True
    assert pool.stats()["deferred_deleted_device_count"] == 1
    assert pool.space.used == 4
    crash(pool)
    with Pool.open(path) as pool:  # the deletion is finished at open
        assert pool.names == {} and not pool.devices
        assert pool.space.used == 0
        assert pool.stats()["deferred_deleted_device_count"] == 0
        assert pool.space.free == pool.nr_blocks
        check_invariants(pool)
