"""The course's notebooks as data: run them with solutions or stubs, check what they show,
count their words. Used by the tests, `make book` and scripts/course_words.py; needs nbformat
and nbclient (the dev extra), imported only here.

Cell conventions (cell metadata):
  tags ["exercise"], ddpzero.exercise = "module.function"   a stub the learner fills in
  tags ["self-check"]                                         prints PASS or FAIL (course.check)
  tags ["raises-exception"], ddpzero.expect_error = "Name"    shows an error on purpose
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

MODES = ("solutions", "stubs")
CODE_LINES_LIMIT = 25  # a code cell the learner is not asked to write stays this short


def tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def meta(cell) -> dict:
    return dict(cell.get("metadata", {}).get("ddpzero", {}))


def load(path):
    import nbformat

    return nbformat.read(str(path), as_version=4)


def prepare(nb, mode: str):
    """A copy of nb with every exercise's solution pasted in ("solutions"), or as shipped."""
    import copy

    from .exercises import solution_source

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    nb = copy.deepcopy(nb)
    if mode == "solutions":
        for cell in nb.cells:
            if "exercise" in tags(cell):
                cell.source = solution_source(meta(cell)["exercise"])
    return nb


def execute(path, mode: str, timeout: int = 600, env: dict | None = None):
    """Run the notebook at path top to bottom as Run All does; returns (nb, seconds per cell).

    Cells tagged raises-exception may raise (nbclient goes on past them, as JupyterLab does);
    any other error stops the run with nbclient's CellExecutionError.
    """
    from nbclient import NotebookClient

    path = Path(path)
    nb = prepare(load(path), mode)
    seconds: list[float] = []
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=True,
    )
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        start = time.perf_counter()
        client.execute()
        seconds.append(time.perf_counter() - start)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nb, seconds[0]


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}")
    return "".join(parts)


def verify(nb, mode: str) -> list[str]:
    """What is wrong with an executed notebook for this mode (empty: all is well)."""
    problems = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        where = f"code cell {i + 1}"
        if cell.get("execution_count") is None and cell.source.strip():
            problems.append(f"{where} did not run (Run All stopped before it)")
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if "raises-exception" in tags(cell):
            want = meta(cell).get("expect_error")
            names = [o.get("ename") for o in errors]
            if not errors:
                problems.append(f"{where} should show an error on purpose but raised nothing")
            elif want and want not in names:
                problems.append(f"{where} should raise {want}, raised {names}")
        elif errors:
            problems.append(f"{where} raised {errors[0].get('ename')}: {errors[0].get('evalue')}")
        if "self-check" in tags(cell):
            text = _text(cell)
            if mode == "solutions" and ("PASS" not in text or "FAIL" in text):
                problems.append(f"{where}: the self-check did not PASS with the solution: {text!r}")
            if mode == "stubs" and "FAIL" not in text:
                problems.append(f"{where}: the self-check did not FAIL with the stub: {text!r}")
    return problems


def structure(nb) -> list[str]:
    """What breaks the course template, without running anything."""
    from .exercises import solution_source

    problems = []
    cells = nb.cells
    for i, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        lines = len(cell.source.strip().splitlines())
        if "exercise" in tags(cell):
            name = meta(cell).get("exercise")
            if not name:
                problems.append(f"cell {i}: an exercise cell needs metadata ddpzero.exercise")
                continue
            solution_source(name)  # raises if the solution is missing
            if "NotImplementedError" not in cell.source:
                problems.append(f"cell {i}: the exercise {name} ships solved (no stub)")
            after = next((c for c in cells[i + 1 :] if c.cell_type == "code"), None)
            if after is None or "self-check" not in tags(after):
                problems.append(f"cell {i}: the exercise {name} is not followed by a self-check")
        elif lines > CODE_LINES_LIMIT:
            problems.append(f"cell {i}: {lines} lines of code (at most {CODE_LINES_LIMIT})")
        if "raises-exception" in tags(cell) and not meta(cell).get("expect_error"):
            problems.append(f"cell {i}: a raises-exception cell needs ddpzero.expect_error")
    if not any("exercise" in tags(c) for c in cells):
        problems.append("no exercise cell")
    text = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    for heading in ("## Summary", "## Exercises"):
        if heading not in text:
            problems.append(f"no '{heading}' section")
    return problems


_WORD = re.compile(r"[A-Za-z0-9ΨαβΔ][\w'’\-./·×Ψ]*")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def prose(nb) -> str:
    """The markdown of a notebook without code blocks, tables' rules and HTML tags."""
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    return text


def words(nb) -> int:
    return len(_WORD.findall(prose(nb)))


def sentence_length(nb) -> float:
    """Average words per sentence of the prose. A paragraph's wrapped lines are joined; list
    items, headings and table rows count as sentences of their own."""
    items: list[str] = []
    for line in prose(nb).splitlines():
        stripped = line.strip()
        starts_item = re.match(r"([-*|#>]|\d+\.)\s", stripped) or not items
        if not stripped:
            items.append("")
        elif starts_item or not items[-1]:
            items.append(stripped)
        else:
            items[-1] += " " + stripped
    lengths = []
    for item in items:
        for sentence in _SENTENCE_END.split(item.lstrip("#-*0123456789. |>")):
            n = len(_WORD.findall(sentence))
            if n:
                lengths.append(n)
    return sum(lengths) / len(lengths) if lengths else 0.0
