"""Lint stays clean: ruff, at the version pinned in pyproject.toml, over the whole tree."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_reports_nothing():
    ruff = Path(sys.executable).parent / "ruff"
    assert ruff.exists(), "ruff not installed: run tools/setup"
    proc = subprocess.run([str(ruff), "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, env=os.environ | {"NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
