"""Lesson 03 (DDP from scratch): the timing harness, the timelines and the plots.

The notebook keeps what the learner studies (the model, the batches, the checks, the hook);
this module owns what only measures and draws: timing configurations in turns, counting
all-reduces, drawing one step rank by rank, the bucket-size sweep and the compression run.
Each function that runs on the ranks takes a `Workload`, the notebook's own model, optimizer
and batches, so the numbers are measured on the lesson's model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.comm.link import Link, emulate


@dataclass(frozen=True)
class Workload:
    """The notebook's model, optimizer and batches (functions sent to the ranks by value), and
    the link every rank emulates while it is timed (a dzl.Link; None: real time)."""

    make_model: Callable[[], nn.Module]
    make_optimizer: Callable
    local_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    link: Link | None = None

    def timing(self) -> str:
        """What a plot or table says about its times."""
        return "measured" if self.link is None else f"measured under {self.link.describe()}"


def _display(fig) -> None:
    # a Figure made without pyplot is shown once, here, and never again by the inline backend
    from IPython.display import display

    display(fig)


# --- timing ------------------------------------------------------------------------------


def measure(work: Workload, ddp_options: dict, steps: int, warmup: int = 2) -> dict:
    """On a rank: time `steps` training steps of dzl.DDP(options) after `warmup` ones, and
    count this rank's all-reduces per step."""
    with emulate(work.link):
        return _measure(work, ddp_options, steps, warmup)


def _measure(work: Workload, ddp_options: dict, steps: int, warmup: int) -> dict:
    model = dzl.DDP(work.make_model(), **ddp_options)
    optimizer = work.make_optimizer(model.parameters())
    seconds = []
    for step in range(warmup + steps):
        if step == warmup:
            dzl.reset_traffic()  # forget the constructor's broadcast and the warm-up steps
        x, y = work.local_batch(step)
        # uncounted barrier: no step's time includes waiting for another rank's previous step
        dist.barrier()
        start = time.perf_counter()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    counted = dzl.traffic().get("all_reduce", {"calls": 0, "bytes": 0})
    return {
        "seconds": seconds,
        "calls": counted["calls"] / steps,
        "bytes": counted["bytes"] / steps,
        "buckets": len(model.bucket_params),
    }


def counters(cluster, work: Workload, ddp_options: dict) -> None:
    """Print one step's all-reduces and payload bytes (rank 0's: every rank counts the same)."""
    r = cluster.run(measure, work, ddp_options, 2)[0]
    print(f"{r['calls']:.0f} all-reduces per step, {r['bytes']:,.0f} bytes per step")


def compare(cluster, work: Workload, configs: dict, rounds: int, steps: int, label="timing"):
    """Time each configuration `rounds` times, in turns, and keep the median step of the
    slowest rank. Taking turns spreads a noisy moment of a shared laptop over every
    configuration instead of one of them."""
    from tqdm.auto import tqdm

    seconds = {key: [] for key in configs}
    rank0 = {}
    with tqdm(total=rounds * len(configs), desc=label, leave=True) as bar:
        for _ in range(rounds):
            for key, options in configs.items():
                per_rank = cluster.run(measure, work, options, steps)
                per_step = zip(*(r["seconds"] for r in per_rank), strict=True)
                seconds[key] += [max(each) for each in per_step]  # the slowest rank, step by step
                rank0[key] = per_rank[0]  # the counters are the same on every rank
                bar.update()
    return {key: {**rank0[key], "step_s": statistics.median(seconds[key])} for key in configs}


def show_three(timings: dict, world_size: int) -> None:
    """Print and draw the naive, bucketed and overlapped DDPs' time per step."""
    from matplotlib.figure import Figure

    for label, r in timings.items():
        print(
            f"{label:<11} {r['calls']:>3.0f} all-reduces/step, {r['bytes']:>10,.0f} bytes/step, "
            f"{r['step_s'] * 1e3:6.1f} ms/step"
        )
    fig = Figure(figsize=(7, 2.6), layout="constrained")
    ax = fig.subplots()
    labels = list(timings)
    ms = [timings[k]["step_s"] * 1e3 for k in labels]
    ax.barh(labels, ms, color=["tab:red", "tab:orange", "tab:blue"][: len(labels)])
    for i, k in enumerate(labels):
        calls = f"  {timings[k]['calls']:.0f} all-reduces"
        ax.text(ms[i], i, calls, va="center", fontsize="small")
    ax.set(xlabel="ms per step (median, slowest rank)", title=f"three DDPs, {world_size} ranks")
    ax.set_xlim(0, max(ms) * 1.4)
    ax.invert_yaxis()
    _display(fig)


def overlap_gain(timings: dict, link) -> float:
    """Print the bucketed and overlapped DDPs' step and the gain of overlap; return the gain."""
    gain = timings["bucketed"]["step_s"] / timings["overlapped"]["step_s"]
    where = "in real time" if link is None else f"under {link.describe()}"
    print(f"measured on the live cluster {where}:")
    for label in ("bucketed", "overlapped"):
        print(f"  {label:<11} {timings[label]['step_s'] * 1e3:6.0f} ms/step")
    print(f"  overlap made the step {gain:.2f}x as fast")
    return gain


# --- one step, rank by rank ------------------------------------------------------------------


def _traced(work: Workload, bucket_mb: float, overlap: bool, steps: int) -> None:
    # dzl.DDP sends a `step` event per step and a `collective` event per bucket
    with emulate(work.link):
        model = dzl.DDP(work.make_model(), bucket_cap_mb=bucket_mb, overlap=overlap)
        optimizer = work.make_optimizer(model.parameters())
        for step in range(steps):
            x, y = work.local_batch(step)
            dist.barrier()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()


def _last_step(events, rank: int, step_index: int):
    step = next(
        e for e in events if e.kind == "step" and e.rank == rank and e["step"] == step_index
    )
    start, end = step["forward_start"], step["backward_end"]
    buckets = [
        e
        for e in events
        if e.kind == "collective"
        and e.rank == rank
        and str(e["tag"]).startswith("bucket")
        and e["start"] >= start
    ]
    return start, end, buckets


def _averages(events) -> dict:
    steps = [e for e in events if e.kind == "step" and e["step"] >= 2]  # 0-1 warm up, rebuild
    keys = ("compute_s", "comm_s", "exposed_comm_s")
    mean = {k: statistics.mean(e[k] for e in steps) for k in keys}
    mean["hidden"] = max(0.0, 1 - mean["exposed_comm_s"] / max(mean["comm_s"], 1e-12))
    return mean


def _draw_timelines(traces: dict, world_size: int, last: int, timing: str = "measured"):
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(9, 1.2 + 1.5 * world_size), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, overlap in zip(axes, (False, True), strict=True):
        rows = [_last_step(traces[overlap], r, last) for r in range(world_size)]
        t0 = min(row[0] for row in rows)
        for rank, (start, end, buckets) in enumerate(rows):
            # a grey bar for forward + backward, one thin lane per bucket below it
            ax.broken_barh(
                [((start - t0) * 1e3, (end - start) * 1e3)], (rank + 0.05, 0.22), fc="0.6"
            )
            lane = 0.62 / max(1, len(buckets))
            for k, e in enumerate(buckets):
                span = ((e["start"] - t0) * 1e3, (e["end"] - e["start"]) * 1e3)
                ax.broken_barh([span], (rank + 0.32 + k * lane, lane * 0.85), fc=f"C{k % 10}")
            top, bottom = 1 - (rank + 1) / world_size, 1 - rank / world_size
            ax.axvline((end - t0) * 1e3, ymin=top, ymax=bottom, color="k", ls=":", lw=1)
        ax.set(
            ylim=(world_size, 0),
            yticks=[r + 0.5 for r in range(world_size)],
            yticklabels=[f"rank {r}" for r in range(world_size)],
            title=f"overlap={overlap}: one step",
        )
    axes[-1].set_xlabel(f"ms since the first rank began forward ({timing})")
    handles = [
        Patch(color="0.6", label="forward + backward"),
        Patch(color="C0", label="a bucket's all-reduce\n(one lane per bucket)"),
    ]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


def timelines(cluster, work: Workload, bucket_mb: float, steps: int = 6) -> dict:
    """Train `steps` steps with overlap False and True, draw the last step of each rank by
    rank, and print how much communication backward hid. Returns the averages."""
    traces = {}
    for overlap in (False, True):
        job = cluster.submit(_traced, work, bucket_mb, overlap, steps)
        job.wait()
        traces[overlap] = job.events
    _display(_draw_timelines(traces, cluster.world_size, steps - 1, work.timing()))
    mean = {}
    for overlap in (False, True):
        early = []
        for rank in range(cluster.world_size):
            _, end, buckets = _last_step(traces[overlap], rank, steps - 1)
            early.append(f"{sum(e['start'] < end for e in buckets)}/{len(buckets)}")
        a = mean[overlap] = _averages(traces[overlap])
        print(
            f"overlap={overlap!s:<5}: buckets launched during backward per rank {', '.join(early)};"
            f" forward+backward {a['compute_s'] * 1e3:.1f} ms, exposed communication "
            f"{a['exposed_comm_s'] * 1e3:.1f} ms ({a['hidden']:.0%} hidden)"
        )
    slower = mean[True]["compute_s"] / mean[False]["compute_s"]
    print(f"with overlap, forward+backward took {slower:.2f}x as long")
    return mean


# --- the bucket-size sweep ---------------------------------------------------------------------


def sweep(
    cluster,
    work,
    sizes_mb,
    rounds: int,
    steps: int,
    naive_s: float | None = None,
    overlaps=(True, False),
):
    """Time every bucket size with overlap and/or without (all buckets one size), print the
    table and the spread, and plot it. Returns {(cap, overlap): result}."""
    from matplotlib.figure import Figure

    configs = {
        (cap, overlap): {"bucket_cap_mb": cap, "first_bucket_mb": cap, "overlap": overlap}
        for cap in sizes_mb
        for overlap in overlaps
    }
    result = compare(cluster, work, configs, rounds, steps, label="bucket sizes")
    ms = {key: r["step_s"] * 1e3 for key, r in result.items()}
    print(f"{work.timing()}, ms per step (median, slowest rank)")
    heads = {True: "overlap [ms]", False: "after backward [ms]"}
    print(f"{'bucket_cap_mb':>13} {'buckets':>8} " + " ".join(f"{heads[o]:>20}" for o in overlaps))
    for cap in sizes_mb:
        n = result[cap, overlaps[0]]["buckets"]
        print(f"{cap:>13} {n:>8} " + " ".join(f"{ms[cap, o]:>20.1f}" for o in overlaps))
    for overlap in overlaps:
        row = [ms[cap, overlap] for cap in sizes_mb]
        best = sizes_mb[row.index(min(row))]
        print(f"overlap={overlap!s:<5}: bucket size changed the step {max(row) / min(row):.2f}x; "
              f"fastest at {best} MiB")  # fmt: skip
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for overlap, style, color in ((True, "o-", "tab:blue"), (False, "s--", "tab:orange")):
        if overlap not in overlaps:
            continue
        label = "during backward" if overlap else "after backward"
        ax.plot(sizes_mb, [ms[c, overlap] for c in sizes_mb], style, color=color, label=label)
    for cap in sizes_mb:
        n = result[cap, overlaps[0]]["buckets"]
        ax.annotate(str(n), (cap, ms[cap, overlaps[0]]), textcoords="offset points", xytext=(0, 7))
    if naive_s is not None:
        ax.axhline(naive_s * 1e3, color="tab:red", ls=":", label="naive (one per tensor)")
    ax.set(
        xscale="log",
        xlabel="bucket_cap_mb (numbers: buckets per step)",
        ylabel="ms per step",
        ylim=(0, max(ms.values()) * 1.15),  # room for the bucket counts
        title="time per step against bucket size\n" + work.timing(),
    )
    ax.legend(fontsize="small", loc="lower left")
    _display(fig)
    return result


# --- compression -------------------------------------------------------------------------------


def _train_run(work: Workload, bucket_mb: float, compression, steps: int):
    model = dzl.DDP(work.make_model(), bucket_cap_mb=bucket_mb, compression=compression)
    optimizer = work.make_optimizer(model.parameters())
    for step in range(steps):
        x, y = work.local_batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dzl.emit("loss", step=step, loss=loss.item())
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def compression_run(cluster, work: Workload, bucket_mb: float, steps: int) -> dict:
    """Train twice from the same init, float32 and bf16 all-reduces; plot both losses (mean
    over the ranks: the global batch's loss) and print how far the runs drifted apart."""
    from matplotlib.figure import Figure

    curves, params = {}, {}
    for compression in (None, "bf16"):
        job = cluster.submit(_train_run, work, bucket_mb, compression, steps)
        params[compression] = job.wait()[0]
        losses = [e for e in job.events if e.kind == "loss"]
        curves[compression] = [
            statistics.mean(e["loss"] for e in losses if e["step"] == s) for s in range(steps)
        ]
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(curves[None], color="tab:blue", label="float32 all-reduce")
    left.plot(curves["bf16"], color="tab:orange", label="bf16 all-reduce")
    left.set(xlabel="step", ylabel="loss (MSE)", title="training loss", ylim=(0, None))
    left.legend()
    gap = [b - f for b, f in zip(curves["bf16"], curves[None], strict=True)]
    right.plot(gap, color="tab:purple")
    right.axhline(0, color="gray", linewidth=1)
    right.set(xlabel="step", ylabel="loss difference", title="bf16 minus float32")
    _display(fig)
    drift = (params["bf16"] - params[None]).abs().max().item()
    print(
        f"loss at step 0: {curves[None][0]:.4f}; at the end: float32 {curves[None][-1]:.4f}, "
        f"bf16 {curves['bf16'][-1]:.4f}; largest gap {max(map(abs, gap)):.4f}"
    )
    print(f"largest parameter difference after {steps} steps: {drift:.2e}")
    return {"curves": curves, "drift": drift}
