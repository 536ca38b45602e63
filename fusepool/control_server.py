"""The mount daemon's side of the control socket (the protocol is in fusepool.control).

No client can hurt the daemon: every connection is checked with SO_PEERCRED
(only the user who mounted the pool, and root, may send commands), its
request is read with a size limit and a time limit, every reply is sent with
a time limit, and nothing a connection does can raise into the nursery that
also serves FUSE.  A client that vanishes, stalls or sends garbage costs only
its own connection.
"""

import contextlib
import json
import logging
import os
import socket
import struct

import trio

from fusepool.control import MAX_REQUEST, Held, Streamed, error_reply, socket_path
from fusepool.errors import PermissionDenied, PoolError, UsageError
from fusepool.layout import SOCKET

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0  # for the client to send its request, and to say "go"
SEND_TIMEOUT = 60.0  # per reply line or chunk: a client that stops reading is dropped
MAX_CONNECTIONS = 64  # more at once are refused (each costs a task and its buffers)
CHUNK = 1 << 20  # streamed output is sent in pieces of about this size
# A reservation (Held) lasts while its client keeps the connection open, but not for
# ever: held metadata pages cannot be reused, so a stuck reader must not fill the metadata.
HOLD_TIMEOUT = 3600.0


class _RequestTooLarge(Exception):
    pass


class _Reader:
    """Lines from a trio stream, with a size limit per line."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buffer = bytearray()

    async def line(self, limit: int) -> bytes | None:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                if end > limit:
                    raise _RequestTooLarge
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > limit:
                raise _RequestTooLarge
            chunk = await self.stream.receive_some(64 << 10)
            if not chunk:
                return None
            self.buffer += chunk


def peer_uid(sock) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ControlServer:
    """Serves ``POOL/control.sock``; ``dispatch(op, args)`` runs one command."""

    def __init__(self, pool_dir: str, dispatch):
        self.pool_dir = pool_dir
        self.dispatch = dispatch
        self.owner = os.geteuid()
        self.allowed = {0, self.owner}
        self.connections = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        path_in_pool = os.path.join(self.pool_dir, SOCKET)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        with socket_path(self.pool_dir) as path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path_in_pool)  # left by a dead daemon
            # The socket file is made with the umask's mode: owner-only from the start,
            # not chmod-ed after (a connection could slip in between).
            old_umask = os.umask(0o177)
            try:
                await sock.bind(path)
            finally:
                os.umask(old_umask)
        sock.listen(128)
        task_status.started()
        try:
            await trio.serve_listeners(self.handle, [trio.SocketListener(sock)])
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path_in_pool)

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection.  Never raises: whatever happens here stays here."""
        try:
            async with stream:
                uid = peer_uid(stream.socket)
                if uid not in self.allowed:  # before it may take a connection slot
                    log.warning("control socket: refused a connection from uid %d", uid)
                    await self._reply(stream, error_reply(PermissionDenied(
                        f"permission denied: pool {self.pool_dir} is controlled only by uid "
                        f"{self.owner} (who mounted it) and root")), patience=1.0)
                    return
                try:
                    self.connections.acquire_nowait()
                except trio.WouldBlock:
                    log.warning("control socket: more than %d connections at once; refusing one",
                                MAX_CONNECTIONS)
                    return
                try:
                    await self._converse(stream)
                finally:
                    self.connections.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
            log.debug("control client went away: %r", exc)
        except Exception:
            log.exception("control connection failed (the daemon carries on)")

    async def _send(self, stream: trio.SocketStream, data: bytes,
                    patience: float = SEND_TIMEOUT) -> bool:
        """Send, or give up on a client that does not read; False if given up."""
        with trio.move_on_after(patience):
            await stream.send_all(data)
            return True
        log.info("control client stopped reading: connection dropped")
        return False

    async def _reply(self, stream: trio.SocketStream, reply: dict,
                     patience: float = SEND_TIMEOUT) -> bool:
        return await self._send(stream, json.dumps(reply).encode() + b"\n", patience)

    async def _converse(self, stream: trio.SocketStream) -> None:
        reader = _Reader(stream)
        line = None
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                line = await reader.line(MAX_REQUEST)
        except _RequestTooLarge:
            await self._reply(stream, error_reply(UsageError(
                f"bad request: larger than {MAX_REQUEST >> 20} MiB")))
            return
        if line is None:
            return  # the client went away, or sent nothing in time
        try:
            request = json.loads(line)
            op, args = request["op"], request.get("args", {})
            if not isinstance(op, str) or not isinstance(args, dict):
                raise TypeError("op must be a string and args an object")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            await self._reply(stream, error_reply(UsageError(f"bad request: {exc}")))
            return
        if not await self._reply(stream, {"ready": True}):
            return
        go = None
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                go = await reader.line(16)
        except _RequestTooLarge:
            pass
        if go != b"go":
            log.info("control client gave up before `%s` started: not carried out", op)
            return
        streamed = held = None
        try:
            result = await self.dispatch(op, args)
            if isinstance(result, Streamed):
                streamed, result = result, result.result
            elif isinstance(result, Held):
                held, result = result, result.result
            reply = {"ok": True, "result": result, "stream": streamed is not None}
        except PoolError as exc:
            reply = error_reply(exc)
        except (ValueError, KeyError, TypeError) as exc:
            reply = error_reply(UsageError(f"bad request: {exc}"))
        except Exception as exc:
            log.exception("control request %s failed", op)
            reply = error_reply(exc)
        if held is not None:
            try:
                if await self._reply(stream, reply):
                    await self._wait_closed(reader, op)
            finally:
                held.release()
            return
        if not await self._reply(stream, reply) or streamed is None:
            return
        await self._send_stream(stream, streamed.chunks)

    async def _wait_closed(self, reader: _Reader, op: str) -> None:
        """Until the client closes the connection (or dies), or HOLD_TIMEOUT passes."""
        with trio.move_on_after(HOLD_TIMEOUT) as scope:
            while await reader.stream.receive_some(4096):
                pass  # (nothing more is expected; whatever comes is ignored)
        if scope.cancelled_caught:
            log.warning("control client held `%s` for %g s: released", op, HOLD_TIMEOUT)

    async def _send_stream(self, stream: trio.SocketStream, chunks) -> None:
        pending: list[bytes] = []
        size = 0
        for piece in chunks:
            data = piece.encode() if isinstance(piece, str) else piece
            pending.append(data)
            size += len(data)
            if size >= CHUNK:
                if not await self._send(stream, b"%d\n" % size + b"".join(pending)):
                    return
                pending, size = [], 0
        if size and not await self._send(stream, b"%d\n" % size + b"".join(pending)):
            return
        await self._send(stream, b"0\n")
