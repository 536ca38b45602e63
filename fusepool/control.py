"""The control socket: how commands reach a pool that a mount daemon holds.

Protocol: the client connects to ``POOL/control.sock``, sends one JSON line
``{"op": NAME, "args": {...}}`` and reads one JSON line back:
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": MESSAGE,
"type": ERROR_CLASS, "exit_status": N}``.  One request per connection keeps
both sides trivial.  The client side uses blocking sockets and imports no trio,
so CLI commands start fast.
"""

import json
import os
import socket

from fusepool import errors
from fusepool.layout import SOCKET

MAX_MESSAGE = 64 << 20
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; longer paths go through /proc


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


def error_reply(exc: Exception) -> dict:
    if isinstance(exc, errors.PoolError):
        return {"ok": False, "error": str(exc), "type": type(exc).__name__,
                "exit_status": exc.exit_status}
    return {"ok": False, "error": f"internal error: {exc!r}", "type": "PoolError", "exit_status": 1}


def raise_reply(reply: dict):
    """Turn a reply back into the engine's exception (or return its result)."""
    if reply.get("ok"):
        return reply.get("result")
    cls = getattr(errors, reply.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.PoolError)):
        cls = errors.PoolError
    raise cls(reply.get("error", "unknown error"))


def request(pool_dir: str, op: str, args: dict | None = None, timeout: float = 120.0):
    """Send one request to the daemon holding ``pool_dir``.

    Raises ``ConnectionRefusedError``/``FileNotFoundError`` when no daemon
    listens (the caller then opens the pool itself).
    """
    with socket_path(pool_dir) as path, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                break
    data = b"".join(chunks)
    if not data:
        raise errors.PoolError("the mount daemon closed the connection without answering")
    return raise_reply(json.loads(data))
