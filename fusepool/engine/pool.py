"""Pool: the thin-pool engine's facade: lifecycle, namespace and open handles.

The rest of the engine lives in rooms that Pool is made of, one module per
concern: transactions (txn.py), the data path (datapath.py), space policy
(space.py) and statistics (stats.py).  They share the pool's state.

No FUSE and no sockets here: the FUSE filesystem, the control socket and the
CLI are adapters over this class.  Every method runs to completion without
yielding, so under trio's single thread each call is atomic with respect to
every other request.

Semantics (see docs/design.md for the full contract):

- A *device* is a thin volume or snapshot: a 24-bit ``dev_id``, a user-visible
  ``name``, a virtual ``size`` and a copy-on-write mapping tree.
- Writes allocate whole data blocks.  A partial write to a new block zero-fills
  the rest of it unless the pool skips block zeroing; a partial write to a
  block shared with another device copies the block first.  Zeros are data
  like any other (dm-thin), unless the pool has zero detection: then zeros
  into a hole store nothing and a block left all zeros is unmapped.
- Metadata changes are held in memory until :meth:`commit`, which flushes the
  data image first (data before metadata).  Namespace changes (create,
  snapshot, remove, rename, resize) commit before they return.
- dm-thin's time model: the pool time goes up by one at every snapshot; a
  mapping records the pool time when it was provisioned; a snapshot sets the
  ``snap_time`` of both origin and snapshot to the new pool time.  A block
  whose mapping time is older than a device's ``snap_time`` may be shared.
"""


import contextlib
import logging
import os
import threading
import time as wallclock
import uuid as uuidlib

from fusepool.config import (
    DATA,
    JOURNAL,
    METADATA,
    BadConfig,
    PoolConfig,
    PoolLock,
    make_pool_dir,
    tighten_pool_dir,
)
from fusepool.datastore import DataStore, DirectDataStore, check_data_device
from fusepool.engine.datapath import DataPath
from fusepool.engine.device import (
    MAX_METADATA_SIZE,
    VOLUME_MODE,
    Device,
    Namespace,
    validate_block_size,
    validate_name,
)
from fusepool.engine.space import (
    AUTOEXTEND_OFF,
    SpacePolicy,
    min_metadata_pages,
    parse_grow_percent,
    parse_threshold,
    untrusted_config,
    validate_space_settings,
)
from fusepool.engine.stats import Statistics
from fusepool.engine.txn import Health, Transaction, Transactions
from fusepool.errors import (
    Corrupt,
    InvalidArgument,
    NoSuchVolume,
    NotAPool,
    PoolError,
    PoolFull,
    UsageError,
    VolumeExists,
)
from fusepool.metadata.format import (
    FANOUT,
    FLAG_NEEDS_CHECK,
    MAX_DEV_ID,
    MAX_VOLUME_SIZE,
    PAGE_SIZE,
    TIME_BITS,
    UNMAPPED,
)
from fusepool.metadata.journal import Journal
from fusepool.metadata.spacemap import DataSpaceMap
from fusepool.metadata.store import MetadataStore
from fusepool.metadata.tree import Tree
from fusepool.units import bytes_size

log = logging.getLogger(__name__)

class Pool(Namespace, Transactions, DataPath, SpacePolicy, Statistics):
    """An open thin pool.  Use :meth:`create` once, then :meth:`open`."""

    # Why on_low_water must not run (set by open: pool.json not the user's own), or None.
    hook_refusal: str | None = None

    # --- lifecycle -------------------------------------------------------------

    @classmethod
    def create(cls, path: str, data_size: int | None = None, metadata_size: int = 2 << 30,
               block_size: int = 64 << 10, base_size: int = 10 << 30,
               min_free_space: float = 10.0, skip_block_zeroing: bool = False,
               no_space_timeout: float = 0.0, mode: str | None = None,
               data_device: str | None = None, preallocate: bool = False, force: bool = False,
               autoextend_threshold: float = AUTOEXTEND_OFF, autoextend_percent: float = 20.0,
               max_data_size: int = 0, low_water_mark: int = 0,
               on_low_water: str | None = None, zero_detection: bool = False) -> int:
        """Make a new pool directory (or fill an empty existing one); returns its data size.

        ``mode`` is "loop" (a sparse data file; the default) or "direct" (a
        block device given as ``data_device``, or a data file preallocated in
        full; ``data_device`` or ``preallocate`` imply it).  ``data_size``
        defaults to 100 GiB, or to the whole device; it may be smaller than the
        device.  Everything is validated before anything is created, and a
        failure leaves nothing behind (not even the directory, if made here).
        """
        validate_block_size(block_size)
        if data_device and preallocate:
            raise UsageError("--data-device and --preallocate exclude each other: the data lives "
                             "either on a block device or in a preallocated file")
        if mode is None:
            mode = "direct" if data_device or preallocate else "loop"
        if mode not in ("loop", "direct"):
            raise UsageError(f"invalid mode {mode!r}: use loop or direct")
        if mode == "loop" and (data_device or preallocate):
            raise UsageError("loop mode keeps its data in a sparse file: --data-device and "
                             "--preallocate need --mode direct")
        if mode == "direct" and not data_device:
            preallocate = True  # direct mode on a file: the whole file is allocated up front
        if data_device:
            data_device = os.path.abspath(data_device)
            device_size = check_data_device(data_device, force)
            if data_size is None:
                data_size = device_size
            elif data_size > device_size:
                raise UsageError(f"data size {bytes_size(data_size)} is larger than the data device "
                                 f"{data_device} ({bytes_size(device_size)})")
        elif data_size is None:
            data_size = 100 << 30
        nr_blocks = data_size // block_size
        if nr_blocks < 1:
            raise UsageError(f"data size {data_size} is smaller than one block ({block_size})")
        if nr_blocks >= 1 << (64 - TIME_BITS):
            raise UsageError("data size too large for the block size")
        if not 0 < base_size <= MAX_VOLUME_SIZE:
            raise UsageError(f"invalid base size {base_size}")
        nr_pages = metadata_size // PAGE_SIZE
        needed = min_metadata_pages(nr_blocks)
        if nr_pages < needed:
            raise UsageError(f"metadata size {bytes_size(metadata_size)} is too small for "
                             f"{nr_blocks} data blocks: use at least {bytes_size(needed * PAGE_SIZE)}")
        if metadata_size > MAX_METADATA_SIZE:
            raise UsageError(f"metadata size is limited to {bytes_size(MAX_METADATA_SIZE)}")
        autoextend_threshold = parse_threshold(autoextend_threshold)
        autoextend_percent = parse_grow_percent(autoextend_percent)
        validate_space_settings(mode, nr_blocks, block_size, autoextend_threshold, autoextend_percent,
                                max_data_size, low_water_mark, on_low_water)
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise UsageError(f"{path} exists and is not a directory")
            if os.listdir(path):
                raise VolumeExists(f"{path} is not empty: refusing to create a pool there")
        try:
            made_dir = make_pool_dir(path)  # owner-only (0700), whatever the umask
        except OSError as exc:
            raise PoolError(f"cannot create {path}: {exc.strerror}") from None
        uuid = str(uuidlib.uuid4())
        try:
            if preallocate:
                DirectDataStore.create_preallocated(os.path.join(path, DATA), nr_blocks * block_size)
            elif not data_device:
                DataStore.create(os.path.join(path, DATA), nr_blocks * block_size)
            MetadataStore.write_new(os.path.join(path, METADATA), uuid=uuid, transaction_id=1, time=0,
                                    block_size=block_size, nr_data_blocks=nr_blocks,
                                    nr_meta_pages=nr_pages)
            Journal.create(os.path.join(path, JOURNAL))
            PoolConfig(uuid, block_size, base_size, min_free_space, skip_block_zeroing,
                       no_space_timeout, mode, data_device=data_device, preallocated=preallocate,
                       autoextend_threshold=autoextend_threshold,
                       autoextend_percent=autoextend_percent, max_data_size=max_data_size,
                       low_water_mark=low_water_mark, on_low_water=on_low_water or None,
                       zero_detection=bool(zero_detection)).save(path)
        except BaseException:
            for name in (DATA, METADATA, JOURNAL, "pool.json", "pool.json.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, name))
            if made_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        return nr_blocks * block_size

    @classmethod
    def open(cls, path: str, readonly: bool = False, clear_needs_check: bool = False) -> "Pool":
        """Open a pool under its exclusive lock (raises PoolBusy when held).

        A pool flagged needs-check opens read-only (``failed`` says why) unless
        ``clear_needs_check``: then the flag is cleared by a commit at once
        (``fusepool check`` does that after a clean check).
        """
        path = os.path.abspath(path)
        config = PoolConfig.load(path)
        if not os.path.exists(os.path.join(path, METADATA)):
            raise NotAPool(f"{path}: the metadata file is missing")
        lock = PoolLock(path)
        try:
            # Judged before tightening: a pool.json others could write stays untrusted.
            hook_refusal = untrusted_config(path)
            if not readonly:
                tighten_pool_dir(path)
            pool = cls(path, config, lock, readonly, clear_needs_check)
        except BaseException:
            lock.release()
            raise
        pool.hook_refusal = hook_refusal
        return pool

    def __init__(self, path: str, config: PoolConfig, lock: PoolLock, readonly: bool,
                 clear_needs_check: bool = False):
        self.path = path
        self.config = config
        self.lock = lock
        self.readonly = readonly
        # Read-only while not WRITABLE (txn.Health): metadata full until extended, or
        # needs-check (an I/O or internal error; a superblock flag, so across opens)
        # until check or repair.  `failure` says why.
        self.health = Health.WRITABLE
        # Held by whatever does metadata or flush I/O (commit on the loop, a FLUSH in a
        # worker thread: txn.run_sync), so the two never interleave.
        self.io_lock = threading.RLock()
        self.commit_in_flight = None  # a CommitJob whose I/O runs in a worker thread
        self.failure: str | None = None
        try:
            self.store, loaded = MetadataStore.open(os.path.join(path, METADATA), readonly)
        except Corrupt as exc:
            raise Corrupt(f"pool metadata is damaged ({exc}); run `fusepool check {path}` "
                          f"and `fusepool repair {path}`") from None
        sb = loaded.superblock
        if sb.uuid != config.uuid:  # pool.json belongs to another pool's metadata
            self.store.close()
            raise BadConfig(f"{path}/pool.json: uuid: {config.uuid} differs from the metadata's {sb.uuid}")
        if sb.block_size != config.block_size:
            raise Corrupt(f"block size in metadata ({sb.block_size}) differs from pool.json")
        self.block_size = sb.block_size
        self.zero_block = bytes(self.block_size)
        self.time = sb.time
        self.next_dev_id = loaded.state.get("next_dev_id", 1)
        self.space = DataSpaceMap(sb.nr_data_blocks, loaded.counts)
        self.tree = Tree(self.space.inc, self.space.dec, self.store.release)
        self.devices: dict[int, Device] = {}
        self.names: dict[str, int] = {}
        try:
            for rec in loaded.state["devices"]:
                dev = Device.from_record(rec, loaded.roots.get(rec["dev_id"]))
                self.devices[dev.dev_id] = dev
                if not dev.deleted:
                    self.names[dev.name] = dev.dev_id
        except (KeyError, TypeError, ValueError) as exc:
            self.store.close()
            raise Corrupt(f"pool metadata is damaged (device table: {exc!r}); run `fusepool check "
                          f"{path}` and `fusepool repair {path}`") from None
        try:
            self.data = DataStore.open(path, config, readonly)
        except BaseException:
            self.store.close()
            raise
        self.transaction = Transaction()  # what changed since the last commit
        self.commits = 0
        self.journal_syncs = 0
        self.journal = Journal(os.path.join(path, JOURNAL), readonly)
        try:
            self._replay_journal(sb)
        except BaseException:
            self.journal.close()
            self.data.close()
            self.store.close()
            raise
        # Autoextend and the low-water event (see _space_low): write() compares the free
        # block count with space_watch, and only below it does anything more.
        self.on_low_water = None  # how to start the hook: (command, env) -> None; None: detached
        self.low_water_armed = True
        self.autoextend_pending = False  # grown in the middle of a write, not committed yet
        self.autoextend_stuck_at = 0  # data size (blocks) at which growing was last refused
        self.space_watch = 0
        self._arm_space_watch()
        if sb.flags & FLAG_NEEDS_CHECK and clear_needs_check and not readonly:
            self.store.superblock.flags &= ~FLAG_NEEDS_CHECK  # written by the commit below
            self.transaction.change_structure()
            log.info("pool %s: needs-check flag cleared", path)
        elif sb.flags & FLAG_NEEDS_CHECK:
            log.warning("pool %s is flagged needs-check: read-only until `fusepool check` or "
                        "`fusepool repair`", path)
            self.health = Health.NEEDS_CHECK
            self.failure = (f"the pool is flagged needs-check (an I/O error or an internal error "
                            f"stopped it earlier); {self._check_advice()}")
            self.transaction = Transaction()  # (a journal replayed above is durable already)
        if not readonly and self.failed is None:
            self.data.grow(self.nr_blocks * self.block_size)
            # Deferred deletions that a crash interrupted are finished now.
            for dev in [d for d in self.devices.values() if d.deleted]:
                self._drop_device(dev)
            if self.dirty:
                self.commit()

    def close(self) -> None:
        """Commit and release everything (safe to call twice)."""
        try:
            if not self.readonly and self.failed is None and self.transaction.pending:
                self.commit()
        finally:
            self.journal.close()
            self.data.close()
            self.store.close()
            self.lock.release()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- properties ----------------------------------------------------------------

    @property
    def _uuid_bytes(self) -> bytes:
        return uuidlib.UUID(self.store.superblock.uuid).bytes

    @property
    def nr_blocks(self) -> int:
        return self.space.nr_blocks

    @property
    def transaction_id(self) -> int:
        return self.store.superblock.transaction_id

    # --- namespace -------------------------------------------------------------------

    def device(self, dev_id: int) -> Device:
        dev = self.devices.get(dev_id)
        if dev is None:
            raise NoSuchVolume(f"no device with id {dev_id}")
        return dev

    def create_volume(self, name: str, size: int | None = None, mode: int = VOLUME_MODE) -> Device:
        """A new, empty thin volume of ``size`` bytes (default: the base size).

        ``mode``: its permission bits in the mount (owner-only unless the creator
        in the mount asked for more, through its open() mode and umask).
        """
        validate_name(name)
        size = self.config.base_size if size is None else size
        self._check_size(size)
        self._check_writable()
        if name in self.names:
            raise VolumeExists(f"a volume named {name!r} already exists")
        self._check_min_free("create volume")
        now = wallclock.time()
        dev = Device(self._new_dev_id(), name, size, self.time, self.time, self.transaction_id + 1,
                     now, mtime=now, mode=mode & 0o777)
        self._add(dev)
        return dev

    def snapshot(self, origin_name: str, name: str) -> Device:
        """A writable point-in-time copy of ``origin_name``: O(1), shares every block."""
        validate_name(name)
        origin = self.volume(origin_name)
        self._check_writable()
        if name in self.names:
            raise VolumeExists(f"a volume named {name!r} already exists")
        self._check_min_free("create snapshot")
        self._ensure_metadata_room()
        self.time += 1
        origin.snap_time = self.time
        if origin.root is not None:
            origin.root.share += 1
        now = wallclock.time()
        dev = Device(self._new_dev_id(), name, origin.size, self.time, self.time,
                     self.transaction_id + 1, now, origin=origin.dev_id,
                     mapped_blocks=origin.mapped_blocks, mtime=now, root=origin.root,
                     mode=origin.mode)  # the same data: the same access as its origin
        self._add(dev)
        return dev

    def _add(self, dev: Device) -> None:
        self.devices[dev.dev_id] = dev
        self.names[dev.name] = dev.dev_id
        self.transaction.change_structure()
        try:
            self.commit()
        except PoolError:
            # Not durable, so not made: take it back out of memory.
            del self.devices[dev.dev_id]
            del self.names[dev.name]
            if dev.root is not None:
                self.tree.drop(dev.root)
            raise

    def remove(self, name: str) -> bool:
        """Delete a volume; deferred while it is open.  Returns True if deferred.

        The removal is made durable first (the device is flagged deleted and
        committed; if that commit fails nothing changed), then its tree is
        dropped and the freed blocks reach the next commit.
        """
        dev = self.volume(name)
        self._check_writable()
        del self.names[name]
        dev.deleted = True
        self.transaction.change_structure()
        try:
            self.commit()
        except PoolError:
            dev.deleted = False
            self.names[name] = dev.dev_id
            raise
        if dev.open_count:
            return True
        self._drop_device(dev)
        self._commit_quietly()
        return False

    def _commit_quietly(self) -> None:
        """Commit now if possible; a failure only delays it to the next commit."""
        try:
            self.commit()
        except PoolError as exc:
            log.info("commit postponed: %s", exc)

    def _drop_device(self, dev: Device) -> None:
        if dev.root is not None:
            self.tree.drop(dev.root)
            dev.root = None
        del self.devices[dev.dev_id]
        self.transaction.change_structure()

    def rename(self, old: str, new: str, replace: bool = False) -> bool:
        """Rename a volume; with ``replace``, a volume already named ``new`` goes.

        The target's removal (deferred while it is open, as in :meth:`remove`)
        and the rename are one commit: a crash shows both or neither.
        Returns True when the target's removal is deferred.
        """
        validate_name(new)
        dev = self.volume(old)
        self._check_writable()
        if old == new:
            return False
        target = None
        if new in self.names:
            if not replace:
                raise VolumeExists(f"a volume named {new!r} already exists")
            target = self.devices[self.names[new]]
            target.deleted = True
        del self.names[old]
        dev.name = new
        self.names[new] = dev.dev_id
        self.transaction.change_structure()
        try:
            self.commit()
        except PoolError:
            dev.name = old  # not durable, so not done
            self.names[old] = dev.dev_id
            if target is not None:
                target.deleted = False
                self.names[new] = target.dev_id
            else:
                del self.names[new]
            raise
        if target is None:
            return False
        if target.open_count:
            return True
        self._drop_device(target)
        self._commit_quietly()
        return False

    def set_mtime(self, dev_id: int, mtime: float) -> Device:
        """An explicit modification time (touch -d, utimes, cp -p): durable with the next
        FLUSH or commit, as a write's data is (a journal record carries each device's mtime)."""
        dev = self.device(dev_id)
        self._check_writable()
        dev.mtime = mtime
        self.transaction.remapped_blocks(dev.dev_id)  # (no block: the record carries the mtime)
        return dev

    def set_mode(self, dev_id: int, mode: int) -> Device:
        """chmod of a volume in the mount: permission bits only; durable before it returns."""
        dev = self.device(dev_id)
        self._check_writable()
        mode &= 0o777
        if mode != dev.mode:
            old, dev.mode = dev.mode, mode
            self.transaction.change_structure()  # the device table: a full commit
            try:
                self.commit()
            except PoolError:
                dev.mode = old
                raise
        return dev

    def resize(self, dev_id: int, size: int) -> Device:
        """Grow a device (online).  Shrinking is refused: data would be lost.

        By device id, as every call from an open handle: a volume removed while
        open may have a new namesake (only the command layer resolves names).
        """
        dev = self.device(dev_id)
        self._check_size(size)
        self._check_writable()
        if size < dev.size:
            raise InvalidArgument(f"cannot shrink volume {dev.name!r} from {dev.size} to {size} "
                                  "bytes: volumes only grow")
        if size > dev.size:
            self._zero_tail(dev)
            self._grow_device(dev, size)
            self.commit()
        return dev

    def _zero_tail(self, dev: Device) -> None:
        """Zero the rest of a volume's last block before the volume grows over it.

        Those bytes may hold a write past the end whose size change a crash took
        back; growing must not bring them back into view.
        """
        bs = self.block_size
        tail = dev.size % bs
        if not tail:
            return
        leaf = Tree.leaf(dev.root, dev.size // bs // FANOUT)
        entry = UNMAPPED if leaf is None else leaf.entries[dev.size // bs % FANOUT]
        if entry == UNMAPPED or not any(self.data.read(entry >> TIME_BITS, tail, bs - tail)):
            return  # (zeros already: no write, so no copy of a shared block, no space needed)
        size = dev.size
        self.write(dev.dev_id, size, bytes(bs - tail))
        dev.size = size  # the zeros are not part of the volume yet

    def _grow_device(self, dev: Device, size: int) -> None:
        self._check_size(size)
        dev.size = size
        self.transaction.remapped_blocks(dev.dev_id)  # the journal carries the new size
        dev.root = self.tree.grow(dev.root, self._blocks_for(size))

    def _check_size(self, size: int) -> None:
        if not isinstance(size, int) or not 0 <= size <= MAX_VOLUME_SIZE:
            raise UsageError(f"invalid volume size {size!r}: must be 0 to {MAX_VOLUME_SIZE} bytes")

    def _blocks_for(self, size: int) -> int:
        return max(1, (size + self.block_size - 1) // self.block_size)

    def _new_dev_id(self) -> int:
        for _ in range(MAX_DEV_ID + 1):
            dev_id = self.next_dev_id
            self.next_dev_id = dev_id + 1 if dev_id < MAX_DEV_ID else 1
            if dev_id not in self.devices:
                return dev_id
        raise PoolFull("all 2^24 device ids are in use")

    # --- handles (deferred deletion) -----------------------------------------------

    def open_device(self, dev_id: int) -> None:
        self.device(dev_id).open_count += 1

    def close_device(self, dev_id: int) -> None:
        dev = self.devices.get(dev_id)
        if dev is None:
            return
        dev.open_count -= 1
        if dev.open_count <= 0 and dev.deleted and self.failed is None and not self.readonly:
            self._drop_device(dev)
            self._commit_quietly()

