"""Lint stays clean: ruff, at the version pinned in pyproject.toml, over the whole tree.

"The whole tree" includes the Python scripts in tools/, which have no .py ending: ruff reads
only *.py unless told, so pyproject.toml names them (extend-include) and a test here makes sure
a new script is not left out.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"


def ruff(*args: str) -> subprocess.CompletedProcess:
    assert RUFF.exists(), "ruff not installed: run tools/setup"
    return subprocess.run([str(RUFF), *args], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | {"NO_COLOR": "1"})


def python_scripts() -> list[str]:
    """tools/* without an ending whose first line runs python."""
    found = []
    for path in sorted((ROOT / "tools").iterdir()):
        if path.is_file() and not path.suffix:
            with open(path, "rb") as f:
                if b"python" in f.readline():
                    found.append(f"tools/{path.name}")
    return found


def test_ruff_reports_nothing():
    proc = ruff("check", "--no-cache", "--output-format", "concise", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_checks_the_scripts_in_tools():
    scripts = python_scripts()
    assert "tools/bench" in scripts and "tools/compare-modes" in scripts
    proc = ruff("check", "--no-cache", "--show-files", ".")
    checked = {os.path.relpath(line.strip(), ROOT) for line in proc.stdout.splitlines() if line.strip()}
    missing = [s for s in scripts if s not in checked]
    assert not missing, f"ruff does not read {missing}: add them to extend-include in pyproject.toml"
