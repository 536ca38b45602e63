"""Unit tests of the engine (fusepool.engine.Pool and the metadata store), no FUSE.

Organised by the semantic contract in DESIGN.md section 1:

1. randomized model-based runs (with and without simulated crashes);
2. snapshots; 3. block zeroing; 4. zero detection and discard;
5. running out of data space and the minimum free space;
6. crash consistency; 7. metadata checksums; 8. bad input;
9. deep snapshot chains and large snapshots; 10. running out of metadata space.

Every test that changes a pool ends by checking the engine's invariants
(``engine_model.check_invariants``: reference counts and node share counts
recomputed from the trees).  A simulated crash (``engine_model.crash``) drops
an open pool without committing, as SIGKILL would.
"""

import contextlib
import os
import random

import pytest
from engine_model import (
    VolumeModel,
    check_invariants,
    crash,
    first_difference,
    snapshot_models,
    verify_all,
)

from fusepool.engine import MAX_VOLUME_SIZE, METADATA_RESERVE_PAGES, Pool, min_metadata_pages
from fusepool.errors import (
    BelowMinFreeSpace,
    Corrupt,
    InvalidArgument,
    MetadataFull,
    NoSuchVolume,
    NotAPool,
    PoolBusy,
    PoolError,
    PoolFull,
    ReadOnlyPool,
    UsageError,
    VolumeExists,
)
from fusepool.metadata.format import FANOUT, PAGE_SIZE
from fusepool.metadata.store import MetadataStore, read_superblocks
from fusepool.metadata.tree import Tree

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BS = 64 * KiB


def new_pool(tmp_path, name: str = "pool", **kw) -> str:
    """Create a small pool (64 MiB data, 8 MiB metadata, 64 KiB blocks, no min free space)."""
    args = {"data_size": 64 * MiB, "metadata_size": 8 * MiB, "block_size": BS, "min_free_space": 0}
    args.update(kw)
    path = str(tmp_path / name)
    Pool.create(path, **args)
    return path


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def mapping_of(pool, dev) -> dict[int, int]:
    """virtual block -> data block."""
    return {vb: block for vb, block, _ in pool.mappings(dev)}


def assert_checker_clean(path: str) -> None:
    """The offline checker (fusepool.check) agrees that the closed pool is consistent."""
    try:
        from fusepool.check import check_offline
    except ImportError:  # the checker is optional for these tests
        return
    report = check_offline(path)
    assert report.ok, f"fusepool check: {report.problems}"


def pool_state(pool) -> dict:
    """A fingerprint of everything observable, to check that a refused request changed nothing."""
    return {
        "names": sorted(pool.names),
        "devices": {d.name: (d.dev_id, d.size, d.mapped_blocks, sorted(mapping_of(pool, d).items()))
                    for d in pool.volumes()},
        # Mapped blocks only (unmapped ones read as zeros by construction; volumes may be huge).
        "contents": {d.name: {vb: pool.read(d.dev_id, vb * pool.block_size, pool.block_size)
                              for vb in mapping_of(pool, d)} for d in pool.volumes()},
        "txn": pool.transaction_id,
        "used": pool.space.used,
        "free": pool.space.free,
        "time": pool.time,
        "dirty": pool.dirty,
        "failed": pool.failed,
    }


# =====================================================================================
# 1. Randomized model-based runs
# =====================================================================================


class RandomRun:
    """Random operations on a pool, checked against :class:`VolumeModel` s.

    With ``crashes`` the run also abandons the pool without committing and
    checks the reopened pool against the last committed model: every volume's
    mappings are exactly the committed ones, and a block differs from its
    committed contents only in bytes that *this volume* wrote since that
    commit (an in-place overwrite of a block the volume owns may reach the data
    image before the metadata commit; nothing else may).
    """

    MAX_VIRTUAL = 96 * MiB  # total virtual size, bounds the cost of full verification

    def __init__(self, tmp_path, seed: int, block_size: int = BS, crashes: bool = False,
                 zero_detection: bool = False):
        # Crash runs use few, small volumes and mostly writes, so that both sides of
        # a snapshot write the same blocks between two commits.
        self.MAX_VOLUMES = 4 if crashes else 10
        self.max_small_blocks = 3 if crashes else 8
        self.rng = random.Random(seed)
        self.bs = block_size
        self.zero_detection = zero_detection
        self.path = new_pool(tmp_path, data_size=128 * MiB, metadata_size=16 * MiB,
                             block_size=block_size, zero_detection=zero_detection)
        self.pool = Pool.open(self.path)
        self.models: dict[str, VolumeModel] = {}
        self.crashes = crashes
        self.committed: dict[str, VolumeModel] = {}
        self.pieces: dict[str, dict[int, list]] = {}  # writes since the last commit, per block
        self.txn = self.pool.transaction_id
        self.serial = 0
        self.crashed = False
        self.log: list[str] = []

    # --- helpers -------------------------------------------------------------

    def new_name(self) -> str:
        self.serial += 1
        r = self.rng.random()
        if r < 0.1:
            return f"vol é ü {self.serial}"  # non-ASCII, spaces
        if r < 0.15:
            stem = f"n{self.serial}-"
            return stem + "x" * (255 - len(stem))  # exactly 255 bytes
        return f"v{self.serial}"

    def virtual_total(self) -> int:
        return sum(m.size for m in self.models.values())

    def nr_big(self) -> int:
        return sum(1 for m in self.models.values() if m.size > FANOUT * self.bs)

    def note_commit_if_any(self) -> None:
        if self.pool.transaction_id != self.txn:
            self.txn = self.pool.transaction_id
            self.committed = snapshot_models(self.models)
            self.pieces = {}

    def record_pieces(self, name: str, offset: int, data: bytes) -> None:
        bs = self.bs
        per_block = self.pieces.setdefault(name, {})
        pos, end = offset, offset + len(data)
        while pos < end:
            vb = pos // bs
            lo = pos - vb * bs
            hi = min(end - vb * bs, bs)
            per_block.setdefault(vb, []).append((lo, hi, data[pos - offset : pos - offset + hi - lo]))
            pos = (vb + 1) * bs

    def random_write(self, model: VolumeModel) -> tuple[int, bytes, str]:
        rng, bs, size = self.rng, self.bs, model.size
        nblocks = size // bs
        kinds = ["small", "span", "zero_partial", "grow"]
        if size <= FANOUT * bs and self.nr_big() < 2 and self.virtual_total() < self.MAX_VIRTUAL // 2:
            kinds.append("grow_far")
        if nblocks:
            kinds += ["whole", "whole", "zero_whole", "mixed", "unaligned_zero"]
        if size == 0:
            kinds = ["grow"]
        kind = rng.choice(kinds)
        if kind == "small":
            off = rng.randrange(size)
            n = min(rng.randint(1, 300), size - off)
            return off, rng.randbytes(n), kind
        if kind == "span":
            off = rng.randrange(size)
            n = min(rng.randint(bs // 2, 3 * bs + 17), size - off)
            return off, rng.randbytes(n), kind
        if kind == "zero_partial":
            off = rng.randrange(size)
            n = min(rng.randint(1, bs - 1), size - off)
            return off, bytes(n), kind
        if kind == "grow":
            off = size - rng.randint(0, min(size, bs))
            n = rng.randint(1, 2 * bs)
            return off, rng.randbytes(n), kind
        if kind == "grow_far":  # past the end into the next leaf: the tree must grow first
            off = rng.randint(FANOUT * bs - 10, (FANOUT + 20) * bs)
            return off, rng.randbytes(rng.randint(1, bs + 10)), kind
        vb = rng.randrange(nblocks)
        count = rng.randint(1, min(3, nblocks - vb))
        if kind == "whole":
            return vb * bs, rng.randbytes(count * bs), kind
        if kind == "zero_whole":
            return vb * bs, bytes(count * bs), kind
        if kind == "mixed":  # whole blocks, some of them zeros
            parts = [bytes(bs) if rng.random() < 0.5 else rng.randbytes(bs) for _ in range(count)]
            return vb * bs, b"".join(parts), kind
        # unaligned_zero: zeros covering whole blocks in the middle, partial at the edges
        off = max(0, vb * bs - rng.randint(1, bs - 1))
        n = min(size - off, count * bs + rng.randint(1, bs))
        return off, bytes(n), kind

    # --- operations ------------------------------------------------------------

    def op_create(self) -> None:
        if len(self.models) >= self.MAX_VOLUMES:
            return
        rng, bs = self.rng, self.bs
        r = rng.random()
        if r < 0.1:
            size = 0
        elif r < 0.2 and self.nr_big() < 2 and self.virtual_total() < self.MAX_VIRTUAL // 2:
            size = (FANOUT + rng.randint(1, 40)) * bs  # two leaves, a level-1 tree
        elif r < 0.6:
            size = rng.randint(1, self.max_small_blocks * bs)  # unaligned
        else:
            size = rng.randint(1, self.max_small_blocks) * bs
        name = self.new_name()
        dev = self.pool.create_volume(name, size)
        assert dev.size == size and dev.mapped_blocks == 0
        self.models[name] = VolumeModel(size, bs, self.zero_detection)
        self.log.append(f"create {name!r} {size}")

    def op_write(self) -> None:
        if not self.models:
            return self.op_create()
        name = self.rng.choice(sorted(self.models))
        off, data, kind = self.random_write(self.models[name])
        self.do_write(name, off, data, kind)

    def do_write(self, name: str, off: int, data: bytes, kind: str) -> None:
        model = self.models[name]
        before = model.clone()
        txn = self.pool.transaction_id
        n = self.pool.write(self.pool.volume(name).dev_id, off, data)
        assert n == len(data), f"short write {n} of {len(data)}"
        model.write(off, data)
        if self.pool.transaction_id != txn:  # the engine committed *before* applying this write
            self.committed = snapshot_models(self.models)
            self.committed[name] = before
            self.pieces = {}
            self.txn = self.pool.transaction_id
        self.record_pieces(name, off, data)
        self.log.append(f"write {kind} {name!r} @{off} +{len(data)}")

    def op_read(self) -> None:
        if not self.models:
            return
        name = self.rng.choice(sorted(self.models))
        model = self.models[name]
        off = self.rng.randrange(model.size + self.bs)
        n = self.rng.randint(0, 3 * self.bs)
        got = self.pool.read(self.pool.volume(name).dev_id, off, n)
        assert got == model.expected(off, n), f"read {name!r} @{off} +{n}"

    def op_snapshot(self) -> None:
        if not self.models or len(self.models) >= self.MAX_VOLUMES:
            return
        origin = self.rng.choice(sorted(self.models))
        m = self.models[origin]
        if self.virtual_total() + m.size > self.MAX_VIRTUAL:
            return
        if m.size > FANOUT * self.bs and self.nr_big() >= 3:
            return
        name = self.new_name()
        snap = self.pool.snapshot(origin, name)
        assert snap.size == m.size and snap.origin == self.pool.volume(origin).dev_id
        self.models[name] = m.clone()
        self.log.append(f"snapshot {origin!r} -> {name!r}")

    def op_snapshot_diverge(self) -> None:
        """Snapshot, then both sides write parts of the same block before any commit."""
        candidates = [n for n, m in sorted(self.models.items()) if m.size >= self.bs]
        if not candidates or len(self.models) >= self.MAX_VOLUMES:
            return
        origin = self.rng.choice(candidates)
        snap = self.new_name()
        self.pool.snapshot(origin, snap)
        self.models[snap] = self.models[origin].clone()
        self.log.append(f"snapshot {origin!r} -> {snap!r} (diverge)")
        self.note_commit_if_any()
        vb = self.rng.randrange(self.models[origin].size // self.bs)
        sides = [snap, origin] if self.rng.random() < 0.5 else [origin, snap]
        for i in range(self.rng.randint(2, 4)):
            lo = self.rng.randrange(self.bs - 1)
            n = self.rng.randint(1, self.bs - lo)
            self.do_write(sides[i % 2], vb * self.bs + lo, self.rng.randbytes(n), "diverge")

    def op_remove(self) -> None:
        if not self.models:
            return
        name = self.rng.choice(sorted(self.models))
        assert self.pool.remove(name) is False
        del self.models[name]
        self.log.append(f"remove {name!r}")

    def op_discard(self) -> None:
        if not self.models:
            return
        name = self.rng.choice(sorted(self.models))
        model = self.models[name]
        if model.size == 0:
            return
        off = self.rng.randrange(model.size)
        n = self.rng.randint(0, min(model.size - off, 6 * self.bs))
        self.pool.discard(self.pool.volume(name).dev_id, off, n)
        model.discard(off, n)
        self.log.append(f"discard {name!r} @{off} +{n}")

    def op_resize(self) -> None:
        if not self.models:
            return
        name = self.rng.choice(sorted(self.models))
        model = self.models[name]
        if (self.rng.random() < 0.2 and model.size <= FANOUT * self.bs and self.nr_big() < 2
                and self.virtual_total() < self.MAX_VIRTUAL // 2):
            size = (FANOUT + self.rng.randint(1, 30)) * self.bs
        else:
            size = model.size + self.rng.randint(0, 4 * self.bs)
        self.pool.resize(self.pool.volume(name).dev_id, size)
        model.size = size
        self.log.append(f"resize {name!r} {size}")

    def op_rename(self) -> None:
        if not self.models:
            return
        old = self.rng.choice(sorted(self.models))
        new = self.new_name()
        dev_id = self.pool.volume(old).dev_id
        self.pool.rename(old, new)
        assert self.pool.volume(new).dev_id == dev_id
        self.models[new] = self.models.pop(old)
        self.log.append(f"rename {old!r} -> {new!r}")

    def op_commit(self) -> None:
        self.pool.commit()
        assert not self.pool.dirty
        self.log.append("commit")

    def op_reopen(self) -> None:
        self.pool.close()
        self.pool = Pool.open(self.path)
        self.log.append("close+reopen")
        verify_all(self.pool, self.models)

    def op_deferred_remove(self) -> None:
        """Remove an open volume: gone from the namespace at once, freed at last close."""
        if not self.models:
            return
        name = self.rng.choice(sorted(self.models))
        model = self.models.pop(name)
        dev = self.pool.volume(name)
        self.pool.open_device(dev.dev_id)
        assert self.pool.remove(name) is True
        assert name not in self.pool.names
        with pytest.raises(NoSuchVolume):
            self.pool.volume(name)
        # The open handle still reads (and writes) the device.
        assert self.pool.read(dev.dev_id, 0, model.size) == model.expected(0, model.size)
        if model.size:
            self.pool.write(dev.dev_id, 0, b"still open")
        if self.rng.random() < 0.5:
            self.pool.close_device(dev.dev_id)
            assert dev.dev_id not in self.pool.devices
            self.log.append(f"deferred remove {name!r} (closed)")
        else:  # the pool closes with the device still open: dropped at the next open
            self.pool.close()
            self.pool = Pool.open(self.path)
            assert dev.dev_id not in self.pool.devices
            self.log.append(f"deferred remove {name!r} (pool reopened)")
        check_invariants(self.pool)

    def op_crash(self) -> None:
        self.log.append("crash+reopen")
        self.crashed = True
        crash(self.pool)
        self.pool = pool = Pool.open(self.path)
        assert sorted(pool.names) == sorted(self.committed), "namespace after a crash"
        models = {}
        for name, cm in self.committed.items():
            dev = pool.volume(name)
            assert dev.size == cm.size, f"{name!r}: size after crash {dev.size} != committed {cm.size}"
            maps = mapping_of(pool, dev)
            required = {vb for vb, block in cm.blocks.items() if any(block)}
            assert required <= set(maps) <= cm.mapped, (
                f"{name!r}: mappings after crash differ from the last commit")
            model = cm.clone()
            touched = self.pieces.get(name, {})
            for vb, phys in maps.items():
                actual = pool.data.read(phys, 0, self.bs)
                committed = bytes(cm.blocks.get(vb, bytes(self.bs)))
                if actual == committed:
                    continue
                assert vb in touched, (
                    f"{name!r} block {vb}: changed after the crash although {name!r} never wrote it "
                    f"since the last commit (byte {first_difference(actual, committed)})")
                check_only_own_bytes(name, vb, actual, committed, touched[vb])
                model.blocks[vb] = bytearray(actual)
            models[name] = model
        self.models = models
        self.committed = snapshot_models(models)
        self.pieces = {}
        self.txn = pool.transaction_id
        verify_all(pool, self.models)

    # --- driver ----------------------------------------------------------------

    def run(self, steps: int) -> None:
        ops = [
            (self.op_write, 40), (self.op_read, 5), (self.op_create, 7), (self.op_snapshot, 9),
            (self.op_remove, 5), (self.op_discard, 8), (self.op_resize, 4), (self.op_rename, 3),
            (self.op_commit, 6), (self.op_reopen, 3), (self.op_deferred_remove, 3),
        ]
        if self.crashes:
            ops = [
                (self.op_write, 60), (self.op_read, 2), (self.op_create, 3), (self.op_snapshot, 6),
                (self.op_remove, 2), (self.op_discard, 4), (self.op_resize, 1), (self.op_rename, 1),
                (self.op_commit, 3), (self.op_reopen, 1), (self.op_deferred_remove, 1),
                (self.op_crash, 6), (self.op_snapshot_diverge, 4),
            ]
        funcs, weights = zip(*ops, strict=True)
        try:
            for step in range(steps):
                op = self.rng.choices(funcs, weights)[0]
                op()
                self.note_commit_if_any()
                if step % 6 == 5:
                    verify_all(self.pool, self.models)
            verify_all(self.pool, self.models)
            self.pool.close()
            assert_checker_clean(self.path)
            self.pool = Pool.open(self.path)
            verify_all(self.pool, self.models)
            self.finish()
            self.pool.close()
            assert_checker_clean(self.path)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n-- last operations:\n" + "\n".join(self.log[-25:])) from exc
        finally:
            if self.pool.lock.fd >= 0:
                self.pool.close()

    def finish(self) -> None:
        """Removing everything gives every data block back."""
        pool = self.pool
        total = pool.stats()["data_blocks_total"]
        for name in list(self.models):
            pool.remove(name)
        assert pool.space.used == 0
        assert pool.stats()["data_blocks_used"] == 0
        assert pool.stats()["volume_count"] == 0
        assert not pool.devices
        pool.commit()
        stats = pool.stats()
        assert stats["data_blocks_free"] == total
        assert stats["data_space_used"] == 0
        assert not any(pool.space.counts)
        # Every freed block was given back to the host.  (Not after a crash: blocks
        # written by a lost transaction were never freed, so nothing punched them.)
        if pool.data.can_punch and not self.crashed:
            assert stats["host_allocated_bytes"] == 0
        check_invariants(pool)


def check_only_own_bytes(name, vb, actual: bytes, committed: bytes, pieces: list) -> None:
    """Every byte differing from the committed block was written there by this volume."""
    step = 256
    for start in range(0, len(actual), step):
        if actual[start : start + step] == committed[start : start + step]:
            continue
        for i in range(start, min(start + step, len(actual))):
            if actual[i] == committed[i]:
                continue
            if not any(lo <= i < hi and data[i - lo] == actual[i] for lo, hi, data in pieces):
                raise AssertionError(
                    f"{name!r} block {vb} byte {i}: {actual[i]:#x} after the crash is neither the "
                    f"committed byte {committed[i]:#x} nor one {name!r} wrote since that commit")


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_operations_match_model(tmp_path, seed):
    RandomRun(tmp_path, seed).run(150)


@pytest.mark.parametrize("seed", [5, 6])
def test_random_operations_match_model_with_zero_detection(tmp_path, seed):
    RandomRun(tmp_path, seed, zero_detection=True).run(150)


def test_random_operations_match_model_128k_blocks(tmp_path):
    RandomRun(tmp_path, 99, block_size=128 * KiB).run(120)


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_random_operations_with_crashes(tmp_path, seed):
    RandomRun(tmp_path, seed, crashes=True).run(150)


def test_random_operations_with_crashes_and_zero_detection(tmp_path):
    RandomRun(tmp_path, 15, crashes=True, zero_detection=True).run(150)


# =====================================================================================
# 2. Snapshots
# =====================================================================================


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


# =====================================================================================
# 3. Block zeroing
# =====================================================================================


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


# =====================================================================================
# 4. Zero detection and discard
# =====================================================================================


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


# =====================================================================================
# 5. Out of data space, minimum free space
# =====================================================================================


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


# =====================================================================================
# 6. Crash consistency
# =====================================================================================


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


# =====================================================================================
# 7. Metadata checksums
# =====================================================================================


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def _pages_of(path: str) -> dict:
    """Page numbers of the newest commit, by kind."""
    store, loaded = MetadataStore.open(os.path.join(path, "metadata"), readonly=True)
    try:
        sb = loaded.superblock
        big = next(d for d in loaded.state["devices"] if d["name"] == "big")
        root = loaded.roots[big["dev_id"]]
        assert root.level >= 1
        leaf = Tree.leaf(root, 0)
        return {
            "superblock": sb.transaction_id % 2,
            "root_record": sb.root_pages[0],
            "spacemap": store.spacemap_pages[0],
            "internal_node": root.page,
            "leaf_node": leaf.page,
        }
    finally:
        store.close()


def _pool_for_corruption(tmp_path) -> str:
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        big = pool.create_volume("big", (FANOUT + 10) * BS)
        pool.write(big.dev_id, 0, b"first")
        pool.write(big.dev_id, (FANOUT + 1) * BS, b"second")
    return path


@pytest.mark.parametrize("kind", ["root_record", "spacemap", "internal_node", "leaf_node"])
@pytest.mark.parametrize("where", ["payload", "header"])
def test_corrupt_page_is_detected(tmp_path, kind, where):
    path = _pool_for_corruption(tmp_path)
    page = _pages_of(path)[kind]
    meta = os.path.join(path, "metadata")
    offset = page * PAGE_SIZE + (100 if where == "payload" else 2)
    flip_byte(meta, offset)
    with pytest.raises(Corrupt, match="check|repair"):
        Pool.open(path)
    # The failed open released the lock; undoing the damage makes the pool usable again.
    flip_byte(meta, offset)
    with Pool.open(path) as pool:
        big = pool.volume("big")
        assert pool.read(big.dev_id, 0, 5) == b"first"
        assert pool.read(big.dev_id, (FANOUT + 1) * BS, 6) == b"second"
        check_invariants(pool)


def test_page_written_to_wrong_place_is_detected(tmp_path):
    """The checksum is seeded with the page number: a valid page copied elsewhere fails."""
    path = _pool_for_corruption(tmp_path)
    pages = _pages_of(path)
    meta = os.path.join(path, "metadata")
    with open(meta, "r+b") as f:
        f.seek(pages["leaf_node"] * PAGE_SIZE)
        leaf = f.read(PAGE_SIZE)
        # Swap in another valid node page: the internal node's page.
        f.seek(pages["internal_node"] * PAGE_SIZE)
        f.write(leaf)
    with pytest.raises(Corrupt):
        Pool.open(path)


def test_corrupt_newest_superblock_falls_back_to_previous_commit(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 8 * BS)
        pool.write(v.dev_id, 0, b"committed-1")
        pool.commit()
        prev_txn = pool.transaction_id
        pool.write(v.dev_id, BS, b"committed-2")
        pool.create_volume("w", BS)  # commits
        newest = pool.transaction_id
        assert newest == prev_txn + 1
    sbs = dict(read_superblocks_of(path))
    assert sbs[newest % 2].transaction_id == newest
    flip_byte(os.path.join(path, "metadata"), (newest % 2) * PAGE_SIZE + 40)
    with Pool.open(path) as pool:
        assert pool.transaction_id == prev_txn
        assert sorted(pool.names) == ["v"]
        v = pool.volume("v")
        assert pool.read(v.dev_id, 0, 11) == b"committed-1"
        assert pool.read(v.dev_id, BS, 11) == bytes(11)
        check_invariants(pool)
        # Carry on from there: the next commit replaces the damaged slot.
        pool.write(v.dev_id, 2 * BS, b"after fallback")
        pool.commit()
        assert pool.transaction_id == prev_txn + 1
    with Pool.open(path) as pool:
        v = pool.volume("v")
        assert pool.read(v.dev_id, 2 * BS, 14) == b"after fallback"
        check_invariants(pool)
    assert all(not isinstance(sb, Exception) for _, sb in read_superblocks_of(path))


def read_superblocks_of(path: str):
    fd = os.open(os.path.join(path, "metadata"), os.O_RDONLY)
    try:
        return read_superblocks(fd)
    finally:
        os.close(fd)


def test_both_superblocks_corrupt(tmp_path):
    path = _pool_for_corruption(tmp_path)
    meta = os.path.join(path, "metadata")
    flip_byte(meta, 40)
    flip_byte(meta, PAGE_SIZE + 40)
    with pytest.raises(Corrupt):
        Pool.open(path)


def test_damage_outside_the_newest_commit_is_harmless(tmp_path):
    """Free pages are not read: damaging one must not stop the pool from opening."""
    path = _pool_for_corruption(tmp_path)
    store, loaded = MetadataStore.open(os.path.join(path, "metadata"), readonly=True)
    try:
        free = store.page_state.index(0, 2)
    finally:
        store.close()
    flip_byte(os.path.join(path, "metadata"), free * PAGE_SIZE + 100)
    with Pool.open(path) as pool:
        assert pool.read(pool.volume("big").dev_id, 0, 5) == b"first"


def test_truncated_metadata_is_corrupt_not_a_crash(tmp_path):
    path = _pool_for_corruption(tmp_path)
    meta = os.path.join(path, "metadata")
    pages = _pages_of(path)
    os.truncate(meta, max(pages.values()) * PAGE_SIZE)
    with pytest.raises(Corrupt):
        Pool.open(path)


# =====================================================================================
# 8. Bad input
# =====================================================================================

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


# =====================================================================================
# 9. Deep snapshot chains and large snapshots
# =====================================================================================


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


def test_stats_and_describe_are_consistent(tmp_path):
    path = new_pool(tmp_path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 10 * BS)
        pool.write(v.dev_id, 0, b"x" * 4 * BS)
        pool.snapshot("v", "s")
        pool.write(v.dev_id, 0, b"y")
        pool.commit()
        st = pool.stats()
        assert st["data_blocks_used"] + st["data_blocks_free"] == st["data_blocks_total"]
        assert st["data_space_used"] == st["data_blocks_used"] * BS == 5 * BS
        assert st["data_space_total"] == 64 * MiB
        assert st["volume_count"] == 2
        assert st["metadata_space_used"] <= st["metadata_space_total"] == 8 * MiB
        assert st["transaction_id"] == pool.transaction_id
        d = pool.describe(v)
        assert (d["mapped_blocks"], d["exclusive_blocks"], d["shared_blocks"]) == (4, 1, 3)
        assert d["mapped_bytes"] == 4 * BS
        ext = pool.extents(v)
        assert sum(e["blocks"] for e in ext) == 4
        assert [e["shared"] for e in ext] == [False, True]


# =====================================================================================
# 10. Out of metadata space
# =====================================================================================


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


def expect_logged(caplog, text: str) -> None:
    """Assert that ``text`` was logged, and mark it expected (see conftest)."""
    found = [r for r in caplog.get_records("call") if text in r.getMessage()]
    assert found, f"expected a log record containing {text!r}"
    for record in found:
        record.expected = True


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
