"""Shared fixtures: pools in tmp dirs, and real FUSE mounts served by a subprocess.

A process must never touch a mount it serves itself (it would deadlock), so
every mount here is a separate daemon started with ``fusepool mount``.  Each
mount fixture unmounts in teardown even when the test failed: first the clean
way (``fusepool umount``), then SIGKILL and a lazy unmount.

Every pool these fixtures make or mount gets an offline ``check`` at teardown,
after its mounts are gone: a test whose pool is not clean fails, unless it is
marked ``@pytest.mark.damages_pool("why")`` because it damages the pool on purpose.
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusepool.mount import unescape_mount_path

FUSEPOOL = [sys.executable, "-m", "fusepool"]
SMALL_POOL = ["--data-size", "512M", "--metadata-size", "64M"]


@pytest.fixture(autouse=True)
def _no_unexpected_warnings(caplog):
    """An engine WARNING (or worse) that a test did not ask for fails the test."""
    yield
    bad = [r for r in caplog.get_records("call") if r.levelno >= logging.WARNING
           and not getattr(r, "expected", False)]
    if bad and not getattr(caplog, "allow_warnings", False):
        pytest.fail("unexpected log records: " + "; ".join(r.getMessage() for r in bad))


def host_root() -> bool:
    """uid 0 of the host (the initial user namespace) with CAP_SYS_ADMIN and a writable /sys: not a
    user namespace's root (`unshare -Urm`, rootless podman) nor a container's (/sys read-only)."""
    with open("/proc/self/uid_map") as f:
        initial_ns = f.read().split() == ["0", "0", "4294967295"]
    with open("/proc/self/status") as f:
        caps = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    sys_writable = not os.statvfs("/sys").f_flag & os.ST_RDONLY
    return os.geteuid() == 0 and initial_ns and bool(caps & 1 << 21) and sys_writable  # 21: SYS_ADMIN


def pytest_runtest_setup(item):
    """The `root` marker is enforced: such a test is skipped, with the reason, unless host root."""
    if item.get_closest_marker("root") and not host_root():
        pytest.skip("needs host root")


def run_fusepool(*args, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess; ``check`` asserts exit status 0."""
    proc = subprocess.run([*FUSEPOOL, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"fusepool {' '.join(map(str, args))} failed ({proc.returncode}): "
                             f"{proc.stderr.strip()}")
    return proc


def fusepool_json(*args):
    return json.loads(run_fusepool(*args, "--json").stdout)


def lazy_unmount(mountpoint) -> None:
    mountpoint = str(mountpoint)
    cmd = ["umount", "-l", mountpoint] if os.getuid() == 0 else ["fusermount3", "-u", "-z", mountpoint]
    subprocess.run(cmd, capture_output=True, check=False)


def is_mounted(mountpoint) -> bool:
    target = os.fsencode(os.path.abspath(mountpoint))
    with open("/proc/self/mounts", "rb") as f:
        return any(unescape_mount_path(line.split()[1]) == target for line in f)


def daemon_pid(mountpoint) -> int | None:
    try:
        with open(os.path.join(mountpoint, ".fusepool"), "rb") as f:
            return json.loads(f.read())["pid"]
    except OSError:
        return None


def wait_exited(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has finished (a zombie counts as finished); False on time-out."""
    from fusepool.cli import process_alive

    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Mount:
    """A pool mounted by a daemon subprocess."""

    def __init__(self, pool: Path, mountpoint: Path, *extra):
        self.pool = pool
        self.mountpoint = mountpoint
        self.extra = extra
        self.pid = None

    def vol(self, name: str) -> Path:
        return self.mountpoint / name

    def mount(self):
        run_fusepool("mount", self.pool, self.mountpoint, *self.extra)
        self.pid = daemon_pid(self.mountpoint)
        assert self.pid, "mounted, but the daemon does not answer"
        return self

    def umount(self):
        run_fusepool("umount", self.mountpoint)
        assert not is_mounted(self.mountpoint)
        self.pid = None

    def kill(self):
        """SIGKILL the daemon (a crash) and clear its dead mount."""
        os.kill(self.pid, signal.SIGKILL)
        wait_exited(self.pid, 10)
        lazy_unmount(self.mountpoint)
        self.pid = None

    def cleanup(self):
        if is_mounted(self.mountpoint):
            if run_fusepool("umount", self.mountpoint, "--force", "--timeout", "10", check=False,
                            timeout=60).returncode and self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            lazy_unmount(self.mountpoint)


def pytest_configure(config):
    config.addinivalue_line("markers", "damages_pool(reason): the test damages its pool on "
                            "purpose, so the pool is not checked at teardown")


@pytest.fixture
def checked_pools(request):
    """Pools to check at teardown (``make_pool`` and ``make_mount`` add theirs).

    Both fixtures depend on this one, so it is torn down after every mount of
    the test is gone.  The check is ``fusepool check``'s offline path, in process.
    """
    pools: list[Path] = []
    yield pools
    marker = request.node.get_closest_marker("damages_pool")
    if marker is not None:
        assert marker.args and marker.args[0], "damages_pool needs a reason"
        return
    from fusepool.check import check_offline

    failures = []
    for pool in dict.fromkeys(Path(p) for p in pools):
        if not (pool / "pool.json").exists():
            continue  # the test removed its pool (or never made one)
        report = check_offline(str(pool)).to_json()
        if not report["ok"]:
            failures.append(f"{pool}: " + "; ".join(f"{p['kind']}: {p['message']}"
                                                     for p in report["problems"]))
    if failures:
        pytest.fail("fusepool check at teardown found problems (mark the test "
                    "damages_pool(reason) if that is its purpose):\n" + "\n".join(failures),
                    pytrace=False)


@pytest.fixture
def make_pool(tmp_path, checked_pools):
    """``make_pool(name='pool', *init_args)`` -> an initialised pool directory."""

    def make(name="pool", *args):
        pool = tmp_path / name
        checked_pools.append(pool)
        run_fusepool("init", pool, *(args or SMALL_POOL))
        return pool

    return make


@pytest.fixture
def pool(make_pool):
    return make_pool()


@pytest.fixture
def make_mount(tmp_path, checked_pools):
    """``make_mount(pool, *mount_args)`` -> a mounted :class:`Mount`; unmounted at teardown."""
    mounts = []

    def make(pool_dir, *extra, name=None):
        mnt = tmp_path / (name or f"mnt{len(mounts)}")
        mnt.mkdir(exist_ok=True)
        checked_pools.append(pool_dir)
        m = Mount(pool_dir, mnt, *extra)
        mounts.append(m)
        return m.mount()

    yield make
    for m in mounts:
        m.cleanup()


@pytest.fixture
def mounted(pool, make_mount):
    return make_mount(pool)


@pytest.fixture
def small_hostfs(tmp_path):
    """A 24 MiB tmpfs to put pools on (root only); lazily unmounted at teardown.

    Requested before ``make_mount`` by a test, it is torn down after the pool mounts.
    """
    if os.getuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "hostfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)


def write_fully(path, offset: int, data, fsync: bool = True) -> None:
    """Write ``data`` at ``offset``, looping over short writes; then fsync (by default)."""
    fd = os.open(path, os.O_RDWR)
    try:
        view = memoryview(data)
        while view:
            done = os.pwrite(fd, view, offset)
            assert done > 0
            view, offset = view[done:], offset + done
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_all(path, offset: int = 0, length: int | None = None) -> bytes:
    """Read what the daemon serves: the kernel's cached pages of the file are dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if length is None:
            length = os.fstat(fd).st_size - offset
        parts, pos, end = [], offset, offset + length
        while pos < end:
            chunk = os.pread(fd, min(end - pos, 4 << 20), pos)
            if not chunk:
                break
            parts.append(chunk)
            pos += len(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def check_blocks(actual: bytes, model, name: str, block_size: int = 64 << 10) -> None:
    """Equal, or an assertion naming the first differing block (not megabytes of repr)."""
    assert len(actual) == len(model), f"{name}: length {len(actual)} != {len(model)}"
    if actual != model:
        bs = block_size
        for b in range(0, len(model), bs):
            if actual[b : b + bs] != model[b : b + bs]:
                i = next(i for i in range(b, min(b + bs, len(model))) if actual[i] != model[i])
                raise AssertionError(f"{name}: content differs first at byte {i} (block {b // bs})")


def write_report(name: str, figures: dict) -> None:
    """Figures for tools/reliability-report: $FUSEPOOL_REPORT_DIR/<name>.json, when set."""
    directory = os.environ.get("FUSEPOOL_REPORT_DIR")
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
        json.dump(figures, f, indent=2, sort_keys=True)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def require(*tools: str) -> None:
    """Fail (never skip) when a tool the test drives is missing: tools/setup installs them all."""
    missing = [t for t in tools if not have(t)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run tools/setup")
