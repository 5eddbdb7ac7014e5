"""The course's static site (`make book`) as a reader sees it, in headless Chromium.

The book is built by scripts/build_book.py from the notebooks that tests/test_notebooks.py
executed with the solutions (build/executed/; pytest runs that file first); a notebook missing
there is executed by the build script itself, except on CI (CI set), where a missing one means
the notebook tests did not do their part, and the test fails. The site is served from
127.0.0.1 by Python's http.server, and each page is checked in the browser: every lesson page
renders with its title and every figure loaded, and the intro page links every lesson.

Needs Chromium (apt-get install chromium, or DDPZERO_CHROMIUM=/path/to/chrome) and playwright.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest
from conftest import REPO

CHROMIUM = os.environ.get("DDPZERO_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium: install it (Debian/Ubuntu: apt-get install chromium) or set "
        "DDPZERO_CHROMIUM to a Chrome/Chromium executable to check the course's site",
    ),
    # the first test builds the book, which executes any notebook build/executed/ lacks
    pytest.mark.timeout(1800),
]
NOTEBOOKS = sorted((Path(REPO) / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXECUTED = Path(REPO) / "build" / "executed"
HTML = Path(REPO) / "build" / "book" / "_build" / "html"
BUILD_LOG = Path(REPO) / "build" / "book_build.log"
SCREENSHOTS = Path(REPO) / "build"


def _title(path: Path) -> str:
    """The lesson's "# NN · Title" heading, from its first markdown cell."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            found = re.search(r"^#\s+(.+)$", "".join(cell["source"]), flags=re.M)
            if found:
                return found.group(1).strip()
    return path.stem


def _letters(text: str) -> str:
    return re.sub(r"[\W_]", "", text)


def _figures(path: Path) -> int:
    """How many outputs of the executed notebook are images (each must show on its page)."""
    nb = json.loads(path.read_text())
    hidden = {"remove-output", "remove-cell"}  # jupyter-book leaves these outputs out
    return sum(
        1
        for cell in nb["cells"]
        if not hidden & set(cell.get("metadata", {}).get("tags", []))
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    )


@pytest.fixture(scope="module")
def site():
    """Build the book, serve it on 127.0.0.1, and open a headless Chromium."""
    from playwright.sync_api import sync_playwright

    missing = [p.name for p in NOTEBOOKS if not (EXECUTED / p.name).exists()]
    if missing and os.environ.get("CI"):
        pytest.fail(
            f"build/executed/ lacks {missing}: tests/test_notebooks.py (the solutions run) "
            "should have written them before the site is built"
        )
    BUILD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(BUILD_LOG, "w") as log:
        result = subprocess.run(
            [sys.executable, str(Path(REPO) / "scripts" / "build_book.py")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    if result.returncode != 0:
        tail = "\n".join(BUILD_LOG.read_text().splitlines()[-30:])
        pytest.fail(f"scripts/build_book.py failed (log: {BUILD_LOG}):\n{tail}")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # no line per request in the test's output
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(HTML))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            base = f"http://127.0.0.1:{server.server_address[1]}/"
            yield {"base": base, "browser": browser}
            browser.close()
    finally:
        server.shutdown()
        server.server_close()


def _open(site, page_name: str):
    """A page of the site, loaded: its images fetched (or failed)."""
    page = site["browser"].new_page(viewport={"width": 1280, "height": 900})
    # the site must work offline: anything it asks of another host is refused here
    page.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/]).*"), lambda route: route.abort())
    response = page.goto(urljoin(site["base"], page_name), wait_until="load")
    assert response is not None and response.ok, f"{page_name}: HTTP {response and response.status}"
    return page


def test_the_intro_links_every_lesson(site):
    page = _open(site, "intro.html")
    try:
        hrefs = page.eval_on_selector_all("main a[href]", "els => els.map(e => e.href)")
        linked = {Path(urlparse(h).path).stem for h in hrefs if urlparse(h).path.endswith(".html")}
        missing = [p.stem for p in NOTEBOOKS if p.stem not in linked]
        assert not missing, f"the intro page does not link {missing}"
    finally:
        page.close()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_lesson_page_renders_with_its_figures(site, path):
    assert (HTML / f"{path.stem}.html").exists(), f"the site has no page for {path.name}"
    page = _open(site, f"{path.stem}.html")
    screenshot = SCREENSHOTS / f"site_{path.stem}.png"
    try:
        title = _title(path)
        heading = page.locator("main h1").first.inner_text()
        images = page.eval_on_selector_all(
            "main img",
            "els => els.map(e => ({src: e.getAttribute('src'), ok: e.complete"
            " && e.naturalWidth > 0}))",
        )
        broken = [i["src"] for i in images if not i["ok"]]
        figures = _figures(EXECUTED / path.name)
        problems = []
        # Sphinx's smart quotes turn ' into ’ (and -- into –): compare letters and digits
        if _letters(title) not in _letters(heading):
            problems.append(f"the page's heading is {heading!r}, not {title!r}")
        if broken:
            problems.append(f"{len(broken)} images did not load: {broken[:3]}")
        if len(images) < figures:
            problems.append(f"{len(images)} images on the page for {figures} figures")
        if problems:
            page.screenshot(path=str(screenshot), full_page=True)
        assert not problems, f"{path.stem}.html (the page: {screenshot}): {problems}"
    finally:
        page.close()
