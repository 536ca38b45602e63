"""A committed, immutable view of a pool's metadata, for bulk reporting.

``list``, ``thin_ls``, ``map``, ``delta``, ``dump``, ``inspect`` and ``check``
walk every mapping of every device.  Run by the mount daemon they would stall
every volume's I/O for the length of the walk (trio serves all of them on one
thread), and a worker thread would still contend for the GIL and need a lock
on the live trees.  So they do not run in the daemon at all, as with the
kernel: dm-thin's ``reserve_metadata_snap`` message keeps one commit's
metadata from being overwritten while ``thin_dump -m`` / ``thin_ls -m`` read
it from the metadata device in their own process.

Here the daemon commits, marks that commit's pages held
(``MetadataStore.hold``) for as long as the client keeps its control
connection open, and answers with the transaction id; the client then loads
:class:`CommittedView` from the metadata file itself and runs the same
command code on it.  The view has the attributes the reporting walks read
from a :class:`~fusepool.engine.Pool` (devices, names, space counts, pool
time...), built from disk alone, so nothing in it can change under the walk.
"""

import os
from dataclasses import dataclass

from fusepool.engine.device import Device, Namespace
from fusepool.engine.stats import Statistics
from fusepool.errors import Corrupt, PoolError
from fusepool.layout import METADATA
from fusepool.metadata.format import Superblock
from fusepool.metadata.store import MetadataStore


@dataclass
class _Counts:
    """The one part of the space map the walks read."""

    counts: object  # array('I') of data block reference counts


class CommittedView(Namespace, Statistics):
    """One commit of a pool, read from its metadata file (read-only, lock-free)."""

    def __init__(self, path: str, store: MetadataStore, loaded, open_counts: dict[int, int]):
        sb = store.superblock
        self.path = path
        self.store = store
        self.block_size = sb.block_size
        self.time = sb.time
        self.space = _Counts(loaded.counts)
        self.devices: dict[int, Device] = {}
        self.names: dict[str, int] = {}
        for rec in loaded.state["devices"]:
            dev = Device.from_record(rec, loaded.roots.get(rec["dev_id"]))
            dev.open_count = open_counts.get(dev.dev_id, 0)
            self.devices[dev.dev_id] = dev
            if not dev.deleted:
                self.names[dev.name] = dev.dev_id

    @classmethod
    def load(cls, pool_dir: str, transaction: int, superblock: bytes,
             open_counts: dict[int, int] | None = None) -> "CommittedView":
        """Read the commit of ``superblock`` (held by the daemon) from ``pool_dir``'s metadata.

        The superblock comes from the daemon, not from its slot, which the commit
        after next rewrites while the pages it points at stay held.
        """
        sb = Superblock.unpack(superblock, transaction % 2)
        path = os.path.join(pool_dir, METADATA)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise PoolError(f"{path}: {exc.strerror}") from None
        try:
            store = MetadataStore(path, fd, sb)
            store.readonly_fd = True
            try:
                loaded = store._load()
            except (KeyError, TypeError, ValueError, IndexError, RecursionError) as exc:
                raise Corrupt(f"metadata is internally inconsistent ({type(exc).__name__}: {exc})"
                              ) from None
        finally:
            os.close(fd)
        return cls(os.path.abspath(pool_dir), store, loaded, open_counts or {})

    # --- what the reporting commands read (Pool's names) ---------------------------------

    @property
    def nr_blocks(self) -> int:
        return self.store.superblock.nr_data_blocks

    @property
    def transaction_id(self) -> int:
        return self.store.superblock.transaction_id
