"""tools/compare-modes and the mode-moving procedures of docs/loop-vs-direct.md, for real.

The tool runs with --smoke (every part, tiny sizes): the report, the charts and
the JSON must hold real figures that agree with what the modes promise (a
direct pool's data is allocated in full and bypasses the host page cache; a
loop pool's is neither), and nothing may stay mounted.  The two shell scripts
that docs/loop-vs-direct.md gives for moving a pool between modes are taken
from the document itself and run on a pool with snapshots of snapshots.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fusepool_json, lazy_unmount, read_all, run_fusepool

REPO = Path(__file__).resolve().parent.parent
TOOL = [sys.executable, str(REPO / "tools" / "compare-modes")]
DOC = REPO / "docs" / "loop-vs-direct.md"
KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB
STEPS = ("seq_first", "seq_over", "seq_read", "rand_first", "rand_over", "rand_read")
SECTIONS = ("## Throughput and p99 latency", "## First write vs overwrite", "## Host page cache",
            "## Host filesystem fragmentation", "## Space: promised vs really available",
            "## Snapshots", "## What limits these figures")
CHARTS = ("throughput-latency.png", "first-write.png", "page-cache.png", "fragmentation.png", "space.png",
          "snapshots.png")


def mounts_under(path) -> list[str]:
    top = str(path)
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(top)]


def compare_modes(tmp_path, *extra, timeout=300) -> tuple[dict, Path]:
    """Run the tool with --smoke; returns its JSON and the report directory."""
    work, out = tmp_path / "work", tmp_path / "report"
    work.mkdir()
    try:
        proc = subprocess.run([*TOOL, "--smoke", "--json", "--out", str(out), "--dir", str(work), *extra],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        left = mounts_under(work)
        for point in reversed(left):
            lazy_unmount(point)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not left, f"left mounted: {left}"
    assert os.listdir(work) == [], "the temporary directory was not removed"
    res = json.loads(proc.stdout)
    assert json.loads((out / "report.json").read_text()) == res
    return res, out


def section(markdown: str, heading: str) -> str:
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + 1)
    return markdown[start:] if end < 0 else markdown[start:end]


def check_report(out: Path, res: dict) -> None:
    """Every section is there with a table of figures and advice; the charts are real PNGs."""
    markdown = (out / "report.md").read_text()
    for placeholder in ("nan", "None", "TODO", "not run", "{", "}"):
        assert placeholder not in markdown, f"report.md holds {placeholder!r}"
    for heading in SECTIONS:
        text = section(markdown, heading)
        if heading != SECTIONS[-1]:
            table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
            assert len(table) >= 2, f"{heading}: no table"
            bare = [row for row in table[1:] if not re.search(r"\d", row) and "a block device" not in row]
            assert not bare, f"{heading}: rows without figures: {bare}"
            advice = [line for line in text.splitlines() if line.startswith("- ")]
            assert advice and all(re.search(r"\d", a) for a in advice), f"{heading}: no advice with figures"
        assert re.search(r"\d", text)
    for chart in CHARTS:
        data = (out / chart).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, chart
        assert f"]({chart})" in markdown
    assert sorted(res["charts"]) == sorted(CHARTS)
    assert set(res["advice"]) == {"fio", "first_write", "page_cache", "fragmentation", "space", "snapshots"}


def check_pool_figures(res: dict) -> None:
    rows = {(r["step"], r["target"]): r["median"] for r in res["fio"]["rows"]}
    for step in STEPS:
        for target in ("loop", "direct"):
            med = rows[step, target]
            assert med["mb_s"] > 0 and med["iops"] > 0 and med["p99_us"] > 0, (step, target, med)
    size = res["config"]["size"]
    cache = res["page_cache"]
    for target in ("loop", "direct"):
        assert cache[target]["read_bytes"] == size
        assert cache[target]["volume_bytes"] >= size // 2, cache[target]  # the volume's own pages
    # Double caching: loop mode's data file holds the volume's data a second time; direct mode's none.
    assert cache["loop"]["lower_bytes"] >= size // 2, cache["loop"]
    assert cache["direct"]["lower_bytes"] <= cache["loop"]["lower_bytes"] // 10, cache
    space = res["space"]
    for target in ("loop", "direct"):
        s = space[target]
        assert s["mode"] == target
        assert s["volume_sizes"] > s["data_size"]  # the `promise` volume: thin provisioning
        assert s["data_used"] >= 2 * size  # the seq and rand volumes, written in full
    # Direct mode reserves its data space on the host; loop mode holds only what was written.
    assert space["direct"]["host_allocated"] >= space["direct"]["data_size"]
    assert space["loop"]["host_allocated"] < space["loop"]["data_size"]
    probe = space["probe"]
    assert probe["data_size"] > probe["host_free"]
    assert probe["loop"]["made"] and probe["loop"]["host_allocated"] < 64 * MiB
    assert not probe["direct"]["made"] and "does not fit" in probe["direct"]["message"]
    for target in ("loop", "direct"):
        sn = res["snapshots"][target]
        assert len(sn["create_s"]) == len(sn["remove_s"]) == sn["count"] > 0
        assert all(0 < t < 30 for t in sn["create_s"] + sn["remove_s"])
    frag = res["fragmentation"]["loop"]
    assert list(frag["after_random_writes"].values())[0] >= 1 and list(frag["at_end"].values())[0] >= 1


def test_smoke_report(tmp_path):
    res, out = compare_modes(tmp_path)
    assert [t["key"] for t in res["targets"]] == ["loop", "direct"]
    check_report(out, res)
    check_pool_figures(res)
    assert res["fragmentation"]["direct"]["at_end"]  # a preallocated file has extents too


def test_interrupt_unmounts_and_cleans_up(tmp_path):
    """Ctrl-C once both pools are mounted: no report, nothing mounted, no temporary files."""
    work, out = tmp_path / "work", tmp_path / "report"
    work.mkdir()
    proc = subprocess.Popen([*TOOL, "--smoke", "--out", str(out), "--dir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        progress = []
        for line in proc.stderr:
            progress.append(line)
            if "repeat 1 of" in line:  # both pools are mounted now
                assert len(mounts_under(work)) == 2, progress
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
        left = mounts_under(work)
        for point in reversed(left):
            lazy_unmount(point)
    assert proc.returncode == 130, "".join(progress) + rest
    assert "interrupted: cleaning up" in rest
    assert not left and os.listdir(work) == [] and not out.exists()


@pytest.mark.parametrize("spec, message", [
    ("k=PLAIN_FILE", "is not a block device"),
    ("k=/nonexistent/device", "No such file or directory"),
    ("/dev/null", "expected LABEL=PATH"),
    ("loop=/dev/null", "not 'loop' or 'direct'"),
])
def test_kernel_device_bad_input(tmp_path, spec, message):
    """One line on stderr, exit status 2, nothing made."""
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(MiB))
    out = tmp_path / "report"
    spec = spec.replace("PLAIN_FILE", str(plain))
    proc = subprocess.run([*TOOL, "--smoke", "--out", str(out), "--kernel-device", spec],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compare-modes: ") and message in lines[0], proc.stderr
    assert not out.exists()


@pytest.fixture
def loop_devices(tmp_path):
    """make(name, size) -> a loop device over a sparse file (root only); all detached at teardown."""
    if os.getuid() != 0:
        pytest.fail("loop devices need root (run the root-marked tests as root)")
    devices = []

    def make(name: str, size: int) -> str:
        image = tmp_path / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        dev = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                             check=True).stdout.strip()
        devices.append(dev)
        return dev

    yield make
    for dev in devices:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


@pytest.mark.root
def test_kernel_device_and_data_device(tmp_path, loop_devices):
    """--kernel-device on a loop device (what loop-lvm sits on) and the direct pool on --data-device."""
    kernel, data = loop_devices("kernel", 64 * MiB), loop_devices("data", 64 * MiB)
    res, out = compare_modes(tmp_path, "--kernel-device", f"loopdev={kernel}", "--data-device", data)
    check_report(out, res)
    check_pool_figures(res)
    assert [t["key"] for t in res["targets"]] == ["loop", "direct", "loopdev"]
    rows = {(r["step"], r["target"]) for r in res["fio"]["rows"]}
    assert all((step, "loopdev") in rows for step in STEPS)
    size = res["config"]["size"]
    cache = res["page_cache"]["loopdev"]
    # The loop device is buffered (no --direct-io): its backing file caches what was read.
    assert list(cache["lower"]) == [str(tmp_path / "kernel.img")] and cache["lower_bytes"] >= size // 2
    assert res["fragmentation"]["loopdev"]["at_end"][str(tmp_path / "kernel.img")] >= 1
    assert res["space"]["direct"]["data_device"] == data
    assert res["space"]["direct"]["host_allocated"] == 64 * MiB
    assert not res["fragmentation"]["direct"].get("at_end")  # a block device: no data file
    assert "Not measured on loopdev" in (out / "report.md").read_text()


# --- moving a pool between modes: the scripts of docs/loop-vs-direct.md ------------------------

def doc_script(name: str, tmp_path) -> Path:
    """The ```sh block that follows ``<!-- script: NAME -->`` in the document, saved as a file."""
    text = DOC.read_text()
    found = re.search(rf"<!-- script: {re.escape(name)} -->\n```sh\n(.*?)```", text, re.S)
    assert found, f"{DOC.name} has no script {name}"
    path = tmp_path / name
    path.write_text(found.group(1))
    return path


def run_script(script: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["sh", str(script), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, f"{script.name} failed: {proc.stderr[-3000:]}"
    assert proc.stdout.rstrip().endswith("clean"), proc.stdout[-500:]  # the script ends with a check
    return proc


def volumes(pool) -> dict[str, dict]:
    return {v["name"]: v for v in fusepool_json("list", pool)}


def contents(pool, make_mount, name: str) -> dict[str, bytes]:
    m = make_mount(pool, name=name)
    out = {v: read_all(m.vol(v)) for v in volumes(pool)}
    m.umount()
    return out


def pool_with_snapshots(make_pool, make_mount, *init) -> Path:
    """Volumes, snapshots (one of a snapshot, one grown), unmapped ranges, an origin grown later."""
    pool = make_pool("old", "--data-size", "64M", "--metadata-size", "16M", *init)
    m = make_mount(pool, name="mnt-old")
    rng = random.Random(9)

    def write(name: str, block: int, count: int) -> None:
        fd = os.open(m.vol(name), os.O_WRONLY)
        try:
            os.pwrite(fd, rng.randbytes(count * BS), block * BS)
        finally:
            os.close(fd)

    run_fusepool("create", pool, "base", "--size", "4M")
    write("base", 0, 20)
    write("base", 40, 3)
    run_fusepool("snapshot", pool, "base", "s1")
    write("s1", 2, 2)  # different
    write("s1", 50, 4)  # only in the snapshot
    run_fusepool("discard", pool, "s1", 10 * BS, 3 * BS)  # only in the origin
    write("base", 30, 2)  # the origin moves on
    run_fusepool("snapshot", pool, "s1", "s2")
    run_fusepool("resize", pool, "s2", "6M")
    write("s2", 90, 3)  # in the grown part
    run_fusepool("create", pool, "other", "--size", "2M")
    write("other", 5, 5)
    run_fusepool("create", pool, "big", "--size", "2M")
    write("big", 0, 4)
    run_fusepool("snapshot", pool, "big", "small")
    run_fusepool("resize", pool, "big", "3M")  # now larger than its snapshot: copied whole
    write("small", 1, 1)
    m.umount()
    return pool


def test_move_loop_to_direct_and_back(make_pool, make_mount, tmp_path):
    """move-to-direct.sh, then move-to-loop.sh: same volumes, same bytes, blocks still shared."""
    old = pool_with_snapshots(make_pool, make_mount)
    before, old_vols = contents(old, make_mount, "mnt-before"), volumes(old)
    direct = tmp_path / "direct"
    run_script(doc_script("move-to-direct.sh", tmp_path), old, direct)
    assert fusepool_json("info", direct)["mode"] == "direct"
    assert fusepool_json("info", direct)["preallocated"]
    new_vols = volumes(direct)
    assert contents(direct, make_mount, "mnt-direct") == before
    for name, v in old_vols.items():
        assert new_vols[name]["size"] == v["size"], name
        assert new_vols[name]["mapped_blocks"] == v["mapped_blocks"], name
    # Snapshots made again share their origin's blocks: no more data than the old pool holds.
    assert new_vols["s1"]["shared_blocks"] == old_vols["s1"]["shared_blocks"] > 0
    assert (new_vols["s1"]["origin"], new_vols["s2"]["origin"]) == ("base", "s1")
    assert fusepool_json("info", direct)["data_space_used"] <= fusepool_json("info", old)["data_space_used"] \
        + 2 * BS * 2  # "small" no longer shares with "big" (copied whole)
    assert not list(tmp_path.glob("direct.*")), "the script left files beside the pool"

    back = tmp_path / "back"
    run_script(doc_script("move-to-loop.sh", tmp_path), direct, back)
    info = fusepool_json("info", back)
    assert info["mode"] == "loop"
    assert contents(back, make_mount, "mnt-back") == before
    assert volumes(back)["s1"]["shared_blocks"] == old_vols["s1"]["shared_blocks"]
    # The preallocated file's unused space went back to the host (fallocate --dig-holes).
    assert (back / "data").stat().st_blocks * 512 < info["data_space_total"] // 4
    assert not list(tmp_path.glob("back.*"))


@pytest.mark.root
def test_move_device_pool_to_loop(make_pool, make_mount, loop_devices, tmp_path):
    """move-to-loop.sh from a pool on a block device (restore takes a file: the script copies it)."""
    device = loop_devices("data", 64 * MiB)
    old = pool_with_snapshots(make_pool, make_mount, "--data-device", device)
    before = contents(old, make_mount, "mnt-before")
    back = tmp_path / "back"
    run_script(doc_script("move-to-loop.sh", tmp_path), old, back)
    assert fusepool_json("info", back)["mode"] == "loop"
    assert contents(back, make_mount, "mnt-back") == before
