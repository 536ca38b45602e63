"""Engine, randomized model-based runs: every operation checked against a model.

Random create/write/read/snapshot/remove/discard/resize/rename/commit/reopen
sequences (with and without simulated crashes) on fusepool.engine.Pool, each
volume checked against ``engine_model.VolumeModel`` and the engine's invariants
(``engine_model.check_invariants``) along the way, and the offline checker at
the end.  A simulated crash (``engine_model.crash``) drops an open pool without
committing, as SIGKILL would.
"""

import random

import pytest
from engine_helpers import BS, KiB, MiB, mapping_of, new_pool
from engine_model import VolumeModel, check_invariants, crash, first_difference, snapshot_models, verify_all

from fusepool.engine import Pool
from fusepool.errors import NoSuchVolume
from fusepool.metadata.format import FANOUT


def assert_checker_clean(path: str) -> None:
    """The offline checker (fusepool.check) agrees that the closed pool is consistent."""
    try:
        from fusepool.check import check_offline
    except ImportError:  # the checker is optional for these tests
        return
    report = check_offline(path)
    assert report.ok, f"fusepool check: {report.problems}"


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
        model.grow(size)
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
