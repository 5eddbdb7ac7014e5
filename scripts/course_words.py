"""Count the course's words: markdown prose per notebook, the total, the average sentence.

    python scripts/course_words.py            a table
    python scripts/course_words.py --check    also exit 1 if the total is over the budget

The budget (COURSE.md in docs/): 16,000 words for the first 14 lessons, and 1,500 more for each
lesson beyond them (`budget(n)` for n lessons).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ddpzero_lab.course import notebooks as course_notebooks

BASE_BUDGET, BASE_LESSONS, PER_LESSON = 16_000, 14, 1_500
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def budget(lessons: int) -> int:
    """The course's word budget for `lessons` notebooks."""
    return BASE_BUDGET + PER_LESSON * max(0, lessons - BASE_LESSONS)


BUDGET = budget(len(list(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))))


def table() -> tuple[list[tuple[str, int, float]], int]:
    rows = []
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        nb = course_notebooks.load(path)
        rows.append((path.stem, course_notebooks.words(nb), course_notebooks.sentence_length(nb)))
    return rows, sum(r[1] for r in rows)


def main(argv: list[str]) -> int:
    rows, total = table()
    width = max(len(r[0]) for r in rows)
    print(f"{'notebook':<{width}}  {'words':>6}  {'words/sentence':>14}")
    for name, count, avg in rows:
        print(f"{name:<{width}}  {count:>6,}  {avg:>14.1f}")
    mean = sum(r[1] * r[2] for r in rows) / max(total, 1)
    print(f"{'course':<{width}}  {total:>6,}  {mean:>14.1f}   (budget {BUDGET:,} words)")
    if "--check" in argv and total > BUDGET:
        print(f"over budget by {total - BUDGET:,} words")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
