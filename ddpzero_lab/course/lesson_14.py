"""Lesson 14 (tensor and pipeline parallelism, ZeRO in a 2-D mesh): the tables and pictures the
notebook calls in one line, a layer of known compute time, and the reference order of work.
The pipeline timelines, the mesh and the traffic per group are the dashboard's own panels
(viz/mesh_panels.py).

Nothing here trains: the lesson's cells do that on the cluster. `SleepyLayer` sleeps a fixed
time in forward and twice that in backward, so that a pipeline's timeline has a clean shape on
any laptop; `reference_order` is PipelineStage.order() for any stage count, without a cluster.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from torch import nn

from ..parallel.pipeline import PipelineStage, ideal_bubble

RANK_COLORS = "tab10"


def _show(fig) -> None:
    from IPython.display import display

    display(fig)


# -- tensor parallelism --------------------------------------------------------------------
def draw_split(d_model: int, hidden: int, tp: int) -> None:
    """Megatron's MLP as Y = GeLU(X A) B: A split by columns, B by rows, coloured by rank."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    ranks = colormaps[RANK_COLORS]
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[hidden, d_model * 1.3])
    for r in range(tp):
        w = hidden / tp
        left.add_patch(Rectangle((r * w, 0), w, d_model, color=ranks(r), alpha=0.8))
        left.text(
            (r + 0.5) * w,
            d_model / 2,
            f"rank {r}\n{d_model}×{hidden // tp}",
            ha="center",
            va="center",
            color="white",
            fontsize=9,
        )
        right.add_patch(
            Rectangle(
                (0, d_model * 0 + (tp - 1 - r) * hidden / tp),
                d_model,
                hidden / tp,
                color=ranks(r),
                alpha=0.8,
            )
        )
        right.text(
            d_model / 2,
            (tp - 1 - r + 0.5) * hidden / tp,
            f"rank {r}\n{hidden // tp}×{d_model}",
            ha="center",
            va="center",
            color="white",
            fontsize=9,
        )
    left.set(xlim=(0, hidden), ylim=(0, d_model), xticks=[], yticks=[])
    left.set_title(f"A ({d_model}×{hidden}): column-parallel, f before it")
    right.set(xlim=(0, d_model), ylim=(0, hidden), xticks=[], yticks=[])
    right.set_title(f"B ({hidden}×{d_model}): row-parallel, g after it")
    _show(fig)


def slice_table(per_rank: list[dict], full: dict) -> None:
    """Each rank's parameter shapes against the full layers'."""
    names = list(full)
    print(
        f"{'parameter':<13}{'full':>12}"
        + "".join(f"{'rank ' + str(r):>12}" for r in range(len(per_rank)))
    )
    for name in names:
        row = "".join(f"{'×'.join(map(str, shapes[name])):>12}" for shapes in per_rank)
        print(f"{name:<13}{'×'.join(map(str, full[name])):>12}{row}")


def count_table(counts: dict) -> None:
    """All-reduces per block, measured on rank 0, against Megatron's count."""
    print(f"{'block':<20}{'forward':>9}{'backward':>10}{'paper':>8}")
    for block, (fwd, bwd, paper) in counts.items():
        print(f"{block:<20}{fwd:>9}{bwd:>10}{paper:>8}")


# -- pipeline parallelism ------------------------------------------------------------------
class _Sleeps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)  # a backward costs about two forwards
        return grad, None


class SleepyLayer(nn.Module):
    """A stage of known compute: `seconds` per forward, twice that per backward."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return _Sleeps.apply(x * self.scale, self.seconds)


def reference_order(stage: int, stages: int, micro_batches: int, schedule: str = "1f1b"):
    """PipelineStage.order() for stage `stage` of `stages`, without a process group."""
    fake = SimpleNamespace(
        stage=stage, stages=stages, micro_batches=micro_batches, schedule=schedule
    )
    return PipelineStage.order(fake)


def bubble(timeline, seconds: float) -> float:
    busy = sum(end - begin for _, _, begin, end in timeline)
    return 1.0 - busy / seconds


def bubble_table(measured: dict, stages: int) -> None:
    """Measured bubble (the stages' mean) per schedule and m, against (p-1)/(m+p-1)."""
    ms = sorted({m for _, m in measured})
    schedules = sorted({s for s, _ in measured}, key=["gpipe", "1f1b"].index)
    print(f"{'m':>3}{'formula':>10}" + "".join(f"{s:>10}" for s in schedules))
    for m in ms:
        row = "".join(f"{measured[(s, m)]:>10.1%}" for s in schedules)
        print(f"{m:>3}{ideal_bubble(stages, m):>10.1%}{row}")


def draw_bubbles(measured: dict, stages: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.2), layout="constrained")
    ax = fig.subplots()
    ms = sorted({m for _, m in measured})
    grid = [m / 4 for m in range(4, 4 * max(ms) + 1)]
    ax.plot(
        grid,
        [ideal_bubble(stages, m) for m in grid],
        color="black",
        linewidth=1,
        label="(p-1)/(m+p-1)",
    )
    for schedule, marker in (("gpipe", "o"), ("1f1b", "x")):
        ax.plot(
            ms,
            [measured[(schedule, m)] for m in ms],
            marker,
            markersize=8,
            label=f"{schedule}, measured",
        )
    top = min(1.0, max([*measured.values(), ideal_bubble(stages, min(ms))]) + 0.1)
    ax.set(xlabel="micro-batches m", ylabel="idle share of the step", ylim=(0, top))
    ax.set_title(f"the bubble shrinks as m grows (p = {stages})")
    ax.legend(fontsize="small")
    _show(fig)


def in_flight_table(held: dict, micro_batches: int) -> None:
    """The most micro-batches each stage held at once, against m (GPipe) and p - s (1F1B)."""
    stages = len(next(iter(held.values())))
    print(f"{'stage':>5}{'gpipe':>8}{'m':>4}{'1f1b':>8}{'p-s':>5}")
    for s in range(stages):
        print(
            f"{s:>5}{held['gpipe'][s]:>8}{micro_batches:>4}{held['1f1b'][s]:>8}"
            f"{min(stages - s, micro_batches):>5}"
        )


# -- two dimensions ------------------------------------------------------------------------
def group_table(per_rank: list, steps: int, formulas: dict) -> None:
    """Bytes each rank sent per step, per group and op, with the group's kind and formula."""
    print(
        f"{'rank':>4} {'(dp, tp)':>9} {'group':>6} {'kind':<14}{'op':<16}{'calls':>6}"
        f"{'sent':>9}{'formula':>9}"
    )
    for rank, (coords, groups, kinds) in enumerate(per_rank):
        for label, ops in sorted(groups.items()):
            for op, c in sorted(ops.items()):
                kind = kinds.get(label, "world")
                want = formulas.get((kind, op))
                print(
                    f"{rank:>4} {str(coords):>9} {label:>6} {kind:<14}{op:<16}"
                    f"{c['calls'] / steps:>6g}{c['sent'] / steps:>9,.0f}"
                    f"{'' if want is None else f'{want:,.0f}':>9}"
                )
