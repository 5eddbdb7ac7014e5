"""`make book`: the whole course as a static jupyter-book site in build/book/_build/html.

The pages show executed notebooks, and jupyter-book itself runs no code (execute_notebooks:
"off"), so the build needs no network and no kernel. For each notebooks/NN_name.ipynb it uses
build/executed/NN_name.ipynb, which `make test` writes (tests/test_notebooks.py runs every
notebook with the exercises' solutions pasted in), when that copy is newer than the notebook;
otherwise it executes the notebook here the same way (smoke sizes) and saves the copy there.

build/book/ is the staging folder: book/'s config and intro page, the intro's course map (one
row per lesson, linking it), the table of contents, and the executed notebooks. It is kept
between builds so that Sphinx re-reads only the notebooks that changed.

    python scripts/build_book.py                 # the whole course
    python scripts/build_book.py --only 00 03    # a partial book, to try a change quickly

Exits non-zero when a notebook fails to execute, when a lesson is missing from the site, or
when jupyter-book fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
EXECUTED = REPO / "build" / "executed"
BOOK_SOURCE = REPO / "book"
STAGING = REPO / "build" / "book"
HTML = STAGING / "_build" / "html"
MAP_MARKER = re.compile(r"<!-- course-map.*?-->")

sys.path.insert(0, str(REPO))  # the ddpzero_lab of this checkout, also when not installed


def lessons(only: list[str] | None = None) -> list[Path]:
    """notebooks/NN_*.ipynb in course order (only: those whose names start with these)."""
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(p.stem.startswith(prefix) for prefix in only)]
    return found


def executed_copy(path: Path) -> Path:
    """build/executed/<name>: reused when newer than the notebook, else executed now."""
    from ddpzero_lab.course import notebooks as course_notebooks

    target = EXECUTED / path.name
    if target.exists() and target.stat().st_mtime >= path.stat().st_mtime:
        return target
    print(f"executing {path.name} (solutions, smoke sizes) ...", flush=True)
    import nbformat

    try:
        nb, seconds = course_notebooks.execute(path, "solutions", env={"DDPZERO_SMOKE": "1"})
    except Exception as error:  # a cell raised, or timed out: no page from a broken lesson
        print(error, flush=True)
        raise SystemExit(f"{path.name} failed to execute (see above)") from error
    for problem in course_notebooks.verify(nb, "solutions"):
        print(f"  warning: {path.name}: {problem}", flush=True)
    EXECUTED.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(target))
    print(f"  {seconds:.0f} s", flush=True)
    return target


def title_and_goal(path: Path) -> tuple[str, str]:
    """The lesson's "# NN · Title" heading and its first goal bullet (for the course map)."""
    nb = json.loads(path.read_text())
    first = next((c for c in nb["cells"] if c["cell_type"] == "markdown"), None)
    text = "".join(first["source"]) if first else ""
    heading = re.search(r"^#\s+(.+)$", text, flags=re.M)
    goal = re.search(r"^\s*[-*]\s+(.+)$", text, flags=re.M)
    title = heading.group(1).strip() if heading else path.stem
    return title, goal.group(1).strip().rstrip(";.") if goal else ""


def course_map(paths: list[Path]) -> str:
    rows = ["| Lesson | After it you can |", "| --- | --- |"]
    for path in paths:
        title, goal = title_and_goal(path)
        # a table cell cannot hold "|"; {doc} links the page whatever its title becomes
        goal = goal.replace("|", "\\|")
        rows.append(f"| {{doc}}`{title.replace('`', '')} <{path.stem}>` | {goal} |")
    return "\n".join(rows) + "\n"


def stage(paths: list[Path]) -> None:
    """Fill build/book/ with the config, the intro, the table of contents and the notebooks."""
    STAGING.mkdir(parents=True, exist_ok=True)
    shutil.copy2(BOOK_SOURCE / "_config.yml", STAGING / "_config.yml")
    intro = (BOOK_SOURCE / "intro.md").read_text()
    if not MAP_MARKER.search(intro):
        raise SystemExit("book/intro.md lost its <!-- course-map --> marker")
    intro = MAP_MARKER.sub(lambda _: course_map(paths), intro)
    _write_if_changed(STAGING / "intro.md", intro)
    toc = (BOOK_SOURCE / "_toc.yml").read_text()
    chapters = "".join(f"  - file: {p.stem}\n" for p in paths)
    toc = re.sub(r"^chapters:.*$", "chapters:\n" + chapters.rstrip("\n"), toc, flags=re.M)
    _write_if_changed(STAGING / "_toc.yml", toc)
    wanted = {p.name for p in paths}
    for old in STAGING.glob("*.ipynb"):  # a renamed or removed lesson leaves the site
        if old.name not in wanted:
            old.unlink()
    for path in paths:
        # written only when it changed, so Sphinx skips a notebook that did not
        _write_if_changed(STAGING / path.name, with_stubs(executed_copy(path), path))


def with_stubs(executed: Path, original: Path) -> str:
    """The executed notebook with each exercise cell showing its stub again: the site shows a
    lesson as it ships (its solutions stay hidden), with the outputs of a solved run."""
    import nbformat

    from ddpzero_lab.course import notebooks as course_notebooks

    nb = nbformat.read(str(executed), as_version=4)
    stubs = [
        c for c in course_notebooks.load(original).cells if "exercise" in course_notebooks.tags(c)
    ]
    cells = [c for c in nb.cells if "exercise" in course_notebooks.tags(c)]
    if len(stubs) != len(cells):
        raise SystemExit(f"{original.name} changed since it was executed: run make test again")
    for cell, stub in zip(cells, stubs, strict=True):
        cell.source = stub.source
    return nbformat.writes(nb)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def build(only: list[str] | None = None, clean: bool = False) -> Path:
    """Build the site; returns build/book/_build/html. Raises SystemExit on any failure."""
    paths = lessons(only)
    if not paths:
        raise SystemExit(f"no notebooks to build in {NOTEBOOKS}")
    start = time.perf_counter()
    if clean and STAGING.exists():
        shutil.rmtree(STAGING)
    stage(paths)
    staged = time.perf_counter()
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [str(jupyter_book) if jupyter_book.exists() else "jupyter-book", "build"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([*command, "--builder", "html", str(STAGING)], env=env)
    if result.returncode != 0:
        raise SystemExit(f"jupyter-book build failed (exit {result.returncode})")
    missing = [p.stem for p in paths if not (HTML / f"{p.stem}.html").exists()]
    if missing or not (HTML / "intro.html").exists():
        raise SystemExit(f"the site lacks pages for: {missing or ['intro']}")
    done = time.perf_counter()
    print(
        f"book: {len(paths)} lessons in {HTML} "
        f"(notebooks {staged - start:.0f} s, jupyter-book {done - staged:.0f} s)",
        flush=True,
    )
    return HTML


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="lessons whose names start with these")
    parser.add_argument("--clean", action="store_true", help="rebuild every page from scratch")
    args = parser.parse_args()
    build(args.only, args.clean)


if __name__ == "__main__":
    main()
