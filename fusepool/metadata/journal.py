"""The sync journal: what an fsync makes durable between two full commits.

A full commit rewrites every metadata page a transaction touched: with 1,000
mappings changed across a large volume that is ~1,000 tree leaves and
space-map pages, tens of milliseconds.  An fsync only needs the changes to be
durable, so it appends one record instead: the device sizes and the changed
mappings (dev id, virtual block, block/time entry) since the previous record.
The periodic commit (and any change other than data-path writes and discards)
still writes the full transaction and starts the journal afresh.

A record applies on top of one committed transaction: it names the pool uuid
and that transaction id, and carries a sequence number and an xxh64 checksum
over the whole record.  Opening a pool replays the records that follow its
newest commit in order, stopping at the first that does not match (a torn
append, or the records of an earlier transaction that were never
overwritten).  Block reference counts are not logged: replay recomputes them
from the old and new mapping of each block, as the write path did.
"""

import errno
import os
import struct
from array import array
from dataclasses import dataclass

import xxhash

from fusepool.metadata.format import MAX_VOLUME_SIZE, TIME_BITS, TIME_MASK, UNMAPPED

_MAGIC = b"FPJ1"
# magic, uuid, base transaction, sequence, pool time, devices, mappings, checksum
HEADER = struct.Struct("<4s16sQQQIIQ")
_CHECKSUM_AT = HEADER.size - 8
DEVICE_FIELDS = 3  # dev id, size in bytes, mtime in ns
MAPPING_FIELDS = 3  # dev id, virtual block, entry (data block << 24 | time, or UNMAPPED)
GROW_STEP = 1 << 20  # the file is zero-filled ahead of the records by this much


@dataclass
class Record:
    seq: int
    time: int
    devices: list[tuple[int, int, int]]
    mappings: array  # flat: dev id, virtual block, entry, ...

    @property
    def nr_mappings(self) -> int:
        return len(self.mappings) // MAPPING_FIELDS


def encode(uuid: bytes, base_txn: int, seq: int, time: int, devices: list[tuple[int, int, int]],
           mappings: array) -> bytes:
    dev_words = array("Q", [x for d in devices for x in d])
    payload = dev_words.tobytes() + mappings.tobytes()
    header = HEADER.pack(_MAGIC, uuid, base_txn, seq, time, len(devices),
                         len(mappings) // MAPPING_FIELDS, 0)
    digest = xxhash.xxh64(header)
    digest.update(payload)
    return header[:_CHECKSUM_AT] + struct.pack("<Q", digest.intdigest()) + payload


def decode_all(raw: bytes, uuid: bytes, base_txn: int) -> list[Record]:
    """The records of transaction ``base_txn`` at the start of ``raw``, in order."""
    records = []
    pos = 0
    while pos + HEADER.size <= len(raw):
        magic, rec_uuid, rec_base, seq, time, nr_devs, nr_maps, stored = HEADER.unpack_from(raw, pos)
        if magic != _MAGIC or rec_uuid != uuid or rec_base != base_txn or seq != len(records):
            break
        size = HEADER.size + 8 * (DEVICE_FIELDS * nr_devs + MAPPING_FIELDS * nr_maps)
        if pos + size > len(raw):
            break  # torn at the end
        digest = xxhash.xxh64(raw[pos : pos + _CHECKSUM_AT] + bytes(8))
        digest.update(raw[pos + HEADER.size : pos + size])
        if digest.intdigest() != stored:
            break
        words = array("Q", raw[pos + HEADER.size : pos + size])
        split = DEVICE_FIELDS * nr_devs
        devices = [tuple(words[i : i + DEVICE_FIELDS]) for i in range(0, split, DEVICE_FIELDS)]
        records.append(Record(seq, time, devices, words[split:]))
        pos += size
    return records


def validate_record(record: Record, sizes: dict[int, int], block_size: int, nr_data_blocks: int,
                    pool_time: int) -> list[str]:
    """Why ``record`` cannot apply to the commit it follows: every reason, or [] if it can.

    The one rule for the engine's replay (which refuses the pool on the first
    reason), ``check`` (which reports them all) and ``repair`` (which drops the
    records from the first bad one on).  ``sizes`` holds each device's size in
    bytes as the commit and the records before this one left it; it is
    updated here to the sizes after this record (a record may grow a device),
    so the caller passes the same dict record after record.
    """
    seq = record.seq
    problems = []
    if record.time != pool_time:
        problems.append(f"record {seq} has pool time {record.time}, the commit's is {pool_time}")
    for dev_id, size, _mtime_ns in record.devices:
        if dev_id not in sizes:
            problems.append(f"record {seq} names device {dev_id}, which does not exist")
        elif size > MAX_VOLUME_SIZE:
            problems.append(f"record {seq} grows device {dev_id} to {size} bytes, beyond the "
                            f"largest volume size ({MAX_VOLUME_SIZE} bytes)")
        else:
            sizes[dev_id] = max(sizes[dev_id], size)
    words = record.mappings
    for i in range(0, len(words), MAPPING_FIELDS):
        dev_id, vb, entry = words[i], words[i + 1], words[i + 2]
        if dev_id not in sizes or vb >= max(1, -(-sizes[dev_id] // block_size)):
            problems.append(f"record {seq} maps block {vb} of device {dev_id}, outside every volume")
        elif entry != UNMAPPED and (entry >> TIME_BITS >= nr_data_blocks
                                    or entry & TIME_MASK > pool_time & TIME_MASK):
            problems.append(f"record {seq} maps block {vb} of device {dev_id} to an invalid entry "
                            f"{entry:#x}")
    return problems


class Journal:
    """Append-only records in one file; a full commit starts it over (:meth:`reset`)."""

    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        if readonly:
            try:
                self.fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # a pool made before the journal existed
                self.fd = -1
        else:
            try:
                self.fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # a pool made before the journal existed
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
                try:
                    os.fsync(dir_fd)  # records in a file that a crash could unlink are no records
                finally:
                    os.close(dir_fd)
        self.end = 0  # where the next record goes
        self.seq = 0
        self.allocated = os.fstat(self.fd).st_size if self.fd >= 0 else 0

    @staticmethod
    def create(path: str) -> None:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, uuid: bytes, base_txn: int) -> list[Record]:
        """The records to replay on top of ``base_txn``; appends continue after them."""
        if self.fd < 0:
            return []
        size = os.fstat(self.fd).st_size
        raw = os.pread(self.fd, size, 0)
        records = decode_all(raw, uuid, base_txn)
        self.seq = len(records)
        self.end = sum(HEADER.size + 8 * (DEVICE_FIELDS * len(r.devices) + len(r.mappings))
                       for r in records)
        return records

    def append(self, uuid: bytes, base_txn: int, time: int, devices: list[tuple[int, int, int]],
               mappings: array) -> int:
        """Write one record durably; returns its size in bytes."""
        record = encode(uuid, base_txn, self.seq, time, devices, mappings)
        end = self.end + len(record)
        if end > self.allocated:
            # Zero-fill ahead: an fdatasync of blocks already written needs no
            # filesystem-journal commit, which an append that grows the file does.
            size = -(-end // GROW_STEP) * GROW_STEP
            if os.pwrite(self.fd, bytes(size - self.allocated), self.allocated) != size - self.allocated:
                raise OSError(errno.ENOSPC, "short write to the journal")
            self.allocated = size
        done = os.pwrite(self.fd, record, self.end)
        if done != len(record):
            raise OSError(errno.ENOSPC, "short write to the journal")
        os.fdatasync(self.fd)
        self.end += len(record)
        self.seq += 1
        return len(record)

    def reset(self) -> None:
        """After a full commit: earlier records no longer apply (their base is older)."""
        self.end = 0
        self.seq = 0
