"""Exercises with hidden solutions.

A lesson's "Implement it" cell is a stub: a signature, a docstring with the contract, and
``raise NotImplementedError`` for a body. The cell after it is its self-check:

    my_fn = course.check("ddp.install_bucketed_all_reduce", my_fn, test)

`check` runs ``test(my_fn)``, prints PASS or FAIL, and returns the function the rest of the
lesson goes on with: the learner's when it passed, else the package's solution, so one
unsolved exercise never blocks the lesson. ``course.solution(name)`` reveals a solution on
purpose (it shows the source and returns the function).

An exercise is named ``"<module>.<function>"``: the solution is the function of that name in
``ddpzero_lab.course.solutions.<module>``. It is written to be pasted over the stub: it uses
only its arguments and the names every notebook imports (torch, nn, dist, dzl, math).
The notebook tests paste every solution in (each check must PASS) and run the stubs as they
ship (each check must FAIL), so every check is shown to be able to fail.
"""

from __future__ import annotations

import importlib
import inspect
import textwrap
import traceback
from collections.abc import Callable
from typing import Any

PASS, FAIL = "PASS", "FAIL"


def _resolve(exercise: str) -> Callable:
    if not isinstance(exercise, str) or exercise.count(".") != 1:
        raise ValueError(
            f"an exercise is named '<module>.<function>' (e.g. 'ddp.install_bucketed_all_reduce'),"
            f" got {exercise!r}"
        )
    module_name, function = exercise.split(".")
    try:
        module = importlib.import_module(f"{__package__}.solutions.{module_name}")
    except ModuleNotFoundError:
        raise ValueError(
            f"no exercise {exercise!r}: there is no solutions module {module_name!r}"
        ) from None
    try:
        return getattr(module, function)
    except AttributeError:
        raise ValueError(f"no exercise {exercise!r}: {module_name} has no {function!r}") from None


def solution_source(exercise: str) -> str:
    """The source of an exercise's solution, as it would be typed into the stub's cell."""
    return textwrap.dedent(inspect.getsource(_resolve(exercise)))


def solution(exercise: str) -> Callable:
    """Reveal one exercise's solution: show its code and return it.

    my_ring_all_reduce = course.solution("collectives.my_ring_all_reduce")
    """
    fn = _resolve(exercise)
    source = solution_source(exercise)
    try:
        from IPython.display import Markdown, display

        display(Markdown(f"Solution to `{exercise}`:\n\n```python\n{source}```"))
    except ImportError:  # outside IPython
        print(source)
    return fn


def _not_implemented(exc: BaseException) -> bool:
    """True if exc is (or wraps, from a rank) a NotImplementedError: a stub not yet written."""
    if isinstance(exc, NotImplementedError):
        return True
    failures = getattr(exc, "failures", None)  # a RankError: look at what each rank raised
    if failures:
        return any(f.exc_type == "NotImplementedError" for f in failures.values())
    return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, AssertionError):
        return str(exc) or "an assertion failed: " + traceback.format_exc(limit=-1).strip()
    short = getattr(exc, "short", None)
    text = short() if callable(short) else f"{type(exc).__name__}: {exc}"
    return text if len(text) < 600 else text[:600] + " ..."


def check(exercise: str, candidate: Any, test: Callable[[Any], Any]) -> Any:
    """Run the self-check `test(candidate)` and print PASS or FAIL.

    test raises (AssertionError, or whatever the candidate raised) when the candidate is wrong;
    what it returns, if anything, is printed as the evidence. Returns `candidate` when it
    passed, else the package's solution, for the rest of the lesson.
    """
    fallback = _resolve(exercise)
    if not callable(test):
        raise TypeError(f"test must be callable, got {type(test).__name__}")
    try:
        evidence = test(candidate)
    except Exception as exc:  # noqa: BLE001 - any failure of the learner's code is a FAIL
        if _not_implemented(exc):
            why = "not written yet (the stub raises NotImplementedError)"
        else:
            why = _reason(exc)
        print(f"{FAIL} · {exercise}: {why}")
        print(
            f"  Fix the cell above and run both cells again, or reveal the solution with "
            f'course.solution("{exercise}").\n  The rest of the lesson goes on with the '
            "package's version."
        )
        return fallback
    print(f"{PASS} · {exercise}" + (f": {evidence}" if evidence not in (None, True) else ""))
    return candidate
