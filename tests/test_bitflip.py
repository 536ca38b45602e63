"""Bit flips in the metadata: detected, never silently used; repair recovers.

A pool with several volumes, snapshots of snapshots, a two-level tree, shared
and exclusive blocks and a two-page root record is committed twice in a row
(transactions P and N; the last transaction only *provisions* blocks, so
that commit P's data is still intact on disk) and closed.  Then, many times,
its metadata file is copied, one bit (or byte) flipped somewhere in the used
part, and:

(a) ``check_pool`` returns a report (never raises): problems for a flip in a
    page of commit N (every page is checksummed), none for a flip commit N
    does not use;
(b) ``Pool.open`` raises ``Corrupt`` naming ``fusepool check`` and
    ``fusepool repair``, or opens at N, or (newest superblock damaged) at P,
    and then reads exactly that commit's data;
(c) ``repair`` leaves a pool that ``check_pool`` calls clean and that reads,
    per volume, commit N's data, or commit P's (repair said it fell back), or
    commit N's with zeros where repair said it dropped that device's
    unreadable nodes — never any other bytes.

Flips are classified by where they land: ``newest_sb`` / ``older_sb`` (the two
superblock slots), ``live_new`` (a page only commit N uses), ``live_shared``
(used by N and P), ``older_only`` (P's pages N no longer uses), ``stale``
(older commits' pages) and ``free`` (never written).

FUSEPOOL_SOAK=1 flips many more; FUSEPOOL_REPORT_DIR=DIR writes the figures
to DIR/bitflip.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import struct
import traceback
from collections import Counter
from dataclasses import dataclass

import pytest
import xxhash
from conftest import is_mounted, run_fusepool
from conftest import write_report as write_report_json
from engine_model import VolumeModel, first_difference

from fusepool.check import Checker, check_pool, repair
from fusepool.engine import Pool
from fusepool.errors import Corrupt, PoolError
from fusepool.metadata.format import _CHECKSUM_AT, FANOUT, HEADER_SIZE, PAGE_SIZE, Superblock, checksum

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB
SOAK = os.environ.get("FUSEPOOL_SOAK", "") not in ("", "0")
FLIPS = 5000 if SOAK else 300
STATS: Counter = Counter()
CATEGORY_WEIGHTS = {"live_new": 30, "live_shared": 20, "newest_sb": 8, "older_sb": 8,
                    "older_only": 14, "stale": 12, "free": 8}


def write_report() -> None:
    write_report_json("bitflip", dict(STATS, soak=SOAK, silently_wrong=STATS.get("silently_wrong", 0)))


# --- the pool under test ------------------------------------------------------------------


@dataclass
class Base:
    path: str
    models: dict[str, VolumeModel]  # commit N
    older_models: dict[str, VolumeModel]  # commit P = N - 1
    txn: int
    older_txn: int
    ids: dict[str, int]
    pages: dict[str, list[int]]  # category -> page numbers
    kinds: dict[int, str]  # page -> what commit N or P uses it as
    data_digest: str


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _pages_of(meta: str, block_size: int, slot: int) -> dict[int, str]:
    fd = os.open(meta, os.O_RDONLY)
    try:
        checker = Checker(fd, block_size, slot)
        report = checker.run()
        assert report.ok, report.problems
        kinds = dict(checker.page_kind)
        kinds[slot] = "superblock"
        return kinds
    finally:
        os.close(fd)


def build_base(path: str) -> Base:
    Pool.create(path, data_size=1100 * BS, metadata_size=1 * MiB, block_size=BS, min_free_space=0)
    rng = random.Random(7)
    models: dict[str, VolumeModel] = {}
    ids: dict[str, int] = {}
    with Pool.open(path) as pool:
        def create(name, size):
            ids[name] = pool.create_volume(name, size).dev_id
            models[name] = VolumeModel(size, BS)

        def snap(origin, name):
            ids[name] = pool.snapshot(origin, name).dev_id
            models[name] = models[origin].clone()

        def write(name, off, data):
            assert pool.write(ids[name], off, data) == len(data)
            models[name].write(off, data)

        create("base", 12 * BS)
        for vb in range(8):
            write("base", vb * BS, rng.randbytes(BS))
        pool.commit()
        snap("base", "s1")
        write("s1", 2 * BS + 100, rng.randbytes(3000))  # copy on write
        write("s1", 9 * BS, rng.randbytes(BS))  # new block
        snap("s1", "s1a")  # a snapshot of a snapshot
        write("s1a", 3 * BS, rng.randbytes(BS))
        write("base", 5 * BS + 7, rng.randbytes(500))  # the origin diverges too
        create("big", (FANOUT + 20) * BS)  # two leaves under an internal node
        for off in (0, 3 * BS + 11, (FANOUT + 5) * BS, (FANOUT + 19) * BS + 1):
            write("big", off, rng.randbytes(rng.randint(100, BS)))
        pool.commit()
        snap("big", "bigsnap")
        write("bigsnap", (FANOUT + 5) * BS + 10, rng.randbytes(2000))
        write("big", 4 * BS, rng.randbytes(BS))
        for i in range(12):  # long names: the root record spans two pages
            name = f"vol{i:02d}-" + "x" * 180
            create(name, rng.randint(1, 4) * BS)
            if i % 3 == 0:
                write(name, 0, rng.randbytes(rng.randint(1, BS)))
            if i % 4 == 1:
                pool.commit()
        snap("vol03-" + "x" * 180, "s-of-vol03")
        for _ in range(6):  # churn: stale pages from older commits
            write("s1a", rng.randrange(10) * BS + 3, rng.randbytes(100))
            pool.discard(ids["vol00-" + "x" * 180], 0, BS)
            models["vol00-" + "x" * 180].discard(0, BS)
            write("vol00-" + "x" * 180, 0, rng.randbytes(300))
            pool.commit()
        older_models = {n: m.clone() for n, m in models.items()}
        older_txn = pool.transaction_id
        # The last transaction only provisions (new blocks, copies of shared ones): commit P's
        # data stays intact on disk, so falling back to it must read it exactly.
        write("base", 10 * BS, rng.randbytes(BS))
        write("s1a", 5, b"copy on write")
        write("bigsnap", (FANOUT + 10) * BS, rng.randbytes(777))
        write("vol06-" + "x" * 180, BS + 1, rng.randbytes(10))
        pool.commit()
        txn = pool.transaction_id
        assert txn == older_txn + 1
        assert len(pool.store.superblock.root_pages) >= 2
    meta = os.path.join(path, "metadata")
    newest = _pages_of(meta, BS, txn % 2)
    older = _pages_of(meta, BS, older_txn % 2)
    assert check_pool(path).ok
    kinds = {**older, **newest}
    pages: dict[str, list[int]] = {k: [] for k in CATEGORY_WEIGHTS}
    with open(meta, "rb") as f:
        content = f.read()
    for p in range(len(content) // PAGE_SIZE):
        if p == txn % 2:
            cat = "newest_sb"
        elif p == older_txn % 2:
            cat = "older_sb"
        elif p in newest:
            cat = "live_shared" if p in older else "live_new"
        elif p in older:
            cat = "older_only"
        elif any(content[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]):
            cat = "stale"
        else:
            cat = "free"
        pages[cat].append(p)
    for cat, found in pages.items():
        assert found, f"the base pool has no {cat} page"
    live_kinds = {newest[p].split()[0] for p in pages["live_new"] + pages["live_shared"]}
    assert {"root-record", "space-map", "node"} <= live_kinds, live_kinds
    return Base(path, models, older_models, txn, older_txn, ids, pages, kinds,
                _digest(os.path.join(path, "data")))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    return build_base(str(tmp_path_factory.mktemp("bitflip") / "base"))


class _NoSync:
    """``os`` for the engine's metadata and check modules, minus the flushes and the host
    space reservation: durability is not what these tests look at, and thousands of
    trial repairs would otherwise wait for the disk."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def fsync(fd):
        pass

    @staticmethod
    def fdatasync(fd):
        pass

    @staticmethod
    def posix_fallocate(fd, offset, length):
        pass


@pytest.fixture(autouse=True)
def _no_sync(monkeypatch):
    import fusepool.check
    import fusepool.metadata.store

    for module in (fusepool.check, fusepool.metadata.store):
        monkeypatch.setattr(module, "os", _NoSync())


def make_trial(base: Base, directory: str) -> str:
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    os.link(os.path.join(base.path, "data"), os.path.join(directory, "data"))  # never written
    for name in ("metadata", "pool.json"):
        shutil.copyfile(os.path.join(base.path, name), os.path.join(directory, name))
    return directory


def sparse_copy(src: str, dst: str) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            for off in range(start, end, 1 << 20):
                os.pwrite(fo.fileno(), os.pread(fi.fileno(), min(1 << 20, end - off), off), off)
            pos = end
        fo.truncate(size)


def flip(path: str, offset: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


# --- verification ---------------------------------------------------------------------------


def read_volumes(pool: Pool, models: dict[str, VolumeModel], what: str,
                 may_drop: set[int] = frozenset()) -> int:
    """Every mapped or model block of every volume reads as the model (or as zeros in a
    device repair said it dropped nodes of).  Returns the blocks that read as dropped."""
    assert sorted(pool.names) == sorted(models), f"{what}: volumes {sorted(pool.names)}"
    dropped = 0
    for name, model in models.items():
        dev = pool.volume(name)
        assert dev.size == model.size, f"{what}: {name[:12]} size {dev.size} != {model.size}"
        blocks = set(model.blocks) | {vb for vb, _, _ in pool.mappings(dev)}
        for vb in sorted(blocks):
            got = pool.read(dev.dev_id, vb * BS, BS)
            want = model.expected(vb * BS, BS)
            if got == want:
                continue
            if dev.dev_id in may_drop and not any(got) and vb not in {v for v, _, _ in pool.mappings(dev)}:
                dropped += 1
                continue
            i = first_difference(got, want)
            STATS["silently_wrong"] += 1
            raise AssertionError(f"{what}: {name[:12]} block {vb} byte {i} reads {got[i:i + 8].hex()}, "
                                 f"expected {want[i:i + 8].hex()}")
    return dropped


def dropped_devices(said: list[str]) -> set[int]:
    found = set()
    for line in said:
        found.update(int(m) for m in re.findall(r"device (\d+) \(", line))
    return found


def run_flip(base: Base, trial: str, category: str, page: int, offset: int, mask: int) -> str:
    """One flip, checked end to end; returns the outcome."""
    make_trial(base, trial)
    meta = os.path.join(trial, "metadata")
    flip(meta, page * PAGE_SIZE + offset, mask)
    what = (f"flip {mask:#04x} at page {page} (+{offset}, {category}, "
            f"{base.kinds.get(page, 'unused')})")
    # (a) check never raises; it reports every flip in a page of commit N.
    report = check_pool(trial)
    live = category in ("live_new", "live_shared")
    if live:
        assert not report.ok and any(p.fatal for p in report.problems), f"{what}: check_pool says clean"
        STATS["detected_by_check"] += 1
    else:
        assert report.ok, f"{what}: check_pool: {[p.message for p in report.problems]}"
        expect_txn = base.older_txn if category == "newest_sb" else base.txn
        assert report.transaction == expect_txn, f"{what}: check chose transaction {report.transaction}"
        if category.endswith("_sb"):
            assert any(f"superblock slot {page}" in n for n in report.notes), f"{what}: {report.notes}"
    # (b) open: refuse with a pointer to check/repair, or open at a valid commit with its data.
    try:
        pool = Pool.open(trial)
    except Corrupt as exc:
        assert live, f"{what}: Pool.open refused a flip commit N does not use: {exc}"
        assert "fusepool check" in str(exc) and "fusepool repair" in str(exc), f"{what}: {exc}"
        outcome = "refused"
    else:
        assert not live, f"{what}: Pool.open accepted a damaged page of the newest commit"
        with pool:
            if category == "newest_sb":
                assert pool.transaction_id == base.older_txn, f"{what}: opened at {pool.transaction_id}"
                read_volumes(pool, base.older_models, what + " (opened)")
                outcome = "rolled_back"
            else:
                assert pool.transaction_id == base.txn, f"{what}: opened at {pool.transaction_id}"
                read_volumes(pool, base.models, what + " (opened)")
                outcome = "harmless"
    # (c) repair, then a clean pool with the right data (or zeros where repair said so).
    said = repair(trial)
    after = check_pool(trial)
    assert after.ok, f"{what}: after repair: {[p.message for p in after.problems]} (repair: {said})"
    fell_back = any(f"rebuilt from transaction {base.older_txn}" in line for line in said)
    salvaged = any("salvaging" in line for line in said)
    with Pool.open(trial, readonly=True) as pool:
        if fell_back or category == "newest_sb":
            assert category in ("live_new", "live_shared", "newest_sb"), f"{what}: {said}"
            assert pool.transaction_id == base.older_txn + 1
            read_volumes(pool, base.older_models, what + " (repaired)")
            STATS["repaired_to_previous_commit"] += 1
        else:
            assert pool.transaction_id == base.txn + 1, f"{what}: {said}"
            may_drop = dropped_devices(said) if salvaged else set()
            if salvaged:
                assert category == "live_shared", f"{what}: salvaged although P was intact: {said}"
                STATS["salvaged"] += 1
            dropped = read_volumes(pool, base.models, what + " (repaired)", may_drop)
            STATS["blocks_dropped_by_repair"] += dropped
            if not salvaged:
                STATS["repaired_to_newest_commit"] += 1
    assert os.path.exists(meta + ".damaged")
    return outcome


def pick_flip(base: Base, rng: random.Random) -> tuple[str, int, int, int]:
    cats, weights = zip(*CATEGORY_WEIGHTS.items(), strict=True)
    category = rng.choices(cats, weights)[0]
    page = rng.choice(base.pages[category])
    r = rng.random()
    if r < 0.15:
        offset = rng.randrange(32)  # the header (magic, kind, level, count, checksum, txn)
    elif r < 0.5 and category != "free":
        with open(os.path.join(base.path, "metadata"), "rb") as f:
            f.seek(page * PAGE_SIZE)
            content = f.read(PAGE_SIZE)
        used = [i for i in range(0, PAGE_SIZE, 8) if any(content[i : i + 8])]
        offset = rng.choice(used) + rng.randrange(8) if used else rng.randrange(PAGE_SIZE)
    else:
        offset = rng.randrange(PAGE_SIZE)  # anywhere, unused payload included
    mask = 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randint(1, 255)
    return category, page, offset, mask


# --- tests -----------------------------------------------------------------------------------------


def test_every_page_of_the_newest_commit_is_checksummed(base, tmp_path):
    """One flip in each page commit N uses (header and payload): all detected."""
    rng = random.Random(1)
    trial = str(tmp_path / "trial")
    for category in ("live_new", "live_shared"):
        for page in base.pages[category]:
            for offset in (rng.randrange(32), rng.randrange(32, PAGE_SIZE), PAGE_SIZE - 1):
                outcome = run_flip(base, trial, category, page, offset, 1 << rng.randrange(8))
                assert outcome == "refused"
                STATS["flips"] += 1
                STATS[f"flips_{category}"] += 1
                STATS["detected"] += 1
    assert _digest(os.path.join(base.path, "data")) == base.data_digest
    write_report()


def test_random_bit_flips(base, tmp_path):
    rng = random.Random(int(os.environ.get("FUSEPOOL_SEED", "12345")))
    trial = str(tmp_path / "trial")
    outcomes = Counter()
    for n in range(FLIPS):
        category, page, offset, mask = pick_flip(base, rng)
        outcome = run_flip(base, trial, category, page, offset, mask)
        outcomes[outcome] += 1
        STATS["flips"] += 1
        STATS[f"flips_{category}"] += 1
        STATS["detected" if outcome == "refused" else outcome] += 1
        if n % 50 == 49:
            write_report()
    assert _digest(os.path.join(base.path, "data")) == base.data_digest, "a trial wrote the data image"
    assert outcomes["refused"] and outcomes["harmless"] and outcomes["rolled_back"]
    write_report()
    print(f"{FLIPS} flips: {dict(outcomes)}; totals {dict(STATS)}")


def test_check_cli_reports_flips(base, tmp_path):
    """``fusepool check`` (text and --json): exit 1 and the problem for a damaged page of
    the newest commit; exit 0 when the flip does not matter; never a traceback."""
    rng = random.Random(3)
    for category in ("live_new", "live_shared", "free", "older_only", "newest_sb"):
        trial = make_trial(base, str(tmp_path / category))
        page = rng.choice(base.pages[category])
        flip(os.path.join(trial, "metadata"), page * PAGE_SIZE + rng.randrange(PAGE_SIZE), 0x10)
        text = run_fusepool("check", trial, check=False)
        js = run_fusepool("check", trial, "--json", check=False)
        for proc in (text, js):
            assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
        report = json.loads(js.stdout)
        if category.startswith("live"):
            assert text.returncode == 1 and js.returncode == 1, (category, text.stdout, text.stderr)
            assert not report["ok"] and report["problems"], report
            assert any(f"page {page}" in p["message"] for p in report["problems"]), report["problems"]
            assert "error: checksum" in text.stdout and "fusepool repair" in text.stdout, text.stdout
        else:
            assert text.returncode == 0 and js.returncode == 0, (category, text.stdout, text.stderr)
            assert report["ok"], report
            if category == "newest_sb":
                assert report["transaction"] == base.older_txn
                assert "note: superblock slot" in text.stdout, text.stdout


def test_mount_of_corrupt_pool_fails_with_one_clear_line(base, tmp_path, make_mount):
    trial = make_trial(base, str(tmp_path / "pool"))
    os.unlink(os.path.join(trial, "data"))  # a private copy: a mounted pool may write
    sparse_copy(os.path.join(base.path, "data"), os.path.join(trial, "data"))
    node = next(p for p in base.pages["live_new"] if base.kinds[p].startswith("node"))
    flip(os.path.join(trial, "metadata"), node * PAGE_SIZE + 1000, 0x04)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run_fusepool("mount", trial, mnt, check=False, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "fusepool check" in lines[0] and "fusepool repair" in lines[0], lines[0]
    assert not is_mounted(mnt)
    js = run_fusepool("check", trial, "--json", check=False)
    assert js.returncode == 1
    problems = json.loads(js.stdout)["problems"]
    assert any(p["kind"] == "checksum" and f"page {node}" in p["message"] for p in problems), problems
    fixed = run_fusepool("repair", trial)
    assert "rebuilt from transaction" in fixed.stdout, fixed.stdout
    assert run_fusepool("check", trial).returncode == 0
    if not os.path.exists("/dev/fuse"):
        return
    m = make_mount(trial)
    with open(m.vol("base"), "rb") as f:
        assert f.read(12 * BS) == base.older_models["base"].expected(0, 12 * BS)
    m.umount()


# --- flips under a valid checksum ------------------------------------------------------------


def _reseal(meta: str, base: Base, page: int) -> None:
    """Recompute the checksum of ``page`` (and, for a root-record page, the newest
    superblock's root checksum): a flip that happened *before* the checksum was computed,
    as bad RAM or a software bug would make it."""
    with open(meta, "r+b") as f:
        f.seek(page * PAGE_SIZE)
        content = bytearray(f.read(PAGE_SIZE))
        struct.pack_into("<Q", content, _CHECKSUM_AT, checksum(content, page))
        f.seek(page * PAGE_SIZE)
        f.write(content)
        if base.kinds.get(page, "").startswith("root-record"):
            slot = base.txn % 2
            f.seek(slot * PAGE_SIZE)
            sb = Superblock.unpack(f.read(PAGE_SIZE), slot)
            blob = b""
            for p in sb.root_pages:
                f.seek(p * PAGE_SIZE + HEADER_SIZE)
                blob += f.read(PAGE_SIZE - HEADER_SIZE)
            sb.root_checksum = xxhash.xxh64_intdigest(blob[: sb.root_len])
            f.seek(slot * PAGE_SIZE)
            f.write(sb.pack())


def _read_everything(pool: Pool) -> None:
    for dev in pool.volumes():
        for vb, _, _ in list(pool.mappings(dev))[:64]:
            pool.read(dev.dev_id, vb * BS, BS)
        pool.read(dev.dev_id, 0, min(dev.size, 4 * BS))


def test_flips_under_a_valid_checksum_never_crash(base, tmp_path):
    """Metadata that verifies but says something impossible (a bit flipped in memory before
    the page was checksummed) must not crash ``check``, ``Pool.open`` or ``repair``: check
    returns a report, open raises ``Corrupt`` (a PoolError) or opens a pool that can be
    read, and repair either refuses with a PoolError or leaves a pool ``check`` calls clean.
    Silently different data cannot be ruled out here (a flipped block number verifies);
    only crashes and an unrepairable "repaired" pool count as failures.
    """
    rng = random.Random(int(os.environ.get("FUSEPOOL_SEED", "99")))
    trial = str(tmp_path / "trial")
    failures: Counter = Counter()
    examples: dict[tuple, str] = {}
    n_flips = 3000 if SOAK else 200
    for _ in range(n_flips):
        category = rng.choice(["live_new", "live_shared", "newest_sb"])
        page = rng.choice(base.pages[category])
        with open(os.path.join(base.path, "metadata"), "rb") as f:
            f.seek(page * PAGE_SIZE)
            content = f.read(PAGE_SIZE)
        outside = [i for i in range(PAGE_SIZE) if not _CHECKSUM_AT <= i < _CHECKSUM_AT + 8]
        used = [i for i in outside if content[i]]
        offset = rng.choice(used if used and rng.random() < 0.7 else outside)
        make_trial(base, trial)
        meta = os.path.join(trial, "metadata")
        flip(meta, page * PAGE_SIZE + offset, 1 << rng.randrange(8))
        _reseal(meta, base, page)
        STATS["forged_flips"] += 1
        where = f"page {page} ({base.kinds.get(page, category)}) byte {offset}"
        stage = "check_pool"
        try:
            check_pool(trial)
            stage = "Pool.open + read"
            try:
                with Pool.open(trial, readonly=True) as pool:
                    _read_everything(pool)
            except PoolError:
                pass
            stage = "repair"
            try:
                said = repair(trial)
            except PoolError:
                continue
            stage = "check after repair"
            after = check_pool(trial)
            if not after.ok:
                raise AssertionError(f"repaired pool not clean: {after.problems[0].kind}: "
                                     f"{after.problems[0].message} (repair said {len(said)} things)")
            stage = "open after repair"
            with Pool.open(trial, readonly=True) as pool:
                _read_everything(pool)
        except Exception as exc:  # noqa: BLE001 - every escape is what this test looks for
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            detail = re.sub(r"\d+", "N", str(exc))[:110]
            key = (stage, type(exc).__name__, f"{os.path.relpath(tb.filename, os.getcwd())}:{tb.lineno}",
                   detail)
            failures[key] += 1
            examples.setdefault(key, where)
    STATS["forged_crashes"] = sum(failures.values())
    write_report()
    assert _digest(os.path.join(base.path, "data")) == base.data_digest
    assert not failures, f"{sum(failures.values())} of {n_flips} forged flips broke something:\n" + "\n".join(
        f"  {n} x {stage}: {name} at {loc}: {detail}  (e.g. {examples[(stage, name, loc, detail)]})"
        for (stage, name, loc, detail), n in failures.most_common())


@pytest.mark.parametrize("offset, problem", [
    (6, "cannot address"),  # the big device's root says level 0: its tree is too short
    (40, "mapped beyond the end"),  # a child pointer now names a small device's leaf
], ids=["root-level", "child-pointer"])
def test_repair_of_forged_flips_found_by_the_soak(base, tmp_path, offset, problem):
    """Two flips under a valid checksum (page 9 of the base pool, bit 0) that the soak found
    repair leaving unclean: a tree too short for its device, and a subtree shared by two
    parents at different virtual blocks.  Repair grows the tree, and gives each position its
    own copy of the subtree."""
    trial = str(tmp_path / "trial")
    make_trial(base, trial)
    meta = os.path.join(trial, "metadata")
    flip(meta, 9 * PAGE_SIZE + offset, 1)
    _reseal(meta, base, 9)
    before = check_pool(trial)
    assert any(problem in p.message for p in before.problems), [p.message for p in before.problems]
    repair(trial)
    after = check_pool(trial)
    assert after.ok, [p.message for p in after.problems]
    with Pool.open(trial, readonly=True) as pool:
        _read_everything(pool)
