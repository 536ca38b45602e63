"""Unit layer: fusepool.units, pure functions with no pool, no files, no FUSE.

Sizes in are binary (LVM's and Docker's storage options: ``1K`` = 1024),
computed exactly; sizes out are Docker's ``units.HumanSize`` (decimal, four
significant digits), which `fusepool info` must print to the letter.
"""

import pytest

from fusepool.errors import UsageError
from fusepool.units import MAX_SIZE, bytes_size, human_size, parse_percent, parse_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("65536", 64 * KiB), ("512k", 512 * KiB), ("512K", 512 * KiB), ("10G", 10 * GiB),
    ("1.5GiB", 3 * GiB // 2), ("1.5gb", 3 * GiB // 2), ("2T", 2 * TiB), ("1P", 1 << 50),
    ("528 KiB", 528 * KiB), ("100B", 100), ("007M", 7 * MiB), ("0.5K", 512),
    (str(MAX_SIZE), MAX_SIZE),
])
def test_parse_size(text, size):
    assert parse_size(text) == size
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("text", [
    "", "G", "-1", "+1G", "1e9", "1 G ", " 1G", "1  G", "1X", "1.5", "0.3K", "１G", "1_000",
    str(MAX_SIZE + 1), "8E", "9" * 10_000, "1." + "0" * 60 + "1K", "nan", "inf",
])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError) as raised:
        parse_size(text)
    message = str(raised.value)
    assert "\n" not in message and len(message) < 200  # one short line, even for 10,000 digits


@pytest.mark.parametrize(("text", "value"), [("0", 0.0), ("10%", 10.0), ("10", 10.0), ("99.5%", 99.5)])
def test_parse_percent(text, value):
    assert parse_percent(text) == value


@pytest.mark.parametrize("text", ["100", "100%", "-1", "%", "", "ten", "10 %", "1e1"])
def test_parse_percent_refuses(text):
    with pytest.raises(UsageError):
        parse_percent(text)


@pytest.mark.parametrize(("size", "text"), [
    # The figures `docker info` prints for a devicemapper pool (same rounding, same units).
    (64 * KiB, "65.54 kB"), (512 * KiB, "524.3 kB"), (10 * GiB, "10.74 GB"), (100 * GiB, "107.4 GB"),
    (2 * GiB, "2.147 GB"), (0, "0 B"), (999, "999 B"), (1000, "1 kB"), (1 << 62, "4.612 EB"),
])
def test_human_size_is_dockers(size, text):
    assert human_size(size) == text


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (64 * KiB, "64 KiB"), (528 * KiB, "528 KiB"), (10 * GiB, "10 GiB"), (3 * GiB // 2, "1.5 GiB"),
])
def test_bytes_size_round_trips_through_parse_size(size, text):
    assert bytes_size(size) == text
    assert parse_size(text) == size
