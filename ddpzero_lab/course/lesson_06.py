"""Notebook 06 (ZeRO-2: gradients reduce-scattered during backward): the tables, pictures and
instrumentation the lesson calls in one line.

It owns: the stage formulas for the lesson's model, the picture of one bucket's reduce-scatter,
the bucket table, the timed trace of one ZeRO-2 step (run on the ranks) and its picture, the
memory and traffic tables, and the step timed under an emulated link with the reduce-scatters
during and after backward (`time_overlap`). The lesson's cells do the training and the checks.
"""

from __future__ import annotations

import statistics
import time

from ..memory import STAGE_NAMES, zero_memory_estimate

PARTS = ("params", "grads", "optimizer", "scratch")
TENSOR_COLORS = ("#c6dbef", "#fdd0a2", "#c7e9c0")  # one light colour per tensor of the toy bucket


def _show(fig) -> None:
    # a matplotlib Figure (not pyplot): nothing stays open between cells
    from IPython.display import display

    display(fig)


def stage_formulas(num_params: int, world_size: int) -> None:
    """Notebook 04's formulas (fp32 AdamW: 4 + 4 + 8 bytes) for stages 0-2, in one line each."""
    est = {
        s: zero_memory_estimate(num_params, world_size, s, preset="fp32_adam") for s in (0, 1, 2)
    }
    for stage, e in est.items():
        print(
            f"stage {stage} {STAGE_NAMES[stage]:<8} grads {e['grads']:>12,.0f}  "
            f"total {e['total']:>12,.0f} bytes per rank"
        )
    saved = est[1]["total"] - est[2]["total"]
    print(f"stage 2 saves 4Ψ·(N-1)/N = {saved:,.0f} bytes per rank over stage 1")


def draw_toy(toy, sizes, world_size: int) -> None:
    """Each rank's padded bucket before the reduce-scatter, and the slice it holds after."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    numel, padded = sum(sizes), toy[0][0].numel()
    size = padded // world_size
    tensor_of = [k for k, n in enumerate(sizes) for _ in range(n)]  # which tensor each element is
    fig = Figure(figsize=(max(6.0, 0.6 * padded + 2), 1.4 + 1.0 * world_size), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)

    def cell(ax, column, row, text, face):
        hatch = "///" if face == "white" else None  # the padding: zeros
        ax.add_patch(Rectangle((column, row), 1, 1, facecolor=face, edgecolor="0.4", hatch=hatch))
        ax.text(column + 0.5, row + 0.5, text, ha="center", va="center", fontsize=8)

    for rank, (before, mine) in enumerate(toy):
        for i in range(padded):
            face = TENSOR_COLORS[tensor_of[i]] if i < numel else "white"
            cell(top, i, rank, f"{before[i]:.0f}", face)
            if rank * size <= i < (rank + 1) * size:  # rank r keeps slice r only
                cell(bottom, i, rank, f"{mine[i - rank * size]:.3g}", face)
    for ax, title in (
        (top, "before: each rank's padded bucket"),
        (bottom, "after: slice r, the mean"),
    ):
        for k in range(1, world_size):
            ax.axvline(k * size, color="black", linewidth=2.5)
        ax.set(xlim=(0, padded), ylim=(world_size, 0), title=title)
        ax.set_yticks(
            [r + 0.5 for r in range(world_size)], [f"rank {r}" for r in range(world_size)]
        )
    _show(fig)


def bucket_table(layouts) -> None:
    """The real model's buckets: elements, padding, and each rank's slice."""
    for k, (names, numel, padded, _) in enumerate(layouts[0]):
        slices = ", ".join(
            f"rank {r} [{lay[k][3][0]:,}, {lay[k][3][1]:,})" for r, lay in enumerate(layouts)
        )
        print(f"bucket {k}: {numel:>9,} + {padded - numel} padding ({', '.join(names)}); {slices}")


def traced(make_model, make_optimizer, local_batch, bucket_cap_mb: float, steps: int) -> dict:
    """On a rank: train `steps` ZeRO-2 steps and time the last one; at every gradient's
    arrival, sample the bytes of gradient shards and of bucket buffers still alive."""
    import torch.distributed as dist
    from torch import nn

    from .. import device, model_state_bytes, parallelize

    model, optimizer = parallelize(
        make_model().to(device()), "zero2", optimizer=make_optimizer, bucket_cap_mb=bucket_cap_mb
    )
    samples = []  # (time, gradient-shard bytes, bucket-buffer bytes)

    def sample(_=None):
        held = model_state_bytes(model, optimizer)
        samples.append((time.time(), held["grads"], held["scratch"]))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(sample)  # runs just after the strategy's hook
    for step in range(steps):
        x, y = local_batch(step)
        dist.barrier()  # line the ranks up, so the last step's picture compares them
        samples.clear()
        start = time.time()
        nn.functional.mse_loss(model(x), y).backward()
        last_gradient = samples[-1][0]
        sample()  # backward has returned
        optimizer.step()
        optimizer.zero_grad()
    return {"start": start, "last_gradient": last_gradient, "samples": list(samples)}


def draw_trace(trace, events, num_params: int) -> dict:
    """Rank lanes (compute, reduce-scatters, all-gathers) and rank 0's gradient bytes over one
    step. Returns {rank: (reduce-scatters launched before the last gradient, all of them)}."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    world_size = len(trace)
    t0 = min(t["start"] for t in trace)

    def ms(seconds):
        return (seconds - t0) * 1e3

    fig = Figure(figsize=(10, 2.0 + 0.8 * world_size), layout="constrained")
    lanes, held = fig.subplots(2, 1, sharex=True, height_ratios=[world_size, 2])
    colors = {"reduce_scatter": "tab:orange", "all_gather": "tab:green"}
    early = {}
    for rank, t in enumerate(trace):
        mine = [
            e
            for e in events
            if e.kind == "collective" and e.rank == rank and e["start"] >= t["start"]
        ]
        lanes.broken_barh(
            [(ms(t["start"]), ms(t["last_gradient"]) - ms(t["start"]))],
            (rank + 0.05, 0.3),
            facecolors="0.6",
        )
        for row, (op, color) in enumerate(colors.items()):
            spans = [
                (ms(e["start"]), max(ms(e["end"]) - ms(e["start"]), 0.05))
                for e in mine
                if e["op"] == op
            ]
            lanes.broken_barh(spans, (rank + 0.42 + 0.28 * row, 0.22), facecolors=color)
        launched = [e for e in mine if e["op"] == "reduce_scatter"]
        early[rank] = (sum(e["start"] <= t["last_gradient"] for e in launched), len(launched))
    lanes.set(ylim=(world_size, 0), title="one ZeRO-2 step")
    lanes.set_yticks([r + 0.5 for r in range(world_size)], [f"rank {r}" for r in range(world_size)])
    lanes.legend(
        handles=[
            Patch(color="0.6", label="forward + backward"),
            Patch(color="tab:orange", label="reduce-scatter"),
            Patch(color="tab:green", label="all-gather"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize="small",
    )
    times = [ms(s) for s, _, _ in trace[0]["samples"]]
    full = 4 * num_params / 1e6  # one full copy of the fp32 gradients, in MB
    held.step(
        times, [g / 1e6 for _, g, _ in trace[0]["samples"]], where="post", label="gradient shards"
    )
    held.step(
        times,
        [(g + s) / 1e6 for _, g, s in trace[0]["samples"]],
        where="post",
        label="+ bucket buffers",
    )
    held.axhline(full, color="black", linestyle="--", linewidth=1, label="4Ψ")
    held.axhline(full / world_size, color="black", linestyle=":", linewidth=1, label="4Ψ/N")
    held.set(xlabel="ms since the first rank began forward", ylabel="MB, rank 0", ylim=(0, None))
    held.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    _show(fig)
    return early


def memory_table(held: dict, num_params: int, world_size: int) -> None:
    """Bytes on rank 0 after backward and after the step, with the stage formula beside."""
    stages = {"ddp": 0, "zero1": 1, "zero2": 2}
    print(f"{'rank 0':<22}" + "".join(f"{p:>11}" for p in PARTS) + f"{'total':>11}{'formula':>11}")
    for strategy, events in held.items():
        formula = zero_memory_estimate(num_params, world_size, stages[strategy], preset="fp32_adam")
        for phase in ("after_backward", "after_step"):
            e = events[0, phase]
            row = "".join(f"{e[p]:>11,}" for p in PARTS)
            total = sum(e[p] for p in PARTS)
            print(f"{strategy:<6}{phase:<16}{row}{total:>11,}{formula['total']:>11,.0f}")


def traffic_line(measured: dict, world_size: int, num_params: int) -> None:
    """Bytes rank 0 sent per step, by strategy, against 2·(N-1)/N·4Ψ."""
    unit = 2 * (world_size - 1) / world_size * 4 * num_params
    print(f"2·(N-1)/N·4Ψ = {unit:,.0f} bytes; rank 0 sent per step:")
    for strategy, per_rank in measured.items():
        r = per_rank[0]
        parts = {op: c["sent"] / r["steps"] for op, c in r["traffic"].items()}
        detail = ", ".join(f"{op} {v:,.0f}" for op, v in parts.items())
        print(f"  {strategy:<6} {sum(parts.values()) / unit:.4f} x  ({detail})")


# -- overlap under an emulated link ------------------------------------------------------------
def _compute_rate_on_rank(size: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of this rank's float32 matmuls on its device (link.compute_rate on a CPU)."""
    import torch

    from .. import device
    from ..comm.link import compute_rate

    here = device()
    if here.type != "cuda":
        return compute_rate()  # the rank's own threads, as it computes in a step
    a, b = torch.randn(size, size, device=here), torch.randn(size, size, device=here)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(here)
        start = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize(here)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def scaled_link(cluster, name: str = "nvlink4", accelerator: str = "h100"):
    """The preset `name` scaled to `accelerator`, by the compute rate the ranks measure on
    their device (on a CPU one thread each, all at once, as they compute in a step): a step's
    ratio of compute to communication is then the accelerator's."""
    from ..comm.link import Link

    rates = cluster.run(_compute_rate_on_rank)
    return Link.preset(name, accelerator, compute_flops=statistics.median(rates))


def _zero2_steps_on_rank(make_model, make_optimizer, batch, bucket_cap_mb, link, steps, overlap):
    """Seconds per ZeRO-2 step on this rank under `link` (the first step, a warm-up, left out)."""
    from .. import device, parallelize
    from ..projection import time_steps

    model, optimizer = parallelize(
        make_model().to(device()),
        "zero2",
        optimizer=make_optimizer,
        bucket_cap_mb=bucket_cap_mb,
        overlap=overlap,
        track_memory=False,
    )
    return time_steps(model, optimizer, batch, link, steps)


def time_overlap(
    cluster, make_model, make_optimizer, batch, bucket_cap_mb, link, steps=5, runs=2
) -> dict:
    """Median step time (the slowest rank's) of ZeRO-2 with the reduce-scatters launched after
    backward and during it, in alternating runs; prints both and the gain."""
    ms = {False: [], True: []}
    args = (make_model, make_optimizer, batch, bucket_cap_mb, link, steps)
    for run in range(runs):  # alternate, so that neither setting always goes first
        for overlap in (False, True) if run % 2 == 0 else (True, False):
            per_rank = cluster.run(_zero2_steps_on_rank, *args, overlap)
            slowest = [max(each) for each in zip(*per_rank, strict=True)]
            ms[overlap].append(1e3 * statistics.median(slowest))
    after, during = (statistics.median(ms[k]) for k in (False, True))
    print(f"measured under {link.describe()}, {cluster.world_size} ranks:")
    print(f"  reduce-scatters after backward:  {after:6.0f} ms per step")
    print(f"  reduce-scatters during backward: {during:6.0f} ms per step")
    print(f"  overlap gain {after / during:.2f}x (runs: {_runs(ms)})")
    return {"after": after, "during": during, "gain": after / during}


def _runs(ms: dict) -> str:
    return "; ".join(
        f"{'on' if k else 'off'} " + ", ".join(f"{v:.0f}" for v in values)
        for k, values in ms.items()
    )
