"""The shared fixtures' own contract (tests/conftest.py).

Every pool ``make_pool``/``pool``/``make_mount`` hands a test is checked offline at
teardown, after its mounts are gone: a damaged pool fails the test that left it,
unless the test is marked ``damages_pool(reason)``.  Tried on a small test module
run by a pytest of its own, with a copy of the real conftest.
"""

import shutil
import subprocess
import sys
from pathlib import Path

INNER = '''
import pytest


def damage(pool):
    """Flip a bit in every metadata page past the superblock's: a checksum problem."""
    with open(pool / "metadata", "r+b") as f:
        for page in range(2, 16):
            f.seek(page * 4096 + 1000)
            byte = f.read(1)
            f.seek(page * 4096 + 1000)
            f.write(bytes([byte[0] ^ 4]))


def test_clean(pool, make_mount):
    make_mount(pool)


def test_damaged(make_pool):
    damage(make_pool())


def test_damaged_while_mounted(pool, make_mount):
    make_mount(pool)
    damage(pool)  # (the daemon's next commit rewrites some pages; not all of them)


@pytest.mark.damages_pool("on purpose")
def test_damaged_on_purpose(make_pool):
    damage(make_pool())
'''


def test_every_pool_is_checked_at_teardown(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "test_inner.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    outcome = {}
    for line in proc.stdout.splitlines():
        word, _, rest = line.partition(" test_inner.py::")
        if rest:
            outcome.setdefault(rest.split()[0], []).append(word)
    assert outcome.get("test_clean") == ["PASSED"], proc.stdout
    assert outcome.get("test_damaged_on_purpose") == ["PASSED"], proc.stdout
    for name in ("test_damaged", "test_damaged_while_mounted"):
        assert outcome.get(name) == ["PASSED", "ERROR"], proc.stdout
    assert proc.stdout.count("fusepool check at teardown found problems") >= 2, proc.stdout
    assert "checksum" in proc.stdout
