"""Emulated links (comm/link.py): a collective takes at least the link's α-β time and, for
messages of 1 MB and more, at most 10% longer; it waits asleep, not spinning; results are
bitwise those of the real collective; async ops overlap with compute and queue on the link.

One cluster of 2 ranks for the module.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from matplotlib.figure import Figure

import ddpzero_lab as dzl
from ddpzero_lab import comm
from ddpzero_lab.comm.link import ACCELERATORS, LINKS, Link
from ddpzero_lab.viz.panels import draw_timeline
from ddpzero_lab.viz.state import DashboardState

# 25 MB/s and 2 ms per message: a 4 MB all-reduce takes 164 ms on it at N = 2, a
# reduce-scatter 82 ms, against a few ms for the real transfer on loopback (and a busy
# machine's late wake-ups, well inside the 10% allowed)
SLOW = Link(latency=2e-3, bandwidth=2.5e7, name="slow")
NUMEL = 1_000_000  # 4 MB of float32


@pytest.fixture(scope="module")
def cluster():
    with dzl.LiveCluster(world_size=2, timeout=30.0) as c:
        yield c


def test_presets_scale_by_the_compute_ratio_and_bad_links_are_refused():
    nv = Link.preset("nvlink4")
    assert (nv.latency, nv.bandwidth, nv.scale) == (*LINKS["nvlink4"], 1.0)
    scaled = Link.preset("nvlink4", "h100", compute_flops=1e11)
    assert scaled.scale == pytest.approx(ACCELERATORS["h100"] / 1e11)
    # the all-reduce's ring time, stretched by the scale
    want = (2 * 1 * 3e-6 + 2 * 1 / 2 * 16e6 / 450e9) * scaled.scale
    assert scaled.seconds("all_reduce", 16e6, 2) == pytest.approx(want)
    assert "scaled" in scaled.describe() and "h100" in scaled.describe()
    assert Link.parse("ib-100g").bandwidth == 12.5e9
    with pytest.raises(ValueError, match="unknown link"):
        Link.preset("carrier-pigeon")
    with pytest.raises(ValueError, match="unknown accelerator"):
        Link.preset("nvlink4", "abacus", compute_flops=1e11)
    with pytest.raises(ValueError, match="bandwidth"):
        Link(latency=0.0, bandwidth=0)
    with pytest.raises(ValueError, match="latency"):
        Link(latency=-1.0, bandwidth=1e9)


def _timed(op: str, link):
    dzl.set_link(link)
    try:
        n, r = dzl.world_size(), dzl.rank()
        g = torch.Generator().manual_seed(r)
        x = torch.randn(NUMEL, generator=g)
        out = torch.empty(NUMEL // n)
        full = torch.empty(NUMEL)
        run = {
            "all_reduce": lambda: comm.all_reduce(x),
            "reduce_scatter": lambda: comm.reduce_scatter(out, x),
            "all_gather": lambda: comm.all_gather(full, x[: NUMEL // n].contiguous()),
        }[op]
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        result = {"all_reduce": x, "reduce_scatter": out, "all_gather": full}[op]
        return wall, cpu, result.clone()
    finally:
        dzl.set_link(None)


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter", "all_gather"])
def test_a_collective_takes_the_links_time_asleep_and_gives_the_same_result(cluster, op):
    want = SLOW.seconds(op, NUMEL * 4, 2)
    emulated = cluster.run(_timed, op, SLOW)
    real = cluster.run(_timed, op, None)
    for (wall, cpu, result), (_, _, plain) in zip(emulated, real, strict=True):
        assert want <= wall <= 1.10 * want, (wall, want)
        assert cpu < 0.5 * wall, (cpu, wall)  # the wait is a sleep
        assert torch.equal(result, plain)


def _overlap_and_queue():
    dzl.set_link(SLOW)
    try:
        x, y = torch.ones(NUMEL), torch.ones(NUMEL)
        one = SLOW.seconds("all_reduce", NUMEL * 4, dzl.world_size())
        dist.barrier()
        start = time.perf_counter()
        work = comm.all_reduce(x, async_op=True)
        time.sleep(one)  # compute as long as the transfer: it hides it
        work.wait()
        overlapped = time.perf_counter() - start
        dist.barrier()
        start = time.perf_counter()
        first = comm.all_reduce(x, async_op=True)
        second = comm.all_reduce(y, async_op=True)  # waits for the link
        second.wait()
        queued = time.perf_counter() - start
        first.wait()
        return one, overlapped, queued
    finally:
        dzl.set_link(None)


def test_async_ops_overlap_with_compute_and_queue_on_the_link(cluster):
    for one, overlapped, queued in cluster.run(_overlap_and_queue):
        assert one <= overlapped < 1.5 * one  # not compute + transfer (2x)
        assert 2 * one <= queued < 2.3 * one


def _events_keep_both_times():
    dzl.set_link(SLOW)
    try:
        comm.all_reduce(torch.ones(NUMEL), tag="emulated")
    finally:
        dzl.set_link(None)
    comm.all_reduce(torch.ones(NUMEL), tag="real")


def test_events_keep_the_real_and_the_emulated_end(cluster):
    job = cluster.submit(_events_keep_both_times)
    job.wait()
    events = {e["tag"]: e for e in job.events if e.kind == "collective" and e.rank == 0}
    emulated, real = events["emulated"], events["real"]
    assert emulated["real_end"] <= emulated["end"]
    assert emulated["end"] - emulated["start"] >= SLOW.seconds("all_reduce", NUMEL * 4, 2)
    assert real.get("real_end") is None
    # and say which link, so that a picture of them can: the dashboard's timeline does
    assert emulated["link"] == SLOW.describe() and real.get("link") is None
    state = DashboardState()
    for event in job.events:
        state.update(event)
    assert state.snapshot()["link"] == SLOW.describe()
    fig = Figure()
    draw_timeline(fig.add_subplot(), state.snapshot())
    assert SLOW.describe() in fig.axes[0].get_title(loc="left")


def _wire_and_model(op: str, numel: int):
    from ddpzero_lab.comm import traffic_model, wire

    n = dzl.world_size()
    x, out, full = torch.ones(numel), torch.empty(numel // n), torch.empty(numel)
    run = {
        "all_reduce": lambda: comm.all_reduce(x),
        "reduce_scatter": lambda: comm.reduce_scatter(out, x),
        "all_gather": lambda: comm.all_gather(full, out),
        "broadcast": lambda: comm.broadcast(x, 0),
    }[op]
    measured = wire.wire_bytes(run)
    model = sum(traffic_model(op, numel, 4, n, r)[0] for r in range(n))  # Σ over ranks
    return measured, model


@pytest.mark.skipif(comm.wire.loopback_bytes() is None, reason="no loopback counters here")
@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter", "all_gather", "broadcast"])
def test_bytes_on_the_wire_are_the_models_within_5_percent(cluster, op):
    with dzl.LiveCluster(world_size=3, timeout=30.0) as three:
        for ranks in (cluster, three):
            measured, model = ranks.run(_wire_and_model, op, 1_200_000)[0]  # 4.8 MB
            # TCP/IP headers add ~0.1%; anything else on loopback meanwhile only adds
            assert model <= measured <= 1.05 * model, (ranks.world_size, measured, model)


def _link_and_time():
    from ddpzero_lab.comm import link

    x = torch.ones(NUMEL)
    dist.barrier()
    start = time.perf_counter()
    comm.all_reduce(x)
    return link.current().link, time.perf_counter() - start


def test_a_cluster_started_with_a_link_emulates_it_on_every_rank_and_after_a_restart():
    assert Link.parse(SLOW.spec()) == SLOW  # a Link travels to the workers as its spec
    want = SLOW.seconds("all_reduce", NUMEL * 4, 2)
    with dzl.LiveCluster(world_size=2, timeout=30.0, link=SLOW) as cluster:
        for _ in range(2):
            for got, took in cluster.run(_link_and_time):
                assert got == SLOW and want <= took <= 1.10 * want
            cluster.restart()  # the new workers emulate it too
    with pytest.raises(TypeError, match="link"):
        dzl.LiveCluster(world_size=2, link=3.5)


# --- per-rank links ----------------------------------------------------------------------------
# a parameter server (rank 0) on a link four times slower than its workers' (tiny messages: a
# message costs about its latency)
SERVER_LINK = Link(latency=2e-2, bandwidth=1e9, name="server")
WORKER_LINK = Link(latency=5e-3, bandwidth=1e9, name="worker")


def test_per_rank_links_are_checked_before_any_worker_starts(monkeypatch):
    from ddpzero_lab.comm import link

    with pytest.raises(ValueError, match=r"no link for rank\(s\) \[1\]"):
        dzl.LiveCluster(world_size=2, link={0: "nvlink4"})
    with pytest.raises(ValueError, match="rank 2"):
        dzl.LiveCluster(world_size=2, link={"default": "nvlink4", 2: "eth-10g"})
    with pytest.raises(TypeError, match="rank"):
        dzl.LiveCluster(world_size=2, link={"default": "nvlink4", "server": "eth-10g"})
    with pytest.raises(ValueError, match="unknown link"):
        dzl.LiveCluster(world_size=2, link={"default": "carrier-pigeon"})
    with pytest.raises(ValueError, match="unknown accelerator"):
        dzl.LiveCluster(world_size=2, link="nvlink4:abacus")
    with pytest.raises(TypeError, match="link"):
        dzl.LiveCluster(world_size=2, link={"default": 3.5})
    # each rank reads its own entry, the default filling the others; None: real time
    spec = link.encode({"default": WORKER_LINK, 0: "eth-10g", 2: None}, 3)
    read = {}
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        read[rank] = link._rank_spec(spec)
    assert read[0] == "eth-10g" and read[2] is None
    assert Link.parse(read[1]) == WORKER_LINK
    assert link.encode({"default": None}, 2) is None  # nobody emulates: no variable at all
    assert link.encode(WORKER_LINK, 2) == WORKER_LINK.spec()


def _param_server_steps(sizes, steps: int = 3):
    """On every rank of 4: the parameter server of parallel/ on the first n ranks, for each n;
    per n, the server's median step and this rank's link-busy share of its step."""
    import statistics

    from torch import nn

    from ddpzero_lab.comm import link
    from ddpzero_lab.parallel.param_server import ParameterServerOptimizer

    out = {}
    for n in sizes:
        group = None if n == dzl.world_size() else dist.new_group(list(range(n)))
        if dzl.rank() >= n:
            continue
        torch.manual_seed(0)
        model = nn.Linear(16, 16)
        optimizer = ParameterServerOptimizer(model, lambda p: torch.optim.SGD(p, lr=0.1), group)
        times, busy = [], []
        for step in range(1 + steps):  # one warm-up step
            model(torch.randn(4, 16)).square().mean().backward()
            dist.barrier(group=group)  # plain torch: not on the emulated link
            before, start = link.current().busy, time.perf_counter()
            optimizer.step()
            optimizer.zero_grad()
            took = time.perf_counter() - start
            if step:
                times.append(took)
                busy.append((link.current().busy - before) / took)
        out[n] = (statistics.median(times), statistics.median(busy), link.current().link.name)
    return out


def test_a_servers_link_is_shared_by_its_workers_and_theirs_sit_idle():
    links = {"default": WORKER_LINK, 0: SERVER_LINK}
    with dzl.LiveCluster(world_size=4, timeout=30.0, link=links) as four:
        per_rank = four.run(_param_server_steps, (2, 3, 4))
    server = per_rank[0]
    for n in (2, 3, 4):
        # the server receives N-1 pushes, then sends N-1 pulls, one after another on its link
        want = 2 * (n - 1) * SERVER_LINK.seconds("send", 1_200, n)
        step, share, name = server[n]
        assert name == "server"
        assert want <= step <= 1.3 * want, (n, step, want)
        assert share > 0.75, (n, share)  # the server's link is busy nearly all the step
        for rank in range(1, n):
            _, idle_share, name = per_rank[rank][n]
            assert name == "worker"
            assert idle_share < 0.5, (n, rank, idle_share)  # a worker's link: mostly idle
    # linear in N-1: 1, 2, 3 times the two-rank step
    assert server[3][0] / server[2][0] == pytest.approx(2, rel=0.15)
    assert server[4][0] / server[2][0] == pytest.approx(3, rel=0.15)


def _recv_after_the_senders_link():
    dzl.set_link(SLOW if dzl.rank() == 0 else None)  # only the sender's link is emulated
    try:
        x = torch.ones(NUMEL)
        dist.barrier()
        start = time.perf_counter()
        if dzl.rank() == 0:
            comm.send(x, 1)
        else:
            comm.recv(x, 0)
        return time.perf_counter() - start
    finally:
        dzl.set_link(None)


def test_a_message_arrives_when_the_senders_link_has_carried_it(cluster):
    want = SLOW.seconds("send", NUMEL * 4, 2)
    sent, received = cluster.run(_recv_after_the_senders_link)
    assert want <= sent <= 1.10 * want + 0.01, (sent, want)
    assert received >= want, (received, want)  # not when the real bytes landed, much earlier


def test_emulate_sets_a_link_for_a_block_and_gives_the_previous_one_back():
    from ddpzero_lab.comm import link

    outer = dzl.set_link(WORKER_LINK)
    try:
        with link.emulate(SLOW) as inner:
            assert inner.link == SLOW and link.current().link == SLOW
        assert link.current().link == outer
        with link.emulate(None):  # None: the rank keeps its link
            assert link.current().link == outer
    finally:
        dzl.set_link(None)
    assert link.current() is None
