"""The course helpers: settings, exercises with hidden solutions, the per-rank state, the short
report of a planned failure."""

from __future__ import annotations

import pytest

import ddpzero_lab as dzl
from ddpzero_lab import course


def test_settings_follow_the_machine_and_the_overrides(monkeypatch):
    for name in ("DDPZERO_SMOKE", "DDPZERO_MODE", "DDPZERO_WORLD_SIZE", "DDPZERO_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    s = course.settings(quiet=True)
    assert (s.mode, s.world_size, s.device, s.small) == ("laptop", 2, "cpu", True)
    assert course.settings(mode="full", world_size=3, quiet=True).small is False
    monkeypatch.setenv("DDPZERO_WORLD_SIZE", "4")
    monkeypatch.setenv("DDPZERO_MODE", "full")
    s = course.settings(world_size=2, quiet=True)
    assert (s.world_size, s.mode) == (4, "full")
    assert "DDPZERO_WORLD_SIZE=4" in str(s)
    monkeypatch.setenv("DDPZERO_SMOKE", "1")
    assert course.settings(quiet=True).mode == "laptop"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"mode": "fast"}, ValueError),
        ({"world_size": 1}, ValueError),
        ({"world_size": 2.0}, TypeError),
        ({"device": "tpu"}, ValueError),
    ],
)
def test_settings_refuse_bad_values(kwargs, error, monkeypatch):
    for name in ("DDPZERO_SMOKE", "DDPZERO_MODE", "DDPZERO_WORLD_SIZE", "DDPZERO_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(error):
        course.settings(quiet=True, **kwargs)


def _solution_module():
    import importlib
    import pkgutil

    import ddpzero_lab.course.solutions as package

    names = [m.name for m in pkgutil.iter_modules(package.__path__)]
    assert names, "no solutions module"
    return importlib.import_module(f"{package.__name__}.{names[0]}"), names[0]


def test_check_passes_a_right_answer_and_falls_back_on_a_wrong_one(capsys):
    module, name = _solution_module()
    function = next(
        n
        for n in dir(module)
        if callable(getattr(module, n))
        and not n.startswith("_")
        and getattr(getattr(module, n), "__module__", "") == module.__name__
    )
    exercise = f"{name}.{function}"
    solution = getattr(module, function)

    def stub(*args, **kwargs):
        raise NotImplementedError

    def test(candidate):
        candidate()  # the stub raises; anything else counts as an answer here

    assert course.check(exercise, stub, test) is solution
    out = capsys.readouterr().out
    assert out.startswith("FAIL") and "not written yet" in out and "course.solution" in out

    def wrong(candidate):
        raise AssertionError("off by 2")

    assert course.check(exercise, solution, wrong) is solution
    assert "FAIL" in capsys.readouterr().out

    def right(candidate):
        return "max error 0"

    mine = lambda: None  # noqa: E731
    assert course.check(exercise, mine, right) is mine
    assert capsys.readouterr().out.startswith(f"PASS · {exercise}: max error 0")
    assert course.solution(exercise) is solution
    assert f"def {function}" in course.solution_source(exercise)


def test_unknown_exercises_are_refused():
    with pytest.raises(ValueError, match="module.*function"):
        course.solution("nodot")
    with pytest.raises(ValueError, match="no solutions module"):
        course.solution("nosuchmodule.fn")


def _remember(value):
    dzl.state.value = value + dzl.rank()
    return "value" in dzl.state


def _recall():
    return dzl.state.value


def _missing():
    return dzl.state.nothing_here


def _fails_on_one():
    if dzl.rank() == 1:
        raise NotImplementedError("not yet")
    return 0


def test_state_keeps_objects_on_each_rank_between_jobs(cluster):
    assert cluster.run(_remember, 10) == [True, True]
    assert cluster.run(_recall) == [10, 11]
    with pytest.raises(dzl.RankError, match="dzl.state has no 'nothing_here'"):
        cluster.run(_missing)


def test_a_failure_reads_short_in_a_notebook(cluster, capsys):
    with pytest.raises(dzl.RankError) as info:
        cluster.run(_fails_on_one)
    err = info.value
    lines = err._render_traceback_()
    assert len(lines) <= 6 and "rank 1: NotImplementedError: not yet" in "\n".join(lines)
    assert "Traceback" not in "\n".join(lines) and "Traceback" in str(err)

    def test(candidate):
        cluster.run(candidate)

    module, name = _solution_module()
    function = next(
        n
        for n in dir(module)
        if not n.startswith("_")
        and getattr(getattr(module, n), "__module__", "") == module.__name__
    )
    course.check(f"{name}.{function}", _fails_on_one, test)
    assert "not written yet" in capsys.readouterr().out
