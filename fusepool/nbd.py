"""The NBD server: every volume of the pool as a Network Block Device export.

The Network Block Device protocol (doc/proto.md of github.com/NetworkBlockDevice/nbd),
as qemu-nbd, nbdkit and qemu-storage-daemon speak it, served on trio in the
daemon's event loop, over the same engine as the FUSE mount (or without one:
``fusepool serve``).  One export per volume, named by the volume's name.

- Handshake: fixed newstyle only; options EXPORT_NAME, GO, INFO, LIST, ABORT,
  STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (``base:allocation``);
  anything else is answered NBD_REP_ERR_UNSUP.
- Transmission: READ, WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES (+NO_HOLE), CACHE,
  BLOCK_STATUS (unmapped blocks are HOLE|ZERO), DISC.
- FLUSH is the FUSE fsync path (:class:`fusepool.flushing.Flusher`, shared with
  the mount): durable when answered.  The engine's FLUSH makes every write the
  daemon has received durable, from every connection and front end, so
  NBD_FLAG_CAN_MULTI_CONN is advertised: a FLUSH on one connection covers the
  writes answered on all of them (the protocol's condition for it).
- Engine calls never await between a lookup and the update that depends on it
  (a request's range is checked against the volume's size in the same
  synchronous stretch as the engine call), as in the FUSE adapter.
- Errors: every failed request gets the protocol's error reply (EINVAL for a
  range past the end of a read, trim or status query, ENOSPC for a write past
  the end or a full pool, EPERM for writes to a read-only export, EIO for a
  failed pool); a client that breaks the protocol (wrong magic, a write
  payload over 32 MiB, unknown client flags) is disconnected; nothing a
  connection does raises into the daemon's nursery, and one that vanishes
  mid-request costs only itself.
"""

import contextlib
import errno
import logging
import os
import socket
import stat
import struct

import trio

from fusepool.control_server import peer_uid
from fusepool.engine import Pool
from fusepool.errors import InvalidArgument, PoolError, PoolFull, UsageError
from fusepool.flushing import Flusher
from fusepool.metadata.format import FANOUT, UNMAPPED
from fusepool.metadata.tree import Tree

log = logging.getLogger(__name__)

# --- protocol constants (doc/proto.md, "Values") --------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9  # option replies
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1

FLAG_HAS_FLAGS = 1 << 0  # transmission flags
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_BLOCK_STATUS = 0, 1, 5
REPLY_TYPE_ERROR = (1 << 15) + 1

STATE_HOLE, STATE_ZERO = 1 << 0, 1 << 1

# The protocol's error values; any other errno is reported as the nearest of these.
NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC = 1, 5, 12, 22, 28
NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN = 75, 95, 108
_NBD_ERRNO = {errno.EPERM: NBD_EPERM, errno.EROFS: NBD_EPERM, errno.EACCES: NBD_EPERM,
              errno.EIO: NBD_EIO, errno.ENOMEM: NBD_ENOMEM, errno.EINVAL: NBD_EINVAL,
              errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC, errno.EFBIG: NBD_ENOSPC,
              errno.EOVERFLOW: NBD_EOVERFLOW, errno.ENOTSUP: NBD_ENOTSUP,
              errno.ESHUTDOWN: NBD_ESHUTDOWN}

BASE_ALLOCATION = "base:allocation"
ALLOCATION_CONTEXT_ID = 1

# --- limits --------------------------------------------------------------------------
MAX_PAYLOAD = 32 << 20  # the protocol's default maximum (2^25): larger requests are refused
MAX_OPTION = 64 << 10  # option data (a name is at most 4096 bytes; queries a few)
MAX_STRING = 4096  # the protocol's limit on a name or a query
MAX_QUERIES = 128
MAX_EXTENTS = 1 << 16  # block status descriptors per reply (the protocol allows 2^20)
PREFERRED_BLOCK = 4096
HANDSHAKE_TIMEOUT = 30.0  # to finish option haggling (a silent client holds a slot only this long)
SEND_TIMEOUT = 60.0  # per reply: a client that stops reading is dropped
MAX_CONNECTIONS = 64  # more at once are closed at once
SMALL_REPLY = 256 << 10  # a reply up to this size is sent in one piece (copied once)
ZERO_CHUNK = 1 << 20  # WRITE_ZEROES with NO_HOLE writes zeros this much at a time
YIELD_EVERY = 16  # requests served from the receive buffer between yields to other tasks
GATHER_RECEIVE = 128 << 10  # a write payload this big is received in pieces, joined once


class ProtocolError(Exception):
    """The client broke the protocol: the connection is dropped (a hard disconnect)."""


class _Disconnected(Exception):
    pass


class _Reader:
    """Exact-size reads from a trio stream, buffered.  ``before_wait`` (a coroutine function)
    runs whenever a read must wait for the client: the connection sends its held replies."""

    def __init__(self, stream, before_wait=None):
        self.stream = stream
        self.buffer = bytearray()
        self.before_wait = before_wait

    async def exactly(self, n: int) -> bytes:
        if len(self.buffer) < n and n >= GATHER_RECEIVE:
            return await self._gathered(n)
        while len(self.buffer) < n:
            await self._wait()
            chunk = await self.stream.receive_some(max(n - len(self.buffer), 256 << 10))
            if not chunk:
                raise _Disconnected
            self.buffer += chunk
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def _gathered(self, n: int) -> bytes:
        """A big payload: its pieces joined once at the end (two copies, not four).  Memory
        grows only as the data arrives: a header alone makes the server allocate nothing."""
        pieces = [bytes(self.buffer)]
        have = len(self.buffer)
        self.buffer.clear()
        while have < n:
            await self._wait()
            chunk = await self.stream.receive_some(min(n - have, 1 << 20))
            if not chunk:
                raise _Disconnected
            pieces.append(chunk)
            have += len(chunk)
        return b"".join(pieces)

    async def _wait(self) -> None:
        if self.before_wait is not None:
            await self.before_wait()


def nbd_error(exc: BaseException) -> int:
    return _NBD_ERRNO.get(getattr(exc, "errno", None) or errno.EIO, NBD_EIO)


def parse_address(text: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:PATH`` or ``tcp:[HOST:]PORT`` (HOST 127.0.0.1 unless given; ``[::1]:PORT``)."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return "unix", os.path.abspath(rest)
    if kind == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if port.isdigit() and int(port) < 65536:
            return "tcp", (host, int(port))
    raise UsageError(f"--nbd {text}: expected unix:PATH or tcp:[HOST:]PORT")


def describe(address: tuple[str, str | tuple[str, int]]) -> str:
    kind, where = address
    if kind == "unix":
        return f"unix:{where}"
    host, port = where
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


class NbdServer:
    """Serves the pool's volumes on the given listening addresses.

    ``flusher`` is the daemon's (shared with the FUSE adapter when both serve);
    ``read_only`` makes every export read-only.
    """

    def __init__(self, pool: Pool, flusher: Flusher, addresses: list, read_only: bool = False,
                 no_space_timeout: float | None = None):
        self.pool = pool
        self.flusher = flusher
        self.addresses = [parse_address(a) if isinstance(a, str) else a for a in addresses]
        self.read_only = read_only
        self.no_space_timeout = (pool.config.no_space_timeout if no_space_timeout is None
                                 else no_space_timeout)
        self.owner = os.geteuid()
        self.connections = trio.CapacityLimiter(MAX_CONNECTIONS)
        self.bound: list[str] = []  # the addresses served, as `describe` gives them (port 0 resolved)
        self._unix_paths: list[str] = []
        self._sockets: list[socket.socket] = []

    # --- listening ---------------------------------------------------------------------

    def bind(self) -> None:
        """Listen on every address, before anything is served: a bad address, a path in
        use or a port taken is a usage error now, not a failure of the running daemon."""
        try:
            for address in self.addresses:
                self._sockets.append(self._listen(address))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop listening; the unix sockets' files are removed."""
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._unix_paths = []

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if not self._sockets:
            self.bind()
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in self._sockets]
        task_status.started()
        try:
            await trio.serve_listeners(self.handle, listeners)
        finally:
            self.close()

    def _listen(self, address) -> socket.socket:
        kind, where = address
        if kind == "unix":
            self._clear_stale_socket(where)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)  # owner-only from the start, as control.sock
            try:
                sock.bind(where)
            except OSError as exc:
                sock.close()
                raise UsageError(f"--nbd unix:{where}: {exc.strerror or exc}") from None
            finally:
                os.umask(old_umask)
            self._unix_paths.append(where)
            self.bound.append(f"unix:{where}")
        else:
            host, port = where
            try:
                family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                raise UsageError(f"--nbd {describe(address)}: {exc.strerror or exc}") from None
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                raise UsageError(f"--nbd {describe(address)}: {exc.strerror or exc}") from None
            self.bound.append(describe(("tcp", sock.getsockname()[:2])))
        sock.listen(128)
        log.info("NBD: serving the pool's volumes on %s", self.bound[-1])
        return sock

    @staticmethod
    def _clear_stale_socket(path: str) -> None:
        """A socket left by a dead daemon is removed; anything else at ``path`` is refused."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError(f"--nbd unix:{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: left behind
            return
        except OSError as exc:
            raise UsageError(f"--nbd unix:{path}: {exc.strerror}") from None
        finally:
            probe.close()
        raise UsageError(f"--nbd unix:{path}: another server listens there")

    # --- one connection ------------------------------------------------------------------

    async def handle(self, stream) -> None:
        """One client.  Never raises: whatever happens here stays here."""
        try:
            async with stream:
                if stream.socket.family == socket.AF_UNIX:
                    uid = peer_uid(stream.socket)
                    if uid not in (0, self.owner):  # (the socket is 0600: only root gets here)
                        log.warning("NBD: refused a connection from uid %d", uid)
                        return
                else:
                    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
                try:
                    self.connections.acquire_nowait()
                except trio.WouldBlock:
                    log.warning("NBD: more than %d connections at once; refusing one", MAX_CONNECTIONS)
                    return
                try:
                    await Connection(self, stream).run()
                finally:
                    self.connections.release()
        except (_Disconnected, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass  # the client went away
        except ProtocolError as exc:
            log.warning("NBD: dropped a client: %s", exc)
        except trio.TooSlowError:
            log.warning("NBD: dropped a client that was too slow")
        except OSError as exc:
            log.warning("NBD: connection error: %s", exc)
        except Exception:
            log.exception("NBD: unexpected error on a connection")


class Connection:
    """The handshake, then the requests of one client (one at a time, in order).

    In transmission, replies are held while more requests wait in the receive
    buffer and go out together when the next read would wait, or before
    anything slow (a FLUSH, direct I/O): a client that keeps several requests
    in flight gets their replies in one write, not one system call (and one
    wake-up of the client) each.
    """

    def __init__(self, server: NbdServer, stream):
        self.server = server
        self.pool = server.pool
        self.stream = stream
        self.reader = _Reader(stream, before_wait=self.send_held)
        self.hold_replies = False  # in transmission: hold replies until send_held
        self.held: list[bytes] = []
        self.held_size = 0
        self.structured = False
        self.no_zeroes = False
        self.meta_export: str | None = None  # the export the metadata contexts were chosen for
        self.allocation = False  # base:allocation selected
        self.dev_id: int | None = None
        self.name = ""

    async def send(self, *parts: bytes) -> None:
        self.held.extend(parts)
        self.held_size += sum(map(len, parts))
        if not self.hold_replies or self.held_size >= SMALL_REPLY:
            await self.send_held()

    async def send_held(self) -> None:
        """Send the replies held so far: small ones joined into one write."""
        parts, self.held, self.held_size = self.held, [], 0
        if not parts:
            return
        with trio.fail_after(SEND_TIMEOUT):
            small: list[bytes] = []
            for part in parts:
                if len(part) < SMALL_REPLY:
                    small.append(part)
                    continue
                if small:
                    await self.stream.send_all(b"".join(small))
                    small = []
                await self.stream.send_all(part)  # (a big read's data: not copied)
            if small:
                await self.stream.send_all(b"".join(small))

    async def run(self) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                entered = await self.handshake()
            if entered:
                await self.transmission()
        finally:
            if self.dev_id is not None:
                self.pool.close_device(self.dev_id)

    # --- handshake ------------------------------------------------------------------------

    async def handshake(self) -> bool:
        """Option haggling; True once an export is chosen (transmission follows)."""
        await self.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", await self.reader.exactly(4))
        if client_flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise ProtocolError(f"unknown client flags {client_flags:#x}")  # (the protocol: MUST drop)
        self.no_zeroes = bool(client_flags & FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = struct.unpack(">QII", await self.reader.exactly(16))
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                await self.option_reply(option, REP_ERR_TOO_BIG, b"option data too long")
                raise ProtocolError(f"option {option} with {length} bytes of data")
            data = await self.reader.exactly(length)
            if option == OPT_EXPORT_NAME:
                return await self.export_name(data)
            if option == OPT_ABORT:
                await self.option_reply(option, REP_ACK)
                return False
            handler = {OPT_LIST: self.opt_list, OPT_INFO: self.opt_info, OPT_GO: self.opt_info,
                       OPT_STRUCTURED_REPLY: self.opt_structured_reply,
                       OPT_LIST_META_CONTEXT: self.opt_meta_context,
                       OPT_SET_META_CONTEXT: self.opt_meta_context}.get(option)
            if handler is None:
                await self.option_error(option, REP_ERR_UNSUP, f"option {option} is not supported")
                continue
            try:
                if await handler(option, data):
                    return True
            except InvalidArgument as exc:
                await self.option_error(option, REP_ERR_INVALID, str(exc))

    async def option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        await self.send(struct.pack(">QIII", REPLY_MAGIC, option, reply, len(data)), data)

    async def option_error(self, option: int, reply: int, message: str) -> None:
        await self.option_reply(option, reply, message.encode()[:MAX_STRING])

    def flags(self) -> int:
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN
        if self.server.read_only:
            flags |= FLAG_READ_ONLY
        else:
            flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
        if self.structured:
            flags |= FLAG_SEND_DF  # (a read is always one chunk)
        return flags

    def lookup(self, name: str) -> int | None:
        return self.pool.names.get(name)

    async def export_name(self, data: bytes) -> bool:
        """NBD_OPT_EXPORT_NAME: no way to say no but to hang up."""
        name = data.decode(errors="replace")
        dev_id = self.lookup(name)
        if dev_id is None:
            raise ProtocolError(f"export {name!r} (NBD_OPT_EXPORT_NAME): no such volume")
        self.enter(name, dev_id)
        size = self.pool.device(dev_id).size
        await self.send(struct.pack(">QH", size, self.flags()), b"" if self.no_zeroes else bytes(124))
        return True

    def enter(self, name: str, dev_id: int) -> None:
        self.pool.open_device(dev_id)  # (a volume removed meanwhile stays until we close it)
        self.name, self.dev_id = name, dev_id
        if self.meta_export != name:
            self.allocation = False
        log.debug("NBD: a client uses export %r", name)

    async def opt_list(self, option: int, data: bytes) -> bool:
        if data:
            raise InvalidArgument("NBD_OPT_LIST takes no data")
        for name in sorted(self.pool.names):
            encoded = name.encode()
            await self.option_reply(option, REP_SERVER, struct.pack(">I", len(encoded)) + encoded)
        await self.option_reply(option, REP_ACK)
        return False

    async def opt_structured_reply(self, option: int, data: bytes) -> bool:
        if data:
            raise InvalidArgument("NBD_OPT_STRUCTURED_REPLY takes no data")
        if self.structured:
            raise InvalidArgument("structured replies are already negotiated")
        self.structured = True
        await self.option_reply(option, REP_ACK)
        return False

    async def opt_info(self, option: int, data: bytes) -> bool:
        """NBD_OPT_INFO and NBD_OPT_GO (GO enters transmission on success)."""
        name, rest = _string(data, 0)
        if len(rest) < 2:
            raise InvalidArgument("truncated information request list")
        (count,) = struct.unpack(">H", rest[:2])
        if len(rest) != 2 + 2 * count:
            raise InvalidArgument("information request list does not match its count")
        requests = set(struct.unpack(f">{count}H", rest[2:]))
        dev_id = self.lookup(name)
        if dev_id is None:
            await self.option_error(option, REP_ERR_UNKNOWN, f"no volume named {name!r} in this pool"
                                    if name else "name a volume: this server has no default export")
            return False
        if option == OPT_GO:
            self.enter(name, dev_id)
        if INFO_NAME in requests:
            await self.option_reply(option, REP_INFO, struct.pack(">H", INFO_NAME) + name.encode())
        if INFO_BLOCK_SIZE in requests:
            await self.option_reply(option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1,
                                                                  PREFERRED_BLOCK, MAX_PAYLOAD))
        size = self.pool.device(dev_id).size
        await self.option_reply(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, self.flags()))
        await self.option_reply(option, REP_ACK)
        return option == OPT_GO

    async def opt_meta_context(self, option: int, data: bytes) -> bool:
        """NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: ``base:allocation`` only."""
        setting = option == OPT_SET_META_CONTEXT
        if setting:
            self.allocation, self.meta_export = False, None  # (replaced, even if this fails)
        if not self.structured:
            raise InvalidArgument("negotiate structured replies first")
        name, rest = _string(data, 0)
        if len(rest) < 4:
            raise InvalidArgument("truncated query list")
        (count,) = struct.unpack(">I", rest[:4])
        if count > MAX_QUERIES:
            await self.option_error(option, REP_ERR_TOO_BIG, "too many queries")
            return False
        queries, pos = [], 4
        for _ in range(count):
            query, _ = _string(rest, pos)
            pos += 4 + len(query.encode())
            queries.append(query)
        if pos != len(rest):
            raise InvalidArgument("query list does not match its count")
        if self.lookup(name) is None:
            await self.option_error(option, REP_ERR_UNKNOWN, f"no volume named {name!r} in this pool")
            return False
        if setting:
            match = BASE_ALLOCATION in queries
        else:  # no query, "base:" and "base:allocation" list it
            match = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        if match:
            await self.option_reply(option, REP_META_CONTEXT,
                                    struct.pack(">I", ALLOCATION_CONTEXT_ID if setting else 0)
                                    + BASE_ALLOCATION.encode())
        if setting:
            self.allocation, self.meta_export = match, name
        await self.option_reply(option, REP_ACK)
        return False

    # --- transmission -----------------------------------------------------------------------

    async def transmission(self) -> None:
        self.hold_replies = True
        served = 0
        while True:
            served += 1
            if served % YIELD_EVERY == 0:
                # Requests taken from the buffer and held replies never wait, so nothing else
                # would yield: one busy client must not keep the other clients and FUSE waiting.
                await trio.lowlevel.checkpoint()
            magic, flags, kind, cookie, offset, length = struct.unpack(
                ">IHHQQI", await self.reader.exactly(28))
            if magic != REQUEST_MAGIC:
                await self.send_held()
                raise ProtocolError(f"bad request magic {magic:#x}")
            if kind == CMD_DISC:
                await self.send_held()  # (the replies to what came before it)
                return
            payload = b""
            if kind == CMD_WRITE:
                if length > MAX_PAYLOAD:  # its payload would have to be read to go on
                    await self.reply_error(kind, cookie, NBD_EINVAL,
                                           f"write of {length} bytes: the limit is {MAX_PAYLOAD}")
                    await self.send_held()
                    raise ProtocolError(f"write payload of {length} bytes")
                payload = await self.reader.exactly(length)
            if kind == CMD_FLUSH or flags & CMD_FLAG_FUA or self.server.flusher.direct is not None:
                await self.send_held()  # this one may take a while: don't hold earlier replies
            try:
                await self.request(kind, flags, cookie, offset, length, payload)
            except PoolError as exc:
                log.debug("NBD %s: command %d: %s", self.name, kind, exc)
                await self.reply_error(kind, cookie, nbd_error(exc), str(exc))
            except OSError as exc:
                log.error("NBD %s: command %d: I/O error: %s", self.name, kind, exc)
                await self.reply_error(kind, cookie, nbd_error(exc), exc.strerror or str(exc))
            except (trio.Cancelled, ProtocolError, _Disconnected, trio.BrokenResourceError,
                    trio.ClosedResourceError, trio.TooSlowError):
                raise
            except Exception as exc:  # the engine may have stopped half-way: fail the pool
                log.exception("NBD %s: unexpected error in command %d", self.name, kind)
                self.pool.fail_unexpected(f"{type(exc).__name__} in NBD command {kind}: {exc}")
                await self.reply_error(kind, cookie, NBD_EIO, "internal error")

    def _check(self, flags: int, allowed: int, offset: int, length: int, past_end: int) -> int:
        """The volume's size, after checking the flags and that the range lies within it."""
        if flags & ~(allowed | CMD_FLAG_FUA):
            raise InvalidArgument(f"command flags {flags:#x} not valid here")
        size = self.pool.device(self.dev_id).size
        if offset + length > size:
            error = InvalidArgument(f"range {offset}+{length} is past the end of the volume "
                                    f"({size} bytes)")
            error.errno = past_end
            raise error
        return size

    def _check_writable(self) -> None:
        if self.server.read_only:
            error = InvalidArgument("the export is read-only")
            error.errno = errno.EPERM
            raise error

    async def request(self, kind, flags, cookie, offset, length, payload) -> None:
        pool, dev_id = self.pool, self.dev_id
        if kind == CMD_READ:
            if length > MAX_PAYLOAD:
                raise InvalidArgument(f"read of {length} bytes: the limit is {MAX_PAYLOAD}")
            self._check(flags, CMD_FLAG_DF if self.structured else 0, offset, length, errno.EINVAL)
            direct = self.server.flusher.direct
            data = (pool.read(dev_id, offset, length) if direct is None
                    else await direct.read(dev_id, offset, length))
            await self.reply_read(cookie, offset, data)
            return
        if kind == CMD_WRITE:
            self._check_writable()
            self._check(flags, 0, offset, length, errno.ENOSPC)
            await self.write(offset, payload)
        elif kind == CMD_FLUSH:
            self._check(flags, 0, 0, 0, errno.EINVAL)
            await self.server.flusher.flush()
        elif kind == CMD_TRIM:
            self._check_writable()
            self._check(flags, 0, offset, length, errno.EINVAL)
            await self.discard(offset, length)
        elif kind == CMD_WRITE_ZEROES:
            self._check_writable()
            self._check(flags, CMD_FLAG_NO_HOLE, offset, length, errno.ENOSPC)
            await self.write_zeroes(offset, length, hole=not flags & CMD_FLAG_NO_HOLE)
        elif kind == CMD_CACHE:
            self._check(flags, 0, offset, length, errno.EINVAL)  # (the host page cache does it)
        elif kind == CMD_BLOCK_STATUS:
            if not self.allocation:
                raise InvalidArgument("no metadata context was selected (base:allocation)")
            size = self._check(flags, CMD_FLAG_REQ_ONE, offset, length, errno.EINVAL)
            if not length:
                raise InvalidArgument("block status of an empty range")
            await self.reply_block_status(cookie, offset, length, size, flags & CMD_FLAG_REQ_ONE)
            return
        else:
            raise InvalidArgument(f"unknown command {kind}")
        if flags & CMD_FLAG_FUA and kind != CMD_FLUSH:
            await self.server.flusher.flush()
        await self.reply_ok(cookie)

    async def write(self, offset: int, data: bytes) -> None:
        """All of ``data`` at ``offset``, or an error.  In queue mode a write that finds the
        pool full waits for space as the FUSE adapter's does (it is retried whole)."""
        deadline = None
        while True:
            try:
                await self._write_all(offset, data)
                return
            except PoolFull:
                if self.server.no_space_timeout <= 0:
                    raise
                if deadline is None:
                    deadline = trio.current_time() + self.server.no_space_timeout
                elif trio.current_time() >= deadline:
                    raise
            await self.send_held()  # (while it waits for space)
            await trio.sleep(0.05)

    async def _write_all(self, offset: int, data) -> None:
        direct = self.server.flusher.direct  # direct mode: its prison and pins, as for FUSE
        view = memoryview(data)
        while view:  # (the engine writes less only when the pool filled up part-way)
            n = (self.pool.write(self.dev_id, offset, view) if direct is None
                 else await direct.write(self.dev_id, offset, view))
            if not n:
                raise PoolFull("pool is out of data space")
            view, offset = view[n:], offset + n

    async def write_zeroes(self, offset: int, length: int, hole: bool) -> None:
        """Zeros over the range: whole blocks unmapped (unless NO_HOLE), partial ones written."""
        end = offset + length
        if hole:
            bs = self.pool.block_size
            first, last = -(-offset // bs) * bs, end // bs * bs
            if first < last:
                await self.discard(first, last - first)
                edges = [(offset, first), (last, end)]
            else:
                edges = [(offset, end)]
            for start, stop in edges:
                if stop > start and self._mapped(start // bs):  # an unmapped block reads as zeros
                    await self.write(start, bytes(stop - start))
            return
        zeros = bytes(min(length, ZERO_CHUNK))
        while offset < end:
            n = min(end - offset, ZERO_CHUNK)
            await self.write(offset, zeros[:n])
            offset += n
            await trio.lowlevel.checkpoint()  # each chunk is its own engine call

    async def discard(self, offset: int, length: int) -> None:
        """Unmap; in direct mode after the device's writes in flight (they would land on
        blocks the discard frees)."""
        direct = self.server.flusher.direct
        if direct is None:
            self.pool.discard(self.dev_id, offset, length)
            return
        async with direct.quiesce(self.dev_id):
            self.pool.discard(self.dev_id, offset, length)

    def _mapped(self, vb: int) -> bool:
        leaf = Tree.leaf(self.pool.device(self.dev_id).root, vb // FANOUT)
        return leaf is not None and leaf.entries[vb % FANOUT] != UNMAPPED

    # --- replies --------------------------------------------------------------------------

    async def reply_ok(self, cookie: int) -> None:
        await self.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie))

    async def reply_read(self, cookie: int, offset: int, data: bytes) -> None:
        if not self.structured:
            await self.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie), data)
        elif not data:
            await self.send(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                        REPLY_TYPE_NONE, cookie, 0))
        else:
            await self.send(struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                        REPLY_TYPE_OFFSET_DATA, cookie, 8 + len(data), offset), data)

    async def reply_error(self, kind: int, cookie: int, error: int, message: str) -> None:
        if self.structured:  # (required for READ; it also carries the message)
            text = message.encode()[:MAX_STRING]
            await self.send(struct.pack(">IHHQIIH", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                        REPLY_TYPE_ERROR, cookie, 6 + len(text), error, len(text)), text)
        else:
            await self.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie))

    async def reply_block_status(self, cookie: int, offset: int, length: int, size: int,
                                 one: bool) -> None:
        extents = self.allocation_extents(offset, min(offset + length, size), 1 if one else MAX_EXTENTS)
        payload = struct.pack(">I", ALLOCATION_CONTEXT_ID) + b"".join(
            struct.pack(">II", n, state) for n, state in extents)
        await self.send(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                    REPLY_TYPE_BLOCK_STATUS, cookie, len(payload)), payload)

    def allocation_extents(self, start: int, end: int, limit: int) -> list[tuple[int, int]]:
        """``(length, state)`` runs from the mappings: an unmapped block is HOLE|ZERO, a mapped
        one 0 (data).  At most ``limit`` runs; the last may end before ``end``."""
        bs = self.pool.block_size
        root = self.pool.device(self.dev_id).root
        extents: list[list[int]] = []
        pos = start
        while pos < end:
            vb = pos // bs
            leaf_index = vb // FANOUT
            leaf = Tree.leaf(root, leaf_index)
            if leaf is None:  # a whole leaf unmapped: one step
                stop, state = min((leaf_index + 1) * FANOUT * bs, end), STATE_HOLE | STATE_ZERO
            else:
                state = STATE_HOLE | STATE_ZERO if leaf.entries[vb % FANOUT] == UNMAPPED else 0
                stop = min((vb + 1) * bs, end)
            if extents and extents[-1][1] == state:
                extents[-1][0] += stop - pos
            elif len(extents) == limit:
                break
            else:
                extents.append([stop - pos, state])
            pos = stop
        return [(n, state) for n, state in extents]


def _string(data: bytes, pos: int) -> tuple[str, bytes]:
    """A 32-bit length and that many bytes of UTF-8 at ``pos``; the text and what follows."""
    if len(data) < pos + 4:
        raise InvalidArgument("truncated string length")
    (n,) = struct.unpack(">I", data[pos : pos + 4])
    if n > MAX_STRING or len(data) < pos + 4 + n:
        raise InvalidArgument("string length past the option's data")
    try:
        text = data[pos + 4 : pos + 4 + n].decode()
    except UnicodeDecodeError:
        raise InvalidArgument("a string that is not UTF-8") from None
    return text, data[pos + 4 + n :]
