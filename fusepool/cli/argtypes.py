"""argparse types for the numbers the command line takes (strict: ASCII digits only)."""

import argparse
import math
import re


def _checked_number(convert, kind: str, ok, rule: str, pattern: str):
    """An argparse type: ``convert`` the text, then require ``ok(value)`` (else say ``rule``).

    The text must match ``pattern`` first (ASCII digits, an optional minus, a decimal
    point for floats): float() and int() would also take ' 12', '1_0', '١٢', 'inf' and
    'nan', and a non-finite float would end up in pool.json as non-JSON ``Infinity``.
    """
    syntax = re.compile(pattern, re.ASCII)

    def parse(text: str):
        if len(text) > 100 or not syntax.fullmatch(text):
            raise argparse.ArgumentTypeError(f"not {kind}: {text[:100]!r}")
        value = convert(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}: {text!r}")
        return value

    return parse


_FLOAT = r"-?[0-9]+(?:\.[0-9]+)?"
positive_float = _checked_number(float, "a number", lambda v: v > 0, "must be positive", _FLOAT)
non_negative_float = _checked_number(float, "a number", lambda v: v >= 0, "must not be negative",
                                     _FLOAT)
_whole_number = _checked_number(int, "a whole number", lambda v: v >= 0, "must not be negative",
                                r"-?[0-9]+")


def non_negative_int(text: str) -> int:
    """A block count: 40-bit (data block numbers share a u64 with a 24-bit time)."""
    value = _whole_number(text)
    if value >= 1 << 40:
        raise argparse.ArgumentTypeError(f"more blocks than a pool can have (2^40): {text[:60]!r}")
    return value
