"""Shared fixtures: one live cluster per test module (starting one costs seconds)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import ddpzero_lab as dzl

# The browser test opens this notebook in JupyterLab itself; nothing else collects it.
collect_ignore_glob = ["browser/*.ipynb"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


@pytest.fixture(scope="module")
def cluster():
    # A short collective timeout keeps the fault tests quick; 2 ranks fit 2 cores.
    with dzl.LiveCluster(world_size=2, timeout=5.0, grace=1.0) as c:
        yield c


# The hang and fault-injection tests wait timeouts out on purpose: a short one keeps them quick.
SHORT_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def short_cluster():
    with dzl.LiveCluster(world_size=2, timeout=SHORT_TIMEOUT, grace=0.5) as c:
        yield c


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"N{n}")
def ncluster(request):
    """One cluster of 2, then one of 3 ranks: the equivalence tests' world sizes (3 divides
    none of their parameter sizes)."""
    with dzl.LiveCluster(request.param, timeout=30.0) as cluster:
        yield cluster


def restart_seconds(cluster) -> float:
    """How long replacing the cluster's workers takes on this machine now: the baseline that a
    test measures before it bounds the time a failure takes to end (most end in a restart),
    so that a busy machine makes the bound longer instead of the test fail."""
    start = time.monotonic()
    cluster.restart()
    return time.monotonic() - start


def alive(pid: int) -> bool:
    """True if pid names a running process (a zombie counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_session(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """End a process started with start_new_session=True and everything in its session:
    SIGTERM, then SIGKILL after `grace` seconds (0: at once)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        if sig == signal.SIGTERM and grace == 0:
            continue
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # the whole session is gone already
        try:
            proc.wait(wait)
            if sig == signal.SIGTERM:
                return
        except subprocess.TimeoutExpired:
            continue
