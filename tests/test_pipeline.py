"""Pipeline parallelism (parallel/pipeline.py): GPipe and 1F1B over 2 and 4 stages equal one
process on the whole batch; 1F1B holds at most p - s micro-batches where GPipe holds m; the
bubble measured with stages of known compute is (p - 1) / (m + p - 1) within 10%; the same
training as torch.distributed.pipelining's ScheduleGPipe and Schedule1F1B.

One cluster per world size (2, 4), shared by the tests of this module.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.comm.link import Link
from ddpzero_lab.course.lesson_14 import SleepyLayer  # compute of a known length
from ddpzero_lab.parallel.pipeline import PipelineStage, bubble_fraction, ideal_bubble

WIDTH, LAYERS, BATCH, MICRO, STEPS = 6, 4, 12, 4, 3
ATOL = 1e-5


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"N{n}")
def ppcluster(request):
    with dzl.LiveCluster(world_size=request.param, timeout=30.0) as cluster:
        yield cluster


def _full_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(LAYERS))
    )


def _data(step):
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)


def _my_layers(full: nn.Sequential, rank: int, stages: int) -> nn.Sequential:
    per = LAYERS // stages
    return full[rank * per : (rank + 1) * per]


def _one_process():
    model = _full_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, y = _data(step)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def _pipelined(schedule: str):
    rank, stages = dzl.rank(), dzl.world_size()
    mine = _my_layers(_full_model(), rank, stages)
    stage = PipelineStage(
        mine, micro_batches=MICRO, schedule=schedule, loss_fn=nn.functional.mse_loss
    )
    opt = torch.optim.SGD(mine.parameters(), lr=0.1, momentum=0.9)
    losses, most = [], []
    for step in range(STEPS):
        x, y = _data(step)
        out = stage.step(x if stage.is_first else None, y if stage.is_last else None)
        opt.step()
        opt.zero_grad()
        losses.append(out["loss"])
        most.append(out["max_in_flight"])
    state = mine.state_dict()  # a slice of a Sequential keeps the full model's keys
    return state, max(most), losses


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_pipeline_trains_as_one_process_and_holds_what_its_schedule_says(ppcluster, schedule):
    want = _one_process()
    p = ppcluster.world_size
    got = {}
    for rank, (state, most, losses) in enumerate(ppcluster.run(_pipelined, schedule)):
        got.update(state)
        assert most == (MICRO if schedule == "gpipe" else min(p - rank, MICRO))
        assert all((loss is None) != (rank == p - 1) for loss in losses)  # the last stage's
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=ATOL, msg=name)


def _bubble(schedule: str, micro: int):
    stage = PipelineStage(
        SleepyLayer(0.07), micro_batches=micro, schedule=schedule, loss_fn=nn.functional.mse_loss
    )
    x, y = torch.randn(micro, 4), torch.randn(micro, 4)
    stage.step(x if stage.is_first else None, y if stage.is_last else None)  # warm-up
    # messages on an emulated link (10 GB/s, 10 µs), as between the GPUs of a node
    dzl.set_link(Link(latency=1e-5, bandwidth=1e10))
    bubbles = []
    try:
        for _ in range(3):  # the median of three steps: a busy machine's late wake-ups vary
            dist.barrier()
            out = stage.step(x if stage.is_first else None, y if stage.is_last else None)
            # the step lasts until its last stage is done: every stage's bubble is against that
            step = torch.tensor([out["seconds"]], dtype=torch.float64)
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
            bubbles.append(bubble_fraction(out["timeline"], step.item()))
    finally:
        dzl.set_link(None)
    return sorted(bubbles)[1]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_the_bubble_is_p_minus_1_over_m_plus_p_minus_1(ppcluster, schedule):
    p, m = ppcluster.world_size, 4
    want = ideal_bubble(p, m)
    bubbles = ppcluster.run(_bubble, schedule, m)
    # every stage idles the same share of the step (messages add a little)
    for bubble in bubbles:
        assert abs(bubble - want) <= 0.1 * want, (bubbles, want)


def _bad_options():
    out = []
    for kwargs in ({"schedule": "zigzag"}, {"micro_batches": 0}):
        try:
            PipelineStage(nn.Linear(2, 2), loss_fn=nn.functional.mse_loss, **kwargs)
        except ValueError as exc:
            out.append(str(exc))
    return out


def test_bad_options_are_refused(ppcluster):
    for messages in ppcluster.run(_bad_options):
        assert len(messages) == 2


def _ours_and_torchs(schedule: str):
    from torch.distributed.pipelining import PipelineStage as TorchStage
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    rank, stages = dzl.rank(), dzl.world_size()
    ours = _my_layers(_full_model(), rank, stages)
    theirs = _my_layers(_full_model(), rank, stages)
    stage = PipelineStage(
        ours, micro_batches=MICRO, schedule=schedule, loss_fn=nn.functional.mse_loss
    )
    torch_stage = TorchStage(theirs, rank, stages, torch.device("cpu"))
    kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    # torch's schedules average the micro-batches' losses (scale_grads): as ours divides by m
    torch_schedule = kind(torch_stage, MICRO, loss_fn=nn.functional.mse_loss)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, theirs)]
    for step in range(STEPS):
        x, y = _data(step)
        stage.step(x if stage.is_first else None, y if stage.is_last else None)
        if stage.is_first:
            torch_schedule.step(x)
        elif stage.is_last:
            torch_schedule.step(target=y)
        else:
            torch_schedule.step()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return ours.state_dict(), theirs.state_dict()


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_trains_as_torchs_schedule_gpipe_and_schedule_1f1b(ppcluster, schedule):
    for ours, theirs in ppcluster.run(_ours_and_torchs, schedule):
        for name, value in theirs.items():
            torch.testing.assert_close(ours[name], value, rtol=0, atol=ATOL, msg=name)
