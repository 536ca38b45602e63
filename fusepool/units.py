"""Size parsing (``10G``, ``512K``, ``+1G``, ``10%``) and Docker-style human sizes.

Input sizes are binary (``1K`` = 1024 bytes), as in LVM and Docker's storage
options.  Output follows Docker's ``units.HumanSize``: decimal units with four
significant digits, so a 10 GiB base device prints as ``10.74 GB`` and a
512 KiB block as ``524.3 kB``.
"""

import re

from fusepool.errors import UsageError

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``'10G'``, ``'512k'``, ``'1.5GiB'`` or ``'65536'`` into bytes."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise UsageError(f"invalid size {text!r}: use a number with an optional K, M, G, T suffix")
    number, suffix = match.groups()
    value = float(number) * _SUFFIXES[suffix.upper()]
    if value != int(value):
        raise UsageError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def parse_percent(text: str) -> float:
    """Parse ``'10%'`` or ``'10'`` into a percentage between 0 and 99."""
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*%?\s*$", str(text))
    if not match or not 0 <= float(match.group(1)) < 100:
        raise UsageError(f"invalid percentage {text!r}: use a number from 0 to 99, e.g. 10%")
    return float(match.group(1))


def human_size(size: float) -> str:
    """Docker's ``units.HumanSize``: decimal units, 4 significant digits."""
    units = ["B", "kB", "MB", "GB", "TB", "PB", "EB"]
    i = 0
    size = float(size)
    while size >= 1000 and i < len(units) - 1:
        size /= 1000
        i += 1
    return f"{size:.4g} {units[i]}"


def bytes_size(size: int) -> str:
    """Binary human size for our own messages (``10 GiB``, ``64 KiB``)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    value = float(size)
    i = 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.4g} {units[i]}"
