"""LiveCluster: running functions on every rank, results, events, persistence."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import ddpzero_lab as dzl


def test_run_returns_one_result_per_rank(cluster):
    results = cluster.run(lambda: (dzl.rank(), dzl.world_size(), str(dzl.device())))
    assert results == [(0, 2, "cpu"), (1, 2, "cpu")]


def test_each_rank_is_its_own_process(cluster):
    pids = cluster.run(os.getpid)
    assert pids == cluster.pids
    assert len(set(pids)) == 2 and os.getpid() not in pids


def test_args_kwargs_and_closures_travel_by_value(cluster):
    offset = 10  # captured by the closure below, as a notebook cell would

    def add(x, *, scale=1):
        return (dzl.rank() + x + offset) * scale

    assert cluster.run(add, 1, scale=2) == [22, 24]


def test_all_reduce_sums_across_ranks(cluster):
    def reduce():
        t = torch.full((3,), float(dzl.rank() + 1))
        dist.all_reduce(t)
        return t

    for t in cluster.run(reduce):
        torch.testing.assert_close(t, torch.full((3,), 3.0))


def test_process_group_uses_the_configured_timeout_and_one_thread(cluster):
    def info():
        return dist.get_backend(), torch.get_num_threads()

    assert cluster.run(info) == [("gloo", 1), ("gloo", 1)]
    assert cluster.backend == "gloo"


def test_workers_keep_state_between_calls(cluster):
    def store():
        import builtins

        builtins._ddpzero_test_value = dzl.rank() * 7
        return os.getpid()

    def load():
        import builtins

        return builtins._ddpzero_test_value, os.getpid()

    pids = cluster.run(store)
    assert cluster.run(load) == [(0, pids[0]), (7, pids[1])]


def test_submit_returns_a_job_with_events_readable_while_running(cluster, tmp_path):
    release = tmp_path / "release"

    def emitter():
        for step in range(5):
            dzl.emit("loss", step=step, loss=1.0 / (step + 1))
            time.sleep(0.05)
        # Held until the test has read the events: "still running" depends on no clock (the
        # 60 s only bound a test that fails before it releases the ranks).
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "done"

    job = cluster.submit(emitter)
    assert not job.done()
    deadline = time.monotonic() + 30
    while len(job.events) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(job.events) == 10 and not job.done()  # all events arrived, job still running
    release.touch()
    assert job.wait() == ["done", "done"]
    assert job.done()
    events = job.events
    assert {e.rank for e in events} == {0, 1}
    assert all(e.kind == "loss" and e.job == job.id for e in events)
    for rank in (0, 1):
        mine = [e for e in events if e.rank == rank]
        assert [e["step"] for e in mine] == list(range(5))
        assert [e["loss"] for e in mine] == [1.0 / (s + 1) for s in range(5)]
        assert all(a.time <= b.time for a, b in zip(mine, mine[1:], strict=False))


def test_events_reach_a_dashboard_consumer_on_one_thread(cluster):
    import threading

    class Recorder:
        def __init__(self):
            self.events, self.threads, self.ended = [], set(), []

        def on_event(self, event):
            self.events.append(event)
            self.threads.add(threading.get_ident())

        def on_job_end(self, job):
            self.ended.append(job.id)

    recorder = Recorder()

    def fn():
        dzl.emit("log", text=f"hello from {dzl.rank()}")

    job = cluster.submit(fn, dashboard=recorder)
    job.wait()
    deadline = time.monotonic() + 5
    while not recorder.ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(e["text"] for e in recorder.events) == ["hello from 0", "hello from 1"]
    assert len(recorder.threads) == 1 and threading.get_ident() not in recorder.threads
    assert recorder.ended == [job.id]


def _held_until(release, value=None):
    """A job that runs until the file `release` exists (60 s at most), then returns value: it
    is still running when the test looks, however slow the machine."""

    def held():
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return value

    return held


def test_wait_with_timeout_leaves_the_job_running(cluster, tmp_path):
    job = cluster.submit(_held_until(tmp_path / "release"))
    with pytest.raises(TimeoutError, match="still running"):
        job.wait(timeout=0.1)
    (tmp_path / "release").touch()
    assert job.wait(timeout=30) == [None, None]


def test_one_job_at_a_time(cluster, tmp_path):
    first = cluster.submit(_held_until(tmp_path / "release", "first"))
    # A second job now would pair its collectives with the first one's: refused, clearly.
    with pytest.raises(dzl.ClusterError, match="still running.*one job runs at a time"):
        cluster.submit(lambda: "second")
    (tmp_path / "release").touch()
    assert first.wait() == ["first", "first"]
    assert cluster.run(lambda: "second") == ["second", "second"]


def test_a_failed_job_nobody_waited_for_is_settled_before_the_next(cluster):
    def uneven():
        if dzl.rank() == 0:
            raise ValueError("rank 0 fails first")
        t = torch.full((1,), 100.0)
        dist.all_reduce(t)  # rank 1 waits here for a partner that has left
        return t.item()

    failed = cluster.submit(uneven)

    def total():
        t = torch.ones(1)
        dist.all_reduce(t)
        return t.item()

    # The next job must not pair its all_reduce with rank 1's pending one. Until rank 0's
    # failure has reached the parent the first job is simply running, and the next one is
    # refused: submit again then (a slow machine takes longer to get there, nothing else).
    deadline = time.monotonic() + 30
    while True:
        try:
            results = cluster.run(total)
            break
        except dzl.RankError:
            raise
        except dzl.ClusterError as exc:
            if "one job runs at a time" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert results == [2.0, 2.0]
    with pytest.raises(dzl.RankError) as info:
        failed.wait()
    assert info.value.ranks == [0] and "rank 0 fails first" in str(info.value)


def test_tensor_results_come_back_by_value(cluster):
    results = cluster.run(lambda: torch.arange(4.0) * dzl.rank())
    torch.testing.assert_close(results[1], torch.arange(4.0))


def test_emit_rejects_tensors_inside_a_rank(cluster):
    with pytest.raises(dzl.RankError) as info:
        cluster.run(lambda: dzl.emit("loss", loss=torch.tensor(1.0)))
    assert info.value.failures[0].exc_type == "TypeError"
    assert "float(t)" in info.value.failures[0].message
    # Every rank raised before any collective: the process group is intact, workers kept.
    assert not info.value.restarted


def test_world_sizes_one_to_four_start_and_reduce():
    for world_size in (1, 3, 4):
        with dzl.LiveCluster(world_size, timeout=5.0) as c:

            def total():
                t = torch.tensor([float(dzl.rank())])
                dist.all_reduce(t)
                return t.item()

            expected = float(sum(range(world_size)))
            assert c.run(total) == [expected] * world_size


def test_spawn_start_method_works_too():
    with dzl.LiveCluster(2, start_method="spawn", timeout=5.0) as c:
        assert c.run(dzl.rank) == [0, 1]


def test_print_in_a_rank_shows_in_the_caller_prefixed_by_rank(cluster, capsys):
    import sys

    def talk():
        print(f"hello from {dzl.rank()}")
        print("no newline", end="")
        print("careful", file=sys.stderr)
        return dzl.rank()

    job = cluster.submit(talk)
    assert job.wait() == [0, 1]
    out, err = capsys.readouterr()
    for rank in (0, 1):
        assert f"[rank {rank}] hello from {rank}\n" in out
        assert f"[rank {rank}] no newline\n" in out
        assert f"[rank {rank}] careful\n" in err
    assert (0, "stdout", "hello from 0\n") in job.output
    # after the job, the workers' own streams are back: nothing more is forwarded
    cluster.run(lambda: None)
    assert capsys.readouterr() == ("", "")
