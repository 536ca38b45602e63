"""Space policy: growing the pool, minimum free space, autoextend and the low-water event.

A room of :class:`fusepool.engine.Pool`; the rules themselves (validation,
LVM's threshold/percent arithmetic, starting the hook) are in
:mod:`fusepool.autoextend`.
"""

import dataclasses
import logging

from fusepool import autoextend
from fusepool.engine.device import (
    MAX_METADATA_SIZE,
)
from fusepool.engine.txn import METADATA_RESERVE_PAGES, Health
from fusepool.errors import (
    BelowMinFreeSpace,
    InvalidArgument,
    PoolError,
    ReadOnlyPool,
    UsageError,
)
from fusepool.metadata.format import (
    PAGE_SIZE,
    TIME_BITS,
)
from fusepool.units import bytes_size

log = logging.getLogger(__name__)

class SpacePolicy:
    """Allocation policy: pool size, minimum free space, autoextend, low water (a room of Pool)."""


    def extend(self, data_size: int | None = None, metadata_size: int | None = None) -> None:
        """Grow the data and/or metadata space (never shrink).

        Everything is validated before anything changes.  Growing the metadata
        is allowed on a pool that went read-only for lack of metadata space,
        and brings it back.
        """
        if self.readonly:
            raise ReadOnlyPool("the pool is open read-only")
        meta_pages = self.store.superblock.nr_meta_pages
        nr_blocks = self.nr_blocks
        if metadata_size is not None:
            if metadata_size // PAGE_SIZE < meta_pages:
                raise InvalidArgument(f"cannot shrink the metadata space from {meta_pages * PAGE_SIZE} "
                                      f"to {metadata_size} bytes")
            if metadata_size > MAX_METADATA_SIZE:
                raise UsageError(f"metadata size is limited to {bytes_size(MAX_METADATA_SIZE)}")
            meta_pages = metadata_size // PAGE_SIZE
        if data_size is not None:
            if data_size // self.block_size < nr_blocks:
                raise InvalidArgument(f"cannot shrink the data space from {nr_blocks * self.block_size} "
                                      f"to {data_size} bytes")
            if data_size // self.block_size >= 1 << (64 - TIME_BITS):
                raise UsageError("data size too large")
            nr_blocks = data_size // self.block_size
        if meta_pages < min_metadata_pages(nr_blocks):
            raise UsageError(f"metadata space too small for {nr_blocks} data blocks: extend it to at "
                             f"least {bytes_size(min_metadata_pages(nr_blocks) * PAGE_SIZE)} too "
                             "(--metadata-size)")
        if not (self.health is Health.METADATA_FULL and meta_pages > self.store.superblock.nr_meta_pages):
            self._check_writable()  # (growing the metadata is what a metadata-full pool waits for)
        if nr_blocks > self.nr_blocks:  # the data first: a device too small or a host too
            self.data.grow(nr_blocks * self.block_size)  # full for a preallocated file stop here
        if meta_pages > self.store.superblock.nr_meta_pages:
            self.store.grow(meta_pages)
            self.dirty = self.structure_changed = True
            self._recover_metadata_full()
        if nr_blocks > self.nr_blocks:
            self._grow_data(nr_blocks)
        self.commit()
        self.autoextend_stuck_at = 0
        self._arm_space_watch()

    def _grow_data(self, nr_blocks: int) -> None:
        """More data blocks (in memory until the next commit)."""
        self.data.grow(nr_blocks * self.block_size)
        self.space.grow(nr_blocks)
        self.dirty = self.structure_changed = True  # a journal record cannot carry it

    # --- autoextend and the low-water event ----------------------------------------------

    def configure(self, **settings) -> None:
        """Change autoextend/low-water settings (``fusepool set``): validated, then saved.

        Keys: autoextend_threshold, autoextend_percent, max_data_size,
        low_water_mark, on_low_water (an empty command removes the hook),
        zero_detection (a bool; takes effect from the next write).
        """
        known = ("autoextend_threshold", "autoextend_percent", "max_data_size", "low_water_mark",
                 "on_low_water")
        zero_detection = settings.pop("zero_detection", self.config.zero_detection)
        if not isinstance(zero_detection, bool):
            raise UsageError(f"zero_detection must be true or false, not {zero_detection!r}")
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise UsageError(f"unknown setting(s): {', '.join(unknown)}")
        if self.readonly:
            raise ReadOnlyPool("the pool is open read-only")
        values = {k: getattr(self.config, k) for k in known} | settings
        values["autoextend_threshold"] = autoextend.parse_threshold(values["autoextend_threshold"])
        values["autoextend_percent"] = autoextend.parse_grow_percent(values["autoextend_percent"])
        values["on_low_water"] = values["on_low_water"] or None
        # (A maximum kept from before is not checked again: `extend` may have passed it.)
        autoextend.validate(self.config.mode, self.nr_blocks, self.block_size,
                            **values | ({} if "max_data_size" in settings else {"max_data_size": 0}))
        config = dataclasses.replace(self.config, **values, zero_detection=zero_detection)
        config.save(self.path)
        self.config = config
        if "on_low_water" in settings:  # the hook is now one this process wrote itself
            self.hook_refusal = None
        self.autoextend_stuck_at = 0
        self._arm_space_watch()
        if self.space.free < self.space_watch:  # already past a new threshold: act now
            self._space_low()

    def _autoextend_on(self) -> bool:
        c = self.config
        return (c.mode == "loop" and c.autoextend_threshold < autoextend.OFF and not self.readonly
                and (not c.max_data_size or self.nr_blocks < c.max_data_size // self.block_size))

    def _arm_space_watch(self) -> None:
        """Set ``space_watch``: below this many free blocks, write() calls :meth:`_space_low`."""
        watch = 0
        if self._autoextend_on():
            # used >= trigger is only possible once free <= nr_blocks - trigger
            watch = self.nr_blocks - autoextend.trigger_blocks(
                self.nr_blocks, self.config.autoextend_threshold) + 1
        mark = self.config.low_water_mark
        if mark:
            if self.space.free >= mark:
                self.low_water_armed = True
            if self.low_water_armed:
                watch = max(watch, mark)
        self.space_watch = watch

    def _space_low(self) -> None:
        """After a write left few free blocks: autoextend, then maybe the low-water event.

        Runs between requests with everything applied, so the commit that
        makes a growth durable is a consistent one.  Nothing here fails the
        write that got us here.
        """
        if self._autoextend() or self.autoextend_pending:
            self.autoextend_pending = False
            self._commit_quietly()  # durable at once, as `fusepool extend` is
        mark = self.config.low_water_mark
        free = self.space.free
        if mark and free < mark and self.low_water_armed:
            self.low_water_armed = False
            self._low_water_event(free)
        self._arm_space_watch()

    def _allocate_grown(self) -> int:
        """No free block in the middle of a write: grow first if autoextend may, then allocate.

        The growth is committed at the end of the write (see _space_low),
        when the mappings it serves are in place.
        """
        if self._autoextend():
            self.autoextend_pending = True
            self.space_watch = self.nr_blocks + 1  # makes this write end in _space_low
        return self.space.allocate()

    def _autoextend(self) -> bool:
        """Grow the data space if use reached the threshold; True if it grew."""
        from fusepool.metadata.format import COUNTS_PER_PAGE

        if not self._autoextend_on():
            return False
        c = self.config
        nr, used = self.nr_blocks, self.space.used
        if used < autoextend.trigger_blocks(nr, c.autoextend_threshold):
            return False
        limit = (1 << (64 - TIME_BITS)) - 1
        if c.max_data_size:
            limit = min(limit, c.max_data_size // self.block_size)
        host_limit = nr + self.data.host_free_bytes() // self.block_size
        # Growing writes the new space-map pages at the next commit: keep that commit possible.
        meta_free = (self.store.free_pages - self.tree.dirtied - len(self.space.dirty_pages)
                     - 2 * METADATA_RESERVE_PAGES)
        meta_limit = nr + max(0, meta_free) * COUNTS_PER_PAGE
        meta_limit = min(meta_limit, max_blocks_for_metadata(self.store.superblock.nr_meta_pages))
        cap = min(limit, host_limit, meta_limit)
        target = autoextend.target_blocks(nr, used, c.autoextend_threshold, c.autoextend_percent, cap)
        if target <= nr:
            if self.autoextend_stuck_at != nr:  # (said once per size, not at every write)
                self.autoextend_stuck_at = nr
                why = ("its maximum data size" if cap == limit else
                       "the free space of the host filesystem" if cap == host_limit else
                       "its metadata space (extend it with --metadata-size)")
                log.warning("pool %s is %d%% full and cannot autoextend: limited by %s",
                            self.path, 100 * used // nr, why)
            return False
        try:
            self._grow_data(target)
        except (OSError, PoolError) as exc:
            log.error("autoextend of pool %s failed: %s", self.path, exc)
            return False
        log.info("autoextend: pool %s data space %s -> %s (%d of %d blocks were in use)", self.path,
                 bytes_size(nr * self.block_size), bytes_size(target * self.block_size), used, nr)
        if target == limit and c.max_data_size:
            log.warning("pool %s reached its maximum data size (%s): it will not autoextend again",
                        self.path, bytes_size(target * self.block_size))
        return True

    def _low_water_event(self, free: int) -> None:
        c = self.config
        log.warning("pool %s: %d free data blocks, below the low-water mark of %d%s", self.path, free,
                    c.low_water_mark, "; running its hook" if c.on_low_water else "")
        if not c.on_low_water:
            return
        refusal = self.hook_refusal or autoextend.untrusted_config(self.path, c.on_low_water)
        if refusal:
            log.error("pool %s: not running the low-water hook: %s", self.path, refusal)
            return
        env = autoextend.hook_environment(self.path, free, self.nr_blocks, self.space.used,
                                          self.block_size, c.low_water_mark)
        (self.on_low_water or autoextend.spawn_hook)(c.on_low_water, env)


    def _check_min_free(self, what: str) -> None:
        """Docker's dm.min_free_space, for data and metadata alike."""
        limit = self.config.min_free_space
        data_free = 100.0 * self.space.free / self.nr_blocks
        if data_free < limit:
            raise BelowMinFreeSpace(
                f"cannot {what}: only {data_free:.1f}% of the pool's data space is free, below the "
                f"minimum free space of {limit:g}%; extend the pool with `fusepool extend {self.path} "
                "--data-size SIZE` or remove volumes")
        meta_free = 100.0 * self.store.free_pages / self.store.superblock.nr_meta_pages
        if meta_free < limit:
            raise BelowMinFreeSpace(
                f"cannot {what}: only {meta_free:.1f}% of the pool's metadata space is free, below "
                f"the minimum free space of {limit:g}%; extend it with `fusepool extend {self.path} "
                "--metadata-size SIZE`")


def max_blocks_for_metadata(nr_pages: int) -> int:
    """The most data blocks ``nr_pages`` of metadata can serve (min_metadata_pages inverted)."""
    from fusepool.metadata.format import COUNTS_PER_PAGE

    return max(0, (nr_pages - 2 * METADATA_RESERVE_PAGES) // 2 * COUNTS_PER_PAGE)


def min_metadata_pages(nr_blocks: int) -> int:
    """Metadata pages a pool needs at the least: two copies of the space map and slack."""
    from fusepool.metadata.format import COUNTS_PER_PAGE

    return 2 * ((nr_blocks + COUNTS_PER_PAGE - 1) // COUNTS_PER_PAGE) + 2 * METADATA_RESERVE_PAGES


