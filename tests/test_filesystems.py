"""Real filesystems and tools on thin volumes: mkfs.ext4/e2fsck/debugfs, mkfs.xfs/xfs_repair,
losetup + mount (root), and fio with verification.

The volumes are files in a fusepool mount served by a daemon subprocess; the
tools open them like any image file.  Snapshots are taken online with the CLI
and must be consistent, independent filesystems afterwards.
"""

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from conftest import require, run_fusepool

MiB = 1 << 20
POOL = ("--data-size", "256M", "--metadata-size", "16M")


def run(*cmd, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def make_tree(root: Path, rng: random.Random, count: int = 300) -> dict[str, bytes]:
    """A directory of ``count`` files of random content (some empty, a few in a
    subdirectory); returns {relative path: content}."""
    files = {}
    (root / "sub").mkdir(parents=True)
    for i in range(count):
        rel = f"sub/s{i:03d}" if i % 25 == 0 else f"f{i:03d}"
        data = rng.randbytes(rng.choice([0, 1, 100, 1000, 4096, 5000, 12000, 70000]))
        (root / rel).write_bytes(data)
        files[rel] = data
    return files


def e2fsck_clean(image) -> None:
    """``e2fsck -fn``: exit 0 means no errors were found (nothing is changed)."""
    run("e2fsck", "-fn", image)


def debugfs(image, request: str, write: bool = False) -> str:
    return run("debugfs", *(["-w"] if write else []), "-R", request, image).stdout


def debugfs_cat(image, path: str) -> bytes:
    proc = subprocess.run(["debugfs", "-R", f"cat /{path}", str(image)], capture_output=True,
                          timeout=60, check=True)
    return proc.stdout


def ext4_names(image, directory: str = "/") -> set[str]:
    """Entry names of a directory, from ``debugfs ls -p`` (/ino/mode/uid/gid/name/size/)."""
    names = set()
    for line in debugfs(image, f"ls -p {directory}").splitlines():
        parts = line.split("/")
        if len(parts) >= 7 and parts[5] not in (".", ".."):
            names.add(parts[5])
    return names


def tree_names(files: dict[str, bytes]) -> tuple[set[str], set[str]]:
    top = {rel for rel in files if "/" not in rel} | {"sub", "lost+found"}
    sub = {rel.split("/", 1)[1] for rel in files if rel.startswith("sub/")}
    return top, sub


# --- ext4 --------------------------------------------------------------------------------

def test_ext4_populated_snapshot_then_change_origin(make_pool, make_mount, tmp_path):
    require("mkfs.ext4", "e2fsck", "debugfs")
    rng = random.Random(21)
    pool = make_pool("p", *POOL)
    m = make_mount(pool)
    src = tmp_path / "src"
    files = make_tree(src, rng)
    run_fusepool("create", pool, "fs", "--size", "64M")
    origin, snap = m.vol("fs"), m.vol("snap")
    run("mkfs.ext4", "-q", "-F", "-d", src, origin)
    e2fsck_clean(origin)
    run_fusepool("snapshot", pool, "fs", "snap")  # online, while nothing has it open

    # Change the origin: a new file in, an old file out, one rewritten.
    new_content = rng.randbytes(200_000)
    (tmp_path / "newfile").write_bytes(new_content)
    debugfs(origin, f"write {tmp_path / 'newfile'} newfile", write=True)
    debugfs(origin, "rm f007", write=True)
    debugfs(origin, "rm sub/s050", write=True)

    for image in (origin, snap):
        e2fsck_clean(image)
    top, sub = tree_names(files)
    assert ext4_names(snap) == top  # the snapshot keeps the original file set
    assert ext4_names(snap, "/sub") == sub
    assert ext4_names(origin) == (top - {"f007"}) | {"newfile"}
    assert ext4_names(origin, "/sub") == sub - {"s050"}
    for rel in ("f001", "f007", "f299", "sub/s050", "sub/s275"):
        assert debugfs_cat(snap, rel) == files[rel], rel
    assert debugfs_cat(origin, "newfile") == new_content
    assert debugfs_cat(origin, "f001") == files["f001"]

    # Cold caches: the same after a remount.
    m.umount()
    m.mount()
    e2fsck_clean(snap)
    assert debugfs_cat(snap, "f007") == files["f007"]


# --- XFS -----------------------------------------------------------------------------------

def _xfs_names(image, directory: str = "/") -> set[str]:
    out = run("xfs_db", "-r", "-c", f"ls {directory}", image).stdout
    names = set()
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 7 and parts[-2] not in (".", ".."):
            names.add(parts[-2])
    return names


def _protofile(path: Path, files: dict[str, Path]) -> None:
    """mkfs.xfs -p format: a flat root with the given files."""
    lines = ["/dummy", "0 0", "d--755 0 0"]
    lines += [f"{name} ---644 0 0 {src}" for name, src in files.items()]
    lines += ["$", ""]
    path.write_text("\n".join(lines))


def test_xfs_snapshot_then_reformat_origin(make_pool, make_mount, tmp_path):
    require("mkfs.xfs", "xfs_repair", "xfs_db")
    rng = random.Random(22)
    pool = make_pool("p", *POOL)
    m = make_mount(pool)
    run_fusepool("create", pool, "x", "--size", "512M")  # XFS needs >= 300 MiB; thin costs little
    origin, snap = m.vol("x"), m.vol("xsnap")
    hostdir = tmp_path / "files"
    hostdir.mkdir()
    first, second = {}, {}
    for i in range(40):
        p = hostdir / f"a{i}"
        p.write_bytes(rng.randbytes(rng.randint(0, 50_000)))
        first[f"a{i}"] = p
    for i in range(15):
        p = hostdir / f"b{i}"
        p.write_bytes(rng.randbytes(rng.randint(0, 50_000)))
        second[f"b{i}"] = p
    _protofile(tmp_path / "proto1", first)
    _protofile(tmp_path / "proto2", second)
    run("mkfs.xfs", "-q", "-f", "-p", tmp_path / "proto1", origin)
    run("xfs_repair", "-n", origin)
    run_fusepool("snapshot", pool, "x", "xsnap")
    # A different filesystem on the origin (new UUID, new file set).
    run("mkfs.xfs", "-q", "-f", "-p", tmp_path / "proto2", origin)
    for image in (origin, snap):
        run("xfs_repair", "-n", image)
    assert _xfs_names(snap) == set(first)
    assert _xfs_names(origin) == set(second)
    uuids = {run("xfs_db", "-r", "-c", "uuid", img).stdout for img in (origin, snap)}
    assert len(uuids) == 2


# --- a kernel filesystem on a loop device over a volume -----------------------------------------

@pytest.mark.root  # (losetup, mount)
def test_loop_mounted_ext4_then_snapshot(make_pool, make_mount, tmp_path):
    require("losetup", "mkfs.ext4", "e2fsck")
    rng = random.Random(23)
    pool = make_pool("p", *POOL)
    m = make_mount(pool)
    run_fusepool("create", pool, "lv", "--size", "64M")
    origin, snap = m.vol("lv"), m.vol("lvsnap")
    run("mkfs.ext4", "-q", "-F", origin)
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    files = {f"file{i}": rng.randbytes(rng.randint(1, 300_000)) for i in range(30)}
    files["big"] = rng.randbytes(8 * MiB)
    loop = run("losetup", "--find", "--show", origin).stdout.strip()
    mounted = False
    try:
        run("mount", "-t", "ext4", loop, fsdir)
        mounted = True
        for name, data in files.items():
            (fsdir / name).write_bytes(data)
        run("sync", "-f", fsdir)
        os.unlink(fsdir / "file3")
        del files["file3"]
        run("umount", fsdir)
        mounted = False
    finally:
        if mounted:
            run("umount", "-l", fsdir, check=False)
        run("losetup", "-d", loop, check=False)
    run_fusepool("snapshot", pool, "lv", "lvsnap")
    e2fsck_clean(origin)
    e2fsck_clean(snap)
    assert ext4_names(snap) == set(files) | {"lost+found"}
    for name in ("file0", "file29", "big"):
        assert debugfs_cat(snap, name) == files[name], name
    # The snapshot is a filesystem of its own: change it, the origin stays as it was.
    debugfs(snap, "rm big", write=True)
    e2fsck_clean(snap)
    e2fsck_clean(origin)
    assert "big" in ext4_names(origin)
    assert debugfs_cat(origin, "big") == files["big"]


# --- fio ---------------------------------------------------------------------------------------

def test_fio_randwrite_verify(make_pool, make_mount, tmp_path):
    require("fio")
    pool = make_pool("p", *POOL)
    m = make_mount(pool)
    run_fusepool("create", pool, "f", "--size", "32M")
    run_fusepool("snapshot", pool, "f", "fsnap")  # so early writes also break sharing
    jobs = [
        ("4k", ["--bs=4k"]),
        ("mixed", ["--bsrange=512-192k", "--offset=1234k"]),  # partial, multi-block writes
    ]
    for name, extra in jobs:
        proc = run("fio", f"--name={name}", f"--filename={m.vol('f')}", "--size=8M",
                   "--ioengine=psync", "--rw=randwrite", "--verify=crc32c", "--do_verify=1",
                   "--verify_fatal=1", "--fallocate=none", "--end_fsync=1",
                   "--verify_state_save=0", "--output-format=json", *extra,
                   check=False, cwd=tmp_path)  # (fio drops state files in its cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout[proc.stdout.index("{"):])
        job = result["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["io_bytes"] >= 8 * MiB
        assert job["read"]["io_bytes"] >= 8 * MiB  # the verification pass read it all back
    # The snapshot taken before fio still reads as zeros.
    with open(m.vol("fsnap"), "rb") as f:
        assert f.read(4 * MiB) == bytes(4 * MiB)
