"""fio: tools/bench's workloads, one job's run, and the figures read from fio's JSON."""

import json
import subprocess
from dataclasses import dataclass

# --- fio ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    args: tuple[str, ...]
    writes: bool  # writes anything (so runs on fresh targets; no repeat on remade targets)
    unit: str  # the figure the ratio and the targets are about: "MB/s" or "IOPS"
    warm: bool = False  # after an untimed read pass instead of a dropped page cache
    vs_plain_target: bool = False  # issue #5: >= 0.8x the plain file


WORKLOADS = [
    Workload("seq_write", "seq 1 MiB write", ("--rw=write", "--bs=1M", "--end_fsync=1"), True, "MB/s",
             vs_plain_target=True),
    Workload("seq_read", "seq 1 MiB read (cold)", ("--rw=read", "--bs=1M"), False, "MB/s",
             vs_plain_target=True),
    Workload("rand_write", "rand 4 KiB write", ("--rw=randwrite", "--bs=4k", "--end_fsync=1"), True, "IOPS"),
    Workload("rand_read_cold", "rand 4 KiB read (cold)", ("--rw=randread", "--bs=4k"), False, "IOPS"),
    Workload("rand_read_warm", "rand 4 KiB read (warm)", ("--rw=randread", "--bs=4k", "--invalidate=0"),
             False, "IOPS", warm=True),
    Workload("mixed", "mixed 70/30 rand 16 KiB, fsync/32",
             ("--rw=randrw", "--rwmixread=70", "--bs=16k", "--fsync=32", "--end_fsync=1",
              "--unified_rw_reporting=mixed"), True, "IOPS"),
]
FIO_COMMON = ("--ioengine=psync", "--numjobs=1", "--direct=0", "--fallocate=none", "--output-format=json")
FIGURES = ("mb_s", "iops", "p50_us", "p99_us")
UNIT_FIGURE = {"MB/s": "mb_s", "IOPS": "iops"}


def fio_filename(path: str) -> str:
    return path.replace(":", "\\:")  # fio splits --filename at colons


def run_fio(fio: str, path: str, size: int, args: tuple[str, ...], runtime: float | None,
            time_based: bool, warm_up: bool = False) -> dict:
    """One fio job; returns its figures (throughput, completion-latency percentiles).

    ``warm_up`` first reads the whole file sequentially, untimed, in the same fio
    process (a job of its own, which the measured job waits for: --stonewall).
    """
    cmd = [fio, f"--filename={fio_filename(path)}", f"--size={size}", *FIO_COMMON]  # global options
    if warm_up:
        cmd += ["--name=warm-up", "--rw=read", "--bs=1M", "--invalidate=0"]
    cmd += ["--name=bench", *(["--stonewall"] if warm_up else []), *args]
    if runtime is not None:
        cmd.append(f"--runtime={max(1, round(runtime * 1000))}ms")
    if time_based:
        cmd.append("--time_based")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout
    if proc.returncode or "{" not in out:
        raise RuntimeError(f"fio on {path} failed ({proc.returncode}): {proc.stderr.strip() or out.strip()}")
    job = next(j for j in json.loads(out[out.index("{"):])["jobs"] if j["jobname"] == "bench")
    if job.get("error"):
        raise RuntimeError(f"fio on {path}: error {job['error']} ({' '.join(args)})")
    side = job["mixed"] if "mixed" in job else job["write"] if job["write"]["io_bytes"] else job["read"]
    if not side["io_bytes"]:
        raise RuntimeError(f"fio moved no data on {path} ({' '.join(args)})")
    pct = side["clat_ns"].get("percentile", {})
    return {"mb_s": side["bw_bytes"] / 1e6, "iops": side["iops"],
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000,
            "runtime_s": side["runtime"] / 1000, "bytes": side["io_bytes"]}


def fill(fio: str, path: str, size: int) -> None:
    """Write every byte of ``path`` once (fio's data: random, never a zero block)."""
    run_fio(fio, path, size, ("--rw=write", "--bs=1M", "--end_fsync=1"), None, False)
