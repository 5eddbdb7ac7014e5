"""The code base passes ruff (lint and format), as DESIGN.md §6 asks."""

import subprocess
import sys

from conftest import REPO


def _ruff(*args):
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_ruff_check():
    out = _ruff("check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format():
    out = _ruff("format", "--check", ".")
    assert out.returncode == 0, out.stdout + out.stderr
