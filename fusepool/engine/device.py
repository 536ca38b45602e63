"""Devices (thin volumes and snapshots): the record, and the rules for names and sizes."""

import logging
from dataclasses import dataclass, field

from fusepool.errors import (
    NoSuchVolume,
    UsageError,
)
from fusepool.metadata.tree import Node

log = logging.getLogger(__name__)

MIN_BLOCK_SIZE = 64 << 10
MAX_BLOCK_SIZE = 1 << 30
MAX_METADATA_SIZE = 16 << 30  # dm-thin's limit is just under 16 GiB
MAX_NAME_BYTES = 255
CONTROL_NAME = ".fusepool"  # reserved: the mount's hidden control file (see fs.py)
VOLUME_MODE = 0o600  # a new volume's permission bits unless the creator says otherwise


@dataclass
class Device:
    """A thin volume or snapshot.  ``to_record`` is its durable form."""

    dev_id: int
    name: str
    size: int
    creation_time: int  # pool time when created (dm-thin)
    snap_time: int  # pool time of the last snapshot taken of or from it (dm-thin)
    transaction: int  # transaction id current when it was created
    created: float  # wall clock, for users
    origin: int | None = None  # dev_id it was snapshotted from (informational)
    mapped_blocks: int = 0
    mtime: float = 0.0
    deleted: bool = False  # removed while open: freed when the last handle closes
    root: Node | None = field(default=None, repr=False)
    open_count: int = 0
    # Permission bits of the volume's file in the mount (chmod; enforced by the kernel's
    # default_permissions).  Records written before modes existed read as the default.
    mode: int = VOLUME_MODE

    def to_record(self) -> dict:
        return {
            "dev_id": self.dev_id, "name": self.name, "size": self.size,
            "creation_time": self.creation_time, "snap_time": self.snap_time,
            "transaction": self.transaction, "created": self.created, "origin": self.origin,
            "mapped_blocks": self.mapped_blocks, "mtime": self.mtime, "deleted": self.deleted,
            "mode": self.mode,
            "root": 0,  # filled in by the store
        }

    @classmethod
    def from_record(cls, rec: dict, root: Node | None) -> "Device":
        mode = rec.get("mode")
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
            mode = VOLUME_MODE  # absent (an older pool) or damaged: the owner-only default
        return cls(rec["dev_id"], rec["name"], rec["size"], rec["creation_time"], rec["snap_time"],
                   rec["transaction"], rec["created"], rec.get("origin"), rec["mapped_blocks"],
                   rec.get("mtime", rec["created"]), rec.get("deleted", False), root, mode=mode)


class Namespace:
    """Names to devices (``devices``: dev_id -> Device, ``names``: name -> dev_id)."""

    def volume(self, name: str) -> Device:
        dev_id = self.names.get(name)
        if dev_id is None:
            raise NoSuchVolume(f"no volume named {name!r} in pool {self.path}")
        return self.devices[dev_id]

    def volumes(self) -> list[Device]:
        """Visible volumes (deferred deletions excluded), by name."""
        return sorted((self.devices[i] for i in self.names.values()), key=lambda d: d.name)


def validate_name(name: str) -> str:
    """Volume names are file names in the mount: no '/', no NUL, at most 255 bytes."""
    if not isinstance(name, str) or not name or name in (".", "..", CONTROL_NAME):
        raise UsageError(f"invalid volume name {name!r}" + (
            " (reserved for the mount's control file)" if name == CONTROL_NAME else ""))
    if "/" in name or "\0" in name:
        raise UsageError(f"invalid volume name {name!r}: it may not contain '/' or NUL")
    # Control characters (a newline would forge lines in `list`) and bytes that are not
    # UTF-8 (they arrive as lone surrogates, which no JSON reply or terminal can carry).
    if any(c < " " or c == "\x7f" or "\ud800" <= c <= "\udfff" for c in name):
        raise UsageError(f"invalid volume name {name!r}: control characters and bytes that "
                         "are not UTF-8 are not allowed")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise UsageError(f"invalid volume name: longer than {MAX_NAME_BYTES} bytes")
    return name


def validate_block_size(block_size: int) -> int:
    if block_size % MIN_BLOCK_SIZE or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise UsageError(f"invalid block size {block_size}: it must be a multiple of 64 KiB "
                         f"between 64 KiB and 1 GiB")
    return block_size


