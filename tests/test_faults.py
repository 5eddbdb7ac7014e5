"""LiveCluster under faults: exceptions, dead ranks, hung collectives, interrupts, restart,
teardown. Every path must end in a clear error within the timeout, never a hang. And the
ranks' sockets listen on loopback only, unless the learner says otherwise and is warned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
from conftest import PYTHON, REPO, alive, end_session, restart_seconds

import ddpzero_lab as dzl
from ddpzero_lab.cluster.job import CANCEL_GRACE_S
from ddpzero_lab.cluster.report import WHERE_WAIT_S


def _healthy(cluster) -> bool:
    def total():
        t = torch.ones(1)
        dist.all_reduce(t)
        return t.item()

    return cluster.run(total) == [float(cluster.world_size)] * cluster.world_size


def test_exception_on_one_rank_names_it_and_keeps_the_workers(cluster):
    pids = cluster.pids

    def fail_on_one():
        if dzl.rank() == 1:
            raise ValueError("bad value on rank 1")
        return "ok"

    with pytest.raises(dzl.RankError) as info:
        cluster.run(fail_on_one)
    err = info.value
    assert err.ranks == [1]
    failure = err.failures[1]
    assert failure.kind == "exception" and failure.exc_type == "ValueError"
    assert failure.message == "bad value on rank 1"
    assert "fail_on_one" in failure.traceback and "raise ValueError" in failure.traceback
    assert isinstance(failure.exception, ValueError)
    assert err.results == ["ok", None]
    assert "rank 1" in str(err) and "ValueError: bad value on rank 1" in str(err)
    # Both ranks left the job having issued the same collectives: nothing to repair.
    assert not err.restarted and cluster.pids == pids
    assert _healthy(cluster)


def test_exception_while_peer_waits_in_collective_recovers(cluster):
    def fail_before_collective():
        if dzl.rank() == 1:
            raise RuntimeError("rank 1 gave up")
        t = torch.ones(1)
        dist.all_reduce(t)  # rank 0 waits here for a partner that never comes

    restart_s = restart_seconds(cluster)
    start = time.monotonic()
    with pytest.raises(dzl.RankError) as info:
        cluster.run(fail_before_collective)
    elapsed = time.monotonic() - start
    err = info.value
    assert err.ranks == [1]
    assert err.failures[1].message == "rank 1 gave up"
    assert err.failures[0].kind in ("stuck", "exception", "cancelled")
    assert err.restarted and "replaced its workers" in str(err)
    # grace (1 s) + cancel grace (1.5 s) + a restart: rank 0 is cancelled, not left to wait
    # out the collective timeout (5 s) and then restarted
    assert elapsed < cluster.timeout + 2 * restart_s, (elapsed, restart_s)
    assert _healthy(cluster)


def test_dead_rank_is_named_with_its_exit_code(cluster):
    def die():
        if dzl.rank() == 0:
            os._exit(7)
        t = torch.ones(1)
        dist.all_reduce(t)

    restart_s = restart_seconds(cluster)
    start = time.monotonic()
    with pytest.raises(dzl.RankError) as info:
        cluster.run(die)
    assert time.monotonic() - start < cluster.timeout + 3 * restart_s + 1, restart_s
    err = info.value
    assert err.ranks == [0]
    assert err.failures[0].kind == "died" and err.failures[0].exitcode == 7
    assert "exit code 7" in str(err)
    assert err.restarted
    assert _healthy(cluster)


def test_rank_killed_by_a_signal_while_idle_is_replaced_on_next_job(cluster):
    victim = cluster.pids[1]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(victim) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let the consumer thread see the sentinel
    with pytest.warns(RuntimeWarning, match="rank 1 died .*SIGKILL"):
        assert cluster.run(dzl.rank) == [0, 1]
    assert victim not in cluster.pids


def test_rank_killed_during_a_job_raises(cluster):
    def sleep_then_reduce():
        time.sleep(30)

    restart_s = restart_seconds(cluster)
    job = cluster.submit(sleep_then_reduce)
    time.sleep(0.5)
    os.kill(cluster.pids[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(dzl.RankError) as info:
        job.wait()
    # seen at once (the process sentinel), then the grace, a cancel and a restart
    elapsed = time.monotonic() - start
    assert elapsed < cluster.grace + CANCEL_GRACE_S + 3 * restart_s + 1, (elapsed, restart_s)
    assert info.value.failures[0].kind == "died"
    assert "SIGKILL" in str(info.value)
    assert _healthy(cluster)


def test_hung_collective_fails_within_the_timeout_naming_the_waiting_rank(cluster):
    def skip_collective():
        if dzl.rank() == 1:
            return "skipped"
        t = torch.ones(1)
        dist.all_reduce(t)
        return "reduced"

    restart_s = restart_seconds(cluster)
    start = time.monotonic()
    with pytest.raises(dzl.RankError) as info:
        cluster.run(skip_collective)
    elapsed = time.monotonic() - start
    assert elapsed < cluster.timeout + cluster.grace + 3 * restart_s + 1, (elapsed, restart_s)
    err = info.value
    assert err.ranks == [0] and err.results == [None, "skipped"]
    assert err.failures[0].is_comm_error
    assert "skip" in str(err) and "same collectives in the same order" in str(err)
    assert _healthy(cluster)


def test_cancel_stops_a_running_job_and_keeps_the_cluster(cluster):
    def forever():
        while True:
            time.sleep(0.01)

    start = time.monotonic()
    cluster.run(int)
    round_trip = time.monotonic() - start  # the baseline: one empty job on this machine now
    job = cluster.submit(forever)
    time.sleep(0.3)
    pids = cluster.pids
    start = time.monotonic()
    job.cancel()
    # The ranks answer the cancel at once: no rank waits out the cancel grace to be ended
    # (the pids below), and the cost is a few round trips, at most the wait for "where".
    elapsed = time.monotonic() - start
    assert elapsed < WHERE_WAIT_S + 0.5 * CANCEL_GRACE_S + 10 * round_trip, (elapsed, round_trip)
    with pytest.raises(dzl.ClusterError, match="cancelled"):
        job.wait()
    assert cluster.pids == pids  # nothing was stuck: the same workers go on
    assert _healthy(cluster)


def test_restart_gives_fresh_workers_and_process_group(cluster):
    old_pids, old_generation = cluster.pids, cluster.generation
    cluster.restart()
    assert cluster.generation == old_generation + 1
    assert set(cluster.pids).isdisjoint(old_pids)
    assert not any(alive(pid) for pid in old_pids)
    assert _healthy(cluster)


def test_unpicklable_result_is_a_rank_error_that_says_so(cluster):
    import threading

    with pytest.raises(dzl.RankError, match="cannot be pickled"):
        cluster.run(threading.Lock)
    assert _healthy(cluster)


def test_close_leaves_no_worker_behind():
    cluster = dzl.LiveCluster(2, timeout=5.0)
    pids = cluster.pids
    assert all(alive(pid) for pid in pids)
    cluster.close()
    cluster.close()  # idempotent
    assert not any(alive(pid) for pid in pids)
    with pytest.raises(dzl.ClusterError, match="closed"):
        cluster.run(dzl.rank)


def test_context_manager_closes_even_after_an_error():
    with pytest.raises(dzl.RankError):
        with dzl.LiveCluster(2, timeout=5.0) as cluster:
            pids = cluster.pids
            cluster.run(lambda: 1 / 0)
    assert not any(alive(pid) for pid in pids)


def test_dropped_cluster_is_closed_by_garbage_collection():
    import gc

    cluster = dzl.LiveCluster(1, timeout=5.0)
    pids = cluster.pids
    del cluster
    gc.collect()
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)


def _script(body: str) -> list[str]:
    return [PYTHON, "-c", textwrap.dedent(body)]


def _wait_gone(pids, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(alive(pid) for pid in pids)


def test_workers_end_when_the_interpreter_exits():
    out = subprocess.run(
        _script("""
            import json, ddpzero_lab as dzl
            cluster = dzl.LiveCluster(2, timeout=5.0)
            print(json.dumps(cluster.pids), flush=True)
            # no close(): the interpreter just ends
        """),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert _wait_gone(json.loads(out.stdout.splitlines()[-1]))


def test_workers_end_when_the_kernel_is_killed():
    proc = subprocess.Popen(
        _script("""
            import json, time, ddpzero_lab as dzl
            cluster = dzl.LiveCluster(2, timeout=5.0)
            job = cluster.submit(time.sleep, 60)
            print(json.dumps(cluster.pids), flush=True)
            time.sleep(60)
        """),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        pids = json.loads(proc.stdout.readline())
        assert all(alive(pid) for pid in pids)
        proc.kill()  # SIGKILL: no atexit, no finalizer runs
        proc.wait(10)
        assert _wait_gone(pids)
    finally:
        proc.kill()
        proc.wait()


def test_jupyter_style_interrupt_cancels_cleanly_and_cluster_stays_usable():
    """Jupyter's interrupt sends SIGINT to the kernel's whole process group, workers included.
    The caller gets KeyboardInterrupt, the workers print nothing, the next job runs."""
    proc = subprocess.Popen(
        _script("""
            import json, time, torch, torch.distributed as dist, ddpzero_lab as dzl
            cluster = dzl.LiveCluster(2, timeout=5.0)
            print(json.dumps(cluster.pids), flush=True)

            def train():
                for _ in range(100000):
                    t = torch.ones(1000)
                    dist.all_reduce(t)
                    time.sleep(0.001)

            def stuck():
                if dzl.rank() == 0:
                    time.sleep(600)
                t = torch.ones(1)
                dist.all_reduce(t)

            report = {}
            for name, fn in (("train", train), ("stuck", stuck)):
                start = time.monotonic()
                try:
                    cluster.run(fn)
                    report[name] = "finished"
                except KeyboardInterrupt:
                    report[name] = time.monotonic() - start
                print("ready", flush=True)
                report[name + "_next"] = cluster.run(dzl.rank)
                report[name + "_generation"] = cluster.generation
            print(json.dumps(report), flush=True)
            cluster.close()
        """),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        json.loads(proc.stdout.readline())
        for _ in range(2):
            time.sleep(1.5)
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.stdout.readline().strip() == "ready"
        out, err = proc.communicate(timeout=60)
    finally:
        end_session(proc, grace=0)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["train"] != "finished" and report["stuck"] != "finished"
    assert report["train_next"] == [0, 1] and report["stuck_next"] == [0, 1]
    # A training loop interrupted in step keeps its workers; a rank stuck in a collective is
    # replaced by a restart.
    assert report["stuck_generation"] == report["train_generation"] + 1
    assert "Traceback" not in err, err  # no spew of worker tracebacks


def test_close_ends_a_running_job_with_a_clear_error():
    cluster = dzl.LiveCluster(2, timeout=5.0)
    job = cluster.submit(time.sleep, 60)
    time.sleep(0.3)
    cluster.close()
    assert job.done()  # close() ended it: wait() has nothing left to wait for
    with pytest.raises(dzl.ClusterError, match="cancelled: the cluster was closed"):
        job.wait()


def test_restart_ends_a_running_job_with_a_clear_error(cluster):
    job = cluster.submit(time.sleep, 60)
    time.sleep(0.3)
    cluster.restart()
    with pytest.raises(dzl.ClusterError, match="cancelled: the workers were replaced") as info:
        job.wait(timeout=5)
    assert "failed on ranks" not in str(info.value)
    assert _healthy(cluster)


def test_exception_whose_str_fails_is_still_reported(cluster):
    class Opaque(Exception):
        def __str__(self):
            raise RuntimeError("no text for you")

    def raise_opaque():
        raise Opaque()

    with pytest.raises(dzl.RankError) as info:
        cluster.run(raise_opaque)
    failure = info.value.failures[0]
    assert failure.kind == "exception" and failure.exc_type == "Opaque"
    assert "str() of the exception failed" in failure.message
    assert not info.value.restarted


def test_last_words_of_a_dead_rank_are_from_its_last_job(cluster):
    def chatter():
        os.write(2, b"words from an earlier job\n")

    def die_loudly():
        if dzl.rank() == 1:
            os.write(2, b"fatal: something native went wrong\n")
            os._exit(9)

    cluster.run(chatter)
    with pytest.raises(dzl.RankError) as info:
        cluster.run(die_loudly)
    text = str(info.value)
    assert "fatal: something native went wrong" in text
    assert "earlier job" not in text
    assert info.value.failures[1].exitcode == 9


def test_dataloader_workers_inside_a_rank_with_a_dataset_defined_in_the_cell(cluster):
    def load():
        class Squares(torch.utils.data.Dataset):  # defined here, as in a notebook cell
            def __len__(self):
                return 8

            def __getitem__(self, i):
                return torch.tensor(float(i * i))

        loader = torch.utils.data.DataLoader(Squares(), batch_size=4, num_workers=2)
        return torch.cat(list(loader)).sum().item()

    assert cluster.run(load) == [140.0, 140.0]


def test_interrupt_while_the_cluster_starts_leaves_nothing_behind():
    proc = subprocess.Popen(
        _script("""
            import glob, json, os, tempfile, time
            import psutil
            import ddpzero_lab as dzl
            pattern = os.path.join(tempfile.gettempdir(), "ddpzero-*")
            before = set(glob.glob(pattern))
            print("go", flush=True)
            try:
                cluster = dzl.LiveCluster(2, timeout=5.0)
                outcome = "started"
                cluster.close()
            except KeyboardInterrupt:
                outcome = "interrupted"
            time.sleep(1.0)
            def is_worker(p):
                try:  # a forkserver killed by the interrupt is a zombie: not a worker
                    line = " ".join(p.cmdline())
                    return "forkserver" not in line and "resource_tracker" not in line
                except psutil.Error:
                    return False
            workers = [p.pid for p in psutil.Process().children(recursive=True)
                       if is_worker(p)]
            leaked = sorted(set(glob.glob(pattern)) - before)
            print(json.dumps({"outcome": outcome, "workers": workers, "leaked": leaked}))
        """),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "go"
        time.sleep(0.5)  # the first start imports torch in the forkserver: about a second
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        # (not communicate(): a leaked worker would hold the pipe open forever)
        report = json.loads(proc.stdout.readline())
    finally:
        end_session(proc, grace=0)  # the whole session: nothing may outlive the test
    assert report["workers"] == [] and report["leaked"] == [], report


def test_ranks_listen_on_loopback_only(cluster):
    # gloo's sockets are unauthenticated: nothing but this machine may reach them.
    import psutil

    for pid in cluster.pids:
        proc = psutil.Process(pid)
        connections = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
        listening = [c.laddr.ip for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening, "a rank of a 2-rank gloo group listens for its peer"
        assert all(ip in ("127.0.0.1", "::1") for ip in listening), listening


def test_binding_off_loopback_warns(monkeypatch):
    # An interface that does not exist: the warning comes first, then the start fails.
    monkeypatch.setenv("DDPZERO_SOCKET_IFNAME", "nonexistent0")
    with pytest.warns(RuntimeWarning, match="DDPZERO_SOCKET_IFNAME=nonexistent0.*not on the"):
        try:
            dzl.LiveCluster(1, timeout=5.0, start_timeout=30).close()
        except dzl.ClusterError:
            pass
