"""Every notebook as a learner first meets it: opened in JupyterLab in a real browser (headless
Chromium), "Restart Kernel and Run All Cells" from the Kernel menu, with the exercises' stubs
as shipped (smoke sizes: DDPZERO_SMOKE=1 in the server's environment).

Run All must reach the last cell: every self-check prints FAIL (the stub is not an answer, and
course.check lets the lesson go on with the package's solution), and only the cells tagged
raises-exception show an error (JupyterLab goes on past those and stops at any other). The
test saves the notebook from the browser and checks the saved file with
ddpzero_lab.course.notebooks.verify(nb, "stubs").

One JupyterLab server serves the whole module, from a temporary copy of notebooks/ (nothing in
the repository changes); each notebook gets its own page and kernel. The seconds each Run All
took go to build/executed/browser_times.json; a failure leaves a screenshot under build/.
Needs Chromium (apt-get install chromium, or DDPZERO_CHROMIUM=/path/to/chrome) and playwright
(the dev extra; it drives the installed Chromium and downloads no browser).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, end_session, free_port

from ddpzero_lab.course import notebooks as course_notebooks

CHROMIUM = os.environ.get("DDPZERO_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: install it (Debian/Ubuntu: apt-get install chromium) or set "
    "DDPZERO_CHROMIUM to a Chrome/Chromium executable to run the notebooks in JupyterLab",
)
NOTEBOOKS = sorted((Path(REPO) / "notebooks").glob("[0-9][0-9]_*.ipynb"))
BUILD = Path(REPO) / "build"
TIMES = BUILD / "executed" / "browser_times.json"
RUN_ALL_SECONDS = 300
TOKEN = "ddpzero-runall-test"

# The open notebook's state, read from JupyterLab itself (the server exposes the app as
# window.jupyterapp): the kernel's status, how many non-empty code cells have run, and how
# many wait or run ("[*]"). The model knows every cell, also those scrolled out of view.
STATE_JS = """() => {
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  if (!panel || !panel.content || !panel.content.model) return null;
  const cells = panel.content.model.cells;
  let code = 0, ran = 0;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code' || !cell.sharedModel.getSource().trim()) continue;
    code += 1;
    if (cell.executionCount) ran += 1;
  }
  const busy = Array.from(panel.node.querySelectorAll('.jp-InputPrompt'))
    .filter(p => p.textContent.includes('*')).length;
  const kernel = panel.sessionContext && panel.sessionContext.session
    && panel.sessionContext.session.kernel;
  return {path: panel.context.path, code, ran, busy, kernel: kernel ? kernel.status : 'none',
          dirty: panel.context.model.dirty};
}"""


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


def _settings(folder: Path) -> None:
    """JupyterLab settings for the test: no news toast over the page, and every cell kept in
    the page (no windowing), so that a screenshot and the prompts show the whole notebook."""
    files = {
        "apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
        "notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }
    for name, value in files.items():
        path = folder / "@jupyterlab" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One JupyterLab server on 127.0.0.1 over a copy of notebooks/, and one headless Chromium."""
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("runall")
    root = tmp / "notebooks"
    root.mkdir()
    for path in NOTEBOOKS:
        shutil.copy(path, root / path.name)
    _settings(tmp / "settings")
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
        "DDPZERO_SMOKE": "1",
    }
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.disable_check_xsrf=True",
        "--LabApp.expose_app_in_browser=True",
    ]
    if os.geteuid() == 0:
        args.append("--allow-root")
    log = open(tmp / "jupyterlab.log", "wb")  # the server's log, closed below
    server = subprocess.Popen(
        args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/api/status?token={TOKEN}", 90)
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
            yield {"base": base, "root": root, "browser": browser}
            browser.close()
    finally:
        end_session(server)
        log.close()


def _api(base: str, path: str, method: str = "GET"):
    request = urllib.request.Request(f"{base}{path}?token={TOKEN}", method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else None


def _shut_down_kernels(base: str, name: str) -> None:
    """Shut the notebook's kernel down (its cluster's ranks end with it)."""
    for session in _api(base, "/api/sessions") or []:
        if session.get("path", "").endswith(name):
            _api(base, f"/api/sessions/{session['id']}", method="DELETE")


def _state(page) -> dict:
    return page.evaluate(STATE_JS) or {"code": 0, "ran": 0, "busy": 0, "kernel": "none"}


def _wait_idle(page, seconds: float, steady: float = 0.0) -> dict:
    """Wait until the kernel is idle and no cell waits or runs, for `steady` seconds in a row
    (between two queued cells the kernel is idle for an instant)."""
    deadline = time.monotonic() + seconds
    since = None
    while time.monotonic() < deadline:
        state = _state(page)
        if state["kernel"] == "idle" and not state["busy"]:
            since = since or time.monotonic()
            if state["ran"] == state["code"] or time.monotonic() - since >= steady:
                return state
        else:
            since = None
        time.sleep(0.25)
    raise TimeoutError(f"the notebook still ran after {seconds:.0f} s: {_state(page)}")


def _accept_dialog(page, seconds: float = 5.0) -> bool:
    """Click the accept button of a JupyterLab dialog ("Restart") if one shows up."""
    accept = page.locator(".jp-Dialog .jp-mod-accept")
    try:
        accept.first.wait_for(state="visible", timeout=seconds * 1000)
    except Exception:
        return False
    accept.first.click()
    return True


def _restart_and_run_all(page) -> None:
    """Kernel menu > "Restart Kernel and Run All Cells…" > Restart, as a learner does; a click
    can arrive before the menu listens, so it tries again until a cell starts."""
    for _attempt in range(5):
        page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").first.click()
        item = page.locator(".lm-Menu-itemLabel", has_text="Restart Kernel and Run All Cells")
        try:
            item.first.wait_for(state="visible", timeout=5_000)
            item.first.click()
        except Exception:
            page.keyboard.press("Escape")
            continue
        if not _accept_dialog(page):
            continue  # the click went nowhere: no "Restart Kernel?" dialog came
        # restarting can take a while on a busy machine; clicking again would restart again
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = _state(page)
            if state["busy"] or state["ran"]:
                return
            time.sleep(0.2)
        break
    raise AssertionError("Restart Kernel and Run All Cells did not start any cell")


def _save(page) -> None:
    """Ctrl+S in the notebook, until JupyterLab says the document is saved."""
    for _attempt in range(5):
        page.keyboard.press("Control+s")  # JupyterLab binds it on the whole page
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _state(page).get("dirty", True):
                return
            time.sleep(0.2)
    raise AssertionError("Ctrl+S did not save the notebook")


def _record_time(name: str, seconds: float) -> None:
    TIMES.parent.mkdir(parents=True, exist_ok=True)
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    times[name] = round(seconds, 1)
    TIMES.write_text(json.dumps(times, indent=1, sort_keys=True))


@pytest.mark.timeout(RUN_ALL_SECONDS + 180)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_restart_and_run_all_in_jupyterlab(lab, path):
    base, root = lab["base"], lab["root"]
    page = lab["browser"].new_page(viewport={"width": 1280, "height": 1000})
    screenshot = BUILD / f"browser_runall_{path.stem}.png"
    try:
        try:
            # a workspace of its own, reset: JupyterLab reopens no notebook of an earlier test
            page.goto(f"{base}/lab/workspaces/{path.stem}/tree/{path.name}?reset&token={TOKEN}")
            page.wait_for_function(
                f"() => ({STATE_JS})()?.path === {json.dumps(path.name)}", timeout=90_000
            )
            page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell")
            _accept_dialog(page, 2)  # a "Select Kernel" dialog, should the server ask
            _wait_idle(page, 90)  # the kernel has started and waits
            start = time.monotonic()
            _restart_and_run_all(page)
            state = _wait_idle(page, RUN_ALL_SECONDS, steady=3.0)
            seconds = time.monotonic() - start
            _save(page)
        except Exception as error:
            BUILD.mkdir(exist_ok=True)
            page.screenshot(path=str(screenshot))
            raise AssertionError(f"{path.name}: {error} (the page: {screenshot})") from error
        _record_time(path.stem, seconds)
        nb = course_notebooks.load(root / path.name)
        problems = course_notebooks.verify(nb, "stubs")
        if problems:
            page.screenshot(path=str(screenshot))
        assert problems == [], (
            f"{path.name} after Run All in JupyterLab ({state['ran']} of {state['code']} code "
            f"cells ran, {seconds:.0f} s; the page: {screenshot}): {problems}"
        )
    finally:
        page.close()
        _shut_down_kernels(base, path.name)
