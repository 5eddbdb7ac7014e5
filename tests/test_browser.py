"""A real browser: JupyterLab on 127.0.0.1, headless Chromium runs a notebook with a live
dashboard and watches the dashboard's images change while the job runs.

Needs Debian's `chromium` (apt-get install chromium) and the `playwright` Python package
(in the dev extra; it drives the installed Chromium, it downloads no browser). Without
Chromium the test is skipped with a message saying how to get it. The screenshot goes to
docs/dashboard.png, which the README shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, end_session, free_port

CHROMIUM = os.environ.get("DDPZERO_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: install it (Debian/Ubuntu: apt-get install chromium) or set "
    "DDPZERO_CHROMIUM to a Chrome/Chromium executable to run the browser test",
)
NOTEBOOK = Path(__file__).parent / "browser" / "dashboard_demo.ipynb"
SCREENSHOT = Path(REPO) / "docs" / "dashboard.png"


def _wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.mark.timeout(300)
def test_dashboard_updates_live_in_jupyterlab(tmp_path):
    from playwright.sync_api import sync_playwright

    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / "demo.ipynb")
    # JupyterLab's "news" toast would cover part of the screenshot: settings say no
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings")}
    port, token = free_port(), "ddpzero-browser-test"
    args = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.disable_check_xsrf=True",
    ]
    if os.geteuid() == 0:
        args.append("--allow-root")
    server = subprocess.Popen(
        args,
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/api/status?token={token}", 90)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(f"{base}/lab/tree/demo.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            # the kernel must be idle before running everything
            page.wait_for_selector(
                ".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000
            )
            # run the three cells in order, as a learner would: select each one (a click on
            # its prompt) and press Shift+Enter
            prompts = page.locator(".jp-Notebook .jp-Cell .jp-InputPrompt")
            for index in range(3):
                for _attempt in range(5):  # a key press can arrive before the page listens
                    prompts.nth(index).click()
                    page.keyboard.press("Shift+Enter")
                    deadline = time.monotonic() + 3
                    while time.monotonic() < deadline:
                        if prompts.nth(index).inner_text().strip() not in ("[ ]:", ""):
                            break
                        time.sleep(0.1)
                    if prompts.nth(index).inner_text().strip() not in ("[ ]:", ""):
                        break
            images = ".jp-OutputArea-output img"
            try:
                page.wait_for_selector(images, timeout=90_000)
            except Exception:
                page.screenshot(path=str(tmp_path / "failure.png"))  # for the report below
                raise AssertionError(
                    f"no dashboard image appeared; the page: {tmp_path / 'failure.png'}"
                ) from None
            sources: list[tuple[str, ...]] = []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                current = tuple(page.eval_on_selector_all(images, "els => els.map(e => e.src)"))
                if current and (not sources or current != sources[-1]):
                    sources.append(current)
                if page.locator(".jp-OutputArea-output", has_text="training done:").count():
                    break
                time.sleep(0.2)
            page.locator(".jp-OutputArea-output", has_text="training done:").wait_for(
                timeout=90_000
            )
            time.sleep(1.0)
            news = page.get_by_role("button", name="No", exact=True)  # JupyterLab's news toast
            if news.count():
                news.first.click()
            errors = page.eval_on_selector_all(
                ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'], "
                ".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']",
                "els => els.map(e => e.innerText)",
            )
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.locator(".jp-Cell").first.screenshot(path=str(SCREENSHOT))
            browser.close()
        assert len(sources) - 1 >= 3, f"the dashboard changed only {len(sources) - 1} times"
        assert not [e for e in errors if "Traceback" in e or "Error" in e], errors
        assert SCREENSHOT.stat().st_size > 10_000
    finally:
        end_session(server)
