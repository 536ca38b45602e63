"""Growing a loop-mode pool by itself, and the low-water event.

Two mechanisms from the kernel/LVM stack, kept apart as they are there:

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
  environment (``FUSEPOOL_*`` below) and typically runs ``fusepool extend``.

The engine (:class:`fusepool.engine.Pool`) decides *when*; this module holds the
rules (validation, growth arithmetic) and how a hook is started.  A hook never
runs on the thread serving FUSE: the mount daemon starts it as a trio task
(:func:`run_hook`), a command that opened the pool itself starts it detached
(:func:`spawn_hook`).
"""

import logging
import math
import os
import re
import subprocess

from fusepool.errors import UsageError
from fusepool.units import bytes_size

log = logging.getLogger(__name__)

OFF = 100.0  # an autoextend threshold of 100 % turns autoextend off (as in LVM)
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


def validate(mode: str, nr_blocks: int, block_size: int, autoextend_threshold: float,
             autoextend_percent: float, max_data_size: int, low_water_mark: int,
             on_low_water: str | None) -> None:
    """Every rule on the autoextend and low-water settings (UsageError on the first broken one)."""
    threshold = parse_threshold(autoextend_threshold)
    parse_grow_percent(autoextend_percent)
    if mode != "loop" and (threshold < OFF or max_data_size):
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
