"""Statistics: per-device usage and extents, and the pool's `docker info` figures.

A room of :class:`fusepool.engine.Pool`.
"""

import logging
import os

from fusepool import __version__
from fusepool.config import (
    DATA,
    METADATA,
)
from fusepool.engine.device import (
    Device,
)
from fusepool.metadata.format import (
    FANOUT,
    PAGE_SIZE,
    TIME_BITS,
    TIME_MASK,
    UNMAPPED,
)
from fusepool.metadata.tree import Tree

log = logging.getLogger(__name__)

class Statistics:
    """Usage, extents, info (a room of Pool)."""


    def device_usage(self, dev: Device) -> tuple[int, int]:
        """``(exclusive, shared)`` mapped blocks of a device."""
        exclusive = shared = 0
        counts = self.space.counts
        for _, leaf, path_shared in Tree.leaves(dev.root):
            for entry in leaf.entries:
                if entry == UNMAPPED:
                    continue
                if path_shared or counts[entry >> TIME_BITS] > 1:
                    shared += 1
                else:
                    exclusive += 1
        return exclusive, shared

    def extents(self, dev: Device) -> list[dict]:
        """Mapped extents: runs of virtual blocks on contiguous data blocks with one sharing state."""
        out: list[dict] = []
        counts = self.space.counts
        for leaf_index, leaf, path_shared in Tree.leaves(dev.root):
            base = leaf_index * FANOUT
            for slot, entry in enumerate(leaf.entries):
                if entry == UNMAPPED:
                    continue
                block = entry >> TIME_BITS
                shared = path_shared or counts[block] > 1
                vb = base + slot
                last = out[-1] if out else None
                if (last and last["shared"] == shared and last["virtual_block"] + last["blocks"] == vb
                        and last["data_block"] + last["blocks"] == block):
                    last["blocks"] += 1
                else:
                    out.append({"virtual_block": vb, "data_block": block, "blocks": 1, "shared": shared})
        return out

    def mappings(self, dev: Device):
        """Yield ``(virtual_block, data_block, time)`` for every mapping, in order."""
        for leaf_index, leaf, _ in Tree.leaves(dev.root):
            base = leaf_index * FANOUT
            for slot, entry in enumerate(leaf.entries):
                if entry != UNMAPPED:
                    yield base + slot, entry >> TIME_BITS, entry & TIME_MASK

    def stats(self) -> dict:
        """Exact figures behind ``fusepool info`` (bytes, counts)."""
        bs = self.block_size
        data_total = self.nr_blocks * bs
        data_used = self.space.used * bs
        direct = self.config.mode == "direct"
        # Docker's devicemapper rule (deviceset.go Status): available = total - used, capped
        # by the host filesystem's free space (statfs Bfree * Bsize) when the data or
        # metadata is a regular (sparse) file.  A direct-mode data file is regular too, but
        # fully allocated: like a block device, nothing on the host can take its space.
        data_available = data_total - data_used
        pool_dir_fs = os.statvfs(self.path)
        if direct:
            host_free = pool_dir_fs.f_bavail * pool_dir_fs.f_frsize
            blocks_available = self.space.free
        else:
            host_free = self.data.host_free_bytes()
            data_available = min(data_available, self.data.host_bfree_bytes())
            blocks_available = min(self.space.free, host_free // bs)
        meta = self.store.superblock.nr_meta_pages * PAGE_SIZE
        meta_used = self.store.used_pages * PAGE_SIZE
        meta_available = min(meta - meta_used, pool_dir_fs.f_bfree * pool_dir_fs.f_bsize)
        deferred = sum(1 for d in self.devices.values() if d.deleted)
        c = self.config
        return {
            "pool_name": os.path.basename(self.path.rstrip("/")) or self.path,
            "pool_dir": self.path,
            "mode": self.config.mode,
            "block_size": bs,
            "base_size": self.config.base_size,
            "backing_filesystem": host_filesystem(self.path),
            "data_file": c.data_device or os.path.join(self.path, DATA),
            "data_device": c.data_device,
            "preallocated": c.preallocated,
            "metadata_file": os.path.join(self.path, METADATA),
            "data_space_used": data_used,
            "data_space_total": data_total,
            # Loop mode promises space it has not reserved: the host caps it (as Docker reports).
            "data_space_available": max(0, data_available),
            "metadata_space_used": meta_used,
            "metadata_space_total": meta,
            "metadata_space_available": max(0, meta_available),
            "min_free_space": int(data_total * self.config.min_free_space / 100),
            "min_free_space_percent": self.config.min_free_space,
            "skip_block_zeroing": self.config.skip_block_zeroing,
            "no_space_timeout": self.config.no_space_timeout,
            "zero_detection": c.zero_detection,
            "deferred_deleted_device_count": deferred,
            "volume_count": len(self.names),
            "data_blocks_total": self.nr_blocks,
            "data_blocks_used": self.space.used,
            "data_blocks_free": self.space.free,
            "data_blocks_available": blocks_available,  # what df shows: capped by the host in loop mode
            "autoextend_threshold": c.autoextend_threshold,
            "autoextend_percent": c.autoextend_percent,
            "max_data_size": c.max_data_size,
            "low_water_mark": c.low_water_mark,
            "on_low_water": c.on_low_water,
            "host_free_bytes": host_free,
            "host_allocated_bytes": self.data.allocated_bytes(),
            "transaction_id": self.transaction_id,
            "journal_records": self.journal.seq,  # synced since that transaction, not yet in it
            "time": self.time,
            "read_only": self.failed,
            "library_version": f"fusepool {__version__}",
        }

    def describe(self, dev: Device, usage: bool = True) -> dict:
        """Everything about one device, for ``list --json`` and ``inspect``."""
        out = {
            "name": dev.name, "dev_id": dev.dev_id, "size": dev.size,
            "mapped_blocks": dev.mapped_blocks, "mapped_bytes": dev.mapped_blocks * self.block_size,
            "origin": self.devices[dev.origin].name if dev.origin in self.devices else None,
            "origin_dev_id": dev.origin, "creation_time": dev.creation_time,
            "snap_time": dev.snap_time, "transaction": dev.transaction, "created": dev.created,
            "open_count": dev.open_count, "deleted": dev.deleted,
        }
        if usage:
            out["exclusive_blocks"], out["shared_blocks"] = self.device_usage(dev)
        return out



def host_filesystem(path: str) -> str:
    """The type of the filesystem holding ``path`` (longest mount point prefix)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype

