"""Mounting as an ordinary user through fusermount3: what unprivileged CI containers need.

Root only sets the stage: a system user ``fusepool-test``, ``/dev/fuse`` usable by
others (mode 0666, as distributions ship it; changed only if it is not, and then
restored), and a
world-readable copy of the code (the venv's interpreter may live under /root,
which other users cannot enter), run with Debian's ``/usr/bin/python3`` (same
minor version, so the same ABI for pyfuse3's and xxhash's extension modules).
Everything after that -- init, mount, I/O through the mount, snapshot, umount,
remount -- runs as that user.
"""

import contextlib
import hashlib
import json
import os
import pwd
import random
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import is_mounted, require

import fusepool

USER = "fusepool-test"
SYSTEM_PYTHON = "/usr/bin/python3"
ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = pytest.mark.root


def ensure_user() -> pwd.struct_passwd:
    """Create the unprivileged user once; reuse it afterwards (or if a parallel run made it)."""
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    proc = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                           "--home-dir", "/nonexistent", USER], capture_output=True, text=True)
    if proc.returncode not in (0, 9):  # 9: the user exists already
        pytest.fail(f"useradd {USER} failed ({proc.returncode}): {proc.stderr.strip()}")
    return pwd.getpwnam(USER)


def copy_code(dest: Path) -> Path:
    """A world-readable copy of the venv's site-packages plus the fusepool source."""
    site = Path(sysconfig.get_path("purelib"))
    # Editable-install hooks would point back into the source tree; the copy replaces them.
    shutil.copytree(site, dest, symlinks=True,
                    ignore=shutil.ignore_patterns("*.pth", "__editable__*", "fusepool*"))
    shutil.copytree(Path(fusepool.__file__).parent, dest / "fusepool",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(dest)], check=True)
    return dest


def io(user, *args) -> subprocess.CompletedProcess:
    """Run IO_SCRIPT as ``user``: ``io(user, "write"|"read", path, offset, length, seed)``."""
    return user.python("-c", IO_SCRIPT, *args)


class User:
    """Runs commands as the test user, with the copied code on PYTHONPATH."""

    def __init__(self, pw: pwd.struct_passwd, pythonpath: Path, home: Path):
        self.pw = pw
        self.pythonpath = pythonpath
        self.env = ["env", "-i", f"PATH={ENV_PATH}", f"HOME={home}", f"USER={pw.pw_name}",
                    f"LOGNAME={pw.pw_name}", f"PYTHONPATH={pythonpath}", "PYTHONDONTWRITEBYTECODE=1",
                    "LANG=C.UTF-8"]
        self.home = home

    def run(self, *cmd, check=True, timeout=60) -> subprocess.CompletedProcess:
        proc = subprocess.run(["runuser", "-u", self.pw.pw_name, "--", *self.env, *map(str, cmd)],
                              capture_output=True, text=True, timeout=timeout, cwd=self.home,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"as {self.pw.pw_name}: {' '.join(map(str, cmd))} failed "
                                 f"({proc.returncode}): {proc.stderr!s}")
        return proc

    def python(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run(SYSTEM_PYTHON, *args, **kw)

    def fusepool(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.python("-m", "fusepool", *args, **kw)


# The user's side of the I/O: write a seeded pattern (and fsync), or print a digest of a range.
IO_SCRIPT = textwrap.dedent("""
    import hashlib, os, random, sys
    op, path = sys.argv[1], sys.argv[2]
    offset, length, seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    if op == "write":
        data = random.Random(seed).randbytes(length)
        fd = os.open(path, os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, offset) == length
            os.fsync(fd)
        finally:
            os.close(fd)
    with open(path, "rb") as f:
        f.seek(offset)
        print(hashlib.sha256(f.read(length)).hexdigest())
""")


def digest(seed: int, length: int) -> str:
    return hashlib.sha256(random.Random(seed).randbytes(length)).hexdigest()


def zeros_digest(length: int) -> str:
    return hashlib.sha256(bytes(length)).hexdigest()


def mount_line(mountpoint: Path) -> str | None:
    with open("/proc/mounts") as f:
        for line in f:
            if line.split()[1] == str(mountpoint):
                return line.strip()
    return None


def holder_pid(pool: Path) -> int | None:
    """The pid the pool's lock file names (the mount daemon while mounted)."""
    try:
        text = (pool / "lock").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def process_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def unprivileged_user():
    """(User, work dir owned by the user, cleanup state); undoes everything on leaving, even
    after a failure.  Needs host root (the module's ``root`` marker skips it otherwise)."""
    require("runuser", "useradd", "fusermount3", SYSTEM_PYTHON)
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing"
    tag = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.implementation.cache_tag)"],
                         capture_output=True, text=True).stdout.strip()
    if tag != sys.implementation.cache_tag:
        pytest.skip(f"{SYSTEM_PYTHON} is {tag}, not {sys.implementation.cache_tag}: the compiled "
                    "modules would not load")
    pw = ensure_user()
    base = Path(tempfile.mkdtemp(prefix="fusepool-nonroot-", dir="/tmp"))
    os.chmod(base, 0o755)
    work = base / "work"
    work.mkdir()
    os.chown(work, pw.pw_uid, pw.pw_gid)
    os.chmod(work, 0o700)
    fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    state = {"pools": [], "mounts": [], "base": base}
    try:
        code = copy_code(base / "python")
        if fuse_mode & 0o006 != 0o006:
            # Only when needed: distributions ship it 0666 already, and where it is not ours
            # to change (a user namespace, rootless podman) chmod would fail.
            os.chmod("/dev/fuse", fuse_mode | 0o006)
        user = User(pw, code, work)
        yield user, work, state
    finally:
        for mnt in state["mounts"]:
            if is_mounted(mnt):
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        for pool in state["pools"]:
            pid = holder_pid(pool)
            if pid and process_uid(pid) == pw.pw_uid:  # never anything but the user's daemon
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_gone(pid)
        if stat.S_IMODE(os.stat("/dev/fuse").st_mode) != fuse_mode:
            os.chmod("/dev/fuse", fuse_mode)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def unprivileged():
    with unprivileged_user() as setup:
        yield setup


def test_mount_as_unprivileged_user(unprivileged):
    user, work, state = unprivileged
    uid = user.pw.pw_uid
    pool, mnt = work / "pool", work / "mnt"
    state["pools"].append(pool)
    state["mounts"].append(mnt)

    # The code under test really is the copy, run by the system python, as the user.
    who = user.python("-c", "import os, sys, fusepool; print(os.getuid(), sys.executable, fusepool.__file__)")
    got_uid, exe, module = who.stdout.split()
    assert (int(got_uid), exe) == (uid, SYSTEM_PYTHON)
    assert module == str(user.pythonpath / "fusepool" / "__init__.py"), module

    user.fusepool("init", pool, "--data-size", "256M", "--metadata-size", "32M")
    user.run("mkdir", mnt)
    assert pool.stat().st_uid == uid and mnt.stat().st_uid == uid

    # mount (in the background) and check it is the user's FUSE mount, served by the user's daemon
    user.fusepool("mount", pool, mnt, timeout=60)
    line = mount_line(mnt)
    assert line is not None, "not in /proc/mounts"
    fstype, options = line.split()[2], line.split()[3].split(",")
    assert fstype.startswith("fuse"), line
    assert f"user_id={uid}" in options, line
    pid = holder_pid(pool)
    assert pid and process_uid(pid) == uid, f"daemon pid {pid} is not running as uid {uid}"

    # create a volume online and do I/O through the mount as the user
    user.fusepool("create", pool, "v", "--size", "16M")
    size = 3 << 20
    offset = 12345
    assert io(user, "write", mnt / "v", offset, size, 1).stdout.strip() == digest(1, size)
    assert io(user, "read", mnt / "v", 0, offset, 0).stdout.strip() == zeros_digest(offset)
    entries = [line.split() for line in user.run("ls", "-ln", mnt).stdout.splitlines()[1:]]
    assert [(e[2], e[-1]) for e in entries] == [(str(uid), "v")], entries
    vols = json.loads(user.fusepool("list", pool, "--json").stdout)
    assert [v["name"] for v in vols] == ["v"]
    assert vols[0]["mapped_blocks"] > 0

    # snapshot online, then diverge: the snapshot keeps the old bytes
    user.fusepool("snapshot", pool, "v", "snap")
    assert io(user, "write", mnt / "v", offset, size, 2).stdout.strip() == digest(2, size)
    assert io(user, "read", mnt / "snap", offset, size, 0).stdout.strip() == digest(1, size)

    # umount as the user: the mount goes away and the daemon exits
    user.fusepool("umount", mnt, timeout=90)
    assert not is_mounted(mnt)
    assert wait_gone(pid), f"daemon {pid} still running after umount"

    # offline, still as the user
    vols = {v["name"]: v for v in json.loads(user.fusepool("list", pool, "--json").stdout)}
    assert sorted(vols) == ["snap", "v"] and vols["snap"]["origin"] == "v"

    # remount and read everything back
    user.fusepool("mount", pool, mnt, timeout=60)
    assert f"user_id={uid}" in mount_line(mnt).split()[3].split(",")
    assert io(user, "read", mnt / "v", offset, size, 0).stdout.strip() == digest(2, size)
    assert io(user, "read", mnt / "snap", offset, size, 0).stdout.strip() == digest(1, size)
    assert io(user, "read", mnt / "v", 0, offset, 0).stdout.strip() == zeros_digest(offset)
    info = json.loads(user.fusepool("info", pool, "--json").stdout)
    assert info["mounted"] == str(mnt)
    assert info["volume_count"] == 2
    pid = holder_pid(pool)
    user.fusepool("umount", mnt, timeout=90)
    assert not is_mounted(mnt)
    assert wait_gone(pid)
    # every file of the pool belongs to the user
    assert {p.name: p.stat().st_uid for p in pool.iterdir()} == {p.name: uid for p in pool.iterdir()}
