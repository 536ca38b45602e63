"""The parts of tools/bench: fio against qcow2 and a plain file, engine figures, reporting at scale.

Each ``*_section`` returns a JSON-able dict of samples, medians and checks of issue #5's and
issue #11's targets ({"what", "value", "ok"}); report.py prints them.
"""

import os
import random
import shutil
import statistics
import subprocess
import time
from contextlib import suppress

from .env import KiB, MiB, drop_caches, fusepool_command, run_fusepool, say, time_command, vm_rss
from .pools import ENGINE_BLOCK, docker_chain_pool, engine_pool, nonzero_bytes
from .report import percentile, ratios
from .targets import FusepoolMount, FusepoolTarget, PlainTarget, Qcow2Target, Target
from .workloads import FIGURES, FIO_COMMON, UNIT_FIGURE, WORKLOADS, run_fio

MOUNT_FSYNC_DIRTY = 1_000
DIRTY_COUNTS = (10, 1_000, 10_000)

# Targets of issue #5.
QCOW2_MIN_RATIO = 1.0
PLAIN_MIN_RATIO = 0.8  # sequential 1 MiB read and write
SNAPSHOT_MAX_GROWTH = 3.0  # biggest volume's snapshot vs the 1,000-block one
SNAPSHOT_MAX_S = 0.050
CLI_SNAPSHOT_MAX_S = 0.150
MOUNT_MAX_S = 1.0
RSS_MAX_PER_BLOCK = 32
FSYNC_P99_MAX_S = 0.010
TARGET_BLOCKS = 1_000_000


def fio_section(work: str, args, tools: dict) -> dict:
    """Every workload on every target, targets interleaved within each repeat."""
    fio, size = tools["fio"], args.size_bytes
    have_qcow2 = bool(tools["qemu-img"] and tools["qemu-storage-daemon"])
    plain = PlainTarget(os.path.join(work, "plain.dat"), fio, size)
    pools = {}
    for name, block in (("64K", "64K"), ("512K", "512K"), ("64K-wt", "64K")):
        pools[name] = os.path.join(work, f"pool-{name}")
        run_fusepool("init", pools[name], "--block-size", block)
    mount64 = FusepoolMount(pools["64K"], os.path.join(work, "mnt-64K"))
    mount512 = FusepoolMount(pools["512K"], os.path.join(work, "mnt-512K"))
    mount64wt = FusepoolMount(pools["64K-wt"], os.path.join(work, "mnt-64K-wt"), "--write-through")
    targets: list[Target] = [plain]
    targets += [
        FusepoolTarget("fp-fresh", "fusepool fresh", "qcow2-fresh", mount64, "fresh", fio, size),
        FusepoolTarget("fp-written", "fusepool written", "qcow2-written", mount64, "written", fio, size),
        FusepoolTarget("fp-snap64", "fusepool snap 64K", "qcow2-overlay", mount64, "snapshot", fio, size),
        FusepoolTarget("fp-snap512", "fusepool snap 512K", "qcow2-overlay", mount512, "snapshot", fio, size),
        FusepoolTarget("fp-fresh-wt", "fusepool fresh, write-through", "qcow2-fresh", mount64wt, "fresh",
                       fio, size),
        FusepoolTarget("fp-written-wt", "fusepool written, write-through", "qcow2-written", mount64wt,
                       "written", fio, size),
    ]
    if have_qcow2:
        targets += [Qcow2Target(key, label, group, work, tools, plain.file, size) for key, label, group in (
            ("qcow2-fresh", "qcow2 fresh", "fresh"), ("qcow2-written", "qcow2 written", "written"),
            ("qcow2-overlay", "qcow2 overlay", "snapshot"))]
    samples: dict[tuple[str, str], list[dict]] = {}
    modes: dict[tuple[str, str], str] = {}
    with mount64, mount512, mount64wt:
        say(f"laying out the targets ({size / MiB:,.0f} MiB each)")
        for target in targets:
            target.setup()
        runs = [(w, t) for w in WORKLOADS for t in targets if t.applies(w)]
        total, done = len(runs) * args.repeats, 0
        for repeat in range(args.repeats):
            for workload in WORKLOADS:
                # Alternate the order, so no target always runs right after the same one.
                order = targets if repeat % 2 == 0 else targets[::-1]
                for target in order:
                    if not target.applies(workload):
                        continue
                    time_based = workload.warm or (workload.writes and not target.remade)
                    modes[workload.key, target.key] = "time" if time_based else "once"
                    with target.instance() as path:
                        if not workload.warm:
                            drop_caches()
                        sample = run_fio(fio, path, size, workload.args, args.runtime, time_based,
                                         warm_up=workload.warm)
                    sample["repeat"] = repeat
                    samples.setdefault((workload.key, target.key), []).append(sample)
                    done += 1
                    say(f"[{done}/{total}] {workload.label} on {target.label}: {sample['mb_s']:,.1f} MB/s, "
                        f"{sample['iops']:,.0f} IOPS, p99 {sample['p99_us']:,.0f} us")
    rows = summarise_fio(targets, samples, modes)
    return {"targets": [{"key": t.key, "label": t.label, "kind": t.kind, "group": t.group,
                         "remade_every_run": t.remade, "pair": t.pair} for t in targets],
            "workloads": [{"key": w.key, "label": w.label, "fio_args": list(w.args), "unit": w.unit}
                          for w in WORKLOADS],
            "fio_common_args": list(FIO_COMMON), "rows": rows}


def summarise_fio(targets: list[Target], samples: dict, modes: dict) -> list[dict]:
    """Median of every figure, ratios to the paired qcow2 target and to the plain file, targets."""
    by_key = {t.key: t for t in targets}
    medians = {k: {f: statistics.median(s[f] for s in v) for f in FIGURES} for k, v in samples.items()}
    rows = []
    for workload in WORKLOADS:
        for target in targets:
            key = (workload.key, target.key)
            if key not in samples:
                continue
            row = {"workload": workload.key, "target": target.key, "mode": modes[key],
                   "median": medians[key], "samples": samples[key],
                   "ratio_qcow2": None, "ratio_plain": None, "checks": []}
            if target.kind == "fusepool":
                unit = UNIT_FIGURE[workload.unit]
                for side, peer in (("qcow2", target.pair), ("plain", "plain")):
                    if peer in by_key and (workload.key, peer) in medians:
                        row[f"ratio_{side}"] = ratios(medians[key], medians[workload.key, peer])
                        row[f"ratio_{side}_of"] = peer
                if row["ratio_qcow2"] and not target.informative:
                    value = row["ratio_qcow2"][unit]
                    row["checks"].append({"what": f"{workload.unit} >= {QCOW2_MIN_RATIO:g}x "
                                                  f"{by_key[target.pair].label}",
                                          "value": value, "ok": value >= QCOW2_MIN_RATIO})
                if workload.vs_plain_target and row["ratio_plain"] and not target.informative:
                    value = row["ratio_plain"][unit]
                    row["checks"].append({"what": f"{workload.unit} >= {PLAIN_MIN_RATIO:g}x plain",
                                          "value": value, "ok": value >= PLAIN_MIN_RATIO})
            rows.append(row)
    return rows


# --- engine figures --------------------------------------------------------------------------


def time_engine_snapshots(path: str, samples: int) -> list[float]:
    """``pool.snapshot`` of 'origin', timed in this process; the snapshots are removed after."""
    from fusepool.engine import Pool

    times = []
    os.sync()  # the write-back of what came before (populating) must not land in the timings
    with Pool.open(path) as pool:
        origin = pool.volume("origin")
        for i in range(samples):
            start = time.perf_counter()
            pool.snapshot("origin", f"engine-snap{i}")
            times.append(time.perf_counter() - start)
            pool._remap(origin, [(0, pool.space.allocate())])  # a write after it, as in real use
        for i in range(samples):
            pool.remove(f"engine-snap{i}")
        pool.commit()
    return times


def fsync_in_engine(path: str, n: int, dirty_counts: tuple[int, ...], samples: int) -> dict:
    """``pool.sync()`` after N copy-on-write breaks of the origin, N per dirty count."""
    from fusepool.engine import Pool

    rnd = random.Random(5)
    out = {}
    os.sync()  # start from a quiet disk, as time_engine_snapshots does
    with Pool.open(path) as pool:
        origin = pool.volume("origin")
        for dirty in dirty_counts:
            dirty = min(dirty, n)
            snap, order, pos, times = None, [], n, []
            for _ in range(samples):
                if pos + dirty > n:  # every block broken already: share them all again (untimed)
                    if snap:
                        pool.remove(snap)
                    snap = f"fsync-snap-{dirty}-{len(times)}"
                    pool.snapshot("origin", snap)
                    order, pos = rnd.sample(range(n), n), 0
                pool._remap(origin, [(vb, pool.space.allocate()) for vb in order[pos:pos + dirty]])
                pos += dirty
                start = time.perf_counter()
                pool.sync()
                times.append(time.perf_counter() - start)
            if snap:
                pool.remove(snap)
            pool.commit()
            out[str(dirty)] = times
    return out


def fsync_through_mount(mount: FusepoolMount, n: int, dirty: int, samples: int) -> list[float]:
    """pwrite 4 KiB into ``dirty`` random shared blocks of a snapshot, then time ``os.fsync``."""
    rnd = random.Random(7)
    data = nonzero_bytes(4 * KiB)
    dirty = min(dirty, n)
    name, fd, order, pos, times = None, None, [], n, []
    try:
        for _ in range(samples):
            if pos + dirty > n:  # every block broken already: a new snapshot (untimed)
                if fd is not None:
                    os.close(fd)
                    fd = None
                    os.unlink(mount.path(name))
                name = f"fsync-snap-{len(times)}"
                run_fusepool("snapshot", mount.pool_dir, "origin", name)
                fd = os.open(mount.path(name), os.O_WRONLY)
                order, pos = rnd.sample(range(n), n), 0
            for vb in order[pos:pos + dirty]:
                os.pwrite(fd, data, vb * ENGINE_BLOCK + rnd.randrange(ENGINE_BLOCK // len(data)) * len(data))
            pos += dirty
            start = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - start)
    finally:
        if fd is not None:
            os.close(fd)
            os.unlink(mount.path(name))
    return times


def mount_cycles(pool_dir: str, mountpoint: str, cycles: int, cold: bool, last=None) -> dict:
    """Timed `fusepool mount` with a warm (and, if ``cold``, a dropped) page cache; the daemon's RSS.

    ``last(mount)``, when given, runs while the last mount is up (saves a mount cycle).
    """
    cold_s, warm, rss = [], [], []
    for i in range(cycles):
        mount = FusepoolMount(pool_dir, mountpoint)
        if cold and drop_caches():
            try:
                cold_s.append(mount.mount())
            finally:
                mount.umount()
        try:
            warm.append(mount.mount())
            rss.append(vm_rss(mount.pid))
            if last and i == cycles - 1:
                last(mount)
        finally:
            mount.umount()
    return {"mount_cold_s": cold_s, "mount_warm_s": warm, "rss_bytes": rss}


def qemu_img_snapshot_times(qemu_img: str, work: str, samples: int) -> list[float]:
    """`qemu-img create -b` of an overlay on a qcow2 image: qcow2's way to take a snapshot."""
    base = os.path.join(work, "snapshot-base.qcow2")
    subprocess.run([qemu_img, "create", "-f", "qcow2", base, "1G"], capture_output=True, check=True)
    times = []
    for i in range(samples):
        overlay = os.path.join(work, f"snapshot-{i}.qcow2")
        times.append(time_command([qemu_img, "create", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay]))
    return times


def engine_section(work: str, args, tools: dict) -> dict:
    biggest = max(args.blocks)
    out: dict = {"snapshot": [], "blocks": biggest, "dirty_counts": list(DIRTY_COUNTS)}
    fsync_allocations = args.fsync_samples * max(DIRTY_COUNTS)
    for n in args.blocks:
        path = os.path.join(work, f"engine-{n}")
        say(f"engine: a pool with {n:,} mapped blocks")
        geometry = engine_pool(path, n, fsync_allocations if n == biggest else 0)
        times = time_engine_snapshots(path, args.snapshot_samples)
        out["snapshot"].append({"blocks": n, "samples_s": times, "median_s": statistics.median(times),
                                "pool": geometry})
        if n != biggest:
            shutil.rmtree(path)
    big, geometry = os.path.join(work, f"engine-{biggest}"), out["snapshot"][-1]["pool"]
    empty = os.path.join(work, "engine-empty")
    from fusepool.engine import Pool

    Pool.create(empty, data_size=geometry["data_size"], metadata_size=geometry["metadata_size"],
                block_size=geometry["block_size"])
    mnt = os.path.join(work, "mnt-engine")
    say(f"engine: {args.repeats} x mount of the empty and of the {biggest:,}-block pool")
    out["mount_empty"] = mount_cycles(empty, mnt, args.repeats, cold=False)

    def while_mounted(mount: FusepoolMount) -> None:
        say(f"engine: {args.snapshot_samples} x `fusepool snapshot` on the mounted pool")
        cli, floor = [], []
        for i in range(args.snapshot_samples):
            floor.append(time_command([*fusepool_command(), "--version"]))
            cli.append(time_command([*fusepool_command(), "snapshot", big, "origin", f"cli-snap{i}"]))
        for i in range(args.snapshot_samples):
            os.unlink(mount.path(f"cli-snap{i}"))
        out["cli_snapshot_s"], out["cli_version_s"] = cli, floor
        say(f"engine: {args.fsync_samples} x fsync after {MOUNT_FSYNC_DIRTY:,} 4 KiB writes "
            "through the mount")
        out["fsync_mount"] = {str(MOUNT_FSYNC_DIRTY): fsync_through_mount(
            mount, biggest, MOUNT_FSYNC_DIRTY, args.fsync_samples)}

    out["mount"] = mount_cycles(big, mnt, args.repeats, cold=args.cold_mount, last=while_mounted)
    pairs = zip(out["mount"]["rss_bytes"], out["mount_empty"]["rss_bytes"], strict=False)
    out["rss_bytes_per_block"] = [(a - b) / biggest for a, b in pairs]
    shutil.rmtree(empty)
    if tools["qemu-img"]:
        out["qemu_img_snapshot_s"] = qemu_img_snapshot_times(tools["qemu-img"], work, args.snapshot_samples)
    say(f"engine: pool.sync() after 10 / 1,000 / 10,000 copy-on-write breaks, {args.fsync_samples} each")
    out["fsync_engine"] = fsync_in_engine(big, biggest, DIRTY_COUNTS, args.fsync_samples)
    shutil.rmtree(big)
    out["checks"] = engine_checks(out)
    return out


def engine_checks(e: dict) -> list[dict]:
    """Issue #5's engine targets, each {"what", "value", "ok"} (values in seconds or bytes)."""
    checks = []
    snaps = {s["blocks"]: s["median_s"] for s in e["snapshot"]}
    big = e["blocks"]
    scale = "" if big == TARGET_BLOCKS else f" (issue #5 states it for {TARGET_BLOCKS:,})"

    def add(figure: str, target: str, what: str, value: float, ok: bool) -> None:
        scaled = scale if figure in (
            "snapshot_growth", "snapshot_s", "mount_s", "rss_bytes_per_block") else ""
        checks.append({"figure": figure, "target": target, "what": what + scaled, "value": value, "ok": ok})

    if 1_000 in snaps:
        growth = snaps[big] / snaps[1_000]
        add("snapshot_growth", f"<= {SNAPSHOT_MAX_GROWTH:g}x 1,000 blocks",
            f"engine snapshot, {big:,} blocks <= {SNAPSHOT_MAX_GROWTH:g}x the 1,000-block one", growth,
            growth <= SNAPSHOT_MAX_GROWTH)
    add("snapshot_s", f"< {SNAPSHOT_MAX_S * 1e3:g} ms", f"engine snapshot, {big:,} blocks < "
        f"{SNAPSHOT_MAX_S * 1e3:g} ms", snaps[big], snaps[big] < SNAPSHOT_MAX_S)
    cli = statistics.median(e["cli_snapshot_s"])
    add("cli_snapshot_s", f"< {CLI_SNAPSHOT_MAX_S * 1e3:g} ms",
        f"`fusepool snapshot` < {CLI_SNAPSHOT_MAX_S * 1e3:g} ms", cli, cli < CLI_SNAPSHOT_MAX_S)
    mount = statistics.median(e["mount"]["mount_warm_s"])
    add("mount_s", f"< {MOUNT_MAX_S:g} s", f"mount of a {big:,}-mapping pool < {MOUNT_MAX_S:g} s", mount,
        mount < MOUNT_MAX_S)
    rss = statistics.median(e["rss_bytes_per_block"])
    add("rss_bytes_per_block", f"< {RSS_MAX_PER_BLOCK} B", f"resident memory < {RSS_MAX_PER_BLOCK} B per "
        "mapped block", rss, rss < RSS_MAX_PER_BLOCK)
    for where, label in (("fsync_engine", "pool.sync()"), ("fsync_mount", "fsync through the mount")):
        times = e[where].get("1000")
        if times:
            p99 = percentile(times, 99)
            add(where, f"p99 < {FSYNC_P99_MAX_S * 1e3:g} ms", f"{label}, 1,000 dirty mappings: p99 < "
                f"{FSYNC_P99_MAX_S * 1e3:g} ms", p99, p99 < FSYNC_P99_MAX_S)
    return checks


# --- reporting at Docker scale (issue #11) ---------------------------------------------------

REPORT_SHAPES = {"default": (1_000_000, 1_000), "quick": (100_000, 100), "smoke": (10_000, 10)}
REPORT_MAX_S = {"list": 2.0, "thin_ls": 2.0, "delta": 1.0, "dump": 60.0}  # stated for 1,000,000 x 1,000


def reporting_section(work: str, args) -> dict:
    """`list`, `list --format thin_ls`, `delta` of the last two layers and `dump -o`, timed through
    the CLI on the unmounted pool (median of --repeats); `info` and `check` as the floor."""
    blocks, layers = REPORT_SHAPES[args.preset]
    path, xml = os.path.join(work, "reporting"), os.path.join(work, "reporting.xml")
    say(f"reporting: a base of {blocks:,} blocks and a chain of {layers:,} snapshots")
    out = {"pool": docker_chain_pool(path, blocks, layers)}
    os.sync()
    fp = fusepool_command()
    commands = {"list": ["list", path], "thin_ls": ["list", "--format", "thin_ls", path],
                "delta": ["delta", path, f"layer{layers - 2}", f"layer{layers - 1}"],
                "dump": ["dump", "-o", xml, path], "info": ["info", path], "check": ["check", path]}
    say(f"reporting: {args.repeats} x {', '.join(commands)}")
    out["times_s"] = {k: [] for k in commands}
    for _ in range(args.repeats):
        for key, cmd in commands.items():
            if key == "dump":
                with suppress(FileNotFoundError):
                    os.unlink(xml)
            out["times_s"][key].append(time_command([*fp, *cmd]))
    out["dump_bytes"] = os.path.getsize(xml)
    os.unlink(xml)
    shutil.rmtree(path)
    scale = "" if (blocks, layers) == REPORT_SHAPES["default"] else " (stated for 1,000,000 x 1,000)"
    out["checks"] = []
    for key, limit in REPORT_MAX_S.items():
        median = statistics.median(out["times_s"][key])
        out["checks"].append({"figure": f"report_{key}_s", "target": f"< {limit:g} s", "value": median,
                              "what": f"`fusepool {key}` < {limit:g} s{scale}", "ok": median < limit})
    return out
