"""Refresh the README's picture of the dashboard: run the demo notebook in JupyterLab in a
headless Chromium, as a learner would, and screenshot the dashboard cell when training is done.

    python scripts/refresh_screenshot.py [--out docs/dashboard.png]

The demo (tests/browser/dashboard_demo.ipynb) trains an MLP with DDP on two ranks on
scikit-learn's 8x8 digits, so the loss panel shows a run that learns. The browser test
(tests/test_browser.py) runs the same flow with `run_demo` and writes its picture under build/;
only this command writes docs/dashboard.png.

Needs Debian's `chromium` (apt-get install chromium, or DDPZERO_CHROMIUM naming a Chrome or
Chromium executable) and the `playwright` Python package (in the dev extra; it drives the
installed browser and downloads none).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "tests" / "browser" / "dashboard_demo.ipynb"
README_PICTURE = REPO / "docs" / "dashboard.png"
CHECK_PREFIX = "dashboard check:"
DONE_PREFIX = "training done:"


def find_chromium() -> str | None:
    return os.environ.get("DDPZERO_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )


@dataclass
class DemoRun:
    """What the browser saw: how often the dashboard's images changed while the job ran, the
    error outputs on the page, the notebook's printed check (numbers the panels drew beside
    the run's own), and the screenshot's path."""

    image_changes: int
    errors: list[str]
    check: dict
    screenshot: Path
    seconds: float
    output_text: str = ""
    notes: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _end_session(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the server's whole session (it started the kernel and the ranks), then
    SIGKILL what is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_demo(workdir: Path, screenshot: Path, chromium: str | None = None) -> DemoRun:
    """Start JupyterLab on 127.0.0.1 in `workdir`, run the demo notebook's cells in Chromium,
    watch the dashboard, and screenshot its cell to `screenshot`."""
    from playwright.sync_api import sync_playwright

    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError(
            "no Chromium: install it (Debian/Ubuntu: apt-get install chromium) or set "
            "DDPZERO_CHROMIUM to a Chrome/Chromium executable"
        )
    began = time.monotonic()
    root = workdir / "lab"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(NOTEBOOK, root / "demo.ipynb")
    # JupyterLab's "news" toast would cover part of the screenshot: settings say no
    settings = workdir / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(workdir / "settings")}
    port, token = _free_port(), "ddpzero-browser-demo"
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
                executable_path=chromium,
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
            # a high-density screen (2 device pixels per CSS pixel), as the panels are drawn for
            page = browser.new_page(viewport={"width": 1100, "height": 1300}, device_scale_factor=2)
            page.goto(f"{base}/lab/tree/demo.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
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
                page.screenshot(path=str(workdir / "failure.png"))
                raise AssertionError(
                    f"no dashboard image appeared; the page: {workdir / 'failure.png'}"
                ) from None
            sources: list[tuple[str, ...]] = []
            done = page.locator(".jp-OutputArea-output", has_text=DONE_PREFIX)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                current = tuple(page.eval_on_selector_all(images, "els => els.map(e => e.src)"))
                if current and (not sources or current != sources[-1]):
                    sources.append(current)
                if done.count():
                    break
                time.sleep(0.2)
            done.wait_for(timeout=90_000)
            time.sleep(1.0)
            news = page.get_by_role("button", name="No", exact=True)  # JupyterLab's news toast
            if news.count():
                news.first.click()
            errors = page.eval_on_selector_all(
                ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'], "
                ".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']",
                "els => els.map(e => e.innerText)",
            )
            text = "\n".join(
                page.eval_on_selector_all(
                    ".jp-OutputArea-output", "els => els.map(e => e.innerText)"
                )
            )
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.locator(".jp-Cell").first.screenshot(path=str(screenshot))
            browser.close()
    finally:
        _end_session(server)
    check = {}
    for line in text.splitlines():
        if line.startswith(CHECK_PREFIX):
            check = json.loads(line[len(CHECK_PREFIX) :])
    return DemoRun(
        image_changes=len(sources) - 1,
        errors=errors,
        check=check,
        screenshot=screenshot,
        seconds=time.monotonic() - began,
        output_text=text,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=README_PICTURE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ddpzero-screenshot-") as tmp:
        run = run_demo(Path(tmp), args.out)
    if run.errors:
        sys.exit("the demo notebook failed:\n" + "\n".join(run.errors))
    check = run.check
    print(
        f"{args.out}: {args.out.stat().st_size} bytes · {run.image_changes} live updates · "
        f"loss {check.get('first_loss', float('nan')):.2f} -> "
        f"{check.get('last_loss', float('nan')):.2f} · {run.seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
