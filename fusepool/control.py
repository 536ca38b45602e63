"""The control socket: how commands reach a pool that a mount daemon holds.

Protocol (one request per connection; every message a JSON line)::

    client -> {"op": NAME, "args": {...}}
    daemon -> {"ready": true}                    the request is well-formed and allowed
    client -> "go"                               (only while the client still waits)
    daemon -> {"ok": true, "result": ...}        or {"ok": false, "error": MESSAGE,
                                                 "type": ERROR_CLASS, "exit_status": N}
    daemon -> CHUNKS (only when the reply says "stream": true)

A request the daemon refuses outright (bad JSON, too large, a peer that is
neither the daemon's user nor root) gets the error reply instead of "ready".
The "go" step is what makes client time-outs honest: a daemon that was stopped
or busy past the client's deadline never receives "go", so a command the CLI
reported as failed is never carried out later.  Only when the deadline passes
*after* "go" is the outcome unknown, and the CLI says so with its own exit
status (:class:`~fusepool.errors.StateUnknown`).

A streamed reply (``dump``) follows the reply line as chunks, each a line with
its length in bytes then the bytes, ended by a ``0`` line; a stream cut short
(the daemon died) is therefore detected, never taken as complete.

A held reply (``reserve_metadata_snap``) keeps something reserved in the
daemon for as long as the client keeps the connection open; closing it, or
dying, releases it (:func:`held`).

The client uses blocking sockets and imports no trio, so CLI commands start
fast.  The daemon side is :mod:`fusepool.control_server`.
"""

import contextlib
import json
import os
import socket
import time

from fusepool import errors
from fusepool.layout import LOCK, SOCKET

# A request is a command name and a few arguments: a MiB is far more than any needs.
MAX_REQUEST = 1 << 20
# Replies carry listings (one line per volume), so they may be large, but not unbounded.
MAX_REPLY = 256 << 20
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; longer paths go through /proc
# Commands that change nothing: a reply that comes too late is a plain failure.
READ_ONLY_OPS = {"status", "list", "info", "inspect", "map", "thin_ls", "delta", "dump", "check",
                 "reserve_metadata_snap"}
# Commands that walk every mapping: online, the client runs them on a commit the daemon
# holds for it (fusepool.reporting), never in the daemon (`info` is cheap and stays there).
SNAPSHOT_OPS = frozenset({"list", "thin_ls", "map", "delta", "dump", "inspect"})


class socket_path:
    """``with socket_path(pool_dir) as path``: a path for the pool's socket that fits
    in sockaddr_un however deep the pool is (long ones go through /proc/self/fd)."""

    def __init__(self, pool_dir: str):
        self.pool_dir = pool_dir
        self.fd = -1

    def __enter__(self) -> str:
        path = os.path.join(self.pool_dir, SOCKET)
        if len(os.fsencode(path)) < _SUN_PATH_MAX:
            return path
        self.fd = os.open(self.pool_dir, os.O_PATH | os.O_DIRECTORY)
        return f"/proc/self/fd/{self.fd}/{SOCKET}"

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Streamed:
    """A command result followed by a byte stream (``dump``'s XML).

    ``chunks`` yields ``str`` or ``bytes`` pieces; it must read only data that
    no other request can change (the stream is sent across await points).
    """

    def __init__(self, result, chunks):
        self.result = result
        self.chunks = chunks


class Held:
    """A command result whose reservation lasts until the client closes the connection.

    ``release()`` is called by the daemon then (or when it stops).
    """

    def __init__(self, result, release):
        self.result = result
        self.release = release


def error_reply(exc: Exception) -> dict:
    if isinstance(exc, errors.PoolError):
        return {"ok": False, "error": str(exc), "type": type(exc).__name__,
                "exit_status": exc.exit_status}
    return {"ok": False, "error": f"internal error: {exc!r}", "type": "PoolError", "exit_status": 1}


def raise_reply(reply: dict):
    """Turn a reply back into the engine's exception (or return its result)."""
    if not isinstance(reply, dict):
        raise errors.PoolError("the mount daemon sent a malformed reply")
    if reply.get("ok"):
        return reply.get("result")
    cls = getattr(errors, str(reply.get("type", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.PoolError)):
        cls = errors.PoolError
    raise cls(str(reply.get("error", "unknown error")))


def lock_holder(pool_dir: str) -> str:
    """The pid written in the pool's lock file, for messages ("" if unknown)."""
    try:
        with open(os.path.join(pool_dir, LOCK), "rb") as f:
            text = f.read(32).decode(errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


class _Connection:
    """A blocking client connection that reads lines and chunks against one deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.buffer = bytearray()

    def _fill(self) -> bool:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(1 << 20)
        self.buffer += chunk
        return bool(chunk)

    def line(self, limit: int = MAX_REPLY) -> bytes | None:
        """The next line without its newline; None at end of stream."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > limit:
                raise errors.PoolError("the mount daemon sent a reply larger than "
                                       f"{limit >> 20} MiB")
            if not self._fill():
                return None

    def exactly(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            if not self._fill():
                return None
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


def request(pool_dir: str, op: str, args: dict | None = None, timeout: float = 120.0,
            output=None):
    """Send one request to the daemon holding ``pool_dir``; return its result.

    Raises ``ConnectionRefusedError``/``FileNotFoundError`` when no daemon
    listens (the caller then opens the pool itself), :class:`DaemonTimeout`
    when the daemon did not take the request within ``timeout`` seconds
    (nothing was done), :class:`StateUnknown` when it took a changing request
    but did not answer in time.  A streamed reply is written to ``output``
    (a binary file object).
    """
    with _exchange(pool_dir, op, args, timeout, output) as result:
        return result


@contextlib.contextmanager
def held(pool_dir: str, op: str, args: dict | None = None, timeout: float = 120.0):
    """``with held(...) as result``: a request whose reservation lasts for the block."""
    with _exchange(pool_dir, op, args, timeout, None) as result:
        yield result


@contextlib.contextmanager
def _exchange(pool_dir: str, op: str, args: dict | None, timeout: float, output):
    deadline = time.monotonic() + timeout
    message = json.dumps({"op": op, "args": args or {}}).encode() + b"\n"
    who = f"the mount daemon of {pool_dir}"
    pid = lock_holder(pool_dir)
    if pid:
        who += f" (pid {pid})"
    with socket_path(pool_dir) as path, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        _connect(sock, path, deadline, f"{who} did not accept a connection within {timeout:g} s; "
                 f"`{op}` was not carried out")
        conn = _Connection(sock, deadline)
        started = False
        try:
            # Refused before reading (another user)? Then its reply says why.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(message)
            hello = conn.line()
            if hello is None:
                raise errors.PoolError(f"{who} closed the connection without answering")
            reply = json.loads(hello)
            if isinstance(reply, dict) and reply.get("ready"):
                sock.sendall(b"go\n")
                started = True
                line = conn.line()
                if line is None:
                    raise _cut_short(who, op)
                reply = json.loads(line)
            result = raise_reply(reply)
            if reply.get("stream"):
                _receive_stream(conn, output, who, op)
        except TimeoutError:
            if not started:
                raise errors.DaemonTimeout(
                    f"{who} did not answer within {timeout:g} s (is it stopped?); `{op}` was not "
                    "carried out") from None
            if op in READ_ONLY_OPS:
                raise errors.PoolError(f"{who} did not finish `{op}` within {timeout:g} s") from None
            raise errors.StateUnknown(
                f"{who} took `{op}` but did not answer within {timeout:g} s: state unknown, the "
                "daemon may still carry it out (check with `fusepool list`)") from None
        except (ConnectionResetError, BrokenPipeError):
            if started and op not in READ_ONLY_OPS:
                raise _cut_short(who, op) from None
            raise errors.PoolError(f"{who} closed the connection without answering") from None
        except ValueError:
            raise errors.PoolError(f"{who} sent a malformed reply") from None
        yield result


def _connect(sock: socket.socket, path: str, deadline: float, late: str) -> None:
    """Connect, retrying while the daemon's backlog is full, until the deadline."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.DaemonTimeout(late)
        sock.settimeout(remaining)
        try:
            sock.connect(path)
            return
        except TimeoutError:
            raise errors.DaemonTimeout(late) from None
        except BlockingIOError:  # EAGAIN: the listen backlog is full
            time.sleep(min(0.01, max(remaining, 0)))


def _cut_short(who: str, op: str) -> errors.PoolError:
    if op in READ_ONLY_OPS:
        return errors.PoolError(f"{who} closed the connection before answering `{op}`")
    return errors.StateUnknown(f"{who} closed the connection after taking `{op}`: state unknown "
                               "(check with `fusepool list`)")


def _receive_stream(conn: _Connection, output, who: str, op: str) -> None:
    while True:
        header = conn.line(limit=32)
        if header is None or not header.isdigit():
            raise errors.PoolError(f"{who} cut the output of `{op}` short")
        size = int(header)
        if size == 0:
            return
        data = conn.exactly(size)
        if data is None:
            raise errors.PoolError(f"{who} cut the output of `{op}` short")
        output.write(data)
