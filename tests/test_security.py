"""Hardening (issue #10, DESIGN.md 4 "A pool belongs to its owner"): nobody else gets in.

Each test is an attack or a careless setting that worked before: files of a pool
readable or writable by others under a loose umask, a low-water hook taken from a
pool.json another user wrote, volumes of an ``--allow-other`` mount readable by
everyone, outputs (``dump -o``, ``export``) that follow a planted symlink or
overwrite the pool's own files, inputs (``import``, ``restore --data``) read from
the pool being written.  docs/reliability.md "Security model" lists them.
"""

import hashlib
import logging
import os
import random
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import SMALL_POOL, fusepool_json, host_root, read_all, require, run_fusepool, write_fully

from fusepool.engine import Pool

KiB, MiB = 1 << 10, 1 << 20
NOBODY = 65534  # another user: the tests run as root and hand files to this uid
INIT_FILES = ("data", "metadata", "journal", "pool.json")
POOL_FILES = INIT_FILES + ("lock",)  # the lock file is made by the first open


# --- helpers ------------------------------------------------------------------------------

@pytest.fixture
def umask_000():
    """Run the test (and the commands it starts) under umask 000, as a careless shell would."""
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def modes(pool) -> dict:
    return {p.name: oct(mode(p)) for p in Path(pool).iterdir()} | {".": oct(mode(pool))}


def assert_owner_only(pool, names=INIT_FILES) -> None:
    found = modes(pool)
    assert found["."] == oct(0o700), found
    for name in names:
        assert found.get(name) == oct(0o600), f"{name}: {found}"
    loose = {k: v for k, v in found.items() if int(v, 8) & 0o077}
    assert not loose, f"group/other bits left on {loose}"


def one_line_error(proc, status: int = 1) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("fusepool: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def pool_digests(pool) -> dict:
    return {name: digest(Path(pool) / name) for name in ("data", "metadata", "journal", "pool.json")
            if (Path(pool) / name).exists()}


def pool_log(pool) -> str:
    path = Path(pool) / "fusepool.log"
    return path.read_text() if path.exists() else ""


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def populated_pool(make_pool):
    pool = make_pool("p")
    run_fusepool("create", pool, "v", "--size", "4M")
    return pool


def write_offline(pool, name: str, data: bytes) -> None:
    with Pool.open(str(pool)) as p:
        p.write(p.volume(name).dev_id, 0, data)


# --- 1. file modes ------------------------------------------------------------------------

def test_pool_files_are_owner_only_whatever_the_umask(umask_000, make_pool, make_mount):
    """init, mount (log, lock, journal), set (pool.json rewritten) under umask 000: all owner-only."""
    pool = make_pool("p")
    assert_owner_only(pool)
    m = make_mount(pool)
    run_fusepool("create", pool, "v", "--size", "4M")
    write_fully(m.vol("v"), 0, b"x" * 70000)  # the fsync appends to the journal
    run_fusepool("set", pool, "--low-water-mark", "3")  # pool.json rewritten by the daemon
    assert_owner_only(pool, POOL_FILES + ("fusepool.log",))
    m.umount()
    assert_owner_only(pool, POOL_FILES + ("fusepool.log",))


def test_library_makes_owner_only_pools_whatever_the_umask(umask_000, tmp_path):
    """The library sets every mode itself (the CLI's umask 077 is only a second line of defence)."""
    path = str(tmp_path / "lib")
    Pool.create(path, data_size=8 * MiB, metadata_size=16 * MiB, min_free_space=0.0)
    with Pool.open(path) as p:
        p.configure(low_water_mark=2)  # pool.json rewritten
        dev = p.create_volume("v", MiB)
        p.write(dev.dev_id, 0, b"x" * 70000)
        p.sync()
    assert_owner_only(path, POOL_FILES)


def test_init_into_an_existing_open_directory_makes_it_0700(umask_000, tmp_path):
    pool = tmp_path / "open"
    pool.mkdir()
    os.chmod(pool, 0o777)
    run_fusepool("init", pool, *SMALL_POOL)
    assert_owner_only(pool)


def test_preallocated_pool_is_owner_only(umask_000, tmp_path):
    pool = tmp_path / "pre"
    run_fusepool("init", pool, "--data-size", "8M", "--metadata-size", "16M", "--preallocate")
    assert_owner_only(pool)


def test_restored_and_imported_pools_are_owner_only(umask_000, make_pool, tmp_path):
    pool = populated_pool(make_pool)
    run_fusepool("dump", pool, "-o", tmp_path / "d.xml", "--names", tmp_path / "n.json")
    for out in ("d.xml", "n.json"):
        assert mode(tmp_path / out) == 0o600
    restored = tmp_path / "restored"
    run_fusepool("restore", restored, "-i", tmp_path / "d.xml", "--data", pool / "data",
                 "--names", tmp_path / "n.json")
    assert_owner_only(restored, ("data", "metadata", "pool.json"))
    require("thin_restore", "thin_dump")
    from test_interop import make_docker_dir

    docker = tmp_path / "docker"
    make_docker_dir(docker, tmp_path)
    imported = tmp_path / "from-docker"
    run_fusepool("import-docker", docker, imported)
    assert_owner_only(imported, ("data", "metadata", "pool.json"))


def test_open_tightens_an_old_pool_and_says_so(make_pool, caplog):
    """A pool made before this rule (or chmodded by hand): opening it makes it owner-only again."""
    pool = make_pool("p")
    run_fusepool("list", pool)  # makes the lock file
    os.chmod(pool, 0o755)
    for name in POOL_FILES:
        os.chmod(pool / name, 0o666)
    with caplog.at_level(logging.INFO, logger="fusepool"), Pool.open(str(pool)):
        pass
    assert_owner_only(pool, POOL_FILES)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "owner-only" in said and "pool.json" in said


# --- 2. the low-water hook runs only from the user's own pool.json ----------------------------

LOW_WATER = ["--data-size", "16M", "--metadata-size", "16M", "--min-free-space", "0%",
             "--low-water-mark", "64"]


@pytest.mark.root  # (to give a file to another user)
def test_low_water_hook_from_another_users_pool_json_is_refused(make_pool, make_mount, tmp_path):
    """root mounts a pool whose pool.json another user owns: that user's command must not run as root."""
    marker = tmp_path / "marker"
    pool = make_pool("p", *LOW_WATER, "--on-low-water", f"touch {marker}")
    os.chown(pool / "pool.json", NOBODY, NOBODY)
    m = make_mount(pool)
    run_fusepool("create", pool, "v", "--size", "32M")
    write_fully(m.vol("v"), 0, random.randbytes(14 * MiB))  # 224 of 256 blocks: below the mark
    wait_for(lambda: "below the low-water mark" in pool_log(pool), 10, "the low-water event")
    wait_for(lambda: "not running the low-water hook" in pool_log(pool), 10, "the refusal")
    time.sleep(0.5)
    assert not marker.exists(), "the hook of another user's pool.json ran"
    log = pool_log(pool)
    assert "ERROR" in log and f"owned by uid {NOBODY}" in log


def test_low_water_hook_from_a_loose_pool_json_is_refused(make_pool, tmp_path):
    """A group/other-writable pool.json (anyone could have set the command) never runs its hook,
    not even after opening the pool made the file owner-only.  Offline: `fusepool import`."""
    marker = tmp_path / "marker"
    pool = make_pool("p", *LOW_WATER, "--on-low-water", f"touch {marker}")
    os.chmod(pool / "pool.json", 0o666)
    image = tmp_path / "image"
    image.write_bytes(random.randbytes(14 * MiB))
    proc = run_fusepool("import", pool, "v", image)
    assert "below the low-water mark" in proc.stderr
    assert "not running the low-water hook" in proc.stderr and "writable by others" in proc.stderr
    time.sleep(0.5)
    assert not marker.exists()
    assert mode(pool / "pool.json") == 0o600


def test_low_water_hook_of_the_users_own_pool_still_runs(make_pool, tmp_path):
    """The control for the two tests above: the same pool, owned and tight, runs its hook."""
    marker = tmp_path / "marker"
    pool = make_pool("p", *LOW_WATER, "--on-low-water", f"touch {marker}")
    image = tmp_path / "image"
    image.write_bytes(random.randbytes(14 * MiB))
    run_fusepool("import", pool, "v", image)
    wait_for(marker.exists, 10, "the hook")


# --- 3. --allow-other: volumes have an owner-settable mode --------------------------------------

@pytest.fixture
def other_user():
    """(run-as-the-test-user function, a world-traversable directory for mountpoints)."""
    if not host_root():  # (its tests are root-marked; this says why, wherever it is used)
        pytest.skip("needs host root to act as another user")
    require("runuser", "useradd")
    from test_nonroot import ensure_user

    pw = ensure_user()
    base = Path(tempfile.mkdtemp(prefix="fusepool-sec-", dir="/tmp"))
    os.chmod(base, 0o755)

    def run(*cmd):
        return subprocess.run(["runuser", "-u", pw.pw_name, "--", *map(str, cmd)], capture_output=True,
                              text=True, timeout=30, cwd="/", stdin=subprocess.DEVNULL)

    yield run, base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.root
def test_allow_other_volume_modes(other_user, make_pool, make_mount):
    as_user, base = other_user
    pool = make_pool("p")
    m = make_mount(pool, "--allow-other", name=str(base / "mnt"))
    run_fusepool("create", pool, "v", "--size", "1M")
    write_fully(m.vol("v"), 0, b"secret")
    assert mode(m.vol("v")) == 0o600
    proc = as_user("head", "-c", "6", m.vol("v"))
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
    os.chmod(m.vol("v"), 0o644)
    assert mode(m.vol("v")) == 0o644
    proc = as_user("head", "-c", "6", m.vol("v"))
    assert proc.returncode == 0 and proc.stdout == "secret", proc
    proc = as_user("dd", "if=/dev/zero", f"of={m.vol('v')}", "bs=1", "count=1", "conv=notrunc")
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
    assert read_all(m.vol("v"), 0, 6) == b"secret"
    proc = as_user("touch", m.vol("mine"))  # the mount root is the owner's (0755)
    assert proc.returncode != 0 and not m.vol("mine").exists()
    with pytest.raises(PermissionError):
        os.chown(m.vol("v"), NOBODY, NOBODY)

    # Made in the mount: the creator's mode & ~umask.  By fusepool: 0600.  A snapshot: its origin's.
    old = os.umask(0o027)
    try:
        os.close(os.open(m.vol("made"), os.O_CREAT | os.O_WRONLY, 0o666))
    finally:
        os.umask(old)
    assert mode(m.vol("made")) == 0o640
    run_fusepool("snapshot", pool, "v", "snap")
    assert mode(m.vol("snap")) == 0o644
    run_fusepool("create", pool, "w", "--size", "1M")
    assert mode(m.vol("w")) == 0o600

    m.umount()
    m.mount()
    assert {n: mode(m.vol(n)) for n in ("v", "made", "snap", "w")} == {
        "v": 0o644, "made": 0o640, "snap": 0o644, "w": 0o600}
    assert as_user("head", "-c", "6", m.vol("v")).stdout == "secret"
    assert as_user("head", "-c", "6", m.vol("w")).returncode != 0
    os.chmod(m.vol("v"), 0o600)
    assert as_user("head", "-c", "6", m.vol("v")).returncode != 0
    assert run_fusepool("check", pool).returncode == 0


# --- 4. outputs never follow a symlink --------------------------------------------------------

@pytest.fixture
def planted(tmp_path):
    """A sticky world-writable directory holding another user's file and symlinks to it."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    victim = sticky / "victim"
    victim.write_text("theirs\n")
    os.chown(victim, NOBODY, NOBODY)
    for name in ("out", "names"):
        os.symlink(victim, sticky / name)
    os.symlink(sticky / "not-yet", sticky / "dangling")  # would create a file where they choose
    return sticky, victim


@pytest.mark.root  # (to give a file to another user)
@pytest.mark.parametrize("online", [False, True])
def test_outputs_refuse_a_symlink(planted, make_pool, make_mount, online):
    sticky, victim = planted
    pool = populated_pool(make_pool)
    if online:
        make_mount(pool)
    before = pool_digests(pool)
    for args in (["dump", pool, "-o", sticky / "out"], ["dump", pool, "--names", sticky / "names"],
                 ["dump", pool, "-o", sticky / "dangling"], ["export", pool, "v", sticky / "out"],
                 ["export", pool, "v", sticky / "dangling", "--sparse"]):
        line = one_line_error(run_fusepool(*args, check=False))
        assert "symlink" in line, line
    assert victim.read_text() == "theirs\n" and os.stat(victim).st_uid == NOBODY
    assert not (sticky / "not-yet").exists()
    assert [v["name"] for v in fusepool_json("list", pool)] == ["v"]  # no temporary snapshot left
    if not online:
        assert pool_digests(pool) == before


def test_outputs_are_0600_and_an_existing_file_is_overwritten(umask_000, make_pool, tmp_path):
    pool = populated_pool(make_pool)
    write_offline(pool, "v", b"volume data")
    run_fusepool("export", pool, "v", tmp_path / "img")
    run_fusepool("dump", pool, "-o", tmp_path / "x.xml", "--names", tmp_path / "n.json")
    for name in ("img", "x.xml", "n.json"):
        assert mode(tmp_path / name) == 0o600, name
    old = tmp_path / "old.img"
    old.write_bytes(b"z" * (8 * MiB))
    os.chmod(old, 0o644)
    run_fusepool("export", pool, "v", old)
    data = old.read_bytes()
    assert len(data) == 4 * MiB and data.startswith(b"volume data") and mode(old) == 0o600


# --- 5. outputs never overwrite the pool's files; inputs are not the pool's ----------------------

def targets_in_pool(pool, tmp_path) -> list:
    """Paths that are, or resolve to, files of ``pool`` (or a new file inside it)."""
    os.symlink(pool, tmp_path / "pool-link")
    os.link(pool / "metadata", tmp_path / "metadata-hardlink")
    return [pool / "metadata", pool / "data", pool / "journal", pool / "pool.json", pool / "lock",
            pool / "new-file", tmp_path / "pool-link" / "metadata", tmp_path / "pool-link" / "fresh",
            Path(f"{pool}/../{pool.name}/data"), tmp_path / "metadata-hardlink"]


@pytest.mark.parametrize("online", [False, True])
def test_outputs_refuse_files_of_the_pool(make_pool, make_mount, tmp_path, online):
    pool = populated_pool(make_pool)
    write_offline(pool, "v", b"volume data")
    if online:
        make_mount(pool)
    before = pool_digests(pool)
    entries = sorted(os.listdir(pool))
    for target in targets_in_pool(pool, tmp_path):
        for args in (["export", pool, "v", target], ["dump", pool, "-o", target],
                     ["dump", pool, "--names", target]):
            line = one_line_error(run_fusepool(*args, check=False))
            assert "pool" in line, line
    assert pool_digests(pool) == before
    assert sorted(os.listdir(pool)) == entries
    assert [v["name"] for v in fusepool_json("list", pool)] == ["v"]
    assert run_fusepool("check", pool).returncode == 0


@pytest.mark.root
def test_export_refuses_the_data_device_of_a_direct_pool(tmp_path):
    require("losetup")
    image = tmp_path / "device.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        pool = tmp_path / "direct"
        run_fusepool("init", pool, "--data-device", dev, "--metadata-size", "16M",
                     "--min-free-space", "0%")
        run_fusepool("create", pool, "v", "--size", "1M")
        other_node = tmp_path / "same-device"  # another name for the same block device
        st = os.stat(dev)
        os.mknod(other_node, stat.S_IFBLK | 0o600, st.st_rdev)
        before = digest(image)
        for target in (dev, other_node):
            line = one_line_error(run_fusepool("export", pool, "v", target, check=False))
            assert "data device" in line, line
        assert digest(image) == before
        assert run_fusepool("check", pool).returncode == 0
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def test_import_refuses_files_of_the_pool(make_pool, make_mount, tmp_path):
    pool = populated_pool(make_pool)
    before = pool_digests(pool)
    for source in (pool / "data", pool / "metadata", tmp_path / "pool-link" / "data"):
        if not (tmp_path / "pool-link").exists():
            os.symlink(pool, tmp_path / "pool-link")
        line = one_line_error(run_fusepool("import", pool, "copy", source, check=False))
        assert "pool" in line, line
    assert pool_digests(pool) == before
    m = make_mount(pool)
    write_fully(m.vol("v"), 0, b"through the mount")
    line = one_line_error(run_fusepool("import", pool, "copy", m.vol("v"), check=False))
    assert "snapshot" in line, line
    assert [v["name"] for v in fusepool_json("list", pool)] == ["v"]


def test_restore_refuses_data_inside_the_destination(make_pool, tmp_path):
    """restore --data must not name a file of the pool being made (a data file read while it is
    written).  The destination must be empty, so this is reached only through a link to it."""
    pool = populated_pool(make_pool)
    run_fusepool("dump", pool, "-o", tmp_path / "d.xml")
    dest = tmp_path / "dest"
    dest.mkdir()
    line = one_line_error(run_fusepool("restore", dest, "-i", tmp_path / "d.xml", "--data", dest,
                                       check=False))
    assert "destination" in line, line
    assert os.listdir(dest) == []
