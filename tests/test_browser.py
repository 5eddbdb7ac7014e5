"""A real browser: JupyterLab on 127.0.0.1, headless Chromium runs a notebook with a live
dashboard, watches the dashboard's images change while the job runs, and checks what the panels
show: the loss panel's last value against the run's last loss (a run that learns: DDP on the
8x8 digits), the memory panel's bars against the ZeRO paper's formula.

Needs Debian's `chromium` (apt-get install chromium) and the `playwright` Python package
(in the dev extra; it drives the installed Chromium, it downloads no browser). Without
Chromium the test is skipped with a message saying how to get it. The screenshot goes to
build/dashboard.png; `python scripts/refresh_screenshot.py` refreshes the README's picture.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import REPO

_spec = importlib.util.spec_from_file_location(
    "refresh_screenshot", Path(REPO) / "scripts" / "refresh_screenshot.py"
)
demo = sys.modules["refresh_screenshot"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

CHROMIUM = demo.find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: install it (Debian/Ubuntu: apt-get install chromium) or set "
    "DDPZERO_CHROMIUM to a Chrome/Chromium executable to run the browser test",
)
SCREENSHOT = Path(REPO) / "build" / "dashboard.png"


@pytest.mark.timeout(300)
def test_dashboard_updates_live_in_jupyterlab(tmp_path):
    run = demo.run_demo(tmp_path, SCREENSHOT, CHROMIUM)
    assert not [e for e in run.errors if "Traceback" in e or "Error" in e], run.errors
    assert run.image_changes >= 3, f"the dashboard changed only {run.image_changes} times"
    check = run.check
    assert check, f"the notebook printed no check line: {run.output_text[-2000:]}"
    # the run learns, and the loss panel ends where the run ended
    assert check["last_loss"] < 0.5 * check["first_loss"], check
    assert check["drawn_last_loss"] == pytest.approx(check["last_loss"], rel=1e-6)
    # the memory panel: DDP with AdamW in float32 holds 16 bytes per parameter on each rank
    # (ZeRO paper, 4 + 4 + 8), the bars and the formula's mark both
    drawn = check["drawn_model_state_bytes"]
    assert sorted(drawn) == ["0", "1"]
    for value in drawn.values():
        assert value == pytest.approx(check["formula_bytes"], rel=0.01)
    for value in check["drawn_formula_bytes"].values():
        assert value == pytest.approx(check["formula_bytes"], rel=0.01)
    assert SCREENSHOT.stat().st_size > 10_000
    assert run.seconds < 120, f"the browser flow took {run.seconds:.0f} s"
