"""Check one notebook as CI does: the template, then Run All with the solutions and with the
stubs (smoke sizes). For authors: python scripts/check_notebook.py notebooks/03_*.ipynb

    --mode solutions|stubs|both (default both)   --keep DIR  save the executed notebooks there
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpzero_lab.course import notebooks as course_notebooks


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--mode", choices=("solutions", "stubs", "both"), default="both")
    parser.add_argument("--keep", type=Path)
    args = parser.parse_args()
    modes = course_notebooks.MODES if args.mode == "both" else (args.mode,)
    failed = False
    for path in args.paths:
        nb = course_notebooks.load(path)
        problems = course_notebooks.structure(nb)
        print(
            f"{path.name}: {course_notebooks.words(nb):,} words, "
            f"{course_notebooks.sentence_length(nb):.1f} words/sentence"
        )
        for mode in modes:
            try:
                done, seconds = course_notebooks.execute(path, mode, env={"DDPZERO_SMOKE": "1"})
            except Exception as exc:  # noqa: BLE001 - report and go on to the next
                problems.append(f"{mode}: Run All stopped: {str(exc)[-3000:]}")
                continue
            problems += [f"{mode}: {p}" for p in course_notebooks.verify(done, mode)]
            print(f"  {mode}: ran in {seconds:.0f} s")
            if args.keep:
                import nbformat

                args.keep.mkdir(parents=True, exist_ok=True)
                nbformat.write(done, str(args.keep / f"{path.stem}.{mode}.ipynb"))
        for problem in problems:
            print("  PROBLEM:", problem)
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
