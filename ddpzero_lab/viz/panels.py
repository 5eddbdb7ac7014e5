"""The dashboard's panels: one function per panel, each drawing a state snapshot on the Axes
it is given (matplotlib's object API only, no pyplot state).

Each function draws what the events say and nothing else; the tests read the numbers back
from the artists. Colours: one per rank (tab10), one per memory category, one per op.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .state import MEMORY_PARTS

PHASES = ("after_forward", "after_backward", "after_step")
PART_COLORS = {
    "params": "#4C72B0",
    "grads": "#DD8452",
    "optimizer": "#55A868",
    "activations": "#C44E52",
    "buffers": "#8172B3",
    "scratch": "#937860",
}
OP_COLORS = {
    "compute": "#B0B0B0",
    "all_reduce": "#4C72B0",
    "reduce_scatter": "#DD8452",
    "all_gather": "#55A868",
    "broadcast": "#8172B3",
    "send": "#C44E52",
    "recv": "#DA8BC3",
    "barrier": "#333333",
    "ring_all_reduce": "#64B5CD",
    "ring_reduce_scatter": "#E8A87C",
    "ring_all_gather": "#8FD694",
}
EVERY_RANK_COLOR = (0.75, 0.75, 0.75)
MB = 1e6


def _rank_color(rank: int):
    from matplotlib import colormaps

    return colormaps["tab10"](rank % 10)


def _empty(ax, title: str, why: str) -> None:
    ax.set_title(title, fontsize=9, loc="left")
    ax.text(
        0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.5"
    )
    ax.set_xticks([])
    ax.set_yticks([])


def draw_memory(ax, snap: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Stacked bar per rank (its latest phase, preferring after_backward, where grads and
    optimizer state coexist) by category; the formula's value as a black tick beside each bar;
    the rank's peak as a dashed line. Returns {rank: {category: bytes}} as drawn."""
    memory = snap["memory"]
    ranks = sorted({r for r, _ in memory})
    if not ranks:
        _empty(ax, "memory per rank", "no memory events yet")
        return {}
    drawn: dict[int, dict[str, float]] = {}
    for rank in ranks:
        phase = next(
            (p for p in ("after_backward", "after_step", "after_forward") if (rank, p) in memory),
            None,
        )
        parts = dict(memory[(rank, phase)])
        # activations are only alive after forward: show them from that phase
        if (rank, "after_forward") in memory:
            parts["activations"] = memory[(rank, "after_forward")]["activations"]
        drawn[rank] = parts
    bottom = np.zeros(len(ranks))
    for part in MEMORY_PARTS:  # one bar call per category: few artists, fast to draw
        values = np.array([drawn[r].get(part, 0.0) / MB for r in ranks])
        ax.bar(
            ranks,
            values,
            bottom=bottom,
            color=PART_COLORS[part],
            width=0.6,
            label=part,
            gid=f"mem:{part}",
        )
        bottom += values
    peaks = [snap["peak"].get(r, 0.0) / MB for r in ranks]
    ax.hlines(
        peaks,
        np.array(ranks) - 0.35,
        np.array(ranks) + 0.35,
        colors="k",
        linestyles="dashed",
        linewidth=0.8,
        gid="peak",
    )
    for rank, value in snap.get("expected_memory", {}).items():
        ax.plot(
            [rank + 0.38],
            [value / MB],
            marker="<",
            color="k",
            markersize=7,
            gid=f"formula:{rank}",
            label="ZeRO formula" if rank == 0 else None,
        )
    formula = [v / MB for v in snap.get("expected_memory", {}).values()]
    ax.set_ylim(0, 1.12 * max([*bottom, *peaks, *formula, 1e-9]))
    ax.set_xticks(ranks)
    ax.set_xlabel("rank", fontsize=8)
    ax.set_ylabel("MB", fontsize=8)
    ax.set_title(
        "memory per rank (model state + activations; ◄ ZeRO formula, -- peak)",
        fontsize=9,
        loc="left",
    )
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return drawn


def shard_image(entries: list[dict], kind: str, world_size: int, width: int = 120) -> np.ndarray:
    """Rows = parameters, columns = positions along each flattened parameter (resampled to
    `width`); each cell holds the owning rank, -1 for every rank, -2 for nobody."""
    image = np.full((max(len(entries), 1), width), -2, dtype=np.int16)
    for row, entry in enumerate(entries):
        numel = max(int(entry["numel"]), 1)
        for rank, start, end in entry.get(kind, []):
            a = int(np.floor(start / numel * width))
            b = max(int(np.ceil(end / numel * width)), a + 1)
            image[row, a:b] = rank
    return image


def draw_shards(axes, snap: dict[str, Any]) -> dict[str, np.ndarray]:
    """Three maps (optimizer state, gradients, parameters): who owns each slice of each
    parameter. Returns the images drawn, keyed by kind."""
    shard_map = snap.get("shard_map")
    kinds = ("optimizer", "grads", "params")
    if not shard_map:
        for ax, kind in zip(axes, kinds, strict=True):
            _empty(ax, f"shards: {kind}", "no shard map yet")
        return {}
    from matplotlib.colors import ListedColormap

    world_size = int(shard_map.get("world_size") or 1)
    entries = list(shard_map.get("params", []))
    colors = [(1, 1, 1, 1), EVERY_RANK_COLOR] + [_rank_color(r) for r in range(world_size)]
    cmap = ListedColormap(colors)
    drawn = {}
    for ax, kind in zip(axes, kinds, strict=True):
        image = shard_image(entries, kind, world_size)
        drawn[kind] = image
        ax.imshow(
            image + 2,
            cmap=cmap,
            vmin=0,
            vmax=len(colors) - 1,
            aspect="auto",
            interpolation="nearest",
            gid=f"shards:{kind}",
        )
        ax.set_title(f"{kind} ({shard_map.get('strategy')})", fontsize=9, loc="left")
        ax.set_xticks([])
        names = [e["name"] for e in entries]
        if len(names) <= 12:
            ax.set_yticks(range(len(names)), names, fontsize=6)
        else:
            ax.set_yticks([])
    return drawn


def draw_traffic(ax, snap: dict[str, Any]) -> dict[int, float]:
    """Cumulative bytes sent per rank over time, with the model's expectation (expected
    bytes per step x completed steps) as dashed lines. Returns {rank: bytes sent so far}."""
    series = snap["sent_over_time"]
    if not series:
        _empty(ax, "traffic", "no collectives yet")
        return {}
    t0 = snap["t0"] or 0.0
    totals = {}
    for rank in sorted(series):
        points = series[rank]
        ax.step(
            [t - t0 for t, _ in points],
            [v / MB for _, v in points],
            where="post",
            color=_rank_color(rank),
            label=f"rank {rank}",
            gid=f"sent:{rank}",
        )
        totals[rank] = points[-1][1]
        expected = snap.get("expected_sent_per_step", {}).get(rank)
        steps = snap["steps"].get(rank, 0)
        if expected and steps:
            ax.axhline(
                expected * steps / MB,
                color=_rank_color(rank),
                linestyle="--",
                linewidth=0.8,
                gid=f"expected:{rank}",
            )
    ax.set_xlabel("seconds", fontsize=8)
    ax.set_ylabel("MB sent (cumulative)", fontsize=8)
    ax.set_title("traffic: sent per rank (dashed: model x steps)", fontsize=9, loc="left")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return totals


def draw_timeline(ax, snap: dict[str, Any], window_s: float = 3.0) -> list[tuple]:
    """Per rank, compute and each collective as bars over time (the last `window_s`
    seconds). Returns the intervals drawn as (rank, kind, start, end) relative to t0."""
    intervals = snap["intervals"]
    if not intervals:
        _empty(ax, "timeline", "no steps or collectives yet")
        return []
    t0 = snap["t0"] or 0.0
    latest = max(end for _, _, _, end in intervals)
    shown = [iv for iv in intervals if iv[3] >= latest - window_s]
    drawn = []
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for rank, kind, start, end in shown:
        bars.setdefault((rank, kind), []).append((start - t0, max(end - start, 1e-4)))
        drawn.append((rank, kind, start - t0, end - t0))
    for (rank, kind), spans in bars.items():  # one artist per rank and kind
        lane = 0.0 if kind == "compute" else 0.45
        ax.broken_barh(
            spans,
            (rank + lane - 0.4, 0.4),
            facecolors=OP_COLORS.get(kind, "#999999"),
            gid=f"bar:{rank}:{kind}",
        )
    ranks = sorted({r for r, *_ in shown})
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks], fontsize=7)
    ax.set_xlabel("seconds", fontsize=8)
    ax.set_title("timeline: compute (grey) and collectives", fontsize=9, loc="left")
    from matplotlib.patches import Patch

    kinds = sorted({k for _, k, *_ in shown})
    ax.legend(
        handles=[Patch(color=OP_COLORS.get(k, "#999999"), label=k) for k in kinds],
        fontsize=6,
        loc="upper left",
        ncol=min(len(kinds), 4),
    )
    return drawn


def draw_loss(ax, snap: dict[str, Any]) -> dict[str, list[float]]:
    """Loss per step per rank (thin) and its mean over ranks (thick)."""
    losses = snap["losses"]
    if not losses:
        _empty(ax, "loss", "no loss events yet (dzl.emit('loss', step=i, loss=...))")
        return {}
    by_step: dict[int, list[float]] = {}
    drawn = {}
    for rank in sorted(losses):
        points = sorted(losses[rank])
        ax.plot(
            [s for s, _ in points],
            [v for _, v in points],
            color=_rank_color(rank),
            linewidth=0.8,
            alpha=0.6,
            label=f"rank {rank}",
            gid=f"loss:{rank}",
        )
        drawn[f"rank {rank}"] = [v for _, v in points]
        for s, v in points:
            by_step.setdefault(s, []).append(v)
    steps = sorted(by_step)
    mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    ax.plot(steps, mean, color="k", linewidth=1.6, label="mean", gid="loss:mean")
    drawn["mean"] = mean
    ax.set_xlabel("step", fontsize=8)
    ax.set_title("loss", fontsize=9, loc="left")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return drawn
