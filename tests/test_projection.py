"""The projection (ddpzero_lab/projection.py): a step replayed on a link, by hand-counted
timelines; memory per rank is the ZeRO paper's formula exactly; a profile measured here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.comm.link import Link
from ddpzero_lab.projection import (
    StepProfile,
    UnitProfile,
    profile_step,
    project_one,
    time_steps,
)

# 1 GB/s, no latency: a byte costs 1 ns, so 1e6 bytes cost 1 ms on the link
LINK = Link(latency=0.0, bandwidth=1e9)
MS = 1e-3


def _profile(*units, optimizer_s=4 * MS) -> StepProfile:
    return StepProfile([UnitProfile(*u) for u in units], optimizer_s, element_size=4)


def test_ddp_overlaps_the_last_units_bucket_with_the_first_units_backward():
    # two units of 250,000 float32 (1e6 bytes) each: DDP's 1 MB first bucket holds the last
    # unit's gradients, launched when its backward ends, while the first unit's runs
    profile = _profile(("a", [250_000], 2 * MS, 4 * MS), ("b", [250_000], 2 * MS, 4 * MS))
    p = project_one(profile, "ddp", 2, LINK)
    one = LINK.seconds("all_reduce", 1e6, 2)  # 1 ms at N = 2: 2(N-1)/N of 1e6 bytes
    assert one == pytest.approx(1 * MS)
    # forward 4 ms, b's backward ends at 8 ms, its all-reduce runs 8-9 ms under a's backward
    # (8-12 ms), a's all-reduce 12-13 ms, then the optimizer: 17 ms
    assert p.step_s == pytest.approx(17 * MS)
    assert p.exposed_comm_s == pytest.approx(1 * MS)
    assert p.comm_s == {"all_reduce": pytest.approx(2 * MS)}


def test_zero1_reduces_after_backward_and_steps_a_shard():
    profile = _profile(("a", [250_000], 2 * MS, 4 * MS), ("b", [250_000], 2 * MS, 4 * MS))
    p = project_one(profile, "zero1", 2, LINK)
    rs = LINK.seconds("reduce_scatter", 2e6, 2)  # the whole flat buffer: 1 ms
    mask = LINK.seconds("all_reduce", 8, 2)  # one int32 per tensor
    ag = LINK.seconds("all_gather", 2e6, 2)
    # backward ends at 12 ms; reduce-scatter and mask; the optimizer on half; the all-gather
    assert p.step_s == pytest.approx(12 * MS + rs + mask + 2 * MS + ag)
    assert p.optimizer_s == pytest.approx(2 * MS)


def test_zero3_gathers_each_unit_twice_and_prefetch_hides_the_next_gather():
    profile = _profile(("a", [250_000], 2 * MS, 4 * MS), ("b", [250_000], 2 * MS, 4 * MS))
    plain = project_one(profile, "zero3", 2, LINK)
    ahead = project_one(profile, "zero3", 2, LINK, prefetch=True)
    gather = LINK.seconds("all_gather", 1e6, 2)  # 0.5 ms per unit
    assert plain.comm_s["all_gather"] == pytest.approx(4 * gather)  # 2 units, twice each
    assert plain.comm_s["reduce_scatter"] == pytest.approx(2 * gather)
    # without prefetch: forward gathers 0-0.5 and 2.5-3 ms, backward's of b at 5-5.5, b's
    # reduce-scatter 9.5-10, a's gather queued behind it until 10.5, a's backward to 14.5,
    # its reduce-scatter to 15, the optimizer on half: 17 ms
    assert plain.step_s == pytest.approx(17 * MS)
    # with it, b's gathers run under a's compute: forward ends at 4.5 ms, backward at 13
    assert ahead.step_s == pytest.approx(15.5 * MS)


def test_memory_per_rank_is_the_zero_papers_formula():
    profile = _profile(("a", [7_500_000], MS, MS), ("b", [2_500_000], MS, MS))
    for strategy, stage in (("ddp", 0), ("zero1", 1), ("zero2", 2), ("zero3", 3)):
        for n in (1, 4, 64):
            want = dzl.zero_memory_estimate(10_000_000, n, stage, preset="fp32_adam")["total"]
            assert project_one(profile, strategy, n, LINK).memory_bytes == want


def test_one_rank_communicates_nothing_and_scaling_efficiency_falls_with_n():
    profile = _profile(("a", [2_500_000], 5 * MS, 10 * MS))
    rows = dzl.project(profile, "ddp", world_sizes=(1, 2, 8, 64), link=LINK)
    assert rows[0].step_s == pytest.approx(19 * MS) and rows[0].exposed_comm_s == 0
    efficiency = [rows[0].step_s / r.step_s for r in rows]
    assert efficiency[0] == 1 and all(
        a >= b for a, b in zip(efficiency, efficiency[1:], strict=False)
    )
    with pytest.raises(ValueError, match="strategy"):
        project_one(profile, "zero4", 2, LINK)


def test_profile_step_measures_every_unit_of_a_model_here():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    profile = profile_step(model, lambda: (torch.randn(16, 64), torch.randn(16, 8)), steps=3)
    assert [u.name for u in profile.units] == ["0", "2"]  # the ReLU holds no parameters
    assert [u.numel for u in profile.units] == [[64 * 128, 128], [128 * 8, 8]]
    assert profile.num_params == sum(p.numel() for p in model.parameters())
    assert all(u.forward_s > 0 and u.backward_s > 0 for u in profile.units)
    assert profile.optimizer_s > 0


def _model():
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


def _batch():
    return torch.randn(32, 512), torch.randn(32, 10)


def _measured_and_projected(strategy: str):
    link = Link(latency=1e-4, bandwidth=2.5e7)  # communication dominates the step
    profile = profile_step(_model(), _batch, steps=3)
    model, opt = dzl.parallelize(
        _model(), strategy, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), track_memory=False
    )
    seconds = time_steps(model, opt, lambda step: _batch(), link, steps=3)
    return sorted(seconds)[1], project_one(profile, strategy, dzl.world_size(), link).step_s


def test_the_projection_agrees_with_emulated_runs_of_the_live_cluster():
    with dzl.LiveCluster(world_size=2, timeout=60.0) as cluster:
        for strategy in ("ddp", "zero1", "zero2", "zero3"):
            measured, projected = max(cluster.run(_measured_and_projected, strategy))
            assert abs(projected / measured - 1) <= 0.15, (strategy, measured, projected)
