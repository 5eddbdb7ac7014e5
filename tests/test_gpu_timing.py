"""CUDA-event timing of collectives, checked on the CPU with fake events.

On a GPU, comm/ times an op on CUDA tensors with three CUDA events (launched, waited, ended)
and converts them to the host clock once per step. Here no GPU is at hand: the ranks (spawned
by the test, as torchrun does) treat float32 tensors as if they were on a GPU and hand out
fake events read from a fake GPU clock that runs on another epoch and in milliseconds, whose
`ended` events fire LAG seconds after the host recorded them (as a GPU that is still busy
with the op when the host has moved on). The figures that come out must be the GPU's.
"""

from __future__ import annotations

import time

import pytest
import torch
from own_ranks import run_ranks

from ddpzero_lab.comm import collectives
from ddpzero_lab.comm.collectives import GpuClock, gpu_step_figures

LAG = 0.05  # seconds an `ended` event fires after the host recorded it
GPU_EPOCH_MS = 5.0e6  # the fake GPU clock's zero, far from the host's


class FakeEvent:
    """What comm/ uses of torch.cuda.Event: elapsed_time (ms to another event), synchronize."""

    def __init__(self, gpu_ms: float) -> None:
        self.gpu_ms = gpu_ms

    def elapsed_time(self, other: FakeEvent) -> float:
        return other.gpu_ms - self.gpu_ms

    def synchronize(self) -> None:
        pass


def test_the_clock_maps_gpu_events_to_host_seconds():
    anchor = FakeEvent(9_000.0)  # fired when the host read 100.0
    clock = GpuClock(anchor, 100.0)
    assert clock.to_host(FakeEvent(8_750.0)) == pytest.approx(99.75)
    assert clock.to_host(FakeEvent(9_000.0)) == pytest.approx(100.0)
    assert clock.to_host(FakeEvent(9_020.0)) == pytest.approx(100.02)


def test_step_figures_union_and_exposed_stretches():
    window = [
        (0.0, 4.0, 3.0),  # async: launched at 0, waited for at 3, ended at 4: 1 s exposed
        (1.0, 2.0, 2.5),  # ended before anyone waited: hidden entirely
        (5.0, 6.0, 5.0),  # blocking: waited from its launch, all of it exposed
        (5.5, 6.5, 5.5),  # overlaps the previous one: counted once
    ]
    comm_s, exposed = gpu_step_figures(window)
    assert comm_s == pytest.approx(4.0 + 1.5)
    assert exposed == pytest.approx(1.0 + 1.5)
    assert gpu_step_figures([]) == (0.0, 0.0)


def _fake_gpu() -> None:
    """Inside a rank: float32 tensors count as CUDA tensors, events come from the fake clock."""
    state = {"ending": False}

    def record_event(device):
        lag = LAG if state["ending"] else 0.0
        return FakeEvent((time.time() + lag) * 1e3 + GPU_EPOCH_MS)

    original_mark_ended = collectives.GpuTimes.mark_ended

    def mark_ended(self):
        state["ending"] = True
        try:
            original_mark_ended(self)
        finally:
            state["ending"] = False

    collectives._timed_on_gpu = lambda t: t.dtype == torch.float32 and t.numel() > 0
    collectives._record_event = record_event
    collectives.GpuTimes.mark_ended = mark_ended


def _train_and_read(fake: bool) -> dict:
    import ddpzero_lab as dzl
    from ddpzero_lab import telemetry

    if fake:
        _fake_gpu()
    telemetry.local_log.clear()
    dzl.reset_traffic()
    torch.manual_seed(0)
    model = dzl.DDP(
        torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4)),
        bucket_cap_mb=0.005,  # several buckets: async all-reduces during backward
        first_bucket_mb=0.005,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(8, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
    blocking = torch.ones(10)
    dzl.comm.all_reduce(blocking, tag="blocking")  # read out by traffic() below
    counters = dzl.traffic()
    events = [e.to_dict() for e in telemetry.local_log.snapshot()]
    return {"events": events, "counters": counters}


def test_cpu_ops_are_timed_by_the_host_as_before():
    (out,) = run_ranks(_train_and_read, 1, False, timeout=120)
    collectives_ = [e for e in out["events"] if e["kind"] == "collective"]
    steps = [e for e in out["events"] if e["kind"] == "step"]
    assert collectives_ and len(steps) == 2
    assert all("timing" not in e and "host_start" not in e for e in collectives_)
    assert all("timing" not in e and "host_comm_s" not in e for e in steps)


def test_gpu_ops_are_timed_by_their_events_on_the_host_clock():
    for rank, out in enumerate(run_ranks(_train_and_read, 2, True, timeout=180)):
        events = out["events"]
        timed = [e for e in events if e["kind"] == "collective" and e.get("timing")]
        assert timed, rank
        for e in timed:
            assert e["timing"] == "cuda_event"
            # the launch is when the host issued it; the end is the GPU's, LAG later than the
            # host saw the op end (a conversion off by the clocks' epochs would be far off)
            assert e["start"] == pytest.approx(e["host_start"], abs=0.01), e
            assert e["end"] - e["host_end"] == pytest.approx(LAG, abs=0.015), e
            assert e["end"] - e["start"] >= LAG
        # the bucket order broadcast (int64) stays on the host: not a "GPU" tensor here
        assert any(e["kind"] == "collective" and "timing" not in e for e in events)
        # seconds in the counters are the events' seconds
        all_reduce = [e for e in timed if e["op"] == "all_reduce"]
        assert out["counters"]["all_reduce"]["calls"] == len(all_reduce)
        assert out["counters"]["all_reduce"]["seconds"] == pytest.approx(
            sum(e["end"] - e["start"] for e in all_reduce), rel=1e-9
        )
        assert any(e["tag"] == "blocking" for e in all_reduce)  # traffic() read it out
        # each step event: the GPU figures of the ops read out just before it, host ones kept
        steps = [i for i, e in enumerate(events) if e["kind"] == "step"]
        assert len(steps) == 2
        previous = -1
        for index in steps:
            step = events[index]
            assert step["timing"] == "cuda_event"
            assert {"host_comm_s", "host_exposed_comm_s"} <= set(step)
            assert step["launch_times"] == ["compute_s", "forward_start", "backward_end"]
            ops = [e for e in events[previous + 1 : index] if e.get("timing") == "cuda_event"]
            assert ops, (rank, index)
            union, _ = gpu_step_figures([(e["start"], e["end"], e["start"]) for e in ops])
            assert step["comm_s"] == pytest.approx(union, rel=1e-9)
            assert step["comm_s"] >= LAG and step["exposed_comm_s"] <= step["comm_s"] + 1e-9
            previous = index
