"""Notebook 05 (ZeRO-1: the optimizer state sharded): the tables and pictures the lesson calls
in one line, so that its cells show the idea and not the plotting.

It owns: the share of the optimizer state in the model states, the owner table and picture of
the flat buffer, the description of one rank's shard, and the traffic and memory tables.
Nothing here trains or communicates; the lesson's cells do that on the cluster.
"""

from __future__ import annotations

from ..memory import zero_memory_estimate

RANK_COLORS = "tab10"  # the dashboard's shard panel colours ranks the same way
OPS = ("all_reduce", "reduce_scatter", "all_gather")


def _show(fig) -> None:
    # a matplotlib Figure (not pyplot): nothing stays open between cells
    from IPython.display import display

    display(fig)


def optimizer_share(world_size: int) -> None:
    """Bytes per parameter with Adam, and what ZeRO-1 (P_os) leaves of them on N ranks."""
    for preset, label in (("mixed_adam", "mixed-precision Adam"), ("fp32_adam", "fp32 Adam")):
        dp = zero_memory_estimate(1, world_size, stage=0, preset=preset)
        pos = zero_memory_estimate(1, world_size, stage=1, preset=preset)
        print(
            f"{label:<21} {dp['params']:g} + {dp['grads']:g} + {dp['optimizer']:g} = "
            f"{dp['total']:g} bytes per parameter; optimizer state "
            f"{dp['optimizer'] / dp['total']:.0%}; with P_os on {world_size} ranks "
            f"{pos['total']:g} bytes ({dp['total'] / pos['total']:.2f}x less)"
        )


def owner_table(layout, names, world_size: int) -> None:
    """Who owns which elements of each parameter (in the parameter's own numbering)."""
    pad = layout.padded_numel - layout.numel
    size = layout.padded_numel // world_size
    print(
        f"Ψ = {layout.numel:,}, padded to {layout.padded_numel:,} (+{pad}): "
        f"S = {size:,} elements per rank"
    )
    print(f"{'parameter':<9} {'offset':>8} {'elements':>9}   owners (rank: [start, end))")
    for index, name in enumerate(names):
        owners = ", ".join(f"{r}: [{a:,}, {b:,})" for r, a, b in layout.owners(index, world_size))
        print(f"{name:<9} {layout.offsets[index]:>8,} {layout.sizes()[index]:>9,}   {owners}")


def draw_layout(layout, names, world_size: int) -> None:
    """The flat buffer to scale, by parameter and by owner; then each parameter on its own."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    ranks = colormaps[RANK_COLORS]
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    top, middle = fig.subplots(2, 1, height_ratios=[1, 2])
    for index, name in enumerate(names):
        start, size = layout.offsets[index], layout.sizes()[index]
        top.broken_barh([(start, size)], (1, 0.9), facecolors=colormaps["Pastel2"](index))
        if size > 0.06 * layout.padded_numel:  # label only the tensors wide enough to read
            top.text(start + size / 2, 1.45, name, ha="center", va="center", fontsize=8)
    for rank in range(world_size):
        lo, hi = layout.shard_range(rank, world_size)
        top.broken_barh([(lo, hi - lo)], (0, 0.9), facecolors=ranks(rank))
        top.text((lo + hi) / 2, 0.45, f"rank {rank}", ha="center", va="center", color="white")
    top.set(xlim=(0, layout.padded_numel), ylim=(0, 2), yticks=[0.45, 1.45])
    top.set_yticklabels(["owner", "parameter"])
    top.set_title(f"one flat buffer of {layout.padded_numel:,} elements, {world_size} slices")
    for row in range(len(names)):
        numel = layout.sizes()[row]
        for rank, a, b in layout.owners(row, world_size):
            # each parameter stretched to the same width, so small ones are visible too
            middle.broken_barh(
                [(a / numel, (b - a) / numel)], (row - 0.4, 0.8), facecolors=ranks(rank)
            )
    middle.set(xlim=(0, 1), yticks=range(len(names)), xlabel="position within the parameter")
    middle.set_yticklabels(names)
    middle.set_title("which rank owns which part of each parameter")
    middle.invert_yaxis()
    _show(fig)


def describe_shard(info: dict, num_params: int, rank: int = 1) -> None:
    """One rank's view of ZeRO-1: what it owns, the gradients it holds, its optimizer state."""
    lo, hi = info["lo"], info["hi"]
    print(f"rank {rank} owns elements [{lo:,}, {hi:,}) of the flat buffer ({hi - lo:,} of them):")
    for name, a, b in info["owns"]:
        print(f"  {name:<9} elements [{a:,}, {b:,})")
    print(f"gradients it holds: {info['grad_elements']:,} elements (Ψ = {num_params:,})")
    if info["state"]:
        for key, numel in info["state"].items():
            print(f"optimizer state {key}: {numel:,} elements = {numel / num_params:.1%} of Ψ")
    else:
        print("optimizer state: none yet (Adam creates it at its first step)")


def traffic_table(traffic: dict, unit: float, world_size: int, num_params: int) -> None:
    """Bytes each rank sent per step, by collective, in units of one model-sized collective."""
    print(
        f"one reduce-scatter or all-gather of the model: each rank sends (N-1)/N · 4Ψ = "
        f"{world_size - 1}/{world_size} · 4 · {num_params:,} = {unit:,.0f} bytes"
    )
    print(f"{'setup':<22} {'rank':>4}" + "".join(f"{op:>15}" for op in OPS) + f"{'in units':>10}")
    for setup, per_rank in traffic.items():
        for rank, (sent, _) in enumerate(per_rank):
            row = "".join(f"{sent.get(op, 0):>15,.0f}" for op in OPS)
            print(f"{setup:<22} {rank:>4}{row}{sum(sent.values()) / unit:>10.3f}")


def draw_traffic(traffic: dict, unit: float) -> None:
    """Rank 0's bytes per step, stacked by collective, against the 2 and 3 units."""
    from matplotlib.figure import Figure

    colors = dict(zip(OPS, ("#4C72B0", "#DD8452", "#55A868"), strict=True))
    fig = Figure(figsize=(7.5, 3.4), layout="constrained")
    ax = fig.subplots()
    for x, per_rank in enumerate(traffic.values()):
        bottom = 0.0
        for op in OPS:
            height = per_rank[0][0].get(op, 0) / unit
            ax.bar(x, height, bottom=bottom, color=colors[op], label=op if x == 0 else None)
            bottom += height
    for level in (2, 3):
        ax.axhline(level, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(traffic)), list(traffic))
    ax.set(ylabel="bytes sent per step\n[units of (N-1)/N · 4Ψ]", ylim=(0, 3.6))
    ax.set_title("ZeRO-1 sends what DDP sends; behind DDP it sends 1.5x")
    ax.legend(fontsize="small", loc="upper left")
    _show(fig)


def memory_table(held: dict, num_params: int, slice_numel: int) -> None:
    """Model-state bytes per rank after optimizer.step(), DDP against ZeRO-1."""
    keys = ("params", "grads", "optimizer", "exp_avg", "exp_avg_sq", "step")
    print(f"{'':<14}" + "".join(f"{k:>12}" for k in keys))
    for strategy, per_rank in held.items():
        for rank, measured in enumerate(per_rank):
            row = "".join(f"{measured.get(k, 0):>12,}" for k in keys)
            print(f"{strategy + ' rank ' + str(rank):<14}{row}")
    print(f"8Ψ = {8 * num_params:,} bytes of Adam state in one copy; 8S = {8 * slice_numel:,}")
