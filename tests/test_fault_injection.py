"""dzl.faults: each fault injected into a real DDP training loop, and what the learner sees.

For every fault the RankError names the rank and the collective (op and sequence number); a
straggler shows in the step events instead (its peers' communication time grows). One cluster
for the module, with a short collective timeout: a skipped collective costs 3 s.
"""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import SHORT_TIMEOUT, alive, restart_seconds
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab import comm, faults, telemetry
from ddpzero_lab.cluster.job import CANCEL_GRACE_S
from ddpzero_lab.comm import collectives

TIMEOUT = SHORT_TIMEOUT

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cluster(short_cluster):
    return short_cluster


def _train(steps=6, arm=None, width=64, batch=64):
    """A plain DDP loop; `arm()` sets the fault first (every rank calls it alike)."""
    if arm is not None:
        arm()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 8))
    model, optimizer = dzl.parallelize(
        net, "ddp", optimizer=lambda p: torch.optim.SGD(p, lr=0.01), track_memory=False
    )
    x, y = torch.randn(batch, 64), torch.randn(batch, 8)
    for _ in range(steps):
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return "done"


def _gone(pids, seconds=5.0) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


def _fail(cluster, fn, *args, **kwargs):
    """Run fn expecting a RankError: (error, job events); no replaced worker is left."""
    restart_s = restart_seconds(cluster)  # the baseline: what a restart costs here now
    pids = cluster.pids
    job = cluster.submit(fn, *args, **kwargs)
    start = time.monotonic()
    with pytest.raises(dzl.RankError) as info:
        job.wait()
    # within the timeout, the grace, a cancel and a restart
    elapsed = time.monotonic() - start
    bound = TIMEOUT + cluster.grace + CANCEL_GRACE_S + 3 * restart_s
    assert elapsed < bound, f"a fault must end within the timeout: {elapsed:.1f} s"
    assert _gone(set(pids) - set(cluster.pids)), "a replaced worker is still running"
    return info.value, job.events


def _last_seq(events, rank) -> int:
    return max(e["seq"] for e in events if e.kind == "collective" and e.rank == rank)


def _steps(job_events, rank, first=2):
    # Steps 0 and 1 include start-up (the first backward, DDP's bucket rebuild): skip them.
    return [e for e in job_events if e.kind == "step" and e.rank == rank and e["step"] >= first]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# --- stragglers: no error, but the others wait ---------------------------------------------------


def _period(job_events, rank) -> float:
    """A rank's mean step time, from one step's forward to the next one's, over the steps that
    _steps keeps (so that each interval holds one of the waits that comm_s counts there)."""
    starts = [e["forward_start"] for e in _steps(job_events, rank)]
    return _mean(b - a for a, b in zip(starts, starts[1:], strict=False))


def test_delay_makes_a_straggler_that_the_others_wait_for(cluster):
    delay = 0.2
    # The baseline, measured here: the same loop without the fault, on this machine now.
    base = cluster.submit(_train, 6)
    assert base.wait() == ["done", "done"]
    job = cluster.submit(_train, 6, lambda: faults.delay(rank=1, seconds=delay))
    assert job.wait() == ["done", "done"]
    events, baseline = job.events, base.events
    grew = _mean(e["comm_s"] for e in _steps(events, 0)) - _mean(
        e["comm_s"] for e in _steps(baseline, 0)
    )
    cost = _period(events, 0) - _period(baseline, 0)  # what the delay added to rank 0's steps
    # Rank 0 waits for the straggler in each all-reduce: most of the delay, counted once
    # (a wait counted twice would be twice what the delay cost rank 0's steps).
    assert grew > 0.4 * delay, (grew, delay)
    assert grew < 1.5 * cost, (grew, cost)
    # The straggler itself hardly waits: its peer is always there before it.
    straggler = _mean(e["comm_s"] for e in _steps(events, 1))
    assert straggler < 0.5 * _mean(e["comm_s"] for e in _steps(events, 0)), straggler
    # ... and so do its collective events: rank 0's all-reduces last about the delay
    waits = [
        e["end"] - e["start"]
        for e in events
        if e.kind == "collective" and e.rank == 0 and e["op"] == "all_reduce"
    ]
    assert sorted(waits)[len(waits) // 2] > 0.4 * delay, waits
    assert [e["text"] for e in events if e.kind == "fault"] == [
        "rank 1 sleeps 0.2 s after every step"
    ]


def test_slow_rank_costs_the_others_its_extra_compute(cluster):
    factor = 4.0
    job = cluster.submit(
        _train, 6, lambda: faults.slow(rank=1, factor=factor), width=1024, batch=256
    )
    assert job.wait() == ["done", "done"]
    events = job.events
    compute_1 = _mean(e["compute_s"] for e in _steps(events, 1))
    extra = (factor - 1) * compute_1  # what rank 1 sleeps after each step
    waited_0 = _mean(e["comm_s"] for e in _steps(events, 0))
    assert waited_0 > 0.5 * extra, (waited_0, extra)
    # rank 1's steps are factor times as long as its compute, start to start
    starts = [e["forward_start"] for e in _steps(events, 1, first=1)]
    period = _mean(b - a for a, b in zip(starts, starts[1:], strict=False))
    assert period > 0.7 * factor * compute_1, (period, compute_1)


# --- faults that end the job: the error names the rank and the collective -----------------------


def test_kill_at_a_step_names_the_dead_rank_and_where_each_rank_stood(cluster):
    err, events = _fail(cluster, _train, 6, lambda: faults.kill(rank=1, at_step=2))
    assert err.ranks == [1] and err.failures[1].kind == "died" and "SIGKILL" in str(err)
    last = _last_seq(events, 1)
    assert (
        f"rank 1 died (killed by SIGKILL (the injected fault)) "
        f"in user code: its last one was all_reduce #{last} (tag bucket0)" in err.report
    ), err.report
    assert f"rank 0 failed in all_reduce #{last + 1} (tag bucket0)" in err.report, err.report
    assert "rank 1 killed itself with SIGKILL after step 2" in err.report
    assert "ddpzero_lab.faults.kill: rank 1 killed itself" in err.failures[1].stderr
    assert max(e["step"] for e in events if e.kind == "step" and e.rank == 1) == 2


def test_skipped_collective_times_out_naming_both_ranks_and_sequence_numbers(cluster):
    err, events = _fail(
        cluster, _train, 5, lambda: faults.skip_collective(rank=1, op="all_reduce", nth=3)
    )
    assert err.ranks == [0] and err.results == [None, "done"]
    waiting = _last_seq(events, 0) + 1  # the op rank 0 never completed
    assert _last_seq(events, 1) == waiting - 1  # rank 1 issued one fewer
    assert re.search(
        rf"timed out after 3 s: rank 0 waited in all_reduce #{waiting} \(tag bucket0\) for "
        rf"\d\.\d s, until the process group's timeout ended it; rank 1 finished the job \(fn "
        rf"returned\): its last one was all_reduce #{waiting - 1} \(tag bucket0\)",
        err.report,
    ), err.report
    assert "rank 1 skipped its 3rd all_reduce (tag bucket0)" in err.report


def _two_reductions(arm, sizes=(4, 4), async_op=True):
    arm()
    r = dzl.rank()
    a, b = torch.full((sizes[0],), 1.0 + r), torch.full((sizes[1],), 10.0 * (r + 1))
    work_a = comm.all_reduce(a, async_op=async_op, tag="a")
    work_b = comm.all_reduce(b, async_op=async_op, tag="b")
    if async_op:
        work_a.wait()
        work_b.wait()
    return a[0].item(), b[0].item()


def test_reorder_of_equal_sizes_silently_mixes_up_the_results(cluster):
    job = cluster.submit(_two_reductions, lambda: faults.reorder(rank=1, nth=1))
    # rank 0's `a` meets rank 1's `b`, and the other way round: no error, wrong sums
    assert job.wait() == [(1.0 + 20.0, 10.0 + 2.0), (10.0 + 2.0, 1.0 + 20.0)]
    seqs = {
        (e.rank, e["tag"]): e["seq"]
        for e in job.events
        if e.kind == "collective" and e["tag"] in ("a", "b")
    }
    # the sequence numbers show it: on rank 1, `b` went out first
    assert seqs[(0, "a")] == seqs[(1, "b")] and seqs[(0, "b")] == seqs[(1, "a")]
    assert seqs[(0, "a")] < seqs[(0, "b")]


def test_reorder_of_different_sizes_fails_naming_both_ops(cluster):
    err, events = _fail(
        cluster, _two_reductions, lambda: faults.reorder(rank=1, nth=1), (4, 1), False
    )
    # Rank 1 sends `b` where rank 0 sends `a`: gloo aborts on the size mismatch, or one side
    # completes and the ranks wait in different ops until the timeout. Either way the report
    # shows each rank in a different op: another sequence number or another tag.
    places = re.findall(r"rank (\d) [^;]*?all_reduce #(\d+) \(tag (\w)\)", err.report)
    by_rank = {int(rank): (int(seq), tag) for rank, seq, tag in places}
    assert set(by_rank) == {0, 1} and by_rank[0] != by_rank[1], err.report
    assert by_rank[0][1] == "a", err.report
    assert "rank 1 held back its 1st op, an all_reduce (tag a), and issued it after" in err.report


# --- hygiene -------------------------------------------------------------------------------------


def _arm_and_report():
    faults.delay(rank=1, seconds=0.01)
    faults.skip_collective(rank=1, op="broadcast", nth=99)
    return [f.armed for f in faults.active()], faults.slow(rank=0, factor=2).armed


def _left_over():
    return (
        faults.active(),
        collectives._fault_hook is None,
        telemetry._sink is not faults._on_event,
    )


def test_faults_act_on_the_named_rank_only_and_end_with_the_job(cluster):
    # rank 0: no fault of rank 1's, then its own slow(); rank 1: both of its own, no slow()
    assert cluster.run(_arm_and_report) == [([], True), ([True, True], False)]
    assert cluster.run(_left_over) == [([], True, True)] * 2


def test_faults_in_a_plain_process_cost_nothing_when_off():
    assert faults.active() == [] and collectives._fault_hook is None
    assert telemetry._sink is not faults._on_event
    with faults.delay(rank=0, seconds=0.05) as fault:
        assert telemetry._sink is faults._on_event and fault.armed
        start = time.monotonic()
        telemetry.emit("step", step=0, compute_s=0.0)
        assert time.monotonic() - start >= 0.05
    assert telemetry._sink is not faults._on_event and faults.active() == []
    with faults.skip_collective(rank=0, op="barrier"):
        assert collectives._fault_hook is faults._on_op
    assert collectives._fault_hook is None


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: faults.delay(rank=1, seconds=0.1), ValueError),  # rank 0 of 1 here
        (lambda: faults.delay(rank=0, seconds=-1), ValueError),
        (lambda: faults.delay(rank="0", seconds=1), TypeError),
        (lambda: faults.slow(rank=0, factor=0.5), ValueError),
        (lambda: faults.kill(rank=0, at_step=-1), ValueError),
        (lambda: faults.kill(rank=0, at_step=1, signal=0), ValueError),
        (lambda: faults.skip_collective(rank=0, op="all_gather_object"), ValueError),
        (lambda: faults.skip_collective(rank=0, nth=0), ValueError),
        (lambda: faults.reorder(rank=0, tag=3), TypeError),
    ],
)
def test_bad_fault_arguments_are_refused(call, error):
    with pytest.raises(error):
        call()
    assert faults.active() == []
