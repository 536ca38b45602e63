"""Engine, DESIGN.md section 1 "Thin volumes", snapshots: point in time, copy on write.

Both sides stay writable, a partial write to a shared block copies the whole
block, deleting snapshots gives back exactly their blocks, dm-thin's time model,
deep chains whose lookup cost does not grow, and O(1) snapshots of large volumes.
No FUSE: fusepool.engine.Pool directly; every test that changes a pool ends by
checking the engine's invariants (``engine_model.check_invariants``).
"""

import pytest
from engine_helpers import BS, MiB, mapping_of, new_pool, pattern
from engine_model import VolumeModel, check_invariants, verify_all

from fusepool.engine import Pool
from fusepool.metadata.format import FANOUT


def test_snapshot_is_point_in_time_and_both_sides_writable(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        a = pool.create_volume("a", 8 * BS)
        old = pattern(1, 8 * BS)
        pool.write(a.dev_id, 0, old)
        s = pool.snapshot("a", "s")
        assert s.size == a.size and s.mapped_blocks == a.mapped_blocks == 8
        assert pool.read(s.dev_id, 0, 8 * BS) == old
        # Write both sides after the snapshot: neither sees the other's writes.
        pool.write(a.dev_id, 0, b"A" * BS)
        pool.write(s.dev_id, BS, b"S" * BS)
        assert pool.read(a.dev_id, 0, 2 * BS) == b"A" * BS + old[BS : 2 * BS]
        assert pool.read(s.dev_id, 0, 2 * BS) == old[:BS] + b"S" * BS
        assert pool.read(a.dev_id, 2 * BS, 6 * BS) == pool.read(s.dev_id, 2 * BS, 6 * BS) == old[2 * BS :]
        # The untouched blocks are still shared, the written ones are not.
        ma, ms = mapping_of(pool, a), mapping_of(pool, s)
        assert ma[0] != ms[0] and ma[1] != ms[1]
        assert all(ma[vb] == ms[vb] for vb in range(2, 8))
        assert pool.device_usage(a) == (2, 6)
        assert pool.device_usage(s) == (2, 6)
        check_invariants(pool)
    with Pool.open(path) as pool:  # and all of it survives a reopen
        a, s = pool.volume("a"), pool.volume("s")
        assert pool.read(a.dev_id, 0, 2 * BS) == b"A" * BS + old[BS : 2 * BS]
        assert pool.read(s.dev_id, 0, 2 * BS) == old[:BS] + b"S" * BS
        assert pool.device_usage(a) == (2, 6)
        check_invariants(pool)


@pytest.mark.parametrize("writer", ["origin", "snapshot"])
def test_partial_write_to_shared_block_copies_the_rest(tmp_path, writer):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        a = pool.create_volume("a", 4 * BS)
        old = pattern(2, 4 * BS)
        pool.write(a.dev_id, 0, old)
        s = pool.snapshot("a", "s")
        w, other = (a, s) if writer == "origin" else (s, a)
        before_other = mapping_of(pool, other)
        used = pool.space.used
        # A write in the middle of block 1, and one straddling blocks 2 and 3.
        pool.write(w.dev_id, BS + 100, b"x" * 50)
        pool.write(w.dev_id, 3 * BS - 10, b"y" * 20)
        expect = bytearray(old)
        expect[BS + 100 : BS + 150] = b"x" * 50
        expect[3 * BS - 10 : 3 * BS + 10] = b"y" * 20
        assert pool.read(w.dev_id, 0, 4 * BS) == bytes(expect)
        assert pool.read(other.dev_id, 0, 4 * BS) == old
        assert mapping_of(pool, other) == before_other  # the other side never moves
        mw = mapping_of(pool, w)
        assert mw[0] == before_other[0]
        assert {mw[1], mw[2], mw[3]}.isdisjoint(before_other.values())
        assert pool.space.used == used + 3  # exactly one new block per broken share
        check_invariants(pool)


def test_whole_block_write_to_shared_block_needs_no_copy(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        a = pool.create_volume("a", 2 * BS)
        pool.write(a.dev_id, 0, b"o" * 2 * BS)
        s = pool.snapshot("a", "s")
        reads = []
        real_read = pool.data.read
        pool.data.read = lambda *args: reads.append(args) or real_read(*args)
        try:
            pool.write(s.dev_id, 0, b"n" * BS)
        finally:
            del pool.data.read
        assert reads == []  # a whole-block write does not read the old block
        assert pool.read(s.dev_id, 0, 2 * BS) == b"n" * BS + b"o" * BS
        assert pool.read(a.dev_id, 0, 2 * BS) == b"o" * 2 * BS
        check_invariants(pool)


def test_snapshot_survives_removal_of_origin(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        a = pool.create_volume("a", 6 * BS + 123)
        data = pattern(3, 6 * BS + 123)
        pool.write(a.dev_id, 0, data)
        s = pool.snapshot("a", "s")
        s2 = pool.snapshot("s", "s2")
        pool.write(a.dev_id, 0, b"after" * 100)
        pool.remove("a")
        assert pool.read(s.dev_id, 0, len(data)) == data
        assert pool.read(s2.dev_id, 0, len(data)) == data
        assert pool.describe(s)["origin"] is None  # the origin is gone
        assert pool.describe(s2)["origin"] == "s"
        check_invariants(pool)
        pool.remove("s")
        assert pool.read(s2.dev_id, 0, len(data)) == data
        assert pool.device_usage(s2) == (7, 0)
        assert pool.space.used == 7
        check_invariants(pool)
    with Pool.open(path) as pool:
        s2 = pool.volume("s2")
        assert pool.read(s2.dev_id, 0, len(data)) == data
        # Now exclusive: a write may go in place or copy once, but costs no space.
        pool.write(s2.dev_id, 10, b"z")
        pool.commit()
        assert pool.space.used == 7
        assert pool.read(s2.dev_id, 0, 11) == data[:10] + b"z"
        check_invariants(pool)


def test_space_returns_exactly_after_snapshot_deletes(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        a = pool.create_volume("a", 16 * BS)
        pool.write(a.dev_id, 0, pattern(4, 16 * BS))
        pool.commit()
        before = pool.stats()
        counts_before = pool.space.counts.tobytes()
        # Snapshots alone change no reference count.
        s = pool.snapshot("a", "s")
        t = pool.snapshot("s", "t")
        assert pool.space.counts.tobytes() == counts_before
        # Diverge everything: writes into snapshots and new blocks.
        pool.write(s.dev_id, 0, b"s" * 3 * BS)
        pool.write(t.dev_id, 5 * BS + 7, b"t" * 2 * BS)
        pool.write(t.dev_id, 15 * BS, b"t" * BS)
        assert pool.space.used > before["data_blocks_used"]
        pool.remove("t")
        pool.remove("s")
        pool.commit()
        after = pool.stats()
        assert pool.space.counts.tobytes() == counts_before
        for key in ("data_blocks_used", "data_blocks_free", "data_space_used", "data_space_available"):
            assert after[key] == before[key], key
        check_invariants(pool)


def test_space_returns_after_deleting_origin_that_diverged(tmp_path):
    """The origin writes after the snapshot; deleting the snapshot frees the old copies."""
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        a = pool.create_volume("a", 8 * BS)
        pool.write(a.dev_id, 0, pattern(5, 8 * BS))
        pool.commit()
        used, free = pool.stats()["data_blocks_used"], pool.stats()["data_blocks_free"]
        pool.snapshot("a", "s")
        pool.write(a.dev_id, 0, pattern(6, 4 * BS))  # 4 CoW copies
        assert pool.space.used == used + 4
        pool.remove("s")  # the old copies go
        pool.commit()
        assert pool.stats()["data_blocks_used"] == used
        assert pool.stats()["data_blocks_free"] == free
        check_invariants(pool)


def test_snapshot_time_model(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        t0 = pool.time
        a = pool.create_volume("a", 4 * BS)
        assert a.creation_time == a.snap_time == t0
        pool.write(a.dev_id, 0, b"1" * BS)
        assert [t for _, _, t in pool.mappings(a)] == [t0]
        s = pool.snapshot("a", "s")
        assert pool.time == t0 + 1
        assert a.snap_time == s.snap_time == s.creation_time == t0 + 1
        assert a.creation_time == t0
        pool.write(a.dev_id, BS, b"2" * BS)
        assert {vb: t for vb, _, t in pool.mappings(a)} == {0: t0, 1: t0 + 1}
    with Pool.open(path) as pool:  # the time model is durable
        a, s = pool.volume("a"), pool.volume("s")
        assert pool.time == t0 + 1
        assert (a.creation_time, a.snap_time, s.creation_time, s.snap_time) == (t0, t0 + 1, t0 + 1, t0 + 1)
        assert s.origin == a.dev_id


def test_snapshot_of_empty_and_of_growing_volume(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        e = pool.create_volume("empty", 3 * BS)
        es = pool.snapshot("empty", "empty-snap")
        assert es.root is None and pool.read(es.dev_id, 0, 3 * BS) == bytes(3 * BS)
        pool.write(e.dev_id, 0, b"e")
        assert pool.read(es.dev_id, 0, 1) == b"\0"
        # Grow an origin past one leaf while its snapshot shares the old root.
        a = pool.create_volume("a", 10 * BS)
        pool.write(a.dev_id, 0, pattern(7, 10 * BS))
        pool.snapshot("a", "s")
        pool.resize(pool.volume("a").dev_id, (FANOUT + 5) * BS)
        assert pool.volume("a").root.level == 1
        pool.write(a.dev_id, (FANOUT + 2) * BS, b"far")
        pool.write(a.dev_id, 0, b"near")
        s = pool.volume("s")
        assert s.size == 10 * BS
        assert pool.read(s.dev_id, 0, 10 * BS) == pattern(7, 10 * BS)
        expect = bytearray(pattern(7, 10 * BS))
        expect[0:4] = b"near"
        assert pool.read(a.dev_id, 0, 10 * BS) == bytes(expect)
        assert pool.read(a.dev_id, (FANOUT + 2) * BS, 3) == b"far"
        check_invariants(pool)
        # Growing the snapshot too.
        pool.resize(pool.volume("s").dev_id, (FANOUT + 50) * BS)
        pool.write(s.dev_id, (FANOUT + 2) * BS, b"snap")
        assert pool.read(a.dev_id, (FANOUT + 2) * BS, 3) == b"far"
        check_invariants(pool)
    with Pool.open(path) as pool:
        a, s = pool.volume("a"), pool.volume("s")
        assert pool.read(a.dev_id, 0, 4) == b"near"
        assert pool.read(s.dev_id, 0, 10 * BS) == pattern(7, 10 * BS)
        assert pool.read(s.dev_id, (FANOUT + 2) * BS, 4) == b"snap"
        check_invariants(pool)


def test_deep_snapshot_chain(tmp_path):
    depth = 50
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        base = pool.create_volume("s0", 64 * BS)
        pool.write(base.dev_id, 0, pattern(20, 64 * BS))
        models = {"s0": VolumeModel(64 * BS, BS)}
        models["s0"].write(0, pattern(20, 64 * BS))
        for i in range(1, depth + 1):
            pool.snapshot(f"s{i - 1}", f"s{i}")
            models[f"s{i}"] = models[f"s{i - 1}"].clone()
            # Each level changes part of one block (breaking the sharing of that block).
            off = (i % 64) * BS + i * 7
            data = f"level {i}".encode() * 10
            pool.write(pool.volume(f"s{i}").dev_id, off, data)
            models[f"s{i}"].write(off, data)
        assert pool.time == depth
        verify_all(pool, models)
        # Lookup cost does not grow with depth: the deepest tree is no taller.
        assert pool.volume(f"s{depth}").root.level == pool.volume("s0").root.level
        # Remove every other level, then the base: the rest still read right.
        for i in range(0, depth, 2):
            pool.remove(f"s{i}")
            del models[f"s{i}"]
        verify_all(pool, models)
    with Pool.open(path) as pool:
        verify_all(pool, models)
        for name in list(models):
            pool.remove(name)
        pool.commit()
        assert pool.space.used == 0 and pool.space.free == pool.nr_blocks
        check_invariants(pool)


def test_snapshot_of_a_large_volume_is_constant_work(tmp_path):
    nb = FANOUT + 100  # two leaves under a root
    path = new_pool(tmp_path, data_size=2 * nb * BS, metadata_size=8 * MiB)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", nb * BS)
        data = pattern(21, BS) * nb
        pool.write(v.dev_id, 0, data)
        pool.commit()
        counts = pool.space.counts.tobytes()
        written = []
        real = pool.store._write_pages
        pool.store._write_pages = lambda writes: (written.extend(w[0] for w in writes), real(writes))
        try:
            s = pool.snapshot("v", "s")
        finally:
            del pool.store._write_pages
        # O(1): no reference count touched, no node or space-map page rewritten; the
        # commit writes the root record only.
        assert pool.space.counts.tobytes() == counts
        assert len(written) <= 2, f"snapshot commit wrote {len(written)} pages"
        assert s.root is v.root and v.root.share == 2 and s.mapped_blocks == nb
        assert pool.read(s.dev_id, 0, nb * BS) == data
        assert pool.device_usage(s) == (0, nb)
        # Writing one block of the snapshot copies one leaf path, not the tree.
        pool.write(s.dev_id, FANOUT * BS + 3, b"one")
        assert pool.device_usage(s) == (1, nb - 1)
        assert pool.read(v.dev_id, 0, nb * BS) == data
        check_invariants(pool)
