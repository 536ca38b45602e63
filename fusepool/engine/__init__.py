"""The thin-pool engine: a plain, synchronous Python API (no FUSE, no sockets).

:class:`Pool` is the facade (lifecycle, namespace, handles); the rooms it is
made of each hold one concern: :mod:`.txn` (commit, sync journal, failure),
:mod:`.datapath` (read/write/discard), :mod:`.space` (pool size, autoextend,
low water), :mod:`.stats` (usage and `docker info` figures).  Devices, names
and sizes are in :mod:`.device`.
"""

from fusepool.engine.device import (
    CONTROL_NAME,
    MAX_BLOCK_SIZE,
    MAX_METADATA_SIZE,
    MAX_NAME_BYTES,
    MIN_BLOCK_SIZE,
    VOLUME_MODE,
    Device,
    validate_block_size,
    validate_name,
)
from fusepool.engine.pool import Pool
from fusepool.engine.space import max_blocks_for_metadata, min_metadata_pages
from fusepool.engine.stats import host_filesystem
from fusepool.engine.txn import JOURNAL_MAX_BYTES, JOURNAL_MAX_MAPPINGS, METADATA_RESERVE_PAGES
from fusepool.metadata.format import MAX_VOLUME_SIZE

__all__ = [
    "CONTROL_NAME", "JOURNAL_MAX_BYTES", "JOURNAL_MAX_MAPPINGS", "MAX_BLOCK_SIZE", "MAX_METADATA_SIZE",
    "MAX_NAME_BYTES", "MAX_VOLUME_SIZE", "METADATA_RESERVE_PAGES", "MIN_BLOCK_SIZE", "VOLUME_MODE",
    "Device", "Pool", "host_filesystem", "max_blocks_for_metadata", "min_metadata_pages",
    "validate_block_size", "validate_name",
]
