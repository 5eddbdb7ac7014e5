"""Lesson 02 (parameter server vs all-reduce): the measuring harness, its tables and its
pictures. The notebook owns the training code the learner studies (model, batches, `build`);
this module times and counts it, runs it on several world sizes and draws the results.

Bytes are counted one direction, as sent by a rank per step, as in the rest of the course.
The parameter server's bytes are MEASURED (the bytes handed to send/recv); the all-reduce's
are the cost MODEL's (dzl.traffic() for a built-in collective, see comm/cost_model.py).
Times are real, or measured under an emulated link (comm/link.py), and labelled as which.
"""

from __future__ import annotations

import statistics
import time

import torch.distributed as dist
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter, ScalarFormatter
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.comm import link as comm_link

from .progress import progress

STRATEGIES = ("param_server", "all_reduce")
COLORS = {"param_server": "tab:red", "all_reduce": "tab:blue"}
SOURCE = {"param_server": "measured", "all_reduce": "model"}


def _comm_seconds_so_far() -> float:
    return sum(c["seconds"] for c in dzl.traffic().values())


def measure(
    build, local_batch, strategy, steps, step_fn, warmup=2, link=None, compute_s=0.0
) -> dict:
    """On a rank: bytes sent per step, and the median seconds per step and inside
    communication. The barrier before the update is plain torch (not counted): the ranks start
    communicating together, so a slower backward does not count as communication.
    link: a dzl.Link to emulate meanwhile (comm/link.py); then also the share of the update
    this rank's link was busy. compute_s: seconds each rank sleeps after backward, standing in
    for its own accelerator's forward and backward (`stand_in_compute`)."""
    with comm_link.emulate(link):
        return _measure(build, local_batch, strategy, steps, step_fn, warmup, compute_s)


def _link_busy() -> float:
    emulator = comm_link.current()
    return 0.0 if emulator is None else emulator.busy


def _measure(build, local_batch, strategy, steps, step_fn, warmup, compute_s=0.0) -> dict:
    model, optimizer, update = build(strategy, step_fn)
    step_seconds, update_seconds, comm_seconds, busy = [], [], [], []
    for step in range(warmup + steps):
        if step == warmup:
            dzl.reset_traffic()  # forget the warm-up (and parallelize's initial broadcast)
        x, y = local_batch(step)
        start = time.perf_counter()
        nn.functional.mse_loss(model(x), y).backward()
        if compute_s:
            time.sleep(compute_s)  # the accelerator's own compute: no core of this machine
        dist.barrier()
        before, link_before = _comm_seconds_so_far(), _link_busy()
        update_start = time.perf_counter()
        update()
        optimizer.zero_grad()
        if step >= warmup:
            step_seconds.append(time.perf_counter() - start)
            update_seconds.append(time.perf_counter() - update_start)
            comm_seconds.append(_comm_seconds_so_far() - before)
            busy.append(_link_busy() - link_before)
    sent = sum(c["sent"] for c in dzl.traffic().values())
    return {
        "sent": sent / steps,
        "step_s": statistics.median(step_seconds),
        "comm_s": statistics.median(comm_seconds),
        "update_s": statistics.median(update_seconds),
        "link_busy_s": statistics.median(busy),  # seconds this rank's link carried; 0: real time
    }


def measure_sizes(
    cluster, sizes, build, local_batch, step_fn, steps, link=None, compute_s=0.0
) -> dict:
    """results[N][strategy] = one dict per rank; a smaller cluster is started for a moment
    for each world size below the lesson's own. link: a dzl.Link every rank emulates;
    compute_s: each rank's compute stand-in (`measure`)."""
    results = {}
    for n in sizes:
        if n == cluster.world_size:
            where, close = cluster, None
        else:
            where = close = dzl.LiveCluster(world_size=n, backend="gloo")
        try:
            results[n] = {
                s: where.run(
                    measure,
                    build,
                    local_batch,
                    s,
                    steps,
                    step_fn,
                    link=link,
                    compute_s=compute_s,
                    dashboard=progress(f"N={n}, {s}" + (" (emulated)" if link else "")),
                )  # fmt: skip
                for s in STRATEGIES
            }
        finally:
            if close is not None:
                close.close()
    return results


def sent_formula(strategy: str, n: int, rank: int, grad_bytes: int, push_bytes: int) -> float:
    """Bytes a rank sends per step: the server N-1 pulls, a worker one push, a ring rank
    2(N-1)/N·B."""
    if strategy == "param_server":
        return (n - 1) * grad_bytes if rank == 0 else push_bytes
    return 2 * (n - 1) / n * grad_bytes


def bytes_table(results, grad_bytes: int, push_bytes: int) -> bool:
    """Print bytes sent per rank per step against the formula; True if the server's MEASURED
    bytes equal theirs exactly (the all-reduce's are the model, equal by construction)."""
    ok = True
    print(f"{'N':>2}  {'strategy':<12} {'rank':>4}  {'sent per step':>14}  {'':<9} {'formula':>12}")
    for n, by_strategy in results.items():
        for strategy in STRATEGIES:
            for rank, row in enumerate(by_strategy[strategy]):
                want = sent_formula(strategy, n, rank, grad_bytes, push_bytes)
                if strategy == "param_server":
                    ok &= round(row["sent"]) == want
                print(f"{n:>2}  {strategy:<12} {rank:>4}  {row['sent']:>14,.0f}  "
                      f"{SOURCE[strategy]:<9} {want:>12,.0f}")  # fmt: skip
        total = {s: sum(r["sent"] for r in by_strategy[s]) for s in STRATEGIES}
        print(f"    N={n}, all ranks together: param_server {total['param_server']:,.0f}, "
              f"all_reduce {total['all_reduce']:,.0f}")  # fmt: skip
    return ok


def plot_busiest(results, grad_bytes: int, far: int = 32) -> Figure:
    """Bytes the busiest rank sends per step, in units of B, measured/model points and the
    formulas out to N = far."""
    ns = list(range(2, far + 1))
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(ns, [n - 1 for n in ns], "--", color=COLORS["param_server"], label="server: (N-1)·B")
    ax.plot(ns, [2 * (n - 1) / n for n in ns], "--", color=COLORS["all_reduce"],
            label="ring rank: 2(N-1)/N·B")  # fmt: skip
    for strategy, marker in (("param_server", "o"), ("all_reduce", "s")):
        sizes = list(results)
        busiest = [max(r["sent"] for r in results[n][strategy]) / grad_bytes for n in sizes]
        ax.plot(sizes, busiest, marker, markersize=8, color=COLORS[strategy],
                label=f"{strategy}: busiest rank ({SOURCE[strategy]})")  # fmt: skip
    ax.set(xlabel="world size N", ylabel="bytes sent per step  [B]", yscale="log",
           yticks=[0.5, 1, 2, 4, 8, 16, 32], title="bytes sent by the busiest rank")  # fmt: skip
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize="small")
    return fig


def comm_seconds(results, strategy: str, n: int) -> float:
    """MEASURED communication seconds per step of the busiest rank: the server (rank 0), or
    the slowest all-reduce rank."""
    per_rank = [r["comm_s"] for r in results[n][strategy]]
    return per_rank[0] if strategy == "param_server" else max(per_rank)


def step_seconds(results, strategy: str, n: int) -> float:
    return max(r["step_s"] for r in results[n][strategy])


def one_step(build, local_batch, strategy, step_fn, link=None) -> float:
    """On a rank: a warm-up step, then one more; returns when step 1's communication began."""
    with comm_link.emulate(link):
        model, optimizer, update = build(strategy, step_fn)
        for step in range(2):
            x, y = local_batch(step)
            nn.functional.mse_loss(model(x), y).backward()
            dist.barrier()
            mark = time.time()
            update()
            optimizer.zero_grad()
        return mark


def plot_one_step(cluster, build, local_batch, step_fn, link=None) -> Figure:
    """Each counted message of one step as a bar, one row per rank, for both designs (under
    the emulated `link` if given: a bar ends when the link would have finished it)."""
    op_colors = {"recv": "tab:green", "send": "tab:orange", "all_reduce": "tab:blue"}
    fig = Figure(figsize=(8, 4.4), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, strategy in zip(axes, STRATEGIES, strict=True):
        job = cluster.submit(one_step, build, local_batch, strategy, step_fn, link)
        t0 = min(job.wait())
        for e in job.events:  # every counted op emits a "collective" event with start and end
            if e.kind == "collective" and e["start"] >= t0 and e["op"] in op_colors:
                ax.broken_barh([((e["start"] - t0) * 1e3, (e["end"] - e["start"]) * 1e3)],
                               (e.rank - 0.35, 0.7), facecolors=op_colors[e["op"]],
                               edgecolor="white")  # fmt: skip
        ax.set(ylabel="rank", yticks=list(range(cluster.world_size)), title=f"one {strategy} step")
        ax.invert_yaxis()
    fig.legend(handles=[Patch(color=c, label=op) for op, c in op_colors.items()],
               loc="outside right upper", fontsize="small")  # fmt: skip
    timing = "measured" if link is None else f"measured under {link.describe()}"
    axes[-1].set_xlabel(f"ms since the step's communication began ({timing})")
    return fig


def stand_in_compute(model: nn.Module, samples: int, link, mfu: float = 0.5) -> float:
    """Seconds an accelerator of its own would take, at this machine's speed, for a rank's
    forward and backward of `samples` samples: 6·Ψ FLOPs per sample (forward 2, backward 4)
    at `mfu` of the compute rate the scaled `link` measured here (its accelerator's FLOP/s over
    its scale). On a cluster each rank computes on its own GPU at once; here N ranks share a
    few cores, so the lesson sleeps that long instead, as the link sleeps for its transfers."""
    if link.accelerator is None:
        raise ValueError("a compute stand-in needs a link scaled to an accelerator")
    here = comm_link.ACCELERATORS[link.accelerator] / link.scale  # FLOP/s of this machine
    psi = sum(p.numel() for p in model.parameters())
    return 6 * psi * samples / (mfu * here)


def link_model(link, strategy: str, n: int, grad_bytes: int, push_bytes: int) -> float:
    """The link's α-β seconds for one update: the server's N-1 receives then N-1 sends, one
    after another on its link; a ring all-reduce of B."""
    if strategy == "param_server":
        return (n - 1) * (link.seconds("recv", push_bytes, n) + link.seconds("send", grad_bytes, n))
    return link.seconds("all_reduce", grad_bytes, n)


def emulated_table(results, link) -> dict:
    """Print the slowest rank's median step per N and design under the emulated link, its
    growth from the smallest N, and how busy rank 0's link and the others' were: the seconds
    each carried traffic, as a share of the slowest rank's update. Returns {strategy: [step
    seconds per N]}."""
    sizes = list(results)
    print(f"measured on the live cluster under {link.describe()}")
    print(f"{'N':>2}  {'strategy':<12} {'step [ms]':>9} {'vs N=' + str(sizes[0]):>7}  "
          f"{'link busy: rank 0':>17} {'others':>7}")  # fmt: skip
    steps = {s: [step_seconds(results, s, n) for n in sizes] for s in STRATEGIES}
    for s in STRATEGIES:
        for n, took in zip(sizes, steps[s], strict=True):
            update = max(r["update_s"] for r in results[n][s])
            busy = [r["link_busy_s"] / update for r in results[n][s]]
            print(f"{n:>2}  {s:<12} {took * 1e3:>9.0f} {took / steps[s][0]:>6.2f}x  "
                  f"{busy[0]:>17.0%} {max(busy[1:]):>7.0%}")  # fmt: skip
    lo, hi = sizes[0], sizes[-1]
    added = {s: (steps[s][-1] - steps[s][0]) / (hi - lo) * 1e3 for s in STRATEGIES}
    costs = ", ".join(f"{s} +{ms:.0f} ms" for s, ms in added.items())
    print(f"each rank added from N={lo} to {hi} cost the step: {costs}")
    ratio = steps["param_server"][-1] / steps["all_reduce"][-1]
    print(f"at N={hi} the server's step is {ratio:.1f}x the ring's")
    return steps


def plot_emulated(
    results, link, grad_bytes: int, push_bytes: int, far: int = 32, compute_s: float = 0.0
) -> Figure:
    """Step ms per N measured under the emulated link, beside its α-β model (plus the
    compute stand-in); the model alone out to N = far."""
    what = "compute + α-β model" if compute_s else "α-β model (communication)"
    sizes = list(results)
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    near, wide = fig.subplots(1, 2)
    for strategy, marker in (("param_server", "o"), ("all_reduce", "s")):
        color = COLORS[strategy]
        model = [
            (compute_s + link_model(link, strategy, n, grad_bytes, push_bytes)) * 1e3 for n in sizes
        ]
        near.plot(sizes, [step_seconds(results, strategy, n) * 1e3 for n in sizes], marker,
                  markersize=8, color=color, label=f"{strategy}: measured step")  # fmt: skip
        near.plot(sizes, model, "--", color=color, label=f"{strategy}: {what}")
        ns = range(2, far + 1)
        wide.plot(ns, [(compute_s + link_model(link, strategy, n, grad_bytes, push_bytes)) * 1e3
                       for n in ns], "--", color=color, label=f"{strategy}: {what}")  # fmt: skip
    near.set(xlabel="world size N", ylabel="ms per step", xticks=sizes, ylim=(0, None),
             title="measured on the live cluster, emulated link")  # fmt: skip
    wide.set(xlabel="world size N", ylabel="ms per step", ylim=(0, None),
             title=f"projection: α-β model of the link, to N = {far}")  # fmt: skip
    near.legend(fontsize="small")
    wide.legend(fontsize="small")
    fig.suptitle(link.describe(), fontsize="medium")
    return fig
