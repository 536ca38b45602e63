"""`fusepool serve --nbd`: the volumes as NBD exports, driven by real clients.

qemu-img / qemu-io (qemu's NBD client) and nbdinfo / nbdcopy (libnbd) on
``nbd+unix:///NAME?socket=PATH``; a raw socket client (below) for what real
clients never send: wrong magic, oversized requests, requests past the end,
unknown options and commands, a disconnect mid-request, writes on one
connection flushed by another.  Every daemon is stopped at teardown (SIGKILL if
it does not stop), and the pool is checked offline (conftest's checked_pools).
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import is_mounted, read_all, require, run_fusepool, wait_exited, write_fully

from fusepool import control

MiB = 1 << 20
BS = 64 << 10  # SMALL_POOL's block size


@pytest.fixture
def sockdir():
    """A short directory for sockets (sockaddr_un holds 108 bytes; pytest's tmp paths are long)."""
    d = tempfile.mkdtemp(prefix="fpnbd")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


class Served:
    """A pool served over NBD by a `fusepool serve` daemon."""

    def __init__(self, pool: Path, sock: Path, *extra):
        self.pool, self.sock, self.extra = pool, sock, extra
        self.pid = None

    def url(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def start(self):
        run_fusepool("serve", self.pool, "--nbd", f"unix:{self.sock}", *self.extra)
        self.pid = control.request(str(self.pool), "status")["pid"]
        return self

    def stop(self, *args):
        run_fusepool("stop", self.pool, *args)
        assert not os.path.exists(f"/proc/{self.pid}") or wait_exited(self.pid, 10)
        self.pid = None

    def kill(self, sig=signal.SIGKILL):
        os.kill(self.pid, sig)
        assert wait_exited(self.pid, 30)
        self.pid = None

    def cleanup(self):
        if self.pid and run_fusepool("stop", self.pool, "--force", "--timeout", "10", check=False,
                                     timeout=60).returncode:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            wait_exited(self.pid, 10)


@pytest.fixture
def make_served(sockdir, checked_pools):
    served = []

    def make(pool, *extra, sock="s.sock"):
        checked_pools.append(pool)
        s = Served(pool, sockdir / sock, *extra)
        served.append(s)
        return s.start()

    yield make
    for s in served:
        s.cleanup()


@pytest.fixture
def served(pool, make_served):
    run_fusepool("create", pool, "v", "--size", "64M")
    return make_served(pool)


def qemu_io(url: str, *commands: str, check=True) -> subprocess.CompletedProcess:
    require("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0 and "failed" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    require(cmd[0])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout}{proc.stderr}"
    return proc


def offline_bytes(pool: Path, name: str, tmp_path: Path) -> bytes:
    """The volume's content as the pool holds it, read with no daemon (`fusepool export`)."""
    out = tmp_path / f"{name}.offline.img"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    run_fusepool("export", pool, name, out)
    return out.read_bytes()


def mapped_ranges(url: str) -> list[tuple[int, int]]:
    """``(start, length)`` of the data extents `qemu-img map` sees (holes are left out)."""
    out = run("qemu-img", "map", "--output=json", "-f", "raw", url).stdout
    return [(e["start"], e["length"]) for e in json.loads(out) if e["data"]]


# --- real clients -------------------------------------------------------------------------

def test_qemu_img_info_io_convert_compare_map(served, tmp_path):
    url = served.url("v")
    info = json.loads(run("qemu-img", "info", "--output=json", url).stdout)
    assert info["virtual-size"] == 64 * MiB
    qemu_io(url, "write -P 0xab 1M 2M", "write -P 0xcd 40M 64k", "read -P 0xab 1M 2M",
            "read -P 0 0 1M", "flush")
    expected = bytearray(64 * MiB)
    expected[MiB : 3 * MiB] = b"\xab" * (2 * MiB)
    expected[40 * MiB : 40 * MiB + BS] = b"\xcd" * BS
    # Holes kept: only what was written is data, in `qemu-img map` and in the pool.
    assert mapped_ranges(url) == [(MiB, 2 * MiB), (40 * MiB, BS)]
    volume = json.loads(run_fusepool("list", served.pool, "--json").stdout)
    assert [v["mapped_bytes"] for v in volume if v["name"] == "v"] == [2 * MiB + BS]
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(out))
    assert out.read_bytes() == expected
    ref = tmp_path / "ref.raw"
    ref.write_bytes(expected)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), url)
    # Into a new volume: a sparse image stays sparse through qemu-img convert.
    run_fusepool("create", served.pool, "copy", "--size", "64M")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(ref), served.url("copy"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), served.url("copy"))
    assert mapped_ranges(served.url("copy")) == [(MiB, 2 * MiB), (40 * MiB, BS)]


def test_nbdinfo_and_nbdcopy(served, tmp_path):
    url = served.url("v")
    run_fusepool("create", served.pool, "other", "--size", "8M")
    info = json.loads(run("nbdinfo", "--json", url).stdout)
    export = info["exports"][0]
    assert export["export-size"] == 64 * MiB
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache"):
        assert export[flag] is True, (flag, export)
    assert export["is_read_only"] is False
    assert "base:allocation" in export["contexts"]
    listed = run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={served.sock}").stdout
    assert sorted(e["export-name"] for e in json.loads(listed)["exports"]) == ["other", "v"]
    # nbdcopy keeps holes both ways.
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(8 * MiB)
        f.write(os.urandom(MiB))
    run("nbdcopy", str(src), url)
    assert "0  data" not in run("nbdinfo", "--map", url).stdout.split("\n")[0]
    extents = [line.split() for line in run("nbdinfo", "--map", url).stdout.splitlines()]
    assert [(int(e[0]), int(e[1]), e[3]) for e in extents] == [
        (0, 8 * MiB, "hole,zero"), (8 * MiB, MiB, "data"), (9 * MiB, 55 * MiB, "hole,zero")]
    back = tmp_path / "back.raw"
    run("nbdcopy", url, str(back))
    assert back.read_bytes() == src.read_bytes()
    assert os.stat(back).st_blocks * 512 <= 2 * MiB  # the copy is sparse too


def test_trim_and_write_zeroes(served, tmp_path):
    url = served.url("v")
    qemu_io(url, "write -P 0x11 0 4M")
    # TRIM unmaps the whole blocks inside the range (rounded inward, as dm-thin).
    qemu_io(url, "discard 96k 1M", "flush")
    assert mapped_ranges(url) == [(0, 2 * BS), (MiB + BS, 3 * MiB - BS)]
    # WRITE_ZEROES that may unmap: whole blocks unmapped, partial ones written with zeros.
    qemu_io(url, "write -z -u 2093056 1056768", "read -P 0 2093056 1056768",
            "read -P 0x11 2088960 4k", "read -P 0x11 3149824 4k")
    assert mapped_ranges(url) == [(0, 2 * BS), (MiB + BS, MiB - BS), (3 * MiB, MiB)]
    # NO_HOLE (write -z without -u): the blocks stay provisioned, and read as zeros.
    qemu_io(url, "write -z 3M 64k", "read -P 0 3M 64k")
    assert (3 * MiB, MiB) in mapped_ranges(url)
    # Zeros over an unmapped range with no hole allowed provision it.
    qemu_io(url, "write -z 10M 128k", "read -P 0 10M 128k", "flush")
    assert (10 * MiB, 2 * BS) in mapped_ranges(url)


@pytest.fixture
def served_no_commits(pool, make_served):
    """Served with no periodic commit in the test's time: only FLUSH makes writes durable."""
    run_fusepool("create", pool, "v", "--size", "64M")
    return make_served(pool, "--commit-period", "3600")


def test_flush_and_fua_survive_sigkill(served_no_commits, tmp_path):
    """The crash rule: what FLUSH acknowledged (or a FUA write) survives the daemon's SIGKILL."""
    served = served_no_commits
    url = served.url("v")
    qemu_io(url, "write -P 0x5a 0 3M", "write -P 0x6b 8392704 12k", "flush")
    qemu_io(url, "write -f -P 0x7c 20M 1M")  # FUA: durable when answered, no FLUSH
    served.kill()
    data = offline_bytes(served.pool, "v", tmp_path)
    assert data[: 3 * MiB] == b"\x5a" * (3 * MiB)
    assert data[8 * MiB + 4096 : 8 * MiB + 16384] == b"\x6b" * 12288
    assert data[20 * MiB : 21 * MiB] == b"\x7c" * MiB


def test_sigterm_stops_cleanly_with_a_commit(served, tmp_path):
    qemu_io(served.url("v"), "write -P 0x42 5M 1M")  # no FLUSH: the stop's commit keeps it
    pid = served.pid
    served.kill(signal.SIGTERM)
    assert not os.path.exists(served.sock)
    log = (served.pool / "fusepool.log").read_text()
    assert "Traceback" not in log and f"pid {pid}" in log and "stopped serving" in log
    assert offline_bytes(served.pool, "v", tmp_path)[5 * MiB : 6 * MiB] == b"\x42" * MiB


def test_snapshot_isolation_through_nbd(served, tmp_path):
    url = served.url("v")
    qemu_io(url, "write -P 0xa1 0 2M")
    run_fusepool("snapshot", served.pool, "v", "snap")  # online, through control.sock
    qemu_io(url, "write -P 0xb2 0 1M", "write -P 0xb3 4M 64k")
    qemu_io(served.url("snap"), "read -P 0xa1 0 2M", "read -P 0 4M 64k")
    qemu_io(url, "read -P 0xb2 0 1M", "read -P 0xa1 1M 1M", "read -P 0xb3 4M 64k")
    # The snapshot's own export is writable and does not show through to the origin.
    qemu_io(served.url("snap"), "write -P 0xc4 1M 64k")
    qemu_io(url, "read -P 0xa1 1M 64k")


def test_read_only(pool, make_served):
    run_fusepool("create", pool, "v", "--size", "8M")
    served = make_served(pool, "--read-only")
    export = json.loads(run("nbdinfo", "--json", served.url("v")).stdout)["exports"][0]
    assert export["is_read_only"] is True
    proc = qemu_io(served.url("v"), "write -P 1 0 64k", check=False)  # qemu sees the flag
    assert proc.returncode and "Permission denied" in proc.stderr, proc.stderr
    with RawClient(served.sock) as c:
        c.go("v")
        assert c.request(CMD_WRITE, 0, 4096, payload=b"x" * 4096)[0] == errno_EPERM
        assert c.request(CMD_READ, 0, 4096) == (0, bytes(4096))
    assert json.loads(run_fusepool("list", pool, "--json").stdout)[0]["mapped_bytes"] == 0


def test_commands_work_online_while_serving(served, tmp_path):
    pool = served.pool
    run_fusepool("create", pool, "w", "--size", "16M")
    qemu_io(served.url("w"), "write -P 0x33 0 1M", "flush")
    assert "w" in run_fusepool("list", pool).stdout
    assert "Pool Name" in run_fusepool("info", pool).stdout
    run_fusepool("resize", pool, "w", "32M")
    assert json.loads(run("qemu-img", "info", "--output=json", served.url("w")).stdout)[
        "virtual-size"] == 32 * MiB
    run_fusepool("discard", pool, "w", "0", "512K")
    qemu_io(served.url("w"), "read -P 0 0 512k", "read -P 0x33 512k 512k")
    out = tmp_path / "w.img"
    run_fusepool("export", pool, "w", out)
    assert out.read_bytes()[512 << 10 : MiB] == b"\x33" * (512 << 10)
    run_fusepool("import", pool, "imp", out)
    qemu_io(served.url("imp"), "read -P 0x33 512k 512k")
    run_fusepool("check", pool)
    assert f"NBD Exports At: unix:{served.sock}" in run_fusepool("info", pool).stdout
    proc = run_fusepool("repair", pool, check=False)
    assert proc.returncode == 1 and "served over NBD" in proc.stderr, proc.stderr
    run_fusepool("remove", pool, "w")
    assert "w" not in [e["name"] for e in json.loads(run_fusepool("list", pool, "--json").stdout)]


def test_mount_and_nbd_at_once(pool, make_mount, sockdir):
    """`mount --nbd`: one daemon, both front ends, one FLUSH order; `stop` unmounts it."""
    run_fusepool("create", pool, "v", "--size", "8M")
    sock = sockdir / "m.sock"
    m = make_mount(pool, "--nbd", f"unix:{sock}")
    url = f"nbd+unix:///v?socket={sock}"
    qemu_io(url, "write -P 0x21 0 1M", "flush")
    assert read_all(m.vol("v"), 0, MiB) == b"\x21" * MiB
    write_fully(m.vol("v"), MiB, b"\x22" * MiB)
    qemu_io(url, "read -P 0x22 1M 1M")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    run_fusepool("stop", pool)
    assert wait_exited(m.pid, 10)
    assert not is_mounted(m.mountpoint) and not os.path.exists(sock)
    m.pid = None


def test_serve_refusals(pool, make_served, sockdir, tmp_path):
    run_fusepool("create", pool, "v", "--size", "8M")
    proc = run_fusepool("stop", pool, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("fusepool: error: no daemon serves")
    for bad in ("unix:", "tcp:host", "tcp:1:99999", "udp:1", "nothing"):
        proc = run_fusepool("serve", pool, "--nbd", bad, check=False)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    (sockdir / "file").write_text("x")
    proc = run_fusepool("serve", pool, "--nbd", f"unix:{sockdir / 'file'}", check=False)
    assert proc.returncode == 2 and "not a socket" in proc.stderr, proc.stderr
    assert (sockdir / "file").read_text() == "x"
    run_fusepool("list", pool)  # nothing left running: the pool is free
    served = make_served(pool)
    assert stat.S_IMODE(os.stat(served.sock).st_mode) == 0o600  # owner-only, as control.sock
    proc = run_fusepool("serve", pool, "--nbd", f"unix:{sockdir / 'x.sock'}", check=False)
    assert proc.returncode == 1 and "already served over NBD" in proc.stderr, proc.stderr
    with RawClient(served.sock) as c:  # a client holds the volume open: stop refuses
        c.go("v")
        proc = run_fusepool("stop", served.pool, check=False)
        assert proc.returncode == 1 and "busy" in proc.stderr, proc.stderr
    served.stop()


def test_a_relative_socket_path_is_where_the_command_ran(pool, make_mount, sockdir, checked_pools):
    """`serve` and `mount --nbd` with `unix:REL`: the socket is made in the caller's directory
    (the daemon itself runs in /)."""
    checked_pools.append(pool)
    run_fusepool("create", pool, "v", "--size", "4M")
    run_fusepool("serve", pool, "--nbd", "unix:rel.sock", cwd=sockdir)
    try:
        assert (sockdir / "rel.sock").is_socket()
        assert control.request(str(pool), "status")["nbd"] == [f"unix:{sockdir / 'rel.sock'}"]
        qemu_io(f"nbd+unix:///v?socket={sockdir / 'rel.sock'}", "write -P 4 0 4k", "read -P 4 0 4k")
    finally:
        run_fusepool("stop", pool)
    assert not (sockdir / "rel.sock").exists()
    old = os.getcwd()
    os.chdir(sockdir)  # (make_mount runs the CLI from here)
    try:
        make_mount(pool, "--nbd", "unix:m.sock")
    finally:
        os.chdir(old)
    assert (sockdir / "m.sock").is_socket()
    qemu_io(f"nbd+unix:///v?socket={sockdir / 'm.sock'}", "read -P 4 0 4k")


def test_tcp_loopback_by_default(pool, make_served):
    run_fusepool("create", pool, "v", "--size", "8M")
    make_served(pool, "--nbd", "tcp::0")
    (address,) = [a for a in control.request(str(pool), "status")["nbd"] if a.startswith("tcp:")]
    host, port = address[4:].rsplit(":", 1)
    assert host == "127.0.0.1"
    qemu_io(f"nbd://127.0.0.1:{port}/v", "write -P 9 0 64k", "read -P 9 0 64k")


def test_serve_without_dev_fuse(pool, sockdir, checked_pools, tmp_path):
    """A private /dev with no fuse node (a container without --device /dev/fuse): serve works."""
    require("unshare")
    checked_pools.append(pool)
    run_fusepool("create", pool, "v", "--size", "8M")
    sock = sockdir / "ns.sock"
    script = """
        dev=$(mktemp -d)
        mount -t tmpfs -o mode=755 none "$dev"
        for n in null zero urandom; do touch "$dev/$n"; mount --bind "/dev/$n" "$dev/$n"; done
        mount --bind "$dev" /dev
        test ! -e /dev/fuse
        $FUSEPOOL serve "$1" --nbd "unix:$2"
    """
    env = dict(os.environ, FUSEPOOL=f"{os.sys.executable} -m fusepool")
    proc = subprocess.run(["unshare", "-Urm", "bash", "-euc", script, "bash", str(pool), str(sock)],
                          capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    pid = control.request(str(pool), "status")["pid"]
    try:
        qemu_io(f"nbd+unix:///v?socket={sock}", "write -P 0x77 0 1M", "flush", "read -P 0x77 0 1M")
        run_fusepool("stop", pool)
        assert wait_exited(pid, 10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert offline_bytes(pool, "v", tmp_path)[:MiB] == b"\x77" * MiB


# --- a raw client, for what real clients never send ----------------------------------------

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_BLOCK_STATUS = 0, 1, 2, 3, 4, 7
OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
REP_ACK, REP_ERR_UNSUP, REP_ERR_UNKNOWN = 1, (1 << 31) + 1, (1 << 31) + 6
errno_EPERM, errno_EINVAL, errno_ENOSPC = 1, 22, 28


class RawClient:
    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.structured = False
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT) and flags & 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def closed(self) -> bool:
        """True when the server has closed the connection (EOF within 10 s)."""
        self.sock.settimeout(10)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def flags(self, flags=1):
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; its replies up to the final one, as (type, data)."""
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, kind, length = struct.unpack(">QIII", self.recv(20))
            assert (magic, opt) == (REPLY_MAGIC, option)
            replies.append((kind, self.recv(length)))
            if kind == REP_ACK or kind & (1 << 31):
                return replies

    def go(self, name: str, structured: bool = False):
        self.flags()
        if structured:
            assert self.option(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
            self.structured = True
        replies = self.option(OPT_GO, struct.pack(">I", len(name)) + name.encode() + b"\0\0")
        assert replies[-1][0] == REP_ACK, replies
        return replies

    def send_request(self, kind, offset, length, flags=0, payload=b"", cookie=7, magic=0x25609513):
        self.sock.sendall(struct.pack(">IHHQQI", magic, flags, kind, cookie, offset, length) + payload)

    def request(self, kind, offset, length, flags=0, payload=b""):
        """(error, data) of one request."""
        self.send_request(kind, offset, length, flags, payload)
        data = b""
        while True:
            head = self.recv(4)
            if head == struct.pack(">I", 0x67446698):  # a simple reply (allowed without payload)
                error, cookie = struct.unpack(">IQ", self.recv(12))
                assert cookie == 7
                assert not (self.structured and kind == CMD_READ)  # (the protocol's MUST NOT)
                return error, (self.recv(length) if kind == CMD_READ and not error else b"")
            assert self.structured
            magic, rflags, rtype, cookie, length_ = struct.unpack(">IHHQI", head + self.recv(16))
            assert (magic, cookie) == (0x668E33EF, 7)
            payload_ = self.recv(length_)
            if rtype == (1 << 15) + 1:
                assert rflags & 1
                return struct.unpack(">I", payload_[:4])[0], payload_[6:]
            if rtype == 1:
                data += payload_[8:]
            if rtype == 5:
                data += payload_
            if rflags & 1:
                return 0, data


def test_bad_handshakes_get_the_protocols_answer(served):
    url = served.url("v")
    with RawClient(served.sock) as c:  # an unknown option: NBD_REP_ERR_UNSUP, then go on
        c.flags()
        assert c.option(99, b"whatever")[-1][0] == REP_ERR_UNSUP
        assert c.option(OPT_GO, struct.pack(">I", 4) + b"nope" + b"\0\0")[-1][0] == REP_ERR_UNKNOWN
        assert c.option(OPT_GO, struct.pack(">I", 1) + b"v" + b"\0\0")[-1][0] == REP_ACK
        assert c.request(CMD_READ, 0, 512) == (0, bytes(512))
    with RawClient(served.sock) as c:  # wrong option magic: hung up on
        c.flags()
        c.sock.sendall(struct.pack(">QII", 0x1234, OPT_GO, 0))
        assert c.closed()
    with RawClient(served.sock) as c:  # unknown client flags: hung up on (the protocol's MUST)
        c.flags(1 << 7)
        assert c.closed()
    with RawClient(served.sock) as c:  # option data far too long: NBD_REP_ERR_TOO_BIG, hung up
        c.flags()
        c.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 1 << 30))
        magic, _, kind, _ = struct.unpack(">QIII", c.recv(20))
        assert kind == (1 << 31) + 9
    with RawClient(served.sock) as c:  # a client that says nothing and goes
        pass
    qemu_io(url, "write -P 3 0 64k", "read -P 3 0 64k")  # served on


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_bad_requests_get_the_protocols_errors(served, structured):
    size = 64 * MiB
    with RawClient(served.sock) as c:
        c.go("v", structured)
        assert c.request(CMD_READ, size - 512, 1024)[0] == errno_EINVAL  # past the end
        assert c.request(CMD_READ, 0, (32 << 20) + 1)[0] == errno_EINVAL  # over 32 MiB
        assert c.request(CMD_WRITE, size, 512, payload=bytes(512))[0] == errno_ENOSPC
        assert c.request(CMD_TRIM, size - BS, 2 * BS)[0] == errno_EINVAL
        assert c.request(99, 0, 0)[0] == errno_EINVAL  # an unknown command
        assert c.request(CMD_READ, 0, 512, flags=1 << 9)[0] == errno_EINVAL  # an unknown flag
        # BLOCK_STATUS without base:allocation selected
        assert c.request(CMD_BLOCK_STATUS, 0, 512)[0] == errno_EINVAL
        assert c.request(CMD_WRITE, 0, 4096, payload=b"\x01" * 4096) == (0, b"")
        assert c.request(CMD_FLUSH, 0, 0) == (0, b"")
        assert c.request(CMD_READ, 0, 4096) == (0, b"\x01" * 4096)
        c.send_request(CMD_READ, 0, 512, magic=0xDEADBEEF)  # wrong request magic: hung up on
        assert c.closed()
    with RawClient(served.sock) as c:  # a write over 32 MiB: EINVAL, then hung up on
        c.go("v", structured)
        assert c.request(CMD_WRITE, 0, 64 << 20)[0] == errno_EINVAL
        assert c.closed()
    qemu_io(served.url("v"), "read -P 1 0 4k")  # served on


def read_simple_replies(c: RawClient, expected: list[tuple[int, int]]) -> dict[int, bytes]:
    """Simple replies for ``(cookie, read length or 0)``, in any order; cookie -> data."""
    wanted = dict(expected)
    got = {}
    while len(got) < len(expected):
        magic, error, cookie = struct.unpack(">IIQ", c.recv(16))
        assert magic == 0x67446698 and error == 0 and cookie in wanted and cookie not in got
        got[cookie] = c.recv(wanted[cookie])
    return got


def test_pipelined_requests_are_all_answered(served):
    """Requests sent back to back: replies are held while more requests are buffered and
    go out together; none is lost, before a FLUSH, at the end of the data, or before DISC."""
    def request(cookie, kind, offset, length, payload=b""):
        return struct.pack(">IHHQQI", 0x25609513, 0, kind, cookie, offset, length) + payload

    with RawClient(served.sock) as c:
        c.go("v")
        batch = b"".join(request(i, CMD_WRITE, i * 4096, 4096, bytes([i]) * 4096) for i in range(1, 65))
        batch += request(100, CMD_FLUSH, 0, 0)  # in the middle: what came before is answered first
        batch += b"".join(request(200 + i, CMD_READ, i * 4096, 4096) for i in range(1, 65))
        c.sock.sendall(batch)
        got = read_simple_replies(c, [(i, 0) for i in range(1, 65)] + [(100, 0)] +
                                  [(200 + i, 4096) for i in range(1, 65)])
        assert all(got[200 + i] == bytes([i]) * 4096 for i in range(1, 65))
        # A batch that ends in DISC: its replies still come, then the server hangs up.
        c.sock.sendall(request(300, CMD_WRITE, 0, 512, b"\x09" * 512) + request(301, CMD_READ, 0, 512)
                       + request(302, CMD_DISC, 0, 0))
        assert read_simple_replies(c, [(300, 0), (301, 512)])[301] == b"\x09" * 512
        assert c.closed()
    qemu_io(served.url("v"), "read -P 9 0 512", "read -P 2 8k 4k")


def test_disconnect_mid_request_costs_nothing(served, tmp_path):
    for sent in (10, 28, 28 + 4096):  # inside the header, after it, inside the payload
        with RawClient(served.sock) as c:
            c.go("v")
            request = struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 1, 0, MiB) + b"\xee" * MiB
            c.sock.sendall(request[:sent])
    with RawClient(served.sock) as c:  # gone before reading its reply
        c.go("v")
        c.send_request(CMD_READ, 0, 16 * MiB)
    qemu_io(served.url("v"), "read -P 0 0 1M")  # nothing half-written
    served.stop()  # no NBD client holds the volume any more: no --force needed
    assert "Traceback" not in (served.pool / "fusepool.log").read_text()


def test_flush_on_one_connection_covers_another(served_no_commits, tmp_path):
    """NBD_FLAG_CAN_MULTI_CONN: a FLUSH makes every connection's answered writes durable."""
    served = served_no_commits
    with RawClient(served.sock) as a, RawClient(served.sock) as b:
        a.go("v")
        b.go("v")
        assert a.request(CMD_WRITE, 3 * MiB, MiB, payload=b"\x99" * MiB) == (0, b"")
        assert b.request(CMD_FLUSH, 0, 0) == (0, b"")
        served.kill()
        assert a.closed()
    assert offline_bytes(served.pool, "v", tmp_path)[3 * MiB : 4 * MiB] == b"\x99" * MiB


def test_block_status_req_one_and_limits(served):
    qemu_io(served.url("v"), "write -P 1 1M 64k")
    with RawClient(served.sock) as c:
        c.flags()
        assert c.option(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
        query = b"base:allocation"
        data = struct.pack(">I", 1) + b"v" + struct.pack(">II", 1, len(query)) + query
        replies = c.option(10, data)
        assert replies[0][0] == 4 and replies[0][1][4:] == query and replies[-1][0] == REP_ACK
        (context,) = struct.unpack(">I", replies[0][1][:4])
        assert c.option(OPT_GO, struct.pack(">I", 1) + b"v" + b"\0\0")[-1][0] == REP_ACK
        c.structured = True
        error, payload = c.request(CMD_BLOCK_STATUS, 0, 2 * MiB)
        assert error == 0 and struct.unpack(">I", payload[:4])[0] == context
        extents = [struct.unpack(">II", payload[i : i + 8]) for i in range(4, len(payload), 8)]
        assert extents == [(MiB, 3), (BS, 0), (MiB - BS, 3)]
        error, payload = c.request(CMD_BLOCK_STATUS, 0, 2 * MiB, flags=1 << 3)  # REQ_ONE
        assert error == 0 and struct.unpack(">II", payload[4:]) == (MiB, 3)
        assert c.request(CMD_BLOCK_STATUS, 64 * MiB - 512, 1024)[0] == errno_EINVAL


def test_direct_mode_pool_served_over_nbd_and_fuse_at_once(make_pool, make_mount, sockdir):
    """Direct mode: NBD and FUSE requests go through the one DirectIO (its prison and
    pins), so interleaved writes to the same blocks from both lose nothing."""
    pool = make_pool("direct", "--data-size", "32M", "--metadata-size", "8M", "--mode", "direct")
    run_fusepool("create", pool, "v", "--size", "4M")
    sock = sockdir / "d.sock"
    m = make_mount(pool, "--nbd", f"unix:{sock}")
    url = f"nbd+unix:///v?socket={sock}"
    # Halves of the same 64 KiB blocks: even 4 KiB pages through NBD, odd ones through FUSE.
    qemu_io(url, *(f"write -P {0x30 + i % 16} {i * 4096} 4096" for i in range(0, 64, 2)), "flush")
    for i in range(1, 64, 2):
        write_fully(m.vol("v"), i * 4096, bytes([0x60 + i % 16]) * 4096, fsync=False)
    os.sync()
    expected = b"".join(bytes([(0x30 if i % 2 == 0 else 0x60) + i % 16]) * 4096 for i in range(64))
    assert read_all(m.vol("v"), 0, 64 * 4096) == expected
    qemu_io(url, *(f"read -P {(0x30 if i % 2 == 0 else 0x60) + i % 16} {i * 4096} 4096"
                   for i in range(64)))
    qemu_io(url, "discard 0 64k", "flush")
    qemu_io(url, "read -P 0 0 64k")
