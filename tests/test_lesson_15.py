"""Lesson 15's helpers: the exercise's premise (one DDP bucket per unit) and its solution
against the projection, the FLOP-based profile, and the largest model that fits."""

from __future__ import annotations

import math

import pytest

import ddpzero_lab as dzl
from ddpzero_lab.course import lesson_15 as lesson
from ddpzero_lab.course.solutions.projection import ddp_step_seconds
from ddpzero_lab.projection import _buckets


def test_every_exercise_case_has_one_ddp_bucket_per_unit():
    for profile, _, _ in lesson.bucket_per_unit_cases():
        sizes = [n * profile.element_size for u in reversed(profile.units) for n in u.numel]
        assert _buckets(sizes, 1, 25) == [[i] for i in range(len(sizes))]


def test_the_solution_is_the_projections_ddp_step():
    for profile, n, link in lesson.bucket_per_unit_cases(seed=1):
        units = profile.units
        got = ddp_step_seconds(
            [u.forward_s for u in units],
            [u.backward_s for u in units],
            [sum(u.numel) * profile.element_size for u in units],
            profile.optimizer_s,
            link,
            n,
        )
        assert math.isclose(got, dzl.project(profile, "ddp", [n], link)[0].step_s, rel_tol=1e-9)


def test_a_gpt_profile_takes_six_flops_per_parameter_and_token():
    profile = lesson.gpt_profile(layers=4, hidden=256, tokens=1000, mfu=0.5)
    assert profile.num_params == 4 * 12 * 256**2
    want = 6 * profile.num_params * 1000 / (0.5 * 989e12)
    assert profile.compute_s == pytest.approx(want)
    assert profile.element_size == 2


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_largest_fitting_model_fills_the_gpu_exactly(stage):
    psi = lesson.largest_fitting(stage, world_size=64, gpu_bytes=80e9)
    assert dzl.zero_memory_estimate(psi, 64, stage)["total"] == pytest.approx(80e9)
