"""Hang diagnosis: ops numbered per process group, the flight record each rank keeps, and the
report a RankError (or Job.where()) gives: which rank waits in which collective (op, sequence
number, tag, for how long) and where the others are.

One cluster for the module, with a short collective timeout: a hang costs 3 s.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
import torch
import torch.distributed as dist
from conftest import SHORT_TIMEOUT, alive, restart_seconds

import ddpzero_lab as dzl
from ddpzero_lab import comm
from ddpzero_lab.cluster import flight
from ddpzero_lab.cluster.job import CANCEL_GRACE_S
from ddpzero_lab.cluster.report import WHERE_WAIT_S

TIMEOUT = SHORT_TIMEOUT

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cluster(short_cluster):
    return short_cluster


def _gone(pids, seconds=5.0) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


def _run_failing(cluster, fn, *args, within=None):
    """Run fn, expecting a RankError; the replaced workers are gone. `within`: the seconds the
    failure may take before the restart that ends it, on top of three restarts as long as one
    measured here first (a busy machine lengthens the bound instead of failing the test)."""
    restart_s = restart_seconds(cluster) if within is not None else 0.0
    pids = cluster.pids
    start = time.monotonic()
    with pytest.raises(dzl.RankError) as info:
        cluster.run(fn, *args)
    elapsed = time.monotonic() - start
    assert _gone(set(pids) - set(cluster.pids)), "a replaced worker is still running"
    if within is not None:
        assert elapsed < within + 3 * restart_s, (elapsed, within, restart_s)
    return info.value


# --- the record itself, in this process -------------------------------------------------------


def test_flight_record_round_trip_and_wording(tmp_path):
    path = str(tmp_path / "rank0.flight")
    rec = flight.FlightRecorder(path)
    assert flight.read_record(path).state == flight.IDLE
    rec.job_started(7)
    rec.entered("all_reduce", 1, "grads0", "", None)
    rec.left("all_reduce", 1, "grads0", "", None, time.time() - 0.5)
    rec.entered("recv", 2, "pull", "0,2", 0)
    record = flight.read_record(path)
    assert record.state == flight.WAITING and record.job == 7 and record.pid == os.getpid()
    assert record.current.label() == "recv #2 of group [0,2] from rank 0 (tag pull)"
    assert record.last.label() == "all_reduce #1 (tag grads0)" and record.last.status == flight.OK
    later = record.current.start + 4.2
    assert flight.describe(0, record, 7, "running", later) == (
        "rank 0 is waiting in recv #2 of group [0,2] from rank 0 (tag pull) for 4.2 s"
    )
    rec.left("recv", 2, "pull", "0,2", 0, record.current.start, flight.TIMED_OUT)
    rec.job_ended("error")
    record = flight.read_record(path)
    assert record.current is None and record.state == flight.RAISED
    assert "waited in recv #2 of group [0,2] from rank 0 (tag pull) for" in flight.describe(
        0, record, 7, "raised", time.time()
    )
    assert "has not started this job" in flight.describe(0, record, 8, "running", time.time())
    assert flight.read_record(str(tmp_path / "missing")) is None


def test_recording_costs_microseconds(tmp_path):
    rec = flight.FlightRecorder(str(tmp_path / "rank0.flight"))
    rec.job_started(1)
    per_op = []
    for repeat in range(5):  # the best of five: a busy machine only ever adds time
        start = time.perf_counter()
        for seq in range(1 + 1000 * repeat, 1001 + 1000 * repeat):
            rec.entered("all_reduce", seq, "bucket0", "", None)
            rec.left("all_reduce", seq, "bucket0", "", None, 0.0)
        per_op.append((time.perf_counter() - start) / 1000)
    best = min(per_op)
    assert best < 100e-6, f"{best * 1e6:.1f} us per op"  # a gloo op takes 50 us or more


# --- numbering ---------------------------------------------------------------------------------


def _numbered_ops():
    r = dzl.rank()
    comm.all_reduce(torch.ones(4), tag="a")
    if r == 0:
        comm.send(torch.ones(2), 1, tag="p2p")
    else:
        comm.recv(torch.ones(2), 0, tag="p2p")
    work = comm.all_reduce(torch.ones(4), async_op=True, tag="async")
    comm.broadcast(torch.ones(3), 0, tag="b")  # issued after the async op, completed before
    work.wait()
    group = dist.new_group([0, 1])
    comm.all_reduce(torch.ones(2), group=group, tag="sub")
    comm.barrier(tag="end")


def test_ops_are_numbered_per_process_group_in_call_order(cluster):
    job = cluster.submit(_numbered_ops)
    job.wait()
    for rank in range(2):
        ops = [e for e in job.events if e.kind == "collective" and e.rank == rank]
        by_tag = {e["tag"]: e["seq"] for e in ops}
        # call order, not completion order; point-to-point counted; the subgroup has its own
        assert by_tag == {"a": 1, "p2p": 2, "async": 3, "b": 4, "sub": 1, "end": 5}, by_tag


# --- reports ---------------------------------------------------------------------------------


def _waits_while_peer_sleeps():
    comm.all_reduce(torch.ones(4), tag="grads0")
    if dzl.rank() == 1:
        # user code that never reaches the next collective
        time.sleep(30)
    comm.all_reduce(torch.ones(4), tag="grads1")


def test_timeout_report_names_the_waiting_rank_its_op_and_where_the_other_is(cluster):
    restart_s = restart_seconds(cluster)  # the baseline for the time the failure takes
    pids = cluster.pids
    job = cluster.submit(_waits_while_peer_sleeps)
    try:
        _check_report_while_it_hangs(job, cluster.grace + CANCEL_GRACE_S + 3 * restart_s)
    finally:
        job.cancel()  # (a no-op when the job failed on its own, as it should)
    err = job._error
    assert isinstance(err, dzl.RankError) and err.ranks == [0]
    first = _seq_of(job, 0, "grads0")  # numbers count from the worker's start, not the job's
    assert re.search(
        rf"job {job.id} \(_waits_while_peer_sleeps\) timed out after 3 s: rank 0 waited in "
        rf"all_reduce #{first + 1} \(tag grads1\) for \d\.\d s, until the process group's "
        rf"timeout ended it; rank 1 is not in a collective: its last one was all_reduce "
        rf"#{first} \(tag grads0\), then it ran user code \(last seen \d+\.\d s ago\); now at "
        r"test_hang_diagnosis.py:\d+ in _waits_while_peer_sleeps: `time\.sleep\(30\)`",
        str(err),
    ), str(err)
    assert err.report in str(err)
    assert _gone(set(pids) - set(cluster.pids))


def _seq_of(job, rank, tag):
    deadline = time.monotonic() + 10.0  # events travel on their own: they may come late
    while time.monotonic() < deadline:
        for event in job.events:
            if event.kind == "collective" and event.rank == rank and event["tag"] == tag:
                return event["seq"]
        time.sleep(0.02)
    raise AssertionError(f"no collective tagged {tag} from rank {rank}")


def _check_report_while_it_hangs(job, restart_allowance):
    # While it hangs, Job.where() reads the records of ranks blocked in gloo.
    deadline = time.monotonic() + 2.0
    while "(tag grads1) for" not in (where := job.where()) and time.monotonic() < deadline:
        time.sleep(0.05)
    first = _seq_of(job, 0, "grads0")
    assert _seq_of(job, 1, "grads0") == first
    lines = where.splitlines()
    assert re.fullmatch(
        rf"rank 0 is waiting in all_reduce #{first + 1} \(tag grads1\) for \d+\.\d s", lines[0]
    ), lines[0]
    assert lines[1].startswith(
        f"rank 1 is not in a collective: its last one was all_reduce #{first} (tag grads0), "
        "then it ran user code (last seen "
    ), lines[1]
    assert "in _waits_while_peer_sleeps: `time.sleep(30)`" in lines[1]
    with pytest.raises(TimeoutError, match=f"rank 0 is waiting in all_reduce #{first + 1}"):
        job.wait(timeout=0.1)
    start = time.monotonic()
    with pytest.raises(dzl.RankError):
        job.wait()
    assert time.monotonic() - start < TIMEOUT + restart_allowance  # the timeout, then a restart


def _dies_inside_a_collective():
    if dzl.rank() == 1:
        # ends the process while its main thread is blocked in gloo
        threading.Timer(0.3, os._exit, (5,)).start()
        comm.all_reduce(torch.ones(4), tag="grads0")
    time.sleep(1.0)


def test_a_rank_that_dies_inside_a_collective_is_named_with_it(cluster):
    # the death is seen at once; rank 0 sleeps its 1 s out, then a restart
    err = _run_failing(cluster, _dies_inside_a_collective, within=cluster.grace + 1.0 + 1.0)
    assert err.failures[1].kind == "died" and err.failures[1].exitcode == 5
    assert re.search(
        r"rank 1 died \(exit code 5\) while waiting in all_reduce #\d+ \(tag grads0\)", err.report
    ), err.report
    assert "rank 0 is not in a collective: " in err.report
    assert "in _dies_inside_a_collective: `time.sleep(1.0)`" in err.report


def _raw_collective_after_peer_failed():
    if dzl.rank() == 1:
        raise RuntimeError("rank 1 gave up")
    t = torch.ones(1)
    # not through comm/: no sequence number; the report finds it from the frames
    dist.all_reduce(t)


def test_a_raw_torch_distributed_call_is_located_by_its_frames(cluster):
    # rank 0 is ended as stuck after the grace and the cancel grace, before its timeout
    within = cluster.grace + WHERE_WAIT_S + CANCEL_GRACE_S + 1.0
    err = _run_failing(cluster, _raw_collective_after_peer_failed, within=within)
    assert err.ranks == [1] and err.failures[0].kind == "stuck"
    assert re.search(
        r"rank 0 is in torch\.distributed\.all_reduce, called at test_hang_diagnosis\.py:\d+ in "
        r"_raw_collective_after_peer_failed: `dist\.all_reduce\(t\)` \(a raw torch\.distributed "
        r"call",
        err.report,
    ), err.report


def test_a_failure_without_collectives_has_no_report(cluster):
    def fail():
        if dzl.rank() == 1:
            raise ValueError("plain bug")

    err = _run_failing(cluster, fail)
    assert err.report == "" and "plain bug" in str(err)


def _both_wait_for_each_other():
    comm.recv(torch.ones(1), 1 - dzl.rank(), tag="hello")  # each waits for the other to send


def _sum_of_ranks():
    t = torch.full((1,), float(dzl.rank()))
    comm.all_reduce(t)
    return t.item()


def test_a_collective_that_timed_out_everywhere_gets_fresh_workers(cluster):
    # The ranks are in step (each issued one op), but gloo closed its connections when the
    # ops timed out: the process group is unusable and must be replaced.
    err = _run_failing(cluster, _both_wait_for_each_other, within=TIMEOUT + cluster.grace + 1.0)
    assert err.restarted
    for rank in (0, 1):
        assert re.search(
            rf"rank {rank} (waited in|failed in) recv #\d+ from rank {1 - rank} \(tag hello\)",
            err.report,
        ), err.report
    assert cluster.run(_sum_of_ranks) == [1.0, 1.0]
