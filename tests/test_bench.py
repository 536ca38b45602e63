"""tools/bench end to end: a --smoke run against real fio, qemu-storage-daemon and fusepool mounts.

The run must report every target and workload with real figures, compute its
ratios from the figures it reports, draw its chart, and leave nothing behind:
no mount, no daemon, no work directory.
"""

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import lazy_unmount

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench"

TARGETS = {"plain", "fp-fresh", "fp-written", "fp-snap64", "fp-snap512", "fp-fresh-wt", "fp-written-wt",
           "qcow2-fresh", "qcow2-written", "qcow2-overlay"}
FRESH = {"fp-fresh", "fp-fresh-wt", "qcow2-fresh"}
INFORMATIVE = {"fp-fresh-wt", "fp-written-wt"}  # mount --write-through: no ok/MISSED checks
WORKLOADS = {"seq_write": True, "seq_read": False, "rand_write": True, "rand_read_cold": False,
             "rand_read_warm": False, "mixed": True}  # key -> writes (so runs on fresh targets too)
PAIRS = {"fp-fresh": "qcow2-fresh", "fp-written": "qcow2-written", "fp-snap64": "qcow2-overlay",
         "fp-snap512": "qcow2-overlay", "fp-fresh-wt": "qcow2-fresh", "fp-written-wt": "qcow2-written"}
FIGURES = ("mb_s", "iops", "p50_us", "p99_us")


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (our daemons name files in the work dir)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def run_bench(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_run_reports_every_figure_and_leaves_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    try:
        proc = run_bench("--smoke", "--dir", work, "--json", out, "--chart", chart)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "x-qcow2" in proc.stdout and "targets:" in proc.stdout, proc.stdout
        res = json.loads(out.read_text())
        assert res["skipped"] == [], "tools/setup installs every tool the benchmark uses"
        for key in ("commit", "kernel", "versions", "nproc"):
            assert res["machine"][key]
        assert res["load_before"] and res["load_after"] and "tools/bench --smoke" in res["command"]

        fio = res["fio"]
        assert {t["key"] for t in fio["targets"]} == TARGETS
        rows = {(r["workload"], r["target"]): r for r in fio["rows"]}
        expected = {(w, t) for w, writes in WORKLOADS.items() for t in TARGETS if writes or t not in FRESH}
        assert set(rows) == expected
        for key, row in rows.items():
            assert row["samples"], key
            for figure in FIGURES:
                assert row["median"][figure] > 0, (key, figure)
                assert row["median"][figure] == statistics.median(s[figure] for s in row["samples"])
        for (workload, target), row in rows.items():
            if target not in PAIRS:
                assert row["ratio_qcow2"] is None and row["ratio_plain"] is None
                continue
            for side, peer in (("qcow2", PAIRS[target]), ("plain", "plain")):
                theirs = rows[workload, peer]["median"]
                for figure in FIGURES:
                    want = row["median"][figure] / theirs[figure]
                    assert row[f"ratio_{side}"][figure] == pytest.approx(want)
            if target in INFORMATIVE:
                assert row["checks"] == []
            else:
                assert row["checks"] and all(isinstance(c["ok"], bool) for c in row["checks"])

        engine = res["engine"]
        assert [s["blocks"] for s in engine["snapshot"]] == [1_000, 10_000]
        assert all(s["median_s"] > 0 for s in engine["snapshot"])
        for key in ("cli_snapshot_s", "cli_version_s", "qemu_img_snapshot_s"):
            assert engine[key] and min(engine[key]) > 0, key
        assert min(engine["mount"]["mount_warm_s"]) > 0 and min(engine["mount"]["rss_bytes"]) > 0
        assert set(engine["fsync_engine"]) == {"10", "1000", "10000"}
        assert set(engine["fsync_mount"]) == {"1000"}
        for times in [*engine["fsync_engine"].values(), *engine["fsync_mount"].values()]:
            assert len(times) == res["config"]["fsync_samples"] and min(times) > 0
        assert {c["figure"] for c in engine["checks"]} == {
            "snapshot_growth", "snapshot_s", "cli_snapshot_s", "mount_s", "rss_bytes_per_block",
            "fsync_engine", "fsync_mount"}

        rep = res["reporting"]  # issue #11's Docker-scale reporting case, at the smoke size
        assert rep["pool"]["layers"] == 10 and rep["dump_bytes"] > 0
        assert set(rep["times_s"]) == {"list", "thin_ls", "delta", "dump", "info", "check"}
        assert all(min(t) > 0 for t in rep["times_s"].values())
        assert {c["figure"] for c in rep["checks"]} == {
            "report_list_s", "report_thin_ls_s", "report_delta_s", "report_dump_s"}

        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert chart.stat().st_size > 10_000
        assert list(work.iterdir()) == [], "the temporary work directory is removed"
    finally:
        left_mounts = mounts_under(work)
        left_processes = processes_mentioning(str(work))
        for point in reversed(left_mounts):
            lazy_unmount(point)
        for pid in left_processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert left_mounts == [], "tools/bench left mounts behind"
    assert left_processes == [], "tools/bench left daemons (qemu-storage-daemon, fusepool) running"


def test_chart_without_matplotlib_says_what_to_install(tmp_path):
    """--chart with no matplotlib: one clear line and a non-zero exit, before any work starts."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=str(shadow.parent))
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--chart", tmp_path / "x.png",
                           "--dir", tmp_path], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "pip install matplotlib" in proc.stderr
    assert not (tmp_path / "x.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("fusepool-bench.")]


@pytest.mark.parametrize("args, message", [
    (["--size", "1k"], "--size"),
    (["--quick", "--smoke"], "exclude"),
    (["--repeats", "0"], "positive"),
    (["--dir", "/nonexistent/bench"], "not a directory"),
])
def test_bad_options_fail_with_one_line(args, message):
    proc = run_bench(*args, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


CONCURRENCY = BENCH.parent / "bench-concurrency"


def test_concurrency_list_loop_reports_both_ways_and_leaves_nothing(tmp_path):
    """tools/bench-concurrency --list-loop at a tiny size: reads alone and next to `fusepool list`."""
    work, out = tmp_path / "work", tmp_path / "ll.json"
    work.mkdir()
    try:
        cmd = [sys.executable, CONCURRENCY, "--list-loop", "--blocks", "2000", "--layers", "5", "--size",
               "16M", "--runtime", "1", "--repeats", "1", "--dir", work, "--json", out]
        proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "reads next to a `list` loop" in proc.stdout and "target: p99 < 5 ms" in proc.stdout
        res = json.loads(out.read_text())
        assert res["pool"]["blocks"] == 2000 and res["pool"]["layers"] == 5
        for key in ("alone", "with_list"):
            assert len(res["samples"][key]) == 1
            assert res["median"][key]["p99_us"] >= res["median"][key]["p50_us"] > 0
        assert res["list_s"][0] and min(res["list_s"][0]) > 0, "no `fusepool list` ran next to the reads"
        assert "--direct=1" in res["fio_args"]
        assert list(work.iterdir()) == []
    finally:
        left = mounts_under(work)
        for point in reversed(left):
            lazy_unmount(point)
    assert left == []


def test_concurrency_list_loop_options_need_list_loop():
    proc = subprocess.run([sys.executable, str(CONCURRENCY), "--blocks", "10"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--list-loop" in proc.stderr and "Traceback" not in proc.stderr
