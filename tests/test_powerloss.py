"""Power loss: the engine against a disk with a volatile write cache.

``faultfs.FaultFS`` sits between the engine and its files and remembers, per
file, what an fdatasync has made durable and what is still in the volatile
cache.  Random workloads run on a pool while crash images are taken at many
points (around every commit's superblock write, and at random I/O events);
each image is what a disk could hold if the power failed there: the durable
contents plus a random choice of the cached writes, per 4 KiB page, sometimes
with a torn page.  Every image must:

- pass ``check_pool`` with no problem at all (no repair needed);
- open with ``Pool.open`` at the last durable commit, or at the commit whose
  superblock write was in flight (nothing else);
- show exactly the volumes of that commit, with their sizes and mappings;
- read back, for every 512-byte sector of every volume, the contents that
  commit holds, or contents that *this volume* wrote since that commit (an
  in-place overwrite of a block it owns may reach the disk before the
  metadata; nothing else may: never another volume's bytes, never freed or
  reused blocks).  Data followed by a successful ``commit()`` reads back
  exactly, including in-place overwrites that ``commit()`` flushed;
- keep the engine's invariants once open.

Some images are *adopted*: the workload goes on from the recovered pool (so
power fails again during the first commits after a recovery).

FUSEPOOL_SOAK=1 runs many more workloads; FUSEPOOL_REPORT_DIR=DIR writes the
figures to DIR/powerloss.json.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from conftest import write_report as write_report_json
from engine_model import VolumeModel, check_invariants, crash, first_difference, verify_all
from faultfs import POLICIES, Event, FaultFS, write_image

import fusepool.engine.datapath as datapath_module
import fusepool.engine.pool as pool_module
from fusepool.check import check_pool
from fusepool.engine import Pool
from fusepool.errors import Corrupt, PoolFull
from fusepool.metadata.format import PAGE_SIZE, Superblock
from fusepool.metadata.store import CURRENT

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB
SECTOR = 512
SOAK = os.environ.get("FUSEPOOL_SOAK", "") not in ("", "0")
WORKLOADS = 300 if SOAK else 30
STEPS = 90 if SOAK else 45
MAX_CUTS = 80 if SOAK else 25  # crash images checked per workload
MAX_VOLUMES = 7
MAX_VOLUME_BLOCKS = 10
STATS: Counter = Counter()


def write_report() -> None:
    write_report_json("powerloss", dict(STATS, soak=SOAK, data_lost=STATS.get("data_lost", 0)))


@pytest.fixture
def fs():
    with FaultFS() as faults:
        yield faults


# --- what a crash image may hold ------------------------------------------------------


def superblock_txn(page: bytes, slot: int) -> int | None:
    try:
        return Superblock.unpack(bytes(page), slot).transaction_id
    except Corrupt:
        return None


def allowed_txns(fs: FaultFS) -> set[int]:
    """Transactions a crash image taken now may open at: the newest durable commit,
    or the one whose superblock write is still in the volatile cache."""
    meta = fs.file("metadata")
    durable = [superblock_txn(meta.durable[s * PAGE_SIZE : (s + 1) * PAGE_SIZE], s) for s in (0, 1)]
    allowed = {max(t for t in durable if t is not None)} if any(t is not None for t in durable) else set()
    for op in meta.pending:
        if op[0] == "w" and op[1] in (0, PAGE_SIZE) and len(op[2]) >= PAGE_SIZE:
            t = superblock_txn(op[2][:PAGE_SIZE], op[1] // PAGE_SIZE)
            if t is not None:
                allowed.add(t)
    return allowed


@dataclass
class Committed:
    """The model of one commit: what a crash image opening at ``txn`` must show."""

    txn: int
    models: dict[str, VolumeModel]  # by name
    ids: dict[str, int]  # name -> dev_id
    pos: int  # log entries [0, pos) are in it (and durable)
    event: int  # FaultFS event count when it was recorded


@dataclass
class Image:
    files: dict[str, bytes]
    allowed: set[int]
    pos: int  # log entries [0, pos) had been issued when the power failed
    event: int
    policy: str
    where: str


def sector_versions(model: VolumeModel, dev_id: int, entries: list) -> dict[int, set[bytes]]:
    """Sector -> every content a write of this device since the commit left there."""
    replay = model.clone()
    versions: dict[int, set[bytes]] = {}
    for dev, kind, off, arg in entries:
        if dev != dev_id:
            continue
        if kind == "d":
            replay.discard(off, arg)
            continue
        replay.write(off, arg)
        for s in range(off // SECTOR, (off + len(arg) - 1) // SECTOR + 1):
            versions.setdefault(s, set()).add(replay.expected(s * SECTOR, SECTOR).ljust(SECTOR, b"\0"))
    return versions


def verify_crashed_volume(pool, name: str, dev_id: int, model: VolumeModel, entries: list,
                          what: str) -> None:
    dev = pool.volume(name)
    assert dev.dev_id == dev_id, f"{what}: {name!r} is device {dev.dev_id}, the commit had {dev_id}"
    assert dev.size == model.size, f"{what}: {name!r} size {dev.size}, the commit had {model.size}"
    got = pool.read(dev_id, 0, model.size)
    want = model.expected(0, model.size)
    assert len(got) == len(want), f"{what}: {name!r} read {len(got)} bytes of {len(want)}"
    if got != want:
        versions = None
        pos = 0
        while pos < len(got):
            i = pos + first_difference(got[pos:], want[pos:])
            if i >= len(got):
                break
            s = i // SECTOR
            lo, hi = s * SECTOR, min((s + 1) * SECTOR, len(got))
            if versions is None:
                versions = sector_versions(model, dev_id, entries)
            piece = got[lo:hi]
            if not any(v[: hi - lo] == piece for v in versions.get(s, ())):
                STATS["data_lost"] += 1
                raise AssertionError(
                    f"{what}: {name!r} (device {dev_id}) byte {i} (block {i // BS}, sector {s}) reads "
                    f"{got[i:i + 8].hex()}, the commit holds {want[i:i + 8].hex()}, and no write of "
                    f"{name!r} since that commit put it there ({len(versions.get(s, ()))} candidates)")
            STATS["sectors_from_uncommitted_in_place_writes"] += 1
            pos = hi
    assert pool.read(dev_id, model.size, 10) == b""
    mapped = {vb for vb, _, _ in pool.mappings(dev)}
    required = {vb for vb, block in model.blocks.items() if any(block)}
    assert required <= mapped <= model.mapped, (
        f"{what}: {name!r} mappings: not allowed {sorted(mapped - model.mapped)[:10]}, "
        f"missing {sorted(required - mapped)[:10]}")


# --- the workload ----------------------------------------------------------------------


class Workload:
    """A random workload on one pool, with crash images checked as it goes."""

    def __init__(self, base, seed: int, fs: FaultFS, max_cuts: int = MAX_CUTS, steps: int = STEPS):
        self.rng = random.Random(seed)
        self.seed = seed
        self.base = base
        self.fs = fs
        self.max_cuts = max_cuts
        self.steps = steps
        self.serial = 0
        self.path = str(base / "pool0")
        # A small metadata file: the page allocator wraps around every few dozen commits.
        meta_pages = self.rng.randint(140, 260)
        # A small data space: the block allocator wraps around (and the pool fills) often,
        # so blocks freed in a running transaction are next in line for reuse.
        data_blocks = self.rng.choice((self.rng.randint(20, 40), self.rng.randint(40, 96)))
        Pool.create(self.path, data_size=data_blocks * BS, metadata_size=meta_pages * PAGE_SIZE,
                    block_size=BS, min_free_space=0)
        fs.track(self.path)
        fs.on_event = self.on_event
        self.pool = Pool.open(self.path)
        self.models: dict[str, VolumeModel] = {}
        self.ids: dict[str, int] = {}
        self.log: list = []  # (dev_id, "w", offset, data) | (dev_id, "d", offset, length)
        self.history: list[Committed] = []
        self.images: list[Image] = []
        self.handles: list[int] = []  # removed while open: deferred deletions
        self.cuts = 0
        self.extends = 0
        self.after_super = 0  # events since a superblock write (commit boundary)
        self.trace: list[str] = []
        self.record()

    # --- bookkeeping ----------------------------------------------------------------

    def record(self, txn: int | None = None, pos: int | None = None) -> None:
        """The model now is what commit ``txn`` (default: the last) holds."""
        self.history.append(Committed(
            self.pool.transaction_id if txn is None else txn,
            {n: m.clone() for n, m in self.models.items()}, dict(self.ids),
            len(self.log) if pos is None else pos, self.fs.events))
        del self.history[:-8]

    def committed_for(self, txn: int, event: int) -> Committed:
        candidates = [c for c in self.history if c.txn == txn]
        assert candidates, (f"an image opened at transaction {txn}, which this workload never "
                            f"committed (known: {[c.txn for c in self.history]})")
        before = [c for c in candidates if c.event <= event]
        return before[-1] if before else candidates[0]

    def on_event(self, ev: Event) -> None:
        if self.cuts + len(self.images) >= self.max_cuts:
            return
        rng = self.rng
        p = 0.03
        where = ev.kind
        if ev.name == "metadata" and ev.kind == "pwrite" and ev.offset < 2 * PAGE_SIZE:
            p, where, self.after_super = 0.5, "before superblock write", 1
        elif self.after_super == 1:
            p, where, self.after_super = 0.5, "superblock written, not synced", 2
        elif self.after_super == 2:
            p, where, self.after_super = 0.5, "after a commit", 0
        if rng.random() < p:
            policy = rng.choice(POLICIES)
            self.images.append(Image(self.fs.crash_image(rng, policy), allowed_txns(self.fs),
                                     len(self.log), ev.index, policy, f"{where} ({ev.kind} {ev.name})"))

    # --- checking crash images ---------------------------------------------------------

    def check_images(self) -> None:
        images, self.images = self.images, []
        adopt = None
        for image in images:
            directory, committed = self.check_image(image)
            if adopt is None and self.rng.random() < 0.08:
                adopt = (directory, image, committed)
            else:
                shutil.rmtree(directory)
        if adopt is not None:
            self.adopt(*adopt)

    def check_image(self, image: Image) -> tuple[str, Committed]:
        self.cuts += 1
        STATS["cuts"] += 1
        STATS[f"policy_{image.policy}"] += 1
        directory = write_image(image.files, self.path, str(self.base / f"img{self.cuts}"))
        what = f"crash image {self.cuts} (seed {self.seed}, {image.where}, policy {image.policy})"
        report = check_pool(directory)
        assert report.ok, f"{what}: check_pool: {[p.message for p in report.problems]}"
        txn = report.transaction
        assert txn in image.allowed, (f"{what}: opens at transaction {txn}, expected one of "
                                      f"{sorted(image.allowed)}")
        STATS["opened_at_inflight_commit" if txn != min(image.allowed) else "opened_at_durable_commit"] += 1
        committed = self.committed_for(txn, image.event)
        with Pool.open(directory) as pool:  # no repair step
            assert pool.transaction_id in (txn, txn + 1)  # +1: deferred deletions finished
            assert sorted(pool.names) == sorted(committed.models), (
                f"{what}: volumes {sorted(pool.names)}, the commit had {sorted(committed.models)}")
            entries = self.log[committed.pos : image.pos]
            for name, model in committed.models.items():
                verify_crashed_volume(pool, name, committed.ids[name], model, entries, what)
            check_invariants(pool)
        return directory, committed

    def adopt(self, directory: str, image: Image, committed: Committed) -> None:
        """Carry on from a recovered crash image (the abandoned pool is dropped as is)."""
        STATS["adopted"] += 1
        self.trace.append(f"-- power cut ({image.where}); carrying on from the recovered image")
        crash(self.pool)
        shutil.rmtree(self.path)
        self.path = directory
        self.fs.track(directory)
        self.pool = Pool.open(directory)
        self.models = {n: m.clone() for n, m in committed.models.items()}
        self.ids = dict(committed.ids)
        # Uncommitted in-place overwrites that reached the disk are part of the pool now
        # (check_image accepted them, sector by sector).  Bytes past a volume's end that a
        # lost write past the end left in its last block are not: they read as zeros, and
        # growing the volume keeps them zeros (test_growing_a_volume_after_a_crash_reads_zeros).
        for name, m in self.models.items():
            dev = self.pool.volume(name)
            for vb, block, _ in self.pool.mappings(dev):
                raw = bytearray(self.pool.data.read(block, 0, BS))
                end = m.size - vb * BS
                if end < BS:
                    raw[max(end, 0):] = bytes(BS - max(end, 0))
                if vb not in m.blocks or m.blocks[vb] != raw:
                    m.blocks[vb] = bytearray(raw)
        self.log = []
        self.handles = []
        self.history = []
        self.record()

    # --- operations ------------------------------------------------------------------

    def new_name(self) -> str:
        self.serial += 1
        return f"v{self.serial}" if self.rng.random() < 0.9 else f"vol é {self.serial}"

    def pick(self) -> str | None:
        return self.rng.choice(sorted(self.models)) if self.models else None

    def run_op(self, kind: str, fn):
        """Run one engine call; record the commits it made.

        A commit inside a write or discard (to make metadata room) holds the state from
        before the call: the model is updated after it, and the call was logged before.
        Every commit of a namespace call holds its outcome (``remove`` commits twice:
        the device flagged deleted, then dropped; both without the volume).
        """
        txn0 = self.pool.transaction_id
        result = fn()
        if kind in ("write", "discard"):
            for t in range(txn0 + 1, self.pool.transaction_id + 1):
                self.record(txn=t, pos=len(self.log) - 1)
        return result

    def recorded(self, txn0: int, always: bool = False) -> None:
        """The model now is what the commits since ``txn0`` hold."""
        for t in range(txn0 + 1, self.pool.transaction_id + 1):
            self.record(txn=t)
        if always and self.pool.transaction_id == txn0:
            self.record()

    def op_create(self) -> None:
        if len(self.models) >= MAX_VOLUMES:
            return
        r = self.rng.random()
        size = self.rng.randint(1, 6) * BS if r < 0.6 else self.rng.randint(1, 6 * BS)
        name = self.new_name()
        self.trace.append(f"create {name} {size}")
        txn0 = self.pool.transaction_id
        dev = self.pool.create_volume(name, size)
        self.models[name] = VolumeModel(size, BS)
        self.ids[name] = dev.dev_id
        self.recorded(txn0)

    def random_write(self, m: VolumeModel) -> tuple[int, bytes]:
        rng = self.rng
        size = m.size
        limit = MAX_VOLUME_BLOCKS * BS
        nblocks = size // BS
        kinds = ["small", "sector", "span", "zero_piece"]
        if nblocks:
            kinds += ["whole", "whole", "zero_whole"]
        if size < limit - 2 * BS:
            kinds.append("grow")
        kind = rng.choice(kinds)
        if kind == "grow":
            off = size - rng.randint(0, min(size, BS))
            return off, rng.randbytes(rng.randint(1, BS + 100))
        if kind == "whole":
            vb = rng.randrange(nblocks)
            return vb * BS, rng.randbytes(min(rng.randint(1, 2), nblocks - vb) * BS)
        if kind == "zero_whole":
            return rng.randrange(nblocks) * BS, bytes(BS)
        off = rng.randrange(max(size, 1))
        if kind == "sector":
            off = off // SECTOR * SECTOR
            n = rng.randint(1, 16) * SECTOR
        elif kind == "span":
            n = rng.randint(BS // 2, 2 * BS + 7)
        else:
            n = rng.randint(1, 3000)
        n = max(1, min(n, max(size, 1) - off))
        return off, bytes(n) if kind == "zero_piece" else rng.randbytes(n)

    def op_write(self) -> None:
        name = self.pick()
        if name is None:
            return self.op_create()
        m = self.models[name]
        dev_id = self.ids[name]
        off, data = self.random_write(m)
        self.trace.append(f"write {name} @{off} +{len(data)}{' zeros' if not any(data) else ''}")
        self.log.append((dev_id, "w", off, data))

        def write():
            try:
                return self.pool.write(dev_id, off, data)
            except PoolFull:
                return 0

        n = self.run_op("write", write)
        if n:
            m.write(off, data[:n])
            STATS["bytes_written"] += n

    def op_discard(self) -> None:
        name = self.pick()
        if name is None or not self.models[name].size:
            return
        m = self.models[name]
        off = self.rng.randrange(m.size)
        length = self.rng.randint(0, m.size - off)
        self.trace.append(f"discard {name} @{off} +{length}")
        self.log.append((self.ids[name], "d", off, length))
        self.run_op("discard", lambda: self.pool.discard(self.ids[name], off, length))
        m.discard(off, length)

    def op_snapshot(self) -> None:
        origin = self.pick()
        if origin is None or len(self.models) >= MAX_VOLUMES:
            return
        name = self.new_name()
        self.trace.append(f"snapshot {origin} -> {name}")
        txn0 = self.pool.transaction_id
        dev = self.pool.snapshot(origin, name)
        self.models[name] = self.models[origin].clone()
        self.ids[name] = dev.dev_id
        self.recorded(txn0)

    def op_remove(self) -> None:
        name = self.pick()
        if name is None:
            return
        self.trace.append(f"remove {name}")
        txn0 = self.pool.transaction_id
        self.pool.remove(name)
        del self.models[name], self.ids[name]
        self.recorded(txn0)

    def op_deferred_remove(self) -> None:
        name = self.pick()
        if name is None:
            return
        dev_id = self.ids[name]
        self.trace.append(f"open+remove {name} (deferred)")
        txn0 = self.pool.transaction_id
        self.pool.open_device(dev_id)
        assert self.pool.remove(name) is True
        self.handles.append(dev_id)
        del self.models[name], self.ids[name]
        self.recorded(txn0)

    def op_close_handle(self) -> None:
        if not self.handles:
            return
        dev_id = self.handles.pop(self.rng.randrange(len(self.handles)))
        self.trace.append(f"close handle of device {dev_id}")
        txn0 = self.pool.transaction_id
        self.pool.close_device(dev_id)
        self.recorded(txn0)

    def op_resize(self) -> None:
        name = self.pick()
        if name is None or self.models[name].size >= (MAX_VOLUME_BLOCKS - 2) * BS:
            return
        size = self.models[name].size + self.rng.randint(1, 2 * BS)
        self.trace.append(f"resize {name} {size}")
        txn0 = self.pool.transaction_id
        try:
            self.pool.resize(self.pool.volume(name).dev_id, size)
        except PoolFull:  # zeroing stale bytes past the end of a shared last block needs a copy
            assert self.pool.volume(name).size == self.models[name].size  # refused whole
            self.trace.append("  (refused: the pool is full)")
            return
        self.models[name].grow(size)
        self.recorded(txn0)

    def op_rename(self) -> None:
        old = self.pick()
        if old is None:
            return
        new = self.new_name()
        self.trace.append(f"rename {old} -> {new}")
        txn0 = self.pool.transaction_id
        self.pool.rename(old, new)
        self.models[new] = self.models.pop(old)
        self.ids[new] = self.ids.pop(old)
        self.recorded(txn0)

    def op_commit(self) -> None:
        self.trace.append("commit")
        txn0 = self.pool.transaction_id
        self.pool.commit()
        self.recorded(txn0, always=True)  # also flushed in-place overwrites: durable now

    def op_reopen(self) -> None:
        """A clean restart: commit, close, open.  (The explicit commit matters: ``close``
        alone does not flush in-place overwrites, see
        test_clean_close_makes_in_place_overwrites_durable.)"""
        self.trace.append("commit+close+open")
        self.op_commit()
        self.pool.close()
        self.pool = Pool.open(self.path)
        self.handles = []
        self.record()

    def op_extend(self) -> None:
        if self.extends >= 2:
            return
        self.extends += 1
        if self.rng.random() < 0.5:
            size = (self.pool.nr_blocks + 16) * BS
            self.trace.append(f"extend data to {size}")
            txn0 = self.pool.transaction_id
            self.pool.extend(data_size=size)
            self.recorded(txn0)
        else:
            size = (self.pool.store.superblock.nr_meta_pages + 64) * PAGE_SIZE
            self.trace.append(f"extend metadata to {size}")
            txn0 = self.pool.transaction_id
            self.pool.extend(metadata_size=size)
            self.recorded(txn0)

    def run(self) -> None:
        ops = [
            (self.op_write, 45), (self.op_commit, 12), (self.op_create, 6), (self.op_snapshot, 8),
            (self.op_remove, 4), (self.op_discard, 5), (self.op_resize, 3), (self.op_rename, 2),
            (self.op_reopen, 3), (self.op_deferred_remove, 2), (self.op_close_handle, 3),
            (self.op_extend, 1),
        ]
        funcs, weights = zip(*ops, strict=True)
        try:
            for step in range(self.steps):
                self.rng.choices(funcs, weights)[0]()
                STATS["operations"] += 1
                self.check_images()
                if step % 10 == 9:
                    verify_all(self.pool, self.models)
            self.op_commit()
            self.check_images()
            verify_all(self.pool, self.models)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n-- last operations:\n" + "\n".join(self.trace[-15:])) from None
        finally:
            self.fs.on_event = None
            self.pool.close()
        report = check_pool(self.path)
        assert report.ok, report.problems


# --- tests -------------------------------------------------------------------------------


def test_faultfs_models_a_volatile_write_cache(tmp_path, fs):
    """The fault layer itself: unsynced writes may or may not survive, synced ones do."""
    path = str(tmp_path / "p")
    Pool.create(path, data_size=16 * BS, metadata_size=1 * MiB, block_size=BS, min_free_space=0)
    fs.track(path)
    rng = random.Random(0)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 4 * BS)
        data = fs.file("data")
        pool.write(v.dev_id, 0, b"A" * BS)
        assert data.pending and data.durable[:1] != b"A"
        assert fs.crash_image(rng, "none")["data"][:BS] != b"A" * BS
        assert fs.crash_image(rng, "all")["data"][:BS] == b"A" * BS
        seen = {fs.crash_image(rng, "pages")["data"][:BS].count(b"A") // PAGE_SIZE for _ in range(40)}
        assert len(seen) > 3, seen  # pages persist independently
        torn = [fs.crash_image(rng, "torn")["data"][:BS].count(b"A") for _ in range(60)]
        assert any(n % PAGE_SIZE for n in torn), "no torn page produced"
        assert all(n % SECTOR == 0 for n in torn)
        pool.commit()
        assert not data.pending and data.durable[:BS] == b"A" * BS
        assert fs.crash_image(rng, "none")["data"][:BS] == b"A" * BS
        # A superblock in flight is visible to allowed_txns.
        events = []
        fs.on_event = lambda ev: events.append((ev.kind, ev.name, ev.offset, allowed_txns(fs)))
        txn = pool.transaction_id
        pool.write(v.dev_id, BS, b"B")
        pool.commit()
        fs.on_event = None
        kinds = [e[:2] for e in events]
        assert ("fdatasync", "data") in kinds and ("pwrite", "metadata") in kinds
        sb_write = next(i for i, e in enumerate(events) if e[1] == "metadata" and e[0] == "pwrite")
        assert events[sb_write][2] == ((txn + 1) % 2) * PAGE_SIZE
        assert events[sb_write][3] == {txn}
        assert events[sb_write + 1][3] == {txn, txn + 1}  # written, not yet synced
    assert fs.crash_image(rng, "none") == fs.crash_image(rng, "all")  # close left nothing pending


@pytest.mark.parametrize("seed", range(WORKLOADS))
def test_power_loss_random_workload(tmp_path, fs, seed, monkeypatch):
    # A fake wall clock: the device table (with its timestamps) then has the same size in
    # every run, so the page layout, the I/O events and the cuts are reproducible by seed.
    ticks = iter(range(1_700_000_000, 1 << 62))
    clock = SimpleNamespace(time=lambda: float(next(ticks)))
    for module in (pool_module, datapath_module):
        monkeypatch.setattr(module, "wallclock", clock)
    start = time.monotonic()
    events0 = fs.events
    w = Workload(tmp_path, seed, fs)
    w.run()
    STATS["workloads"] += 1
    STATS["iterations"] += 1
    STATS["events"] += fs.events - events0
    STATS["seconds"] = round(STATS.get("seconds", 0) + time.monotonic() - start, 1)
    assert w.cuts >= min(10, MAX_CUTS), f"only {w.cuts} crash images were taken"
    write_report()
    print(f"seed {seed}: {w.cuts} crash images, totals {dict(STATS)}")


def _scripted(pool, mark) -> None:
    """A fixed workload through every path that writes; ``mark()`` after every commit."""
    v = pool.create_volume("v", 6 * BS)
    mark()
    pool.write(v.dev_id, 0, b"a" * (3 * BS))  # provision
    pool.write(v.dev_id, 3 * BS + 100, b"partial")  # zero-filled new block
    pool.commit()
    mark()
    pool.write(v.dev_id, 10, b"in place")  # exclusive: overwritten in place
    pool.commit()  # metadata clean: only the data flush
    mark()
    s = pool.snapshot("v", "s")
    mark()
    pool.write(v.dev_id, 0, b"v after snap")  # copy on write (the origin)
    pool.write(s.dev_id, BS, b"s after snap")  # copy on write (the snapshot)
    pool.write(s.dev_id, 2 * BS, bytes(BS))  # whole zero block: a new block (zeros are data)
    pool.commit()
    mark()
    pool.discard(v.dev_id, 0, 2 * BS)  # frees v's copy of block 0 (block 1 is shared)
    pool.write(v.dev_id, 4 * BS, b"b" * BS)  # provision: must not reuse the freed block
    pool.commit()  # the freed block is punched after this
    mark()
    s2 = pool.snapshot("s", "s2")  # a snapshot of a snapshot
    mark()
    pool.write(s2.dev_id, 5, b"s2")
    pool.remove("s")  # commits: s's exclusive blocks are freed and punched
    mark()
    pool.resize(pool.volume("v").dev_id, 8 * BS)
    mark()
    pool.write(v.dev_id, 7 * BS, b"tail")
    pool.rename("v", "w")
    mark()
    pool.open_device(s2.dev_id)
    pool.remove("s2")  # deferred
    mark()
    pool.extend(data_size=(pool.nr_blocks + 8) * BS,
                metadata_size=(pool.store.superblock.nr_meta_pages + 32) * PAGE_SIZE)
    mark()
    pool.close_device(s2.dev_id)  # dropped and committed
    mark()


def test_power_loss_at_every_event(tmp_path, fs):
    """A scripted workload, cut before *every* I/O event, with every policy.

    Each image must open at the commit that was durable (or in flight) and read
    exactly what a fault-free run of the same script held at that commit; the
    only exception is the window between an in-place overwrite and the
    ``commit()`` that flushes it, where the overwritten sector may read either
    way.
    """
    # 1. A fault-free run: the committed contents after every commit.
    ref_path = str(tmp_path / "ref")
    Pool.create(ref_path, data_size=48 * BS, metadata_size=1 * MiB, block_size=BS, min_free_space=0)
    reference: dict[int, dict[str, bytes]] = {}
    with Pool.open(ref_path) as pool:
        def mark_ref():  # (remove commits twice, flagged then dropped: the same volumes)
            contents = {d.name: pool.read(d.dev_id, 0, d.size) for d in pool.volumes()}
            for txn in range(max(reference, default=pool.transaction_id - 1) + 1, pool.transaction_id + 1):
                reference[txn] = contents
            reference[pool.transaction_id] = contents
        mark_ref()
        _scripted(pool, mark_ref)
    in_place_window = (b"a" * 10 + b"in place").ljust(SECTOR, b"a"), b"a" * SECTOR
    # 2. The same script under FaultFS, cut before every event.
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=48 * BS, metadata_size=1 * MiB, block_size=BS, min_free_space=0)
    fs.track(path)
    rng = random.Random(1)
    counts = Counter()

    def check(ev: Event) -> None:
        for policy in POLICIES:
            where = f"event {ev.index} (before {ev.kind} {ev.name}@{ev.offset}, policy {policy})"
            allowed = allowed_txns(fs)
            directory = write_image(fs.crash_image(rng, policy), path, str(tmp_path / "img"))
            report = check_pool(directory)
            assert report.ok, f"{where}: {[p.message for p in report.problems]}"
            assert report.transaction in allowed, f"{where}: txn {report.transaction} not in {allowed}"
            counts["in_flight"] += report.transaction != min(allowed)
            counts["images"] += 1
            expected = reference[report.transaction]
            with Pool.open(directory) as pool:
                assert sorted(pool.names) == sorted(expected), f"{where}: {sorted(pool.names)}"
                for name, want in expected.items():
                    dev = pool.volume(name)
                    got = pool.read(dev.dev_id, 0, dev.size)
                    assert len(got) == len(want), f"{where}: {name} is {len(got)} bytes, not {len(want)}"
                    if got == want:
                        continue
                    for s in range(0, len(got), SECTOR):
                        if got[s : s + SECTOR] != want[s : s + SECTOR]:
                            assert s == 0 and got[:SECTOR] in in_place_window, (
                                f"{where}: {name} sector {s // SECTOR} reads {got[s:s + 16]!r}, "
                                f"the commit holds {want[s:s + 16]!r}")
                            counts["in_place_window"] += 1
                check_invariants(pool)
            shutil.rmtree(directory)

    fs.on_event = check
    with Pool.open(path) as pool:
        _scripted(pool, lambda: None)
    fs.on_event = None
    assert fs.events > 60
    assert counts["in_flight"], "no image opened at an in-flight commit"
    STATS["cuts"] += counts["images"]
    STATS["scripted_events"] += fs.events
    STATS["opened_at_inflight_commit"] += counts["in_flight"]
    write_report()
    print(f"every event: {fs.events} events, {dict(counts)}")


def test_clean_close_makes_in_place_overwrites_durable(tmp_path, fs):
    """After ``Pool.close`` (what ``fusepool umount`` does) everything written is durable.

    An overwrite of a block the volume owns changes no metadata, so ``close``
    finds nothing to commit — but it must still flush the data image, or a
    power cut shortly after a clean unmount loses those writes.
    """
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=16 * BS, metadata_size=1 * MiB, block_size=BS, min_free_space=0)
    fs.track(path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 2 * BS)
        pool.write(v.dev_id, 0, b"old" * 100)
        pool.commit()
        pool.write(v.dev_id, 0, b"new")  # exclusive: in place, no metadata change
        assert not pool.dirty
    image = write_image(fs.crash_image(random.Random(0), "none"), path, str(tmp_path / "img"))
    with Pool.open(image) as pool:
        got = pool.read(pool.volume("v").dev_id, 0, 3)
    if got != b"new":
        STATS["data_lost"] += 1
        STATS["data_lost_after_clean_close"] += 1
        write_report()
    assert got == b"new", (f"an in-place overwrite made before a clean close reads {got!r} after a "
                           "power cut: Pool.close() did not flush the data image")


def test_block_freed_before_a_power_cut_is_not_reused(tmp_path, fs):
    """A block freed in the running transaction stays unallocatable until that
    transaction commits: the last commit still maps it (DESIGN.md).  On a full pool the
    freed block is the only candidate, so a reuse would be immediate; after a power cut
    the old owner must read its committed bytes, not the new owner's."""
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=8 * BS, metadata_size=1 * MiB, block_size=BS, min_free_space=0)
    fs.track(path)
    rng = random.Random(2)
    a, b = rng.randbytes(4 * BS), rng.randbytes(5 * BS)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 4 * BS)
        w = pool.create_volume("w", 4 * BS)
        pool.write(v.dev_id, 0, a)
        pool.write(w.dev_id, 0, b[: 4 * BS])
        pool.commit()  # the pool is full
        pool.discard(v.dev_id, 0, BS)  # frees v's block 0: not committed
        pool.discard(v.dev_id, BS, BS)  # and block 1
        with pytest.raises(PoolFull):
            pool.write(w.dev_id, 4 * BS, b[4 * BS :])  # nothing may be allocated before the commit
        images = [fs.crash_image(rng, policy) for policy in POLICIES]
        pool.commit()
        assert pool.write(w.dev_id, 4 * BS, b[4 * BS :]) == BS  # now it may
        images += [fs.crash_image(rng, policy) for policy in POLICIES]
    for n, files in enumerate(images):
        directory = write_image(files, path, str(tmp_path / f"img{n}"))
        with Pool.open(directory) as pool:
            v_got = pool.read(pool.volume("v").dev_id, 0, 4 * BS)
            w_got = pool.read(pool.volume("w").dev_id, 0, 5 * BS)
            check_invariants(pool)
        if n < len(POLICIES):  # at the last commit: v as committed
            assert v_got == a, f"image {n}: v reads {v_got[:8].hex()}..., committed {a[:8].hex()}..."
        else:  # the commit that freed them is durable: v's blocks 0-1 unmapped
            assert v_got == bytes(2 * BS) + a[2 * BS :], f"image {n}"
        assert w_got[: 4 * BS] == b[: 4 * BS], f"image {n}: w"
        shutil.rmtree(directory)


@pytest.mark.parametrize("grow", ["resize", "write past the end"])
def test_growing_a_volume_after_a_crash_reads_zeros(tmp_path, fs, grow):
    """Bytes between a volume's old and new end read as zeros (file semantics: ext4 zeroes
    the tail of the last block when a file grows).

    A write past the end of a volume goes in place into its last block when that block
    is exclusively owned.  If the power fails before the commit, the pool comes back
    with the old size, but the block keeps the lost bytes past the old end; growing the
    volume then shows them.
    """
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=16 * BS, metadata_size=1 * MiB, block_size=BS, min_free_space=0)
    fs.track(path)
    with Pool.open(path) as pool:
        v = pool.create_volume("v", 1000)
        pool.write(v.dev_id, 0, b"a" * 1000)
        pool.commit()
        pool.write(v.dev_id, 1000, b"lost" * 100)  # grows v to 1400 bytes, in place
        image = write_image(fs.crash_image(random.Random(0), "all"), path, str(tmp_path / "img"))
    with Pool.open(image) as pool:
        v = pool.volume("v")
        assert v.size == 1000
        if grow == "resize":
            pool.resize(pool.volume("v").dev_id, 2 * BS)
        else:
            pool.write(v.dev_id, 1500, b"x")
        got = pool.read(v.dev_id, 1000, 400)
    if got != bytes(400):
        STATS["stale_bytes_after_growing"] += 1
        write_report()
    assert got == bytes(400), (
        f"after a crash and a {grow}, bytes 1000..1400 of v (past its committed end) read "
        f"{got[:16]!r}...: what a lost write past the end had put in the last block")


def test_fallback_commit_is_not_overwritten_before_its_superblock_is(tmp_path, fs):
    """The commit before last must stay intact until a newer superblock replaces it.

    docs/design.md: "Pages referenced by the last two commits are never
    overwritten, so a damaged latest commit can fall back to the one before
    it."  After an open, only the newest commit's pages are protected: the
    first commit of the session may write its pages over those of the commit
    before, and only then replace that commit's superblock.  A power cut in
    between leaves a valid superblock whose pages hold other data (a page's
    checksum is seeded by its page number only, so a node written to the same
    page number verifies).  If the newest superblock is then damaged,
    ``Pool.open`` falls back to that commit: it must refuse (Corrupt) or show
    it *as it was* — never pages of a transaction that never committed.
    """
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=32 * BS, metadata_size=1 * MiB, block_size=BS, min_free_space=0)
    rng = random.Random(0)
    with Pool.open(path) as pool:
        v, w = pool.create_volume("v", 8 * BS), pool.create_volume("w", 8 * BS)
        # Find a history where the next session's pages (leaf of v, space map, root record:
        # allocated next-fit from page 2) land on the older commit's leaf of v, but not on
        # its space map or root record (those would fail their kind or the root checksum).
        contents = prev_contents = prev_leaf = None
        for i in range(20000):
            for dev in (v, w):
                if rng.random() < 0.5:
                    block = rng.randrange(4)
                    if rng.random() < 0.5:
                        pool.discard(dev.dev_id, block * BS, BS)
                    else:
                        pool.write(dev.dev_id, block * BS, b"%d" % i)
            if not pool.dirty:
                continue
            pool.commit()
            prev_contents, contents = contents, {d.name: pool.read(d.dev_id, 0, d.size) for d in (v, w)}
            state = pool.store.page_state
            free = [p for p in range(2, len(state)) if not state[p] & CURRENT]
            older = {p for p in range(2, len(state)) if state[p] and not state[p] & CURRENT}
            if prev_contents and free[0] == prev_leaf and not older & set(free[1:3]):
                break
            prev_leaf = v.root.page if v.root is not None else None
        else:
            pytest.fail("could not set the scene")
        older_txn = pool.transaction_id - 1
        newest = pool.transaction_id
    fs.track(path)
    cut: list[dict] = []

    def before_superblock(ev: Event) -> None:
        if ev.name == "metadata" and ev.kind == "pwrite" and ev.offset < 2 * PAGE_SIZE and not cut:
            cut.append(fs.crash_image(random.Random(0), "all"))

    fs.on_event = before_superblock
    with Pool.open(path) as pool:  # a new session: only `newest` is loaded
        v = pool.volume("v")
        pool.write(v.dev_id, 6 * BS, b"never committed" * 4)
        pool.commit()
    fs.on_event = None
    image = cut[0]
    meta = bytearray(image["metadata"])
    meta[(newest % 2) * PAGE_SIZE + 100] ^= 0x01  # then the newest superblock is damaged
    image["metadata"] = bytes(meta)
    directory = write_image(image, path, str(tmp_path / "img"))
    try:
        pool = Pool.open(directory)
    except Corrupt:
        return  # refusing to open is fine
    with pool:
        assert pool.transaction_id == older_txn
        got = {name: pool.read(pool.volume(name).dev_id, 0, 8 * BS) for name in ("v", "w")}
    check = check_pool(directory)
    if got != prev_contents:
        STATS["wrong_data_after_fallback"] += 1
        write_report()
    for name, want in prev_contents.items():
        i = first_difference(got[name], want)
        assert got[name] == want, (
            f"Pool.open fell back to commit {older_txn} (newest superblock damaged) and volume "
            f"{name} reads {got[name][i:i + 15]!r} at byte {i} (block {i // BS}), where that commit "
            f"holds {want[i:i + 15]!r}: a page written by the interrupted commit {newest + 1} was "
            f"read as part of commit {older_txn}. check_pool: ok={check.ok}, "
            f"{[p.message for p in check.problems][:2]}")


def test_power_loss_while_recovering(tmp_path, fs):
    """Power fails again while a recovered pool finishes a deferred deletion."""
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=32 * BS, metadata_size=1 * MiB, block_size=BS, min_free_space=0)
    fs.track(path)
    pool = Pool.open(path)
    v = pool.create_volume("v", 4 * BS)
    pool.write(v.dev_id, 0, b"x" * (2 * BS))
    s = pool.snapshot("v", "s")
    pool.write(s.dev_id, 0, b"y" * BS)
    pool.open_device(s.dev_id)
    pool.remove("s")  # deferred: committed with s flagged deleted
    crash(pool)
    rng = random.Random(5)
    base = write_image(fs.crash_image(rng, "pages"), path, str(tmp_path / "base"))
    fs.track(base)
    images = []
    fs.on_event = lambda ev: images.extend(fs.crash_image(rng, p) for p in POLICIES)
    with Pool.open(base) as pool:  # drops s and commits
        assert sorted(pool.names) == ["v"]
    fs.on_event = None
    assert images
    for n, files in enumerate(images):
        directory = write_image(files, base, str(tmp_path / f"img{n}"))
        report = check_pool(directory)
        assert report.ok, report.problems
        with Pool.open(directory) as pool:
            assert sorted(pool.names) == ["v"]
            assert not any(d.deleted for d in pool.devices.values())
            v = pool.volume("v")
            assert pool.read(v.dev_id, 0, 2 * BS) == b"x" * (2 * BS)
            check_invariants(pool)
        shutil.rmtree(directory)
    STATS["cuts"] += len(images)
    write_report()
