"""Size parsing (``10G``, ``512K``, ``+1G``, ``10%``) and Docker-style human sizes.

Input sizes are binary (``1K`` = 1024 bytes), as in LVM and Docker's storage
options.  Output follows Docker's ``units.HumanSize``: decimal units with four
significant digits, so a 10 GiB base device prints as ``10.74 GB`` and a
512 KiB block as ``524.3 kB``.
"""

import re
from decimal import Decimal
from fractions import Fraction

from fusepool.errors import UsageError

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# ASCII digits only (``\d`` would take any script's digits), no sign, no exponent, no
# spaces: what a user means by a size, and nothing a float or int() parser also takes.
# One space may separate number and unit: fusepool's own messages print "528 KiB".
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(?: ?([KMGTP](?:I?B)?|B))?", re.IGNORECASE | re.ASCII)
_PERCENT_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)%?", re.ASCII)
MAX_SIZE = (1 << 63) - 1  # the largest file offset (off_t); every size fusepool takes is below


def parse_size(text: str) -> int:
    """Parse ``'10G'``, ``'512k'``, ``'1.5GiB'`` or ``'65536'`` into bytes, exactly.

    Decimals are computed exactly (``Fraction``), never through a float, and are
    accepted only when they give a whole number of bytes.
    """
    match = _SIZE_RE.fullmatch(str(text))
    if not match:
        raise UsageError(f"invalid size {text!r}: use a number with an optional K, M, G, T, P suffix")
    number, unit = match.groups()
    suffix = unit[0] if unit else ""
    whole, _, frac = number.partition(".")
    # Cheap bounds before exact arithmetic on absurdly long digit strings: 20 significant
    # integer digits already exceed MAX_SIZE, and a whole number of bytes needs at most 50
    # decimals (the largest suffix is 2^50, and 1/2^50 has 50).
    if len(whole.lstrip("0")) > 20:
        raise UsageError(f"invalid size {_short(text)}: larger than {MAX_SIZE} bytes (8 EiB)")
    if len(frac.rstrip("0")) > 50:
        raise UsageError(f"invalid size {_short(text)}: not a whole number of bytes")
    value = Fraction(Decimal(number)) * _SUFFIXES[suffix.upper()]  # exact: no float anywhere
    if value > MAX_SIZE:
        raise UsageError(f"invalid size {_short(text)}: larger than {MAX_SIZE} bytes (8 EiB)")
    if value.denominator != 1:
        raise UsageError(f"invalid size {_short(text)}: not a whole number of bytes")
    return int(value)


def _short(text: str) -> str:
    """``text`` quoted for a message, cut when absurdly long (a message stays one line)."""
    text = str(text)
    return repr(text) if len(text) <= 40 else repr(text[:20] + "..." + text[-10:])


def parse_percent(text: str) -> float:
    """Parse ``'10%'`` or ``'10'`` into a percentage between 0 and 99."""
    match = _PERCENT_RE.fullmatch(str(text))
    if not match or not 0 <= Fraction(Decimal(match.group(1))) < 100:
        raise UsageError(f"invalid percentage {_short(text)}: use a number from 0 to 99, e.g. 10%")
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
