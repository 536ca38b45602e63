"""A minimal synchronous NBD client: the CLI's way to a volume's data when the
daemon serves no FUSE mount (`fusepool serve`), for `export` and `import`.

Fixed newstyle, NBD_OPT_GO, simple replies; READ, WRITE, FLUSH, DISC, one
request at a time.  No trio: the CLI starts fast.
"""

import contextlib
import socket
import struct

from fusepool.errors import PoolError

_NBDMAGIC, _IHAVEOPT, _REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
_REQUEST_MAGIC, _SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
_OPT_GO, _REP_ACK, _REP_INFO = 7, 1, 3
_CMD_READ, _CMD_WRITE, _CMD_DISC, _CMD_FLUSH = 0, 1, 2, 3
CHUNK = 4 << 20  # bytes per request (the server takes up to 32 MiB)


def connect_address(address: str, timeout: float = 60.0) -> socket.socket:
    """A socket connected to ``unix:PATH`` or ``tcp:HOST:PORT`` (as the daemon's status names it)."""
    kind, _, rest = address.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = rest
    else:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


class NbdVolume:
    """One export, read and written by offset (the interface of the CLI's volume objects)."""

    def __init__(self, address: str, name: str):
        self.name = name
        self.sock = connect_address(address)
        self.cookie = 0
        try:
            self._handshake(name.encode())
        except BaseException:
            self.sock.close()
            raise

    def _recv(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            chunk = self.sock.recv(min(n - got, 1 << 20))
            if not chunk:
                raise PoolError(f"NBD export {self.name!r}: the daemon closed the connection")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _handshake(self, name: bytes) -> None:
        magic, opt, _flags = struct.unpack(">QQH", self._recv(18))
        if (magic, opt) != (_NBDMAGIC, _IHAVEOPT):
            raise PoolError("not an NBD server (newstyle)")
        self.sock.sendall(struct.pack(">I", 1))  # NBD_FLAG_C_FIXED_NEWSTYLE
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", _IHAVEOPT, _OPT_GO, len(data)) + data)
        while True:
            magic, _opt, kind, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if magic != _REPLY_MAGIC:
                raise PoolError("NBD: bad option reply")
            if kind == _REP_ACK:
                return
            if kind & (1 << 31):
                raise PoolError(f"NBD export {self.name!r}: {payload.decode(errors='replace')}")

    def _request(self, kind: int, offset: int, length: int, payload=b"") -> bytes:
        self.cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, kind, self.cookie, offset, length))
        if payload:
            self.sock.sendall(payload)
        magic, error, cookie = struct.unpack(">IIQ", self._recv(16))
        if magic != _SIMPLE_REPLY_MAGIC or cookie != self.cookie:
            raise PoolError("NBD: bad reply")
        if error:
            import os

            raise PoolError(f"NBD export {self.name!r}: {os.strerror(error)} at byte {offset}")
        return self._recv(length) if kind == _CMD_READ else b""

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        while length > 0:
            n = min(length, CHUNK)
            parts.append(self._request(_CMD_READ, offset, n))
            offset, length = offset + n, length - n
        return b"".join(parts)

    def write(self, offset: int, data) -> None:
        view = memoryview(data)
        while view:
            piece = view[:CHUNK]
            self._request(_CMD_WRITE, offset, len(piece), piece)
            view, offset = view[len(piece):], offset + len(piece)

    def flush(self) -> None:
        self._request(_CMD_FLUSH, 0, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0))
        self.sock.close()
