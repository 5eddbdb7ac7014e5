"""Shared fixtures: one live cluster per test module (starting one costs seconds)."""

from __future__ import annotations

import os
import sys

import pytest

import ddpzero_lab as dzl

# The browser test opens this notebook in JupyterLab itself; nbval need not run it again.
collect_ignore_glob = ["browser/*.ipynb"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


@pytest.fixture(scope="module")
def cluster():
    # A short collective timeout keeps the fault tests quick; 2 ranks fit 2 cores.
    with dzl.LiveCluster(world_size=2, timeout=5.0, grace=1.0) as c:
        yield c


def alive(pid: int) -> bool:
    """True if pid names a running process (a zombie counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
