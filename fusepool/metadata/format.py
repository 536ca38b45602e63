"""The durable metadata format, in one place.

The metadata file is an array of 4 KiB pages (dm-thin's metadata block size).
Nothing is ever overwritten in place except the two superblock slots: a commit
writes every changed page to a page that neither the last nor the previous
commit uses (shadow paging), flushes, then writes the superblock of the new
transaction into the slot of the transaction before last.  Opening the pool
picks the valid superblock with the highest transaction id, so a crash at any
moment leaves the last complete commit intact.

Page layout (all little-endian)::

    page 0, 1            superblock slots (transaction id parity picks the slot)
    any other page       a node page, a space-map page or a root-record page

Every page starts with a 32-byte header::

    magic    4s   b"FPnd" node, b"FPsm" space map, b"FProot" record, b"FPSB" superblock
    kind     u16  page kind (see PAGE_* below)
    level    u16  tree level of a node page (0 = leaf); 0 otherwise
    count    u32  entries in use (informational; checked against the payload)
    _pad     u32
    checksum u64  xxh64 of the whole page with this field zeroed, seeded with
                  the page number, so a page written to the wrong place fails too
    txn      u64  transaction that wrote the page (for check and for debugging)

Node pages: FANOUT little-endian u64 entries.  In a leaf an entry is
``data_block << 24 | time`` (dm-thin's block_time packing) or UNMAPPED; in an
internal node it is a child page number or 0 for "no child".

Space-map pages: COUNTS_PER_PAGE u32 reference counts of consecutive data
blocks.  A data block's count is the number of leaf nodes that map it; a leaf
shared by several devices counts once (dm-thin counts the same way; the
sharing is carried by the nodes' own reference counts).

The root record (see encode_root) is JSON for the device table and pool state
followed by the space-map page list; it spans one or more pages listed in the
superblock.
"""

import json
import struct
import uuid as uuidlib
from array import array
from dataclasses import dataclass, field

import xxhash

from fusepool.errors import Corrupt

PAGE_SIZE = 4096
HEADER = struct.Struct("<4sHHII QQ")
HEADER_SIZE = HEADER.size  # 32
FANOUT = (PAGE_SIZE - HEADER_SIZE) // 8  # entries per node page: 508
COUNTS_PER_PAGE = (PAGE_SIZE - HEADER_SIZE) // 4  # reference counts per space-map page
UNMAPPED = (1 << 64) - 1
TIME_BITS = 24
TIME_MASK = (1 << TIME_BITS) - 1
MAX_DEV_ID = (1 << 24) - 1  # dm-thin device ids are 24 bits
MAX_VOLUME_SIZE = 1 << 60  # bytes: far beyond need, and st_size (off_t) holds it
MAX_DATA_BLOCKS = 1 << (64 - TIME_BITS)  # a leaf entry keeps the data block in 40 bits
MAX_U32 = (1 << 32) - 1
MAX_U64 = (1 << 64) - 1  # transaction ids (superblock field), as thin-provisioning-tools' too
# thin_restore takes transaction ids up to MAX_U64; restore takes half of that, so that a
# restored pool can still commit (each commit adds one) without overflowing the field.
MAX_TRANSACTION_ID = (1 << 63) - 1
FORMAT_VERSION = 1

PAGE_SUPER, PAGE_NODE, PAGE_SPACEMAP, PAGE_ROOT = 1, 2, 3, 4
_MAGIC = {PAGE_SUPER: b"FPSB", PAGE_NODE: b"FPnd", PAGE_SPACEMAP: b"FPsm", PAGE_ROOT: b"FPrt"}
_CHECKSUM_AT = 16  # byte offset of the checksum field inside the header
SUPERBLOCK_SLOTS = (0, 1)
FIRST_DATA_PAGE = 2

# Superblock payload after the page header.
SUPER = struct.Struct("<I16sQIQQQI IQ I")
# version, uuid, transaction_id, time, block_size, nr_data_blocks, nr_meta_pages,
# flags, root_len, root_checksum, nr_root_pages; then nr_root_pages u64 page numbers.
MAX_ROOT_PAGES = (PAGE_SIZE - HEADER_SIZE - SUPER.size) // 8

FLAG_NEEDS_CHECK = 1


def checksum(page: bytes | bytearray | memoryview, page_no: int) -> int:
    """xxh64 of the page with its checksum field zeroed, seeded by its page number."""
    h = xxhash.xxh64(seed=page_no)
    h.update(page[:_CHECKSUM_AT])
    h.update(b"\0" * 8)
    h.update(page[_CHECKSUM_AT + 8 :])
    return h.intdigest()


def pack_page(kind: int, page_no: int, txn: int, payload: bytes, level: int = 0, count: int = 0) -> bytes:
    """A full page: header + payload, zero padded, checksummed for ``page_no``."""
    if len(payload) > PAGE_SIZE - HEADER_SIZE:
        raise ValueError("payload larger than a page")
    page = bytearray(PAGE_SIZE)
    HEADER.pack_into(page, 0, _MAGIC[kind], kind, level, count, 0, 0, txn)
    page[HEADER_SIZE : HEADER_SIZE + len(payload)] = payload
    struct.pack_into("<Q", page, _CHECKSUM_AT, checksum(page, page_no))
    return bytes(page)


def unpack_page(page: bytes, page_no: int, kind: int, max_txn: int | None = None
                ) -> tuple[int, int, memoryview]:
    """Verify a page; return ``(level, count, payload)`` or raise :class:`Corrupt`.

    ``max_txn``: the transaction being read; a page written by a later one belongs
    to a commit that never completed (it reused a page this commit still needed).
    """
    if len(page) != PAGE_SIZE:
        raise Corrupt(f"metadata page {page_no}: short read ({len(page)} bytes)")
    magic, got_kind, level, count, _pad, stored, txn = HEADER.unpack_from(page, 0)
    if magic != _MAGIC[kind] or got_kind != kind:
        raise Corrupt(f"metadata page {page_no}: expected a {_MAGIC[kind].decode()} page, found {magic!r}")
    if stored != checksum(page, page_no):
        raise Corrupt(f"metadata page {page_no}: checksum mismatch")
    if max_txn is not None and txn > max_txn:
        raise Corrupt(f"metadata page {page_no}: written by transaction {txn}, after the "
                      f"commit being read ({max_txn})")
    return level, count, memoryview(page)[HEADER_SIZE:]


@dataclass
class Superblock:
    """What a commit points at.  Lives in page ``transaction_id % 2``."""

    uuid: str
    transaction_id: int
    time: int  # dm-thin pool time: bumped by every snapshot
    block_size: int  # bytes
    nr_data_blocks: int
    nr_meta_pages: int
    flags: int = 0
    root_len: int = 0
    root_checksum: int = 0
    root_pages: list[int] = field(default_factory=list)

    def pack(self) -> bytes:
        if len(self.root_pages) > MAX_ROOT_PAGES:
            raise ValueError("root record too large")
        payload = SUPER.pack(
            FORMAT_VERSION, uuidlib.UUID(self.uuid).bytes, self.transaction_id, self.time,
            self.block_size, self.nr_data_blocks, self.nr_meta_pages, self.flags,
            self.root_len, self.root_checksum, len(self.root_pages),
        ) + array("Q", self.root_pages).tobytes()
        slot = self.transaction_id % 2
        return pack_page(PAGE_SUPER, slot, self.transaction_id, payload)

    @classmethod
    def unpack(cls, page: bytes, slot: int) -> "Superblock":
        _, _, payload = unpack_page(page, slot, PAGE_SUPER)
        (version, uid, txn, time, bs, nblocks, npages, flags, root_len, root_sum,
         nroot) = SUPER.unpack_from(payload, 0)
        if version != FORMAT_VERSION:
            raise Corrupt(f"superblock {slot}: unsupported format version {version}")
        if txn % 2 != slot or nroot > MAX_ROOT_PAGES:
            raise Corrupt(f"superblock {slot}: inconsistent header")
        pages = array("Q")
        pages.frombytes(payload[SUPER.size : SUPER.size + 8 * nroot])
        return cls(str(uuidlib.UUID(bytes=uid)), txn, time, bs, nblocks, npages, flags,
                   root_len, root_sum, list(pages))


def encode_root(state: dict, spacemap_pages: list[int]) -> bytes:
    """The root record: ``u32 json_len | json | u64 spacemap page numbers``.

    ``state`` holds the device table (one dict per device, see
    ``Device.to_record``) and pool counters; it is small next to the trees.
    """
    text = json.dumps(state, separators=(",", ":")).encode()
    return struct.pack("<I", len(text)) + text + array("Q", spacemap_pages).tobytes()


def decode_root(blob: bytes) -> tuple[dict, list[int]]:
    (n,) = struct.unpack_from("<I", blob, 0)
    try:
        state = json.loads(blob[4 : 4 + n])
    except ValueError as exc:
        raise Corrupt(f"root record: {exc}") from None
    pages = array("Q")
    pages.frombytes(blob[4 + n :])
    return state, list(pages)
