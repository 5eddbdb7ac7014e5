"""Every notebook, run top to bottom as "Restart Kernel and Run All" does.

- with the solutions pasted into the exercise cells: every self-check prints PASS;
- with the stubs as shipped: every self-check prints FAIL and the lesson still reaches its last
  cell (in the real browser when Chromium is here: tests/test_browser_runall.py; else here);
- cells that show an error on purpose really raise the error they name, and no other cell raises.

The solutions run saves each executed notebook under build/executed/ for `make book`, with the
seconds each took (build/executed/times.json).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO

from ddpzero_lab.course import notebooks as course_notebooks

NOTEBOOKS = sorted((Path(REPO) / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXECUTED = Path(REPO) / "build" / "executed"
HAVE_BROWSER = any(map(shutil.which, ("chromium", "chromium-browser", "google-chrome")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_template(path):
    assert course_notebooks.structure(course_notebooks.load(path)) == []


def test_the_course_keeps_to_its_word_budget():
    # 16,000 words for the first 14 lessons, 1,500 more per lesson beyond (scripts/course_words.py)
    budget = 16_000 + 1_500 * max(0, len(NOTEBOOKS) - 14)
    total = sum(course_notebooks.words(course_notebooks.load(p)) for p in NOTEBOOKS)
    assert total <= budget, f"{total:,} words of prose: the budget is {budget:,}"


def _record_time(name: str, seconds: float) -> None:
    times_file = EXECUTED / "times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    times[name] = round(seconds, 1)
    times_file.write_text(json.dumps(times, indent=1, sort_keys=True))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", course_notebooks.MODES)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_run_all(path, mode):
    if mode == "stubs" and HAVE_BROWSER:
        pytest.skip("the stubs run in JupyterLab itself: tests/test_browser_runall.py")
    nb, seconds = course_notebooks.execute(path, mode, env={"DDPZERO_SMOKE": "1"})
    if mode == "solutions":
        import nbformat

        EXECUTED.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(EXECUTED / path.name))
        _record_time(path.stem, seconds)
    assert course_notebooks.verify(nb, mode) == []
