"""The dashboard's panels: one function per panel, each drawing a state snapshot on the Axes
it is given (matplotlib's object API only, no pyplot state).

Each function draws what the events say and nothing else; the tests read the numbers back
from the artists. Colours: one per rank (tab10), one per memory category, one per op.
Bars are drawn as one PolyCollection per colour rather than one Rectangle per bar: a live frame
builds its artists anew, and a collection costs a fraction of a patch per bar.

`legend=False` leaves the legend out but records its labels (`legend_labels(ax)`): a live frame
whose axes, ticks and legend are unchanged reuses the picture of them drawn before
(`render.PanelCanvas`), so only the data is drawn again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.collections import PolyCollection

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


def _boxes(ax, x, bottom, width, height, color, gid: str, label: str | None = None):
    """Rectangles (x centred, from `bottom` up by `height`) as one PolyCollection."""
    x, bottom, height = (np.asarray(v, dtype=float) for v in (x, bottom, height))
    left, right, top = x - width / 2, x + width / 2, bottom + height
    verts = np.stack(
        [
            np.stack([left, bottom], 1),
            np.stack([left, top], 1),
            np.stack([right, top], 1),
            np.stack([right, bottom], 1),
        ],
        axis=1,
    )
    boxes = PolyCollection(verts, facecolors=color, edgecolors="none", gid=gid, label=label)
    ax.add_collection(boxes)
    return boxes


def boxes(collection) -> list[tuple[float, float, float, float]]:
    """(left, bottom, width, height) of each rectangle of a `_boxes` collection: for reading
    a bar chart back."""
    out = []
    for path in collection.get_paths():
        (x0, y0), (x1, y1) = path.vertices[:4].min(0), path.vertices[:4].max(0)
        out.append((float(x0), float(y0), float(x1 - x0), float(y1 - y0)))
    return out


def add_legend(ax, show: bool = True) -> None:
    """Draw the legend if `show`; always record its labels for `legend_labels`."""
    handles = [a for a in [*ax.lines, *ax.collections] if not a.get_label().startswith("_")]
    ax._ddpzero_legend = tuple(h.get_label() for h in handles)
    if show and handles:
        ax.legend(
            handles=handles,
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
            frameon=False,
            handlelength=1.5,
        )


def legend_labels(ax) -> tuple[str, ...]:
    return getattr(ax, "_ddpzero_legend", ())


def _empty(ax, title: str, why: str) -> None:
    ax.set_title(title, fontsize=9, loc="left")
    ax.text(
        0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.5"
    )
    ax.set_xticks([])
    ax.set_yticks([])


def draw_memory(ax, snap: dict[str, Any], legend: bool = True) -> dict[int, dict[str, float]]:
    """Stacked bar per rank (its latest phase, preferring after_backward, where grads and
    optimizer state coexist) by category; the formula's value as a black tick beside each bar.
    Where the memory tracker reported peaks: one letter per phase (F forward, B backward,
    S step) at the rank's highest peak of that phase, with the peak formula's value
    (`Dashboard.expect_peak`) as a grey bar behind it; otherwise the highest total seen, as
    a dashed line. Returns {rank: {category: bytes}} as drawn."""
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
    for part in MEMORY_PARTS:  # one collection per category: few artists, fast to draw
        values = np.array([drawn[r].get(part, 0.0) / MB for r in ranks])
        _boxes(ax, ranks, bottom, 0.6, values, PART_COLORS[part], gid=f"mem:{part}", label=part)
        bottom += values
    heights = _draw_phase_peaks(ax, snap, ranks)
    if not snap.get("phase_peaks"):  # an older recording: the highest total seen
        heights = [snap["peak"].get(r, 0.0) / MB for r in ranks]
        ax.hlines(
            heights,
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
            label="ZeRO formula (at rest)" if rank == 0 else None,
        )
    formula = [v / MB for v in snap.get("expected_memory", {}).values()]
    ax.set_ylim(0, 1.12 * max([*bottom, *heights, *formula, 1e-9]))
    ax.set_xticks(ranks)
    ax.set_xlabel("rank", fontsize=8)
    ax.set_ylabel("MB", fontsize=8)
    ax.set_title(
        "memory per rank (bars: held after backward; F B S: peak of forward, backward, step)",
        fontsize=9,
        loc="left",
    )
    add_legend(ax, legend)
    return drawn


# x offsets of the phases' peak markers within a rank's bar: left to right in step order
PEAK_OFFSETS = {"forward": -0.18, "backward": 0.0, "step": 0.18}


def _draw_phase_peaks(ax, snap: dict[str, Any], ranks: list[int]) -> list[float]:
    """The tracker's peak per rank and phase as a letter, the formula's as a grey bar behind
    it (gids "peak:<phase>:<rank>", "peak_formula:<phase>:<rank>"); returns the heights in MB."""
    peaks, expected = snap.get("phase_peaks", {}), snap.get("expected_peak", {})
    heights = []
    for phase, offset in PEAK_OFFSETS.items():
        value = expected.get(phase)
        for i, rank in enumerate(ranks if value is not None else ()):
            heights.append(value / MB)
            # drawn first: the measured letter sits on it when the two agree
            ax.plot(
                [rank + offset],
                [value / MB],
                marker="_",
                markersize=16,
                markeredgewidth=3,
                color="0.6",
                linestyle="none",
                gid=f"peak_formula:{phase}:{rank}",
                label="peak formula" if i == 0 and phase == "forward" else None,
            )
        letter = f"${phase[0].upper()}$"
        for i, rank in enumerate(r for r in ranks if (r, phase) in peaks):
            heights.append(peaks[(rank, phase)] / MB)
            ax.plot(
                [rank + offset],
                [peaks[(rank, phase)] / MB],
                marker=letter,
                markersize=7,
                color="k",
                linestyle="none",
                gid=f"peak:{phase}:{rank}",
                label="peak per phase" if i == 0 and phase == "forward" else None,
            )
    return heights


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


SHARD_KEY_REPLICATED = "every rank (replicated)"
SHARD_KEY_NOBODY = "no rank"
SHARD_KEY_GATHERED = "gathered for fwd/bwd,\nfreed after use"


def shard_legend(images: dict[str, np.ndarray], world_size: int, strategy: str | None):
    """The shard panel's legend, one entry per colour (and pattern) the maps show, in order:
    [(label, facecolor, hatch)]. ZeRO-3's parameters are sharded at rest, all-gathered for
    their unit's forward and backward and freed right after (ZeRO paper, P_os+g+p): the
    parameter map is hatched for that."""
    shown = set()
    for image in images.values():
        shown.update(np.unique(image).tolist())
    entries = []
    if -1 in shown:
        entries.append((SHARD_KEY_REPLICATED, EVERY_RANK_COLOR, None))
    entries += [
        (f"rank {r}", _rank_color(r), None) for r in range(max(world_size, 1)) if r in shown
    ]
    if -2 in shown:
        entries.append((SHARD_KEY_NOBODY, (1, 1, 1, 1), None))
    if strategy == "zero3":
        entries.append((SHARD_KEY_GATHERED, (0.55, 0.55, 0.55, 1), GATHER_HATCH))
    return entries


GATHER_HATCH = "////"


def draw_shards(axes, snap: dict[str, Any], legend: bool = True) -> dict[str, np.ndarray]:
    """Three maps (optimizer state, gradients, parameters): who owns each slice of each
    parameter, with a legend for every colour. Returns the images drawn, keyed by kind."""
    shard_map = snap.get("shard_map")
    kinds = ("optimizer", "grads", "params")
    if not shard_map:
        for ax, kind in zip(axes, kinds, strict=True):
            _empty(ax, f"shards: {kind}", "no shard map yet")
        return {}
    from matplotlib.colors import ListedColormap

    world_size = int(shard_map.get("world_size") or 1)
    strategy = shard_map.get("strategy")
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
        ax.set_title(f"{kind} ({strategy})", fontsize=9, loc="left")
        ax.set_xticks([])
        names = [e["name"] for e in entries]
        if len(names) <= 12:
            ax.set_yticks(range(len(names)), names, fontsize=6)
        else:
            ax.set_yticks([])
    if strategy == "zero3":  # the gather/free cycle of every parameter, over its map
        rows, cols = drawn["params"].shape
        ax = axes[kinds.index("params")]
        ax.add_collection(
            PolyCollection(
                [[(-0.5, -0.5), (-0.5, rows - 0.5), (cols - 0.5, rows - 0.5), (cols - 0.5, -0.5)]],
                facecolors="none",
                edgecolors="none",
                hatchcolors=[(1, 1, 1, 0.8)],
                hatch=GATHER_HATCH,
                gid="shards:gathered",
            )
        )
    # the legend's entries: empty collections on the last map (the legend sits to its right)
    for label, color, hatch in shard_legend(drawn, world_size, strategy):
        axes[-1].add_collection(
            PolyCollection(
                [],
                facecolors=[color],
                edgecolors=[(0.3, 0.3, 0.3, 1)],
                hatchcolors=[(1, 1, 1, 0.8)],
                linewidths=0.5,
                hatch=hatch,
                label=label,
                gid=f"key:{label}",
            )
        )
    add_legend(axes[-1], legend)
    return drawn


def draw_traffic(ax, snap: dict[str, Any], legend: bool = True) -> dict[int, float]:
    """Cumulative bytes sent per rank over time, with the model's expectation (expected
    bytes per step x completed steps) as dashed lines. The title says which figures are the
    model's and which are payload counted. Returns {rank: bytes sent so far}."""
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
    # the figures are the ring model's for collectives and the payload for send/recv
    # (comm.bytes_source); comm.wire measures what the transport really sent
    ax.set_title(
        "sent per rank: ring model (collectives), payload (send/recv); dashed: model x steps",
        fontsize=8,
        loc="left",
    )
    add_legend(ax, legend)
    return totals


ROWS_PER_RANK = 20  # the timeline image's rows per rank: lanes 0.4 high with gaps of 0.05
_LANES = {"compute": (2, 10), "comm": (11, 19)}  # rows of each lane within a rank's 20


def _kind_color(kind: str):
    return OP_COLORS.get(kind, "#999999")


def timeline_image(
    intervals, lo: float, hi: float, first_rank: int, last_rank: int, kinds, width: int = 800
) -> np.ndarray:
    """The timeline's bars as an RGBA image: `width` columns from `lo` to `hi` seconds,
    ROWS_PER_RANK rows per rank from `first_rank` (bottom) up, compute in the lower lane and
    collectives in the upper one; transparent where nothing runs. One image costs the same
    however many bars it shows, where one rectangle per collective would not."""
    from matplotlib.colors import to_rgba

    rows = (last_rank - first_rank + 1) * ROWS_PER_RANK
    image = np.zeros((rows, width, 4), dtype=np.uint8)
    colors = {k: (np.array(to_rgba(_kind_color(k))) * 255).astype(np.uint8) for k in kinds}
    scale = width / max(hi - lo, 1e-9)
    for rank, kind, start, end in intervals:
        a = min(max(int((start - lo) * scale), 0), width - 1)
        b = min(max(int(np.ceil((end - lo) * scale)), a + 1), width)
        top, bottom = _LANES["compute" if kind == "compute" else "comm"]
        base = (rank - first_rank) * ROWS_PER_RANK
        image[base + top : base + bottom, a:b] = colors[kind]
    return image


def draw_timeline(
    ax, snap: dict[str, Any], legend: bool = True, window_s: float = 3.0
) -> list[tuple]:
    """Per rank, compute and each collective as bars over time (the last `window_s`
    seconds), drawn as one image. Returns the intervals drawn as (rank, kind, start, end)
    relative to t0."""
    intervals = snap["intervals"]
    if not intervals:
        _empty(ax, "timeline", "no steps or collectives yet")
        return []
    t0 = snap["t0"] or 0.0
    latest = max(end for _, _, _, end in intervals)
    shown = [iv for iv in intervals if iv[3] >= latest - window_s]
    drawn = [(rank, kind, start - t0, end - t0) for rank, kind, start, end in shown]
    ranks = sorted({r for r, *_ in shown})
    kinds = sorted({k for _, k, *_ in shown})
    lo = max(latest - window_s, min(start for _, _, start, _ in shown)) - t0
    hi = latest - t0
    image = timeline_image(drawn, lo, hi, ranks[0], ranks[-1], kinds)
    extent = (lo, hi, ranks[0] - 0.5, ranks[-1] + 0.5)
    ax.imshow(
        image, extent=extent, origin="lower", aspect="auto", interpolation="nearest", gid="bars"
    )
    for kind in kinds:  # empty collections: the legend's entries
        ax.add_collection(
            PolyCollection([], facecolors=_kind_color(kind), label=kind, gid=f"key:{kind}")
        )
    ranks = sorted({r for r, *_ in shown})
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks], fontsize=7)
    ax.set_xlabel("seconds", fontsize=8)
    title = "timeline: compute (grey) and collectives"
    if snap.get("link"):  # the collectives' times are an emulated link's: say which
        title += f"\n{snap['link']}"
    ax.set_title(title, fontsize=9 if not snap.get("link") else 8, loc="left")
    add_legend(ax, legend)
    return drawn


def draw_loss(ax, snap: dict[str, Any], legend: bool = True) -> dict[str, list[float]]:
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
    add_legend(ax, legend)
    return drawn
