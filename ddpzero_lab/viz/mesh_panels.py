"""The dashboard's panels for meshes and pipelines: what each rank holds, traffic per process
group, and a pipeline's timeline with its bubble (matplotlib's object API, as panels.py).

Each function draws a `DashboardState` snapshot on the Axes it is given and returns what it
drew, so that tests compare the picture with the events. `PANELS` registers them with the
Dashboard: `dzl.Dashboard(panels=("mesh", "group_traffic", "pipeline"))`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.collections import PolyCollection

from . import panels as P
from .mesh_state import MESH_PANELS

REPLICATED = -1  # as parallel/layout.py: a parameter every rank of its TP group holds whole
LIGHT = 0.3  # share of a slice's colour left where a data-parallel peer owns the ZeRO shard
CELL_ROWS, CELL_COLS = 24, 48  # a mesh cell's picture: the full parameter, resampled to this
DIM_ORDER = ("dp", "tp", "pp")
GROUP_COLORS = {"dp": "#4C72B0", "tp": "#DD8452", "pp": "#55A868", "world": "#8172B3"}
SPAN_COLORS = {"F": "#4C72B0", "B": "#DD8452"}
WAIT_COLOR = "#C44E52"
COUNTED_HATCH = "////"


def _hboxes(ax, spans, y, height, color, gid: str, label: str | None = None, hatch=None):
    """Horizontal boxes [(left, width)] from y to y + height, as one PolyCollection."""
    verts = [
        [(left, y), (left, y + height), (left + width, y + height), (left + width, y)]
        for left, width in spans
    ]
    boxes = PolyCollection(
        verts, facecolors=color, edgecolors="white", linewidths=0.5, gid=gid, label=label
    )
    if hatch:
        boxes.set_hatch(hatch)
    ax.add_collection(boxes)
    return boxes


def _key(ax, label: str, color, hatch=None) -> None:
    """An empty collection: one legend entry."""
    key = PolyCollection([], facecolors=[color], edgecolors=[(0.3, 0.3, 0.3, 1)], linewidths=0.5)
    key.set_label(label)
    key.set_gid(f"key:{label}")
    if hatch:
        key.set_hatch(hatch)
    ax.add_collection(key)


def coordinates_text(coords: dict[str, Any]) -> str:
    """The rank's place, e.g. "dp 0 · tp 1" (pp where present), from its `mesh` fields."""
    parts = [f"{d} {coords[d + '_index']}" for d in DIM_ORDER if f"{d}_index" in coords]
    return " · ".join(parts)


# -- the mesh: who holds which slice of which layer -----------------------------------------
def _owners(shard_map: dict | None, name: str, kind: str = "optimizer") -> list | None:
    """ZeRO's owner ranges of parameter `name` (ranks within the data-parallel group)."""
    if not shard_map:
        return None
    for entry in shard_map.get("params", []):
        if entry["name"] == name or entry["name"].endswith("." + name):
            return entry.get(kind)
    return None


def cell_mask(entry: dict, owners: list | None, dp_rank: int, rows=CELL_ROWS, cols=CELL_COLS):
    """The full parameter as a small grid (resampled to at most rows x cols; exact when it is
    smaller): 0 where this rank holds nothing, 1 where it holds the slice but a data-parallel
    peer owns its ZeRO shard, 2 where it holds the slice and owns it (or nobody shards it)."""
    shape = [int(s) for s in entry["shape"]] or [1]
    if len(shape) == 1:
        shape = [1, shape[0]]
    full_rows, full_cols = shape[0], int(np.prod(shape[1:]))
    grid_rows, grid_cols = min(full_rows, rows), min(full_cols, cols)
    r = ((np.arange(grid_rows) + 0.5) * full_rows / grid_rows).astype(int)[:, None]
    c = ((np.arange(grid_cols) + 0.5) * full_cols / grid_cols).astype(int)[None, :]
    dim, start, end = int(entry["tp_dim"]), int(entry["start"]), int(entry["end"])
    if len(entry["shape"]) == 1 and dim == 0:
        dim = 1  # a vector is drawn as one row: its split runs along the columns
    if dim == 0:
        held = (r >= start) & (r < end) & (c >= 0)
        local = (r - start) * full_cols + c
    elif dim == 1:
        held = (c >= start) & (c < end) & (r >= 0)
        local = r * (end - start) + (c - start)
    else:
        held = np.ones((grid_rows, grid_cols), dtype=bool)
        local = r * full_cols + c
    if owners is None:
        return np.where(held, 2, 0).astype(np.int8)
    mine = np.zeros_like(held)
    for owner, lo, hi in owners:
        if owner in (dp_rank, REPLICATED):
            mine |= (local >= lo) & (local < hi)
    return np.where(held, np.where(mine, 2, 1), 0).astype(np.int8)


def _shape_text(entry: dict) -> str:
    """The full shape and how tensor parallelism splits it (by rows of W in a column-parallel
    layer, by columns in a row-parallel one)."""
    shape, dim = "×".join(map(str, entry["shape"])), int(entry["tp_dim"])
    if dim == REPLICATED:
        return f"{shape} whole"
    return f"{shape} split" if len(entry["shape"]) == 1 else f"{shape} {('rows', 'cols')[dim]}"


def _short(name: str, width: int = 12) -> str:
    """A parameter's name as the tick beside its row has room for: its end."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _dp_rank(rank: int, coords: dict[str, Any]) -> int:
    return int(coords.get("dp_index", rank))


def _slice_index(entry: dict) -> int:
    width = int(entry["end"]) - int(entry["start"])
    return int(entry["start"]) // width if width else 0


def draw_mesh(ax, snap: dict[str, Any], legend: bool = True) -> dict[str, Any]:
    """A grid: a row per parameter, a column per rank (with its mesh coordinates); each cell is
    the full parameter, coloured where the rank holds it (by tensor-parallel slice; grey where
    its group replicates it), pale where a data-parallel peer owns that part's ZeRO shard.
    Returns {"cells": {(name, rank): cell_mask}, "coordinates": {rank: text}}."""
    from matplotlib.colors import to_rgba

    layouts, coordinates = snap.get("layouts", {}), snap.get("coordinates", {})
    if not layouts:
        why = "no layout yet: parallel.layout.emit_layout(model) on every rank"
        if coordinates:
            why = " | ".join(f"rank {r}: {coordinates_text(c)}" for r, c in coordinates.items())
        P._empty(ax, "mesh", why)
        return {"cells": {}, "coordinates": {}}
    ranks = sorted(set(layouts) | set(coordinates))
    names: list[str] = []
    shapes: dict[str, str] = {}  # name -> "16×8, rows split": the tick beside its row
    for rank in ranks:
        for entry in layouts.get(rank, []):
            if entry["name"] not in shapes:
                names.append(entry["name"])
                shapes[entry["name"]] = _shape_text(entry)
    shard_map = snap.get("shard_map")
    cells, slices = {}, set()
    for row, name in enumerate(names):
        owners = _owners(shard_map, name)
        for column, rank in enumerate(ranks):
            entry = next((e for e in layouts.get(rank, []) if e["name"] == name), None)
            if entry is None:
                continue
            mask = cell_mask(entry, owners, _dp_rank(rank, coordinates.get(rank, {})))
            cells[(name, rank)] = mask
            split = int(entry["tp_dim"]) != REPLICATED
            base = np.array(
                to_rgba(P._rank_color(_slice_index(entry)) if split else P.EVERY_RANK_COLOR)
            )
            slices.add(_slice_index(entry) if split else REPLICATED)
            pale = base * LIGHT + (1 - LIGHT)
            picture = np.ones((*mask.shape, 4))
            picture[mask == 2] = base
            picture[mask == 1] = pale
            picture[..., 3] = 1.0
            ax.imshow(
                picture,
                extent=(column - 0.42, column + 0.42, row + 0.4, row - 0.4),
                aspect="auto",
                interpolation="nearest",
                gid=f"mesh:{name}:{rank}",
            )
            ax.add_collection(
                PolyCollection(
                    [[(column - 0.42, row - 0.4), (column - 0.42, row + 0.4),
                      (column + 0.42, row + 0.4), (column + 0.42, row - 0.4)]],
                    facecolors="none", edgecolors=[(0.6, 0.6, 0.6, 1)], linewidths=0.5,
                )
            )  # fmt: skip
    ax.set_xlim(-0.5, len(ranks) - 0.5)
    ax.set_ylim(len(names) - 0.5, -0.5)
    labels = {r: coordinates_text(coordinates.get(r, {})) for r in ranks}
    ax.set_xticks(range(len(ranks)), [f"rank {r}\n{labels[r]}".strip() for r in ranks])
    ax.set_yticks(
        range(len(names)),
        [f"{_short(n)}\n{shapes[n]}" for n in names],
        fontsize=6 if len(names) <= 6 else 5,
    )
    for index in sorted(s for s in slices if s != REPLICATED):
        _key(ax, f"TP slice {index}", P._rank_color(index))
    if REPLICATED in slices:
        _key(ax, "whole on every TP rank", P.EVERY_RANK_COLOR)
    strategy = (shard_map or {}).get("strategy")
    if shard_map:
        _key(ax, "pale: a DP peer's\nZeRO shard", (1 - LIGHT) + LIGHT * np.array([0.3, 0.3, 0.3]))
    dims = "×".join(d for d in DIM_ORDER if any(f"{d}_size" in c for c in coordinates.values()))
    title = f"mesh ({dims or 'no mesh events'}): each rank's slice of each parameter"
    if strategy:
        title += f"; solid: its {strategy} optimizer-state shard"
    ax.set_title(title, fontsize=9, loc="left")
    P.add_legend(ax, legend)
    return {"cells": cells, "coordinates": labels}


# -- traffic per process group --------------------------------------------------------------
def group_names(coordinates: dict[int, dict[str, Any]]) -> dict[str, str]:
    """Group label ("0,2", "world") -> what the mesh events call it ("dp", "tp", "pp")."""
    names: dict[str, list[str]] = {}
    for coords in coordinates.values():
        for dim in DIM_ORDER:
            label = coords.get(f"{dim}_group")
            if label is not None and dim not in names.setdefault(label, []):
                names[label].append(dim)
    return {label: "+".join(dims) for label, dims in names.items()}


def _dims_first(kind: str) -> tuple[int, str]:
    first = kind.split("+")[0]
    return (DIM_ORDER.index(first) if first in DIM_ORDER else len(DIM_ORDER), kind)


def _unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= scale:
            return scale, unit
    return 1.0, "bytes"


def draw_group_traffic(ax, snap: dict[str, Any], legend: bool = True) -> dict[int, dict]:
    """Bytes each rank sent, one bar per process group it used (coloured by the group's mesh
    dimension); solid: the cost model's bytes of the collectives, hatched: bytes counted as
    sent (send/recv and ring.py's rings). Returns {rank: {group: {"model", "counted"}}}."""
    traffic = snap.get("group_traffic", {})
    if not traffic:
        P._empty(ax, "traffic per process group", "no collectives yet")
        return {}
    kinds = group_names(snap.get("coordinates", {}))
    ranks = sorted(traffic)
    # bars side by side by the group's kind (dp, tp, pp, others): each rank's dp bar in the
    # same place
    slots = sorted({kinds.get(g, g) for r in ranks for g in traffic[r]}, key=_dims_first)
    width = 0.8 / len(slots)
    largest = max([sum(v.values()) for r in ranks for v in traffic[r].values()] + [1.0])
    scale, unit = _unit(largest)
    drawn: dict[int, dict] = {}
    placed: dict[str, list] = {}
    for rank in ranks:
        drawn[rank] = {}
        for label in sorted(traffic[rank], key=lambda g: _dims_first(kinds.get(g, g))):
            entry = traffic[rank][label]
            drawn[rank][label] = dict(entry)
            slot = slots.index(kinds.get(label, label))
            x = rank - 0.4 + (slot + 0.5) * width
            placed.setdefault(kinds.get(label, label), []).append(
                (x, entry["model"] / scale, entry["counted"] / scale, label)
            )
    for kind, bars in placed.items():
        color = GROUP_COLORS.get(kind.split("+")[0], GROUP_COLORS["world"])
        xs = [b[0] for b in bars]
        model = np.array([b[1] for b in bars])
        name = kind if kind in DIM_ORDER or "+" in kind else f"group {kind}"
        counts = [b[2] for b in bars]
        # a legend entry only for what this group sent: "pp: cost model" at 0 says nothing
        P._boxes(ax, xs, np.zeros(len(xs)), width * 0.9, model, color, gid=f"model:{kind}",
                 label=f"{name}: cost model" if model.any() else None)  # fmt: skip
        hatched = P._boxes(ax, xs, model, width * 0.9, counts, "white", gid=f"counted:{kind}",
                           label=f"{name}: counted" if any(counts) else None)  # fmt: skip
        hatched.set_edgecolor(color)
        hatched.set_hatch(COUNTED_HATCH)
        for x, m, c, label in bars:
            if m + c > 0:
                ax.text(x, m + c, label, ha="center", va="bottom", fontsize=5, color="0.3")
    ax.set_xlim(min(ranks) - 0.5, max(ranks) + 0.5)
    ax.set_ylim(0, 1.18 * largest / scale)
    coordinates = snap.get("coordinates", {})
    ax.set_xticks(
        ranks, [f"rank {r}\n{coordinates_text(coordinates.get(r, {}))}".strip() for r in ranks]
    )
    ax.set_ylabel(f"{unit} sent", fontsize=8)
    ax.set_title(
        "traffic per process group (solid: ring/chain model of the collective; "
        "hatched: bytes counted, send/recv)",
        fontsize=9,
        loc="left",
    )
    P.add_legend(ax, legend)
    return drawn


# -- the pipeline's timeline ----------------------------------------------------------------
def pipeline_step(pipeline: dict[int, list[dict]]) -> tuple[int | None, dict[int, dict]]:
    """The newest step every stage has reported (else the newest of each), {rank: event}."""
    if not pipeline:
        return None, {}
    steps = [{e["step"] for e in events} for events in pipeline.values()]
    common = set.intersection(*steps)
    if common:
        step = max(common)
        return step, {r: next(e for e in ev if e["step"] == step) for r, ev in pipeline.items()}
    return None, {r: ev[-1] for r, ev in pipeline.items()}


def draw_pipeline(ax, snap: dict[str, Any], legend: bool = True) -> dict[str, Any]:
    """One step of a pipeline: a row per stage, a box per micro-batch's forward (F) and
    backward (B), a thin red bar while a stage waits in a recv; white is idle, the bubble.
    Times are seconds from the first stage's start. Returns {"step", "boxes": {rank: [(kind,
    i, begin, end)]}, "waits": {rank: [...]}, "bubble": the stages' mean idle share}."""
    step, events = pipeline_step(snap.get("pipeline", {}))
    if not events:
        P._empty(ax, "pipeline", "no pipeline steps yet (PipelineStage.step)")
        return {}
    t0 = min(e["start"] for e in events.values())
    finish = max(e["start"] + e["seconds"] for e in events.values())
    span = max(finish - t0, 1e-9)
    boxes, waits, idle = {}, {}, []
    for rank, event in events.items():
        y, offset = int(event["stage"]), event["start"] - t0
        boxes[rank] = [(k, int(i), b + offset, e + offset) for k, i, b, e in event["spans"]]
        waits[rank] = [(t, int(i), b + offset, e + offset) for t, i, b, e in event["waits"]]
        for kind in ("F", "B"):
            mine = [(b, e - b) for k, _, b, e in boxes[rank] if k == kind]
            _hboxes(ax, mine, y - 0.35, 0.6, SPAN_COLORS[kind], gid=f"{kind}:{rank}")
        _hboxes(ax, [(b, e - b) for _, _, b, e in waits[rank]], y + 0.27, 0.1, WAIT_COLOR,
                gid=f"wait:{rank}")  # fmt: skip
        if len(boxes[rank]) <= 24:
            for kind, i, b, e in boxes[rank]:
                ax.text((b + e) / 2, y - 0.05, f"{kind}{i}", ha="center", va="center",
                        fontsize=5.5, color="white")  # fmt: skip
        idle.append(1.0 - sum(e - b for _, _, b, e in boxes[rank]) / span)
    _key(ax, "forward (F)", SPAN_COLORS["F"])
    _key(ax, "backward (B)", SPAN_COLORS["B"])
    _key(ax, "waiting in recv", WAIT_COLOR)
    _key(ax, "idle: the bubble", (1, 1, 1, 1))
    any_event = next(iter(events.values()))
    p, m = int(any_event["stages"]), int(any_event["micro_batches"])
    bubble = sum(idle) / len(idle)
    stages = sorted(events, key=lambda r: events[r]["stage"])
    ax.set_xlim(0, span * 1.01)
    ax.set_ylim(p - 0.5, -0.5)
    ax.set_yticks(
        [events[r]["stage"] for r in stages],
        [f"stage {events[r]['stage']}\nrank {r}" for r in stages],
        fontsize=7,
    )
    link = any_event.get("link")
    ax.set_xlabel(
        "seconds since the step began, " + (f"measured under {link}" if link else "real time"),
        fontsize=8,
    )
    ax.set_title(
        f"pipeline {any_event['schedule']}, p = {p}, m = {m}, step {step}: idle {bubble:.0%} "
        f"of the step; (p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.0%}",
        fontsize=9,
        loc="left",
    )
    P.add_legend(ax, legend)
    return {"step": step, "boxes": boxes, "waits": waits, "bubble": bubble, "span": span}


PANELS = dict(zip(MESH_PANELS, (draw_mesh, draw_group_traffic, draw_pipeline), strict=True))
