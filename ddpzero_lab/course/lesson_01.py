"""Lesson 01 (collectives): the chunk grids, link diagrams, the ring on paper, and the timing
sweep with its pictures. The notebook calls each in one line; what it teaches (the
collectives, the ring, the α-β fit) stays in its cells.

Pictures: a chunk grid has one row per rank and one column per chunk; a cell's colour is the
rank whose input the value comes from, grey is a sum over ranks (darker: more ranks). A link
diagram puts the ranks on a circle; an arrow a -> b is data a sends to b, labelled in bytes.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

import torch
import torch.distributed as dist
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, Rectangle

from ..comm import AlphaBeta, backend_device, fit_alpha_beta
from .progress import progress

REDUCED = "0.25"  # dark grey: summed over every rank
EMPTY = "0.94"  # light grey: nothing there (not written, or not kept)


def _rank_color(r: int) -> str:
    return f"C{r % 10}"


def _partial_grey(count: int, n: int) -> str:
    """Grey for a sum over `count` of `n` ranks: lighter for fewer, REDUCED for all."""
    return str(round(0.85 - 0.6 * (count - 1) / max(n - 1, 1), 3))


def _ink(color) -> str:
    # white text on dark cells, black on light ones, so every label stays readable
    r, g, b = to_rgb(color)
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.55 else "black"


def chunk_values(t: torch.Tensor, n: int) -> list:
    """The value each of n chunks holds (in lesson 01 every element of a chunk is equal)."""
    return [chunk[0].item() if chunk.numel() else None for chunk in t.tensor_split(n)]


def _kib(nbytes: float) -> str:
    return f"{nbytes / 1024:g} KiB"


def draw_grid(ax, labels, colors, title, outline=(), fontsize=9) -> None:
    """labels[r][c], colors[r][c]: one row per rank, one column per chunk; outline: red rings."""
    rows, cols = len(labels), len(labels[0])
    for r in range(rows):
        for c in range(cols):
            ax.add_patch(Rectangle((c, r), 1, 1, facecolor=colors[r][c], edgecolor="white", lw=2))
            ax.text(
                c + 0.5, r + 0.5, labels[r][c], ha="center", va="center",
                fontsize=fontsize, color=_ink(colors[r][c]),
            )  # fmt: skip
    for r, c in outline:
        ax.add_patch(
            Rectangle((c + 0.06, r + 0.06), 0.88, 0.88, fill=False, edgecolor="red", lw=2.5)
        )
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_xticks([c + 0.5 for c in range(cols)], [f"chunk {c}" for c in range(cols)], fontsize=8)
    ax.set_yticks([r + 0.5 for r in range(rows)], [f"rank {r}" for r in range(rows)], fontsize=8)
    ax.tick_params(length=0)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    for spine in ax.spines.values():
        spine.set_visible(False)


def draw_links(ax, n, links, title) -> None:
    """Ranks on a circle (rank 0 on top, clockwise); links = [(src, dst, label)] as arrows."""
    pos = [(math.sin(2 * math.pi * r / n), math.cos(2 * math.pi * r / n)) for r in range(n)]
    nodes = []
    for r, (x, y) in enumerate(pos):
        node = Circle((x, y), 0.2, facecolor=_rank_color(r), edgecolor="none")
        ax.add_patch(node)
        ax.text(x, y, str(r), ha="center", va="center", color="white", fontweight="bold")
        nodes.append(node)
    for src, dst, label in links:
        ax.add_patch(
            FancyArrowPatch(
                pos[src], pos[dst], patchA=nodes[src], patchB=nodes[dst], arrowstyle="-|>",
                mutation_scale=14, color="0.3", connectionstyle="arc3,rad=-0.25", linewidth=1.5,
            )
        )  # fmt: skip
        mx, my = (pos[src][0] + pos[dst][0]) / 2, (pos[src][1] + pos[dst][1]) / 2
        norm = math.hypot(mx, my) or 1.0
        scale = (norm + 0.3) / norm  # push the label outside the arrow
        ax.text(mx * scale, my * scale, label, ha="center", va="center", fontsize=8)
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-1.45, 1.45)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=10)


def plot_collective(op: str, results, n: int, src: int = 0) -> Figure:
    """Before, after, and the cost model's links for one collective.

    results[r] = (input, output, counters): what the notebook's do_<op> returned on rank r.
    The arrows carry the counters' bytes, which are the cost model's (not measured).
    """
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    ax_in, ax_out, ax_links = fig.subplots(1, 3, width_ratios=[1, 1, 0.9])

    def values(t):
        return [f"{v:g}" if v is not None else "" for v in chunk_values(t, n)]

    def one_chunk(r, t):  # a one-chunk tensor shown in column r only
        return [f"{t[0].item():g}" if c == r else "" for c in range(n)]

    own = [[_rank_color(r)] * n for r in range(n)]
    diagonal = [[_rank_color(r) if c == r else EMPTY for c in range(n)] for r in range(n)]
    if op == "all_gather":
        draw_grid(ax_in, [one_chunk(r, i) for r, (i, _, _) in enumerate(results)], diagonal,
                  "input: rank r holds chunk r")  # fmt: skip
    else:
        draw_grid(ax_in, [values(i) for i, _, _ in results], own, "input: each rank its own")
    if op == "broadcast":
        after, colors = [values(o) for _, o, _ in results], [[_rank_color(src)] * n] * n
    elif op == "all_reduce":
        after, colors = [values(o) for _, o, _ in results], [[REDUCED] * n] * n
    elif op == "reduce_scatter":
        after = [one_chunk(r, o) for r, (_, o, _) in enumerate(results)]
        colors = [[REDUCED if c == r else EMPTY for c in range(n)] for r in range(n)]
    else:  # all_gather: chunk c came from rank c
        after, colors = [values(o) for _, o, _ in results], [[_rank_color(c) for c in range(n)]] * n
    draw_grid(ax_out, after, colors, f"after {op}")
    sent = [counts["sent"] for *_, counts in results]
    if op == "broadcast":  # a chain from src
        links = [
            ((src + d) % n, (src + d + 1) % n, _kib(sent[(src + d) % n])) for d in range(n - 1)
        ]
        shape = "chain"
    else:
        links = [(r, (r + 1) % n, _kib(sent[r])) for r in range(n)]
        shape = "ring"
    draw_links(ax_links, n, links, f"{shape} model: bytes each rank sends")
    return fig


def model_bytes_table(ops: dict) -> None:
    """Print each rank's sent/received bytes as dzl.traffic() holds them for built-in ops:
    the cost model's figures, labelled so."""
    print("MODEL bytes per rank (dzl.traffic() for built-in ops = cost_model, not the wire)")
    n = len(next(iter(ops.values())))
    print(f"{'op':<15} " + " ".join(f"{'rank ' + str(r) + ' sent/recv':>20}" for r in range(n)))
    for op, results in ops.items():
        cells = [f"{c['sent']:>9,.0f}/{c['recv']:<9,.0f}" for *_, c in results]
        print(f"{op:<15} " + " ".join(f"{cell:>20}" for cell in cells))


def busiest_rank_bytes(nbytes: float, sizes) -> None:
    """Print the bytes through the busiest rank for three ways to sum nbytes over N ranks."""
    for n in sizes:
        schemes = {
            "everyone sends to everyone": (n - 1) * nbytes,  # sent by each rank
            "all to rank 0, then back": (n - 1) * nbytes,  # received, then sent, by rank 0
            "ring": 2 * (n - 1) / n * nbytes,  # sent by each rank
        }
        line = ", ".join(f"{k}: {v / 1e6:.0f} MB" for k, v in schemes.items())
        print(f"N = {n:>3}: {line}")


def ring_frames(n: int) -> list:
    """The ring all-reduce on paper, no messages. Frames of (title, state, moves): state[r][c]
    is the set of ranks summed into rank r's chunk c; moves: (sender, receiver, chunk)."""
    state = [[{r} for _ in range(n)] for r in range(n)]
    frames = [("start", [row[:] for row in state], [])]
    for s in range(n - 1):  # phase 1: reduce-scatter, rank r sends chunk (r - s) mod n
        moves = [(r, (r + 1) % n, (r - s) % n) for r in range(n)]
        new = [row[:] for row in state]
        for src, dst, c in moves:
            new[dst][c] = state[dst][c] | state[src][c]  # add what arrived
        state = new
        frames.append((f"reduce-scatter step {s}", [row[:] for row in state], moves))
    for s in range(n - 1):  # phase 2: all-gather, rank r sends chunk (r + 1 - s) mod n
        moves = [(r, (r + 1) % n, (r + 1 - s) % n) for r in range(n)]
        new = [row[:] for row in state]
        for src, dst, c in moves:
            new[dst][c] = set(state[src][c])  # overwrite with what arrived
        state = new
        frames.append((f"all-gather step {s}", [row[:] for row in state], moves))
    return frames


def _draw_ring_frame(ax, n, title, state, moves) -> None:
    labels = [
        ["all" if len(c) == n else "+".join(map(str, sorted(c))) if n <= 4 else str(len(c))
         for c in row]
        for row in state
    ]  # fmt: skip
    colors = [
        [_rank_color(r) if len(c) == 1 else _partial_grey(len(c), n) for c in row]
        for r, row in enumerate(state)
    ]
    draw_grid(ax, labels, colors, title, outline=[(dst, c) for _, dst, c in moves], fontsize=8)
    red = dict(color="red", linewidth=1.5)
    for src, dst, c in moves:
        x = c + 0.5
        if dst == src + 1:  # down one row
            ax.annotate("", xy=(x, dst + 0.3), xytext=(x, src + 0.7),
                        arrowprops=dict(arrowstyle="-|>", **red))  # fmt: skip
        else:  # rank n-1 -> rank 0: out at the bottom (dashed), in at the top
            ax.annotate("", xy=(x, n + 0.45), xytext=(x, src + 0.7),
                        arrowprops=dict(arrowstyle="-", linestyle="--", **red))  # fmt: skip
            ax.annotate("", xy=(x, 0.3), xytext=(x, -0.45),
                        arrowprops=dict(arrowstyle="-|>", linestyle="--", **red))  # fmt: skip
    ax.set_ylim(n + 0.5, -0.5)


def plot_ring_phase(n: int, phase: int) -> Figure:
    """Phase 1 (reduce-scatter) or 2 (all-gather) of the ring on paper, one panel per step.
    Labels name the ranks summed ("0+3"; "all"); red rings mark chunks that just arrived."""
    frames = ring_frames(n)
    shown = frames[:n] if phase == 1 else [("after phase 1", frames[n - 1][1], [])] + frames[n:]
    fig = Figure(figsize=(3.4 * n, 3.7), layout="constrained")
    axes = fig.subplots(1, len(shown))
    for ax, (title, state, moves) in zip(axes, shown, strict=True):
        _draw_ring_frame(ax, n, title, state, moves)
    fig.suptitle(
        "phase 1, reduce-scatter: pass a partial sum right, add the one from the left"
        if phase == 1
        else "phase 2, all-gather: the finished chunks travel once around the ring"
    )
    return fig


def time_all_reduce(numels, repeats) -> list[float]:
    """On a rank: the median seconds of dist.all_reduce for each size (float32 elements).

    A warm-up call first (buffers, connections), and a barrier before each timed call so
    the ranks start together: this times the collective, not a late arrival.
    """
    medians = []
    for numel in numels:
        t = torch.ones(numel, device=backend_device())  # nccl moves only CUDA tensors
        dist.all_reduce(t)
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return medians


def sweep(cluster, numels, repeats) -> tuple[list[int], list[float]]:
    """Time the all-reduce sweep on the cluster; a collective ends with its slowest rank, so
    each size keeps the largest of the ranks' medians. Prints the MEASURED table."""
    per_rank = cluster.run(time_all_reduce, numels, repeats, dashboard=progress("all-reduce sweep"))
    seconds = [max(column) for column in zip(*per_rank, strict=True)]
    nbytes = [numel * 4 for numel in numels]
    n = cluster.world_size
    print(f"MEASURED on this machine, N = {n}")
    print(f"{'bytes':>10} {'time':>10} {'bus bandwidth':>14}")
    for b, s in zip(nbytes, seconds, strict=True):
        print(f"{b:>10} {s * 1e6:>8.0f} µs {2 * (n - 1) / n * b / s / 1e9:>10.3f} GB/s")
    return nbytes, seconds


def fit_sweep(nbytes, seconds, n: int) -> AlphaBeta:
    """α and β of the ring all-reduce: a line T = 2(N-1)·α + x·β in x = 2(N-1)/N·B."""
    line = fit_alpha_beta([2 * (n - 1) / n * b for b in nbytes], seconds)
    return AlphaBeta(alpha=line.alpha / (2 * (n - 1)), beta=line.beta)


def describe(name: str, model: AlphaBeta) -> None:
    bandwidth = f"{model.bandwidth / 1e9:.2f} GB/s" if model.beta > 0 else "unbounded (β = 0)"
    adds = f"   adds at 1/γ = {1 / model.gamma / 1e9:.2f} GB/s" if model.gamma > 0 else ""
    print(f"{name:<34} α = {model.alpha * 1e6:7.1f} µs   1/β = {bandwidth}{adds}")


def plot_sweep(nbytes, seconds, fit: AlphaBeta, link: AlphaBeta, n: int) -> Figure:
    """Measured time and bus bandwidth against size, with both α-β models' predictions."""
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax_time, ax_bw = fig.subplots(1, 2)
    steps = 4 * round(math.log2(nbytes[-1] / nbytes[0]))
    dense = [nbytes[0] * 2 ** (k / 4) for k in range(steps + 1)]
    models = [(fit, "-", "α-β fitted to the sweep"), (link, "--", "α-β from the ping-pong")]
    ax_time.loglog(nbytes, [s * 1e6 for s in seconds], "o", color="black", label="measured")
    for model, style, name in models:
        ax_time.loglog(dense, [model.predict("all_reduce", b, n) * 1e6 for b in dense], style,
                       label=f"model: {name}")  # fmt: skip
    ax_time.set(xlabel="message size B (bytes)", ylabel="all_reduce time (µs)",
                title=f"all_reduce on this machine, N = {n}")  # fmt: skip
    ax_time.legend(fontsize=8)
    bus = [2 * (n - 1) / n * b / s / 1e9 for b, s in zip(nbytes, seconds, strict=True)]
    ax_bw.semilogx(nbytes, bus, "o-", color="black", label="measured bus bandwidth")
    for model, style, name in models:
        if model.beta > 0:
            predicted = [
                2 * (n - 1) / n * b / model.predict("all_reduce", b, n) / 1e9 for b in dense
            ]
            ax_bw.semilogx(dense, predicted, style, label=f"model: {name}")
    ax_bw.set(xlabel="message size B (bytes)", ylabel="bus bandwidth (GB/s)", ylim=(0, None),
              title="bus bandwidth = 2(N-1)/N·B / time")  # fmt: skip
    ax_bw.legend(fontsize=8)
    return fig


def _gloo_reduce_scatter(out: torch.Tensor, x: torch.Tensor) -> None:
    with warnings.catch_warnings():  # torch names a successor that not every version has
        warnings.simplefilter("ignore", FutureWarning)
        dist.reduce_scatter_tensor(out, x)


def _wire_and_model(numel: int) -> list[tuple[str, int | None, int]]:
    """On every rank: each op's bytes on loopback (all ranks together; rank 0's figure) and
    the model's Σ over ranks of the bytes sent."""
    from ..comm import all_gather, all_reduce, broadcast, reduce_scatter, traffic_model, wire

    n, r = dist.get_world_size(), dist.get_rank()
    x, out = torch.ones(numel), torch.empty(numel // n)
    runs = {
        "all_reduce": ("all_reduce", lambda: all_reduce(x)),
        "reduce_scatter": ("reduce_scatter", lambda: reduce_scatter(out, x)),
        "all_gather": ("all_gather", lambda: all_gather(x, out)),
        "broadcast": ("broadcast", lambda: broadcast(x, 0)),
        # gloo's own reduce-scatter, for comparison: not through comm/
        "gloo's reduce_scatter_tensor": ("reduce_scatter", lambda: _gloo_reduce_scatter(out, x)),
    }
    rows = []
    for name, (op, run) in runs.items():
        model = sum(traffic_model(op, numel, 4, n, rank)[0] for rank in range(n))
        rows.append((name, wire.wire_bytes(run), model))
    return rows if r == 0 else []


def wire_table(cluster, numel: int) -> dict[str, float]:
    """Print, per op on a float32 tensor of `numel` elements, the model's bytes (Σ over
    ranks) beside the bytes measured on the loopback interface; returns measured/model."""
    rows = cluster.run(_wire_and_model, numel)[0]
    if any(measured is None for _, measured, _ in rows):
        print("no loopback counters on this machine (/proc/net/dev is Linux's): nothing measured")
        return {}
    print(f"payload {numel * 4 / 1e6:.1f} MB, N = {cluster.world_size}, all ranks together")
    print(f"{'op':<30} {'model [MB]':>11} {'loopback [MB]':>14} {'measured/model':>15}")
    ratios = {}
    for name, measured, model in rows:
        ratios[name] = measured / model
        print(f"{name:<30} {model / 1e6:>11.3f} {measured / 1e6:>14.3f} {ratios[name]:>15.3f}")
    return ratios
