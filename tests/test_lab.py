"""`make lab` serves the notebooks: start it, fetch pages from 127.0.0.1, stop it."""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest
from conftest import REPO, end_session, free_port


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode("utf-8", "replace")


@pytest.mark.timeout(180)
def test_make_lab_serves_the_notebooks():
    port = free_port()
    token = "ddpzero-test"
    args = f"--no-browser --port={port} --IdentityProvider.token={token}"
    proc = subprocess.Popen(
        ["make", "lab", f"LAB_ARGS={args}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so the whole make -> jupyter tree can be stopped at once
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status, _ = _get(f"{base}/api/status?token={token}")
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "JupyterLab did not start within 120 s"
                time.sleep(0.5)
        assert status == 200
        status, page = _get(f"{base}/lab?token={token}")
        assert status == 200 and "JupyterLab" in page
        status, listing = _get(f"{base}/api/contents?token={token}")
        assert status == 200 and "00_live_cluster.ipynb" in listing
    finally:
        end_session(proc)
    # Stopped: nothing answers on the port any more.
    with pytest.raises(OSError):
        _get(f"{base}/api/status?token={token}")
