"""tools/compare-modes' measurements: loop mode, direct mode and kernel devices, side by side."""

import json
import os
import shutil
import statistics
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass

from .env import MiB, drop_caches, fusepool_command, run_fusepool, say, time_command
from .host import allocated_bytes, evict, extent_count, file_size, meminfo_cached, resident_bytes
from .targets import KernelTarget, ModeTarget, PoolTarget
from .workloads import FIGURES, FIO_COMMON, WORKLOADS, run_fio

BLOCK = 64 << 10  # the `fusepool init` default, used by both pools
POOL_VOLUMES = 4  # data size of each pool, in --size units: two volumes per repeat + room
PROBE_FACTOR = 4  # the overcommit probe asks for this many times the host's free space
PROBE_BLOCK = 64 * MiB  # its block size: space is the point, and big blocks keep its metadata small


# --- measurements ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    key: str
    label: str
    workload: str  # the key of tools/bench's workload whose fio arguments it uses
    region: str
    first: bool  # on never-written blocks (a region made just before)
    unit: str  # "MB/s" or "IOPS": the figure that matters for it


STEPS = [
    Step("seq_first", "seq 1 MiB write, first", "seq_write", "seq", True, "MB/s"),
    Step("seq_over", "seq 1 MiB write, overwrite", "seq_write", "seq", False, "MB/s"),
    Step("seq_read", "seq 1 MiB read (cold)", "seq_read", "seq", False, "MB/s"),
    Step("rand_first", "rand 4 KiB write, first", "rand_write", "rand", True, "IOPS"),
    Step("rand_over", "rand 4 KiB write, overwrite", "rand_write", "rand", False, "IOPS"),
    Step("rand_read", "rand 4 KiB read (cold)", "rand_read_cold", "rand", False, "IOPS"),
]
UNIT_FIGURE = {"MB/s": "mb_s", "IOPS": "iops"}


class Run:
    """One comparison: its targets, settings and every figure gathered (``self.res``)."""

    def __init__(self, args, tools: dict, work: str):
        self.args, self.tools, self.work = args, tools, work
        self.fio = tools["fio"]
        self.workloads = {w.key: w for w in WORKLOADS}
        self.targets: list[ModeTarget] = []
        self.samples: dict[tuple[str, str], list[dict]] = {}
        self.res: dict = {}

    def fio_run(self, target: ModeTarget, path: str, offset: int, fio_args: tuple, runtime: float | None,
                time_based: bool) -> dict:
        extra = (f"--offset={offset}",) if offset else ()
        return run_fio(self.fio, path, target.size, (*fio_args, *extra), runtime, time_based)

    def fill(self, target: ModeTarget, path: str, offset: int) -> None:
        """Write the whole region once, untimed (so later runs overwrite only)."""
        self.fio_run(target, path, offset, ("--rw=write", "--bs=1M", "--end_fsync=1"), None, False)

    def step(self, step: Step, target: ModeTarget, repeat: int) -> None:
        if step.first:
            where = target.fresh(step.region, repeat)
            if where is None:
                return
        else:
            where = target.region(step.region, repeat)
        workload = self.workloads[step.workload]
        drop_caches()
        time_based = not step.first and workload.writes  # overwrites wrap around; reads read once
        sample = self.fio_run(target, *where, workload.args, self.args.runtime, time_based)
        sample["repeat"] = repeat
        self.samples.setdefault((step.key, target.key), []).append(sample)
        say(f"{step.label} on {target.label}: {sample['mb_s']:,.1f} MB/s, {sample['iops']:,.0f} IOPS, "
            f"p99 {sample['p99_us']:,.0f} us")
        if step.first:
            if step.region == "rand" and repeat == 0:
                self.res["fragmentation"][target.key]["after_random_writes"] = self.extents(target)
            self.fill(target, *where)

    def extents(self, target: ModeTarget) -> dict[str, int]:
        return {f: extent_count(self.tools["filefrag"], f) for f in target.lower_files()}

    def page_cache(self, target: ModeTarget) -> dict:
        """Read the written seq region once after eviction; what is cached above and below."""
        path, offset = target.region("seq", self.args.repeats - 1)
        lower = target.lower_files()
        for f in (path, *lower):
            evict(f)
        dropped = drop_caches()
        before = meminfo_cached()
        fd = os.open(path, os.O_RDONLY)
        done = 0
        try:
            while done < target.size:
                got = len(os.pread(fd, MiB, offset + done))
                if not got:
                    break
                done += got
            after = meminfo_cached()
            # Counted while still open: a block device's cache goes when its last user closes it.
            volume = resident_bytes(path, offset, target.size, fd=fd)
        finally:
            os.close(fd)
        out = {"read_bytes": done, "caches_dropped": dropped, "meminfo_cached_delta": after - before,
               "volume_bytes": volume, "lower": {f: resident_bytes(f) for f in lower}}
        out["lower_bytes"] = sum(out["lower"].values())
        return out

    def snapshots(self, pools: list[PoolTarget]) -> dict:
        """N snapshots of the written seq volume per pool, then N removes; pools interleaved."""
        n, origin = self.args.snapshots, PoolTarget.volume("seq", self.args.repeats - 1)
        out = {p.key: {"count": n, "create_s": [], "remove_s": []} for p in pools}
        cmd = fusepool_command()
        say(f"{n} x `fusepool snapshot`, then {n} x `fusepool remove`, on each mounted pool")
        for phase, verb in (("create_s", "snapshot"), ("remove_s", "remove")):
            for i in range(n):
                for p in pools:
                    names = [origin, f"snap{i}"] if verb == "snapshot" else [f"snap{i}"]
                    out[p.key][phase].append(time_command([*cmd, verb, p.pool_dir, *names]))
        return out

    def space(self, pools: list[PoolTarget], kernels: list[KernelTarget]) -> dict:
        out = {}
        for p in pools:
            info = json.loads(run_fusepool("info", p.pool_dir, "--json").stdout)
            volumes = json.loads(run_fusepool("list", p.pool_dir, "--json").stdout)
            host = shutil.disk_usage(p.pool_dir)
            out[p.key] = {
                "data_size": info["data_space_total"], "data_used": info["data_space_used"],
                "data_available": info["data_space_available"],
                "volumes": len(volumes), "volume_sizes": sum(v["size"] for v in volumes),
                "host_allocated": (file_size(p.data_device) if p.data_device
                                   else allocated_bytes(p.data_file)),
                "data_device": p.data_device,
                "host_free": host.free, "host_total": host.total, "mode": info["mode"],
            }
        for k in kernels:
            entry = {"device_size": file_size(k.device), "backing": []}
            for b in k.backing:
                if os.path.isfile(b["file"]):
                    host = shutil.disk_usage(os.path.dirname(b["file"]))
                    entry["backing"].append({**b, "size": file_size(b["file"]),
                                             "allocated": allocated_bytes(b["file"]), "host_free": host.free})
            out[k.key] = entry
        return out

    def overcommit_probe(self) -> dict:
        """A pool of PROBE_FACTOR x the host's free space: loop mode makes it, --preallocate may not."""
        free = shutil.disk_usage(self.work).free
        size = (PROBE_FACTOR * free) // PROBE_BLOCK * PROBE_BLOCK
        out = {"host_free": free, "data_size": size, "block_size": PROBE_BLOCK}
        for mode, extra in (("loop", []), ("direct", ["--preallocate"])):
            pool = os.path.join(self.work, f"probe-{mode}")
            proc = subprocess.run([*fusepool_command(), "init", pool, "--data-size", str(size),
                                   "--block-size", str(PROBE_BLOCK), *extra],
                                  capture_output=True, text=True, timeout=120)
            made = proc.returncode == 0
            lines = (proc.stdout if made else proc.stderr).strip().splitlines()
            entry = {"made": made, "message": lines[-1].removeprefix("fusepool: error: ") if lines else ""}
            if made:
                entry["host_allocated"] = allocated_bytes(os.path.join(pool, "data"))
            shutil.rmtree(pool, ignore_errors=True)
            out[mode] = entry
        return out

    def main(self) -> None:
        args, work = self.args, self.work
        size = args.size_bytes
        data_size = POOL_VOLUMES * size
        direct_args = ["--preallocate"]
        if args.data_device:
            device_size = file_size(args.data_device)
            data_size = min(data_size, device_size // BLOCK * BLOCK)
            direct_args = ["--data-device", args.data_device]
        common = ["--data-size", str(data_size)]
        pools = [
            PoolTarget("loop", "loop", size, os.path.join(work, "pool-loop"), os.path.join(work, "mnt-loop"),
                       [*common, "--mode", "loop"]),
            PoolTarget("direct", "direct" + (" (device)" if args.data_device else ""), size,
                       os.path.join(work, "pool-direct"), os.path.join(work, "mnt-direct"),
                       [*common, *direct_args], args.data_device),
        ]
        kernels = [KernelTarget(label, label, size, path) for label, path in args.kernel_devices]
        self.targets = [*pools, *kernels]
        self.res["targets"] = [{"key": t.key, "label": t.label, "kind": t.kind,
                                "path": getattr(t, "pool_dir", None) or getattr(t, "device", None),
                                "data": getattr(t, "data_file", None),
                                "backing": getattr(t, "backing", [])} for t in self.targets]
        self.res["fragmentation"] = {t.key: {} for t in self.targets}
        with ExitStack() as stack:
            for p in pools:
                say(f"making and mounting the {p.label} pool ({data_size / MiB:,.0f} MiB data)")
                p.setup(stack)
            for repeat in range(args.repeats):
                say(f"repeat {repeat + 1} of {args.repeats}")
                for step in STEPS:
                    order = self.targets if repeat % 2 == 0 else self.targets[::-1]
                    for target in order:
                        self.step(step, target, repeat)
            say("page cache: each first volume read once after eviction")
            self.res["page_cache"] = {t.key: self.page_cache(t) for t in self.targets}
            for t in self.targets:
                self.res["fragmentation"][t.key]["at_end"] = self.extents(t)
            self.res["snapshots"] = self.snapshots(pools)
            # A volume whose virtual size is twice the pool: thin provisioning in both modes.
            for p in pools:
                run_fusepool("create", p.pool_dir, "promise", "--size", 2 * data_size)
            self.res["space"] = self.space(pools, kernels)
        say("overcommit: init of a pool larger than the host's free space, in both modes")
        self.res["space"]["probe"] = self.overcommit_probe()
        self.res["fio"] = self.summarise_fio()

    def summarise_fio(self) -> dict:
        rows = []
        for step in STEPS:
            for t in self.targets:
                samples = self.samples.get((step.key, t.key))
                if samples:
                    median = {f: statistics.median(s[f] for s in samples) for f in FIGURES}
                    rows.append({"step": step.key, "target": t.key, "median": median, "samples": samples})
        return {"steps": [{"key": s.key, "label": s.label, "unit": s.unit, "first": s.first,
                           "fio_args": list(self.workloads[s.workload].args)} for s in STEPS],
                "fio_common_args": list(FIO_COMMON), "rows": rows}
