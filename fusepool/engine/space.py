"""Space policy: growing the pool, minimum free space, autoextend and the low-water event.

:class:`SpacePolicy` is a room of :class:`fusepool.engine.Pool`: it decides
*when* the pool grows or warns.  Below it, the rules themselves, two
mechanisms from the kernel/LVM stack kept apart as they are there:

- **Autoextend** (LVM's ``thin_pool_autoextend_threshold`` / ``_percent``,
  which dmeventd applies): when the data in use reaches ``threshold`` percent
  of the data space, the data space grows by ``percent`` of its current size,
  again until use is below the threshold, never past ``max_data_size`` and
  never by more than the host filesystem has free (a sparse file could grow
  further, but that would promise space the host cannot give).  Loop mode
  only: a direct-mode pool's space is a device or a preallocated file.
- **Low water** (dm-thin's ``low_water_mark``, the event dmeventd listens
  to): when the free data blocks drop below the mark, it is logged and a
  user command runs once; it runs again only after the free blocks have been
  back at or above the mark.  The command learns the figures from its
  environment (``FUSEPOOL_*``, see :func:`hook_environment`) and typically
  runs ``fusepool extend``.

A hook never runs on the thread serving FUSE: the mount daemon starts it as a
trio task (:func:`run_hook`), a command that opened the pool itself starts it
detached (:func:`spawn_hook`).
"""

import dataclasses
import logging
import math
import os
import re
import subprocess

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
            self.transaction.change_structure()
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
        self.transaction.change_structure()  # a journal record cannot carry it

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
        values["autoextend_threshold"] = parse_threshold(values["autoextend_threshold"])
        values["autoextend_percent"] = parse_grow_percent(values["autoextend_percent"])
        values["on_low_water"] = values["on_low_water"] or None
        # (A maximum kept from before is not checked again: `extend` may have passed it.)
        validate_space_settings(self.config.mode, self.nr_blocks, self.block_size,
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
        return (c.mode == "loop" and c.autoextend_threshold < AUTOEXTEND_OFF and not self.readonly
                and (not c.max_data_size or self.nr_blocks < c.max_data_size // self.block_size))

    def _arm_space_watch(self) -> None:
        """Set ``space_watch``: below this many free blocks, write() calls :meth:`_space_low`."""
        watch = 0
        if self._autoextend_on():
            # used >= trigger is only possible once free <= nr_blocks - trigger
            watch = self.nr_blocks - trigger_blocks(
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
        if used < trigger_blocks(nr, c.autoextend_threshold):
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
        target = target_blocks(nr, used, c.autoextend_threshold, c.autoextend_percent, cap)
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
        refusal = self.hook_refusal or untrusted_config(self.path, c.on_low_water)
        if refusal:
            log.error("pool %s: not running the low-water hook: %s", self.path, refusal)
            return
        env = hook_environment(self.path, free, self.nr_blocks, self.space.used,
                                          self.block_size, c.low_water_mark)
        (self.on_low_water or spawn_hook)(c.on_low_water, env)


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


# --- the rules: settings, growth arithmetic, the low-water hook -------------------------------

AUTOEXTEND_OFF = 100.0  # an autoextend threshold of 100 % turns autoextend off (as in LVM)
MAX_GROW_PERCENT = 1000.0


def parse_threshold(value) -> float:
    """``--autoextend-threshold``: a percentage from 1 to 100 (100 = off)."""
    number = _number(value, "autoextend threshold")
    if not 1 <= number <= 100:
        raise UsageError(f"invalid autoextend threshold {value!r}: use a percentage from 1 to 100 "
                         "(100 turns autoextend off)")
    return number


def parse_grow_percent(value) -> float:
    """``--autoextend-percent``: how much to grow, in percent of the current size."""
    number = _number(value, "autoextend percent")
    if not 0 < number <= MAX_GROW_PERCENT:
        raise UsageError(f"invalid autoextend percent {value!r}: use a percentage above 0 and at most "
                         f"{MAX_GROW_PERCENT:g}")
    return number


def _number(value, what: str) -> float:
    if isinstance(value, bool):
        raise UsageError(f"invalid {what} {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    else:
        # ASCII digits and a decimal point only: float() would also take '1_0', '١٢',
        # ' 1' and 'inf'.
        match = re.fullmatch(r"(-?[0-9]{1,30}(?:\.[0-9]{1,30})?)%?", str(value), re.ASCII)
        if not match:
            raise UsageError(f"invalid {what} {str(value)[:40]!r}: not a number")
        number = float(match.group(1))
    if not math.isfinite(number):
        raise UsageError(f"invalid {what} {value!r}")
    return number


def validate_space_settings(mode: str, nr_blocks: int, block_size: int, autoextend_threshold: float,
                            autoextend_percent: float, max_data_size: int, low_water_mark: int,
                            on_low_water: str | None) -> None:
    """Every rule on the autoextend and low-water settings (UsageError on the first broken one)."""
    threshold = parse_threshold(autoextend_threshold)
    parse_grow_percent(autoextend_percent)
    if mode != "loop" and (threshold < AUTOEXTEND_OFF or max_data_size):
        raise UsageError("autoextend works in loop mode only: a direct-mode pool's data space is "
                         "reserved up front (grow the device or file, then `fusepool extend`)")
    if not isinstance(max_data_size, int) or isinstance(max_data_size, bool) or max_data_size < 0:
        raise UsageError(f"invalid maximum data size {max_data_size!r}")
    if max_data_size and max_data_size < nr_blocks * block_size:
        raise UsageError(f"maximum data size {bytes_size(max_data_size)} is below the pool's data size "
                         f"({bytes_size(nr_blocks * block_size)})")
    if not isinstance(low_water_mark, int) or isinstance(low_water_mark, bool) or low_water_mark < 0:
        raise UsageError(f"invalid low-water mark {low_water_mark!r}: a number of data blocks")
    if low_water_mark >= nr_blocks:
        raise UsageError(f"low-water mark {low_water_mark} must be below the pool's {nr_blocks} "
                         "data blocks")
    if on_low_water and not low_water_mark:
        raise UsageError("--on-low-water needs a --low-water-mark (in data blocks)")


def trigger_blocks(nr_blocks: int, threshold: float) -> int:
    """Blocks in use at which autoextend acts: ``threshold`` percent, rounded up."""
    return max(1, math.ceil(nr_blocks * threshold / 100))


def target_blocks(nr_blocks: int, used: int, threshold: float, percent: float, limit: int) -> int:
    """The data size (blocks) to grow to: steps of ``percent`` until use is under the threshold.

    ``limit`` caps it (max data size, host free space, metadata room); the
    result equals ``nr_blocks`` when nothing can be added.
    """
    new = nr_blocks
    while new < limit and used >= trigger_blocks(new, threshold):
        new = min(limit, new + max(1, math.ceil(new * percent / 100)))
    return max(new, nr_blocks)


def hook_environment(pool_dir: str, free: int, total: int, used: int, block_size: int,
                     mark: int) -> dict[str, str]:
    """What a low-water hook is told (on top of the daemon's own environment)."""
    return {
        "FUSEPOOL_EVENT": "low-water",
        "FUSEPOOL_POOL": pool_dir,
        "FUSEPOOL_FREE_BLOCKS": str(free),
        "FUSEPOOL_USED_BLOCKS": str(used),
        "FUSEPOOL_TOTAL_BLOCKS": str(total),
        "FUSEPOOL_BLOCK_SIZE": str(block_size),
        "FUSEPOOL_LOW_WATER_MARK": str(mark),
    }


def untrusted_config(pool_dir: str, command: str | None = None) -> str | None:
    """Why the pool's ``on_low_water`` must not run as this process, or None if it may.

    The hook is a shell command run with this process's rights, so it must come
    from a pool.json that only this user could have written: owned by the
    effective uid and not group/other-writable (root mounting another user's
    pool does not run that user's command as root).  With ``command``, the file
    is read again through the descriptor that was checked and must still hold
    that command, so swapping pool.json after it was loaded does not help.
    """
    import json
    import stat

    from fusepool.layout import CONFIG

    path = os.path.join(pool_dir, CONFIG)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        euid = os.geteuid()
        if st.st_uid != euid:
            return f"{path} is owned by uid {st.st_uid}, not by this process (uid {euid})"
        if st.st_mode & 0o022:
            return (f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): anyone "
                    "could have set the command")
        if command is None:
            return None
        try:
            on_file = json.loads(f.read()).get("on_low_water")
        except (OSError, ValueError, AttributeError) as exc:
            return f"{path} cannot be read back ({exc})"
    if on_file != command:
        return f"{path} no longer holds the command this pool was opened with"
    return None


def spawn_hook(command: str, env: dict[str, str]) -> None:
    """Start ``command`` with ``/bin/sh -c`` and do not wait for it (no trio loop here)."""
    try:
        subprocess.Popen(["/bin/sh", "-c", command], env=os.environ | env, stdin=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    except OSError as exc:
        log.error("low-water hook %r could not start: %s", command, exc)


async def run_hook(command: str, env: dict[str, str]) -> None:
    """The mount daemon's way: a trio task that waits for the hook and logs how it ended.

    Its output goes where the daemon's goes (``POOL/fusepool.log``).  The hook
    may call back into the daemon (``fusepool extend POOL``): nothing waits
    for it on the thread that serves those requests.
    """
    import trio

    log.info("running low-water hook: %s", command)
    try:
        result = await trio.run_process(["/bin/sh", "-c", command], env=os.environ | env,
                                        stdin=b"", check=False)
    except OSError as exc:
        log.error("low-water hook %r could not start: %s", command, exc)
        return
    if result.returncode:
        log.error("low-water hook %r exited with status %d", command, result.returncode)
    else:
        log.info("low-water hook finished")
