"""fusepool where users really run it: user namespaces, containers, non-root users.

Each way a FUSE mount can be refused is made real here, not simulated: no
/dev/fuse (a private /dev in a user namespace, as a container started without
``--device /dev/fuse``), /dev/fuse not accessible (a 0600 node for a non-root
user), mount not permitted (root of a user namespace that does not own its mount
namespace: a container's root without CAP_SYS_ADMIN), fusermount3 missing (the
same, with fusermount3 hidden from /usr/bin).  Each must give one line naming
cause and fix, exit status 1, nothing mounted, the pool left unlocked.  And the
README session runs inside ``unshare -Urm`` as an unprivileged user.

Everything runs without host root except what needs another user
(``root``-marked: skipped with "needs host root" otherwise).
"""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_POOL, host_root, is_mounted, require, run_fusepool
from test_nonroot import holder_pid, unprivileged_user, wait_gone

FUSEPOOL = f"{sys.executable} -m fusepool"


def namespaced(unshare: list[str], script: str, *args, timeout=120) -> subprocess.CompletedProcess:
    """Run a bash ``script`` (``$1``...: ``args``; ``$FUSEPOOL``: the CLI) under ``unshare``."""
    require("unshare")
    env = dict(os.environ, FUSEPOOL=FUSEPOOL)
    return subprocess.run(["unshare", *unshare, "bash", "-euc", script, "bash", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def ns_pool(tmp_path):
    """(pool, mountpoint) for a daemon in a namespace; a daemon left running is killed at teardown
    (its mount lives in a namespace that dies with it)."""
    pool, mnt = tmp_path / "pool", tmp_path / "mnt"
    run_fusepool("init", pool, *SMALL_POOL)
    mnt.mkdir()
    yield pool, mnt
    pid = holder_pid(pool)
    if pid and pid != os.getpid():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid)


def assert_refused(proc: subprocess.CompletedProcess, pool: Path, mnt: Path, cause: str, fix: str,
                   libfuse_said: str) -> None:
    """One line naming cause and fix, status 1, libfuse's words in the log, nothing left behind."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"fusepool: error: cannot mount {mnt}: "), lines[0]
    assert cause in lines[0] and fix in lines[0], lines[0]
    log = (pool / "fusepool.log").read_text()
    assert "Traceback" not in log and "Traceback" not in proc.stderr, log
    assert libfuse_said in log, log
    assert lines[0].removeprefix("fusepool: error: ") in log  # the daemon logged it too
    assert not is_mounted(mnt)
    assert holder_pid(pool) is None or not os.path.exists(f"/proc/{holder_pid(pool)}")
    run_fusepool("list", pool)  # the pool is not locked: nothing was left running


# A private /dev with only null/zero/urandom: what a container started without --device /dev/fuse has.
NO_DEV_FUSE = """
    dev=$(mktemp -d)
    mount -t tmpfs -o mode=755 none "$dev"
    for n in null zero urandom; do touch "$dev/$n"; mount --bind "/dev/$n" "$dev/$n"; done
    mount --bind "$dev" /dev
    test ! -e /dev/fuse
    exec $FUSEPOOL mount "$1" "$2"
"""


def test_mount_without_dev_fuse(ns_pool):
    pool, mnt = ns_pool
    proc = namespaced(["-Urm"], NO_DEV_FUSE, pool, mnt)
    assert_refused(proc, pool, mnt, "/dev/fuse is missing", "start the container with --device /dev/fuse",
                   "fuse: device not found")


def test_mount_not_permitted(ns_pool):
    # Root of a user namespace that does not own the mount namespace (no -m): mount(2) is
    # refused, and so is fusermount3's (it gains nothing here).  A docker container's root
    # without CAP_SYS_ADMIN is in the same place.
    pool, mnt = ns_pool
    require("fusermount3")
    proc = namespaced(["-Ur"], 'exec $FUSEPOOL mount "$1" "$2"', pool, mnt)
    assert_refused(proc, pool, mnt, "mounting is not permitted here",
                   "add --cap-add SYS_ADMIN (in a container) or run inside `unshare -Urm`",
                   "fusermount3: mount failed: Operation not permitted")


# /usr/bin as it is, minus fusermount3 (symbolic links to a second view of the real one), then a
# nested user namespace that does not own the mount namespace, so that mounting needs fusermount3.
NO_FUSERMOUNT = """
    real=$(mktemp -d) links=$(mktemp -d)
    mount --bind /usr/bin "$real"
    ln -s "$real"/* "$links"/
    rm "$links/fusermount3"
    mount --bind "$links" /usr/bin
    ! command -v fusermount3
    PATH=/usr/bin:/bin exec unshare -U $FUSEPOOL mount "$1" "$2"
"""


def test_mount_without_fusermount3(ns_pool):
    pool, mnt = ns_pool
    proc = namespaced(["-Urm"], NO_FUSERMOUNT, pool, mnt)
    assert_refused(proc, pool, mnt, "may not mount directly and fusermount3 is not installed",
                   "install fuse3", "failed to exec fusermount3")


@pytest.mark.root
def test_dev_fuse_not_accessible():
    # A non-root user and a /dev/fuse of mode 0600 (a copy of the node, bound over /dev/fuse in
    # a mount namespace: the host's stays as it is for everyone else).
    with unprivileged_user() as (user, work, state):
        pool, mnt = work / "pool", work / "mnt"
        state["pools"].append(pool)
        user.fusepool("init", pool, *SMALL_POOL)
        user.run("mkdir", mnt)
        node = state["base"] / "fuse"
        mode, rdev = os.stat("/dev/fuse").st_mode, os.stat("/dev/fuse").st_rdev
        script = f"""
            mknod -m 0600 {node} c {os.major(rdev)} {os.minor(rdev)}
            mount --bind {node} /dev/fuse
            exec "$@"
        """
        proc = namespaced(["-m"], script, "runuser", "-u", user.pw.pw_name, "--", *user.env,
                          "/usr/bin/python3", "-m", "fusepool", "mount", pool, mnt)
        assert_refused(proc, pool, mnt,
                       f"/dev/fuse is not readable and writable by uid {user.pw.pw_uid} (mode 0600)",
                       "chmod 0666 /dev/fuse", "fuse: failed to open /dev/fuse: Permission denied")
        assert os.stat("/dev/fuse").st_mode == mode  # untouched outside the namespace


# The README's session (init, mount, create, write, snapshot, list, info, umount), in a fresh
# user and mount namespace: what `unshare -Urm` gives any unprivileged user, and a rootless
# container's user.
README_SESSION = """
    echo "outside: uid $(id -u)"
    exec unshare -Urm bash -euc '
        cd "$1"
        test "$(id -u)" = 0                         # root of the namespace ...
        ! grep -q 4294967295 /proc/self/uid_map     # ... and of nothing else
        $FUSEPOOL init pool --data-size 1G --metadata-size 64M
        mkdir mnt
        $FUSEPOOL mount pool mnt
        grep -q " $PWD/mnt fuse.fusepool " /proc/self/mounts
        $FUSEPOOL create pool base --size 64M
        mkfs.ext4 -q -F mnt/base
        printf "fusepool%.0s" {1..512} | dd of=mnt/base bs=1M seek=1 conv=notrunc,fsync status=none
        $FUSEPOOL snapshot pool base base-snap
        $FUSEPOOL list pool
        $FUSEPOOL info pool
        cmp mnt/base mnt/base-snap
        $FUSEPOOL umount mnt
        ! grep -q " $PWD/mnt " /proc/self/mounts
        $FUSEPOOL list pool --json
    ' bash "$1"
"""


def test_readme_session_in_a_user_namespace(tmp_path):
    require("unshare", "mkfs.ext4")
    if host_root():  # run it as an unprivileged user, not as the host's root
        with unprivileged_user() as (user, work, state):
            state["pools"].append(work / "pool")
            python = "/usr/bin/python3"
            cmd = ["runuser", "-u", user.pw.pw_name, "--", *user.env, f"FUSEPOOL={python} -m fusepool",
                   "bash", "-euc", README_SESSION, "bash", str(work)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=work,
                                  stdin=subprocess.DEVNULL)
            check_session(proc, user.pw.pw_uid)
    else:  # already unprivileged (a CI user, or inside a user namespace)
        env = dict(os.environ, FUSEPOOL=FUSEPOOL)
        proc = subprocess.run(["bash", "-euc", README_SESSION, "bash", str(tmp_path)], capture_output=True,
                              text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
        check_session(proc, os.getuid())


def check_session(proc: subprocess.CompletedProcess, uid: int) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith(f"outside: uid {uid}\n"), out
    assert "base-snap" in out and "Storage Driver: fusepool" in out, out
    assert '"name": "base-snap"' in out and '"origin": "base"' in out, out
