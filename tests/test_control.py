"""The control socket and `fusepool umount` against hostile, vanishing and stopped peers.

Each test talks to a real mount daemon (a subprocess) as an attacker or a
broken client would: raw sockets that close early, huge or malformed requests,
another uid, a forged FUSE mount naming someone else's pool, a SIGSTOPped
daemon.  Afterwards the daemon must still serve I/O, and nothing the client
was told had failed may have happened.
"""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import fusepool_json, is_mounted, lazy_unmount, run_fusepool, wait_exited, write_fully

from fusepool import control
from fusepool.errors import DaemonTimeout

M = 1 << 20


def sock_path(pool) -> str:
    return os.path.join(pool, "control.sock")


def raw_connect(pool) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sock_path(pool))
    return s


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def assert_serving(m, name="alive") -> None:
    """The daemon still answers commands and serves I/O."""
    assert m.pid and os.path.exists(f"/proc/{m.pid}")
    run_fusepool("create", m.pool, name, "--size", "4M")
    write_fully(m.vol(name), 0, b"x" * 65536)
    assert fusepool_json("list", m.pool)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.fixture
def stopped(mounted):
    """The mounted daemon, SIGSTOPped for the test; always continued afterwards."""
    pid = mounted.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield mounted
    finally:
        os.kill(pid, signal.SIGCONT)


# --- clients that vanish -----------------------------------------------------------------------

@pytest.mark.parametrize("when", ["after-request", "after-ready", "after-go", "mid-stream"])
def test_a_vanishing_client_costs_nothing(mounted, when):
    run_fusepool("create", mounted.pool, "v", "--size", "64M")
    scatter(mounted.vol("v"), 256)
    op = "dump" if when == "mid-stream" else "list"
    for _ in range(20):
        s = raw_connect(mounted.pool)
        s.sendall(json.dumps({"op": op, "args": {}}).encode() + b"\n")
        if when != "after-request":
            assert json.loads(read_line(s)) == {"ready": True}
        if when in ("after-go", "mid-stream"):
            s.sendall(b"go\n")
        if when == "mid-stream":
            # the stream may arrive in the same recv as the reply: parse the reply's line only
            assert json.loads(read_line(s).split(b"\n", 1)[0])["ok"]
            s.recv(1000)
        s.close()
    time.sleep(0.3)
    assert_serving(mounted)


def test_interrupted_cli_check_costs_nothing(mounted):
    """Ctrl-C on `fusepool check` while the daemon works on it."""
    for i in range(10):
        proc = subprocess.Popen([sys.executable, "-m", "fusepool", "check", str(mounted.pool)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.05 + 0.02 * i)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert_serving(mounted)


def test_a_client_that_stops_reading_costs_only_its_connection(mounted):
    run_fusepool("create", mounted.pool, "v", "--size", "64M")
    scatter(mounted.vol("v"), 256)
    s = raw_connect(mounted.pool)
    s.sendall(b'{"op": "dump", "args": {}}\n')
    read_line(s)
    s.sendall(b"go\n")  # ... and never reads the megabytes that follow
    try:
        assert_serving(mounted)
    finally:
        s.close()


# --- requests that are too large or malformed ----------------------------------------------------

def test_a_huge_request_is_refused_without_buffering_it(mounted):
    before = rss_kib(mounted.pid)
    s = raw_connect(mounted.pool)
    chunk = b"x" * M
    sent = 0
    try:
        while sent < 100 * M:
            s.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon stopped reading and closed: what we want
    finally:
        s.close()
    assert sent < 100 * M, "the daemon read 100 MB of one request"
    assert rss_kib(mounted.pid) - before < 20 * 1024
    assert_serving(mounted)


def test_the_size_limit_answers_with_an_error(mounted):
    s = raw_connect(mounted.pool)
    s.sendall(b"x" * (control.MAX_REQUEST + 10))
    reply = json.loads(read_line(s))
    s.close()
    assert reply["ok"] is False and "larger than" in reply["error"]
    assert_serving(mounted)


@pytest.mark.parametrize("payload", [
    b"not json\n", b"[1, 2]\n", b'{"op": 5}\n', b'{"op": "create", "args": []}\n',
    b"[" * 200_000 + b"\n", b'{"op": "create", "args": {"name": 5, "bogus": 1}}\n',
    b'{"op": "no-such-op"}\n', b"\xff\xfe\n", b"\n",
], ids=["text", "list", "op-type", "args-type", "deep", "bad-args", "unknown-op", "binary", "empty"])
def test_malformed_requests_get_an_error_reply(mounted, payload):
    s = raw_connect(mounted.pool)
    s.sendall(payload)
    reply = json.loads(read_line(s))
    if reply.get("ready"):  # well-formed JSON: the error comes after "go"
        s.sendall(b"go\n")
        reply = json.loads(read_line(s))
    s.close()
    assert reply["ok"] is False and reply["error"]
    assert_serving(mounted)


def test_idle_connections_do_not_lock_out_the_owner(mounted):
    idle = [raw_connect(mounted.pool) for _ in range(80)]
    try:
        time.sleep(0.5)
        assert os.path.exists(f"/proc/{mounted.pid}")
    finally:
        for s in idle:
            s.close()
    assert_serving(mounted)


# --- who may send commands --------------------------------------------------------------------------

@pytest.fixture
def open_dir():
    """A directory every user can enter (tmp_path is root's, 0700)."""
    d = tempfile.mkdtemp(prefix="fusepool-open-", dir="/tmp")
    os.chmod(d, 0o755)
    yield Path(d)
    for entry in Path(d).iterdir():
        if entry.is_dir() and is_mounted(entry):
            lazy_unmount(entry)
    shutil.rmtree(d, ignore_errors=True)


OTHER_USER_CLIENT = textwrap.dedent("""
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sys.argv[1])
    reader = s.makefile("rb")
    try:
        s.sendall(json.dumps({"op": "create", "args": {"name": "evil", "size": 1048576}}).encode() + b"\\n")
    except BrokenPipeError:
        pass  # refused at once: the reply is waiting
    line = reader.readline()
    if json.loads(line).get("ready"):
        s.sendall(b"go\\n")
        line = reader.readline()
    print(line.decode().strip())
""")


@pytest.mark.root  # (to act as another user)
def test_other_users_are_refused_even_when_the_socket_is_reachable(open_dir, make_mount):
    """SO_PEERCRED: with the socket made reachable by hand (as an old pool's modes were),
    another uid still cannot send a command."""
    pool = open_dir / "pool"
    run_fusepool("init", pool, "--data-size", "256M", "--metadata-size", "32M")
    m = make_mount(pool)
    os.chmod(pool, 0o755)
    os.chmod(sock_path(pool), 0o666)
    proc = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c",
                           OTHER_USER_CLIENT, sock_path(pool)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False and "permission denied" in reply["error"]
    assert [v["name"] for v in fusepool_json("list", pool)] == []
    assert_serving(m)


def test_the_socket_is_owner_only_whatever_the_umask(tmp_path, make_pool, make_mount):
    pool = make_pool()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    old = os.umask(0)
    try:
        m = make_mount(pool, name="mnt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(sock_path(pool)).st_mode) == 0o600
    assert m.pid


# --- a stopped daemon: time-outs are honoured, and a failed command stays undone --------------------

def test_a_timed_out_command_is_never_carried_out_later(stopped):
    pool = str(stopped.pool)
    started = time.monotonic()
    with pytest.raises(DaemonTimeout, match="was not carried out"):
        control.request(pool, "create", {"name": "late", "size": M}, timeout=2)
    assert time.monotonic() - started < 5
    os.kill(stopped.pid, signal.SIGCONT)
    time.sleep(1.0)
    assert "late" not in [v["name"] for v in fusepool_json("list", pool)]
    assert_serving(stopped)


def test_umount_of_a_stopped_daemon_honours_its_timeout(stopped):
    started = time.monotonic()
    proc = run_fusepool("umount", stopped.mountpoint, "--timeout", "3", check=False, timeout=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == 1
    assert "did not answer within 3 s" in proc.stderr and "--force" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert is_mounted(stopped.mountpoint)
    os.kill(stopped.pid, signal.SIGCONT)
    time.sleep(0.5)
    assert is_mounted(stopped.mountpoint), "the timed-out umount was carried out later"
    assert_serving(stopped)


def test_umount_force_detaches_a_stopped_daemon(stopped):
    started = time.monotonic()
    proc = run_fusepool("umount", stopped.mountpoint, "--force", "--timeout", "2", timeout=30)
    assert time.monotonic() - started < 10
    assert "detached" in proc.stderr
    assert not is_mounted(stopped.mountpoint)
    os.kill(stopped.pid, signal.SIGCONT)
    assert wait_exited(stopped.pid, 20), "the detached daemon did not exit after SIGCONT"
    report = json.loads(run_fusepool("check", stopped.pool, "--json").stdout)
    assert report["ok"]
    stopped.pid = None


# --- umount decides from the mount table and the daemon, never from a file -------------------------

def test_umount_ignores_a_forged_marker_file(tmp_path, mounted):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / ".fusepool").write_text(json.dumps({"pool": str(mounted.pool), "pid": mounted.pid}))
    proc = run_fusepool("umount", fake, check=False)
    assert proc.returncode == 1 and "not a fusepool mount" in proc.stderr
    assert is_mounted(mounted.mountpoint)
    assert_serving(mounted)


FORGED_FS = textwrap.dedent("""
    import sys, pyfuse3, trio
    pyfuse3.init(pyfuse3.Operations(), sys.argv[1],
                 ["fsname=" + sys.argv[2], "subtype=fusepool"])
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
""")


def test_umount_of_a_forged_fuse_mount_naming_another_pool(tmp_path, mounted):
    """A FUSE mount whose type and source claim to be another pool's: the pool's daemon
    says that mount is not its own, so nothing is unmounted."""
    fake = tmp_path / "forged"
    fake.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", FORGED_FS, str(fake), str(mounted.pool)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert is_mounted(fake)
        result = run_fusepool("umount", fake, check=False)
        assert result.returncode == 1
        assert "is not where pool" in result.stderr
        assert is_mounted(mounted.mountpoint)
        assert_serving(mounted)
    finally:
        lazy_unmount(fake)
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


# --- dump streams ------------------------------------------------------------------------------------

def scatter(path, count: int, step: int = 2 * 65536) -> None:
    """Map ``count`` blocks, one every ``step`` bytes: as many runs as blocks."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(count):
            os.pwrite(fd, b"\1" * 512, i * step)
    finally:
        os.close(fd)


def test_online_dump_streams_the_same_xml_as_offline(tmp_path, make_pool, make_mount):
    pool = make_pool("pool", "--data-size", "2G", "--metadata-size", "64M")
    m = make_mount(pool)
    run_fusepool("create", pool, "v", "--size", "2G")
    scatter(m.vol("v"), 12000)  # 24,000 single mappings with the snapshot: ~2 MB, 2 chunks
    run_fusepool("snapshot", pool, "v", "s")
    online = run_fusepool("dump", pool).stdout
    assert len(online) > 1.5 * M
    run_fusepool("dump", pool, "-o", tmp_path / "online.xml")
    assert (tmp_path / "online.xml").read_text() == online
    assert online.count("<single_mapping") == 24000 and online.endswith("</superblock>\n")
    m.umount()
    assert run_fusepool("dump", pool).stdout == online


def test_umount_finds_a_pool_whose_path_needs_escaping(tmp_path):
    """The pool's path travels as the mount's source: commas (libfuse's option separator),
    backslashes and spaces (octal in mountinfo) must survive the round trip."""
    base = tmp_path / "we,ird \\dir x"
    base.mkdir()
    pool, mnt = base / "pool", base / "mnt"
    mnt.mkdir()
    run_fusepool("init", pool, "--data-size", "256M", "--metadata-size", "32M")
    run_fusepool("mount", pool, mnt)
    try:
        run_fusepool("create", pool, "v", "--size", "1M")
        run_fusepool("umount", mnt)
        assert not is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            lazy_unmount(mnt)
