"""Lesson 04 (memory anatomy): the tables, the plots and the per-stage measurement.

The notebook teaches the byte counts and the ZeRO stage formulas and keeps the training loop
in view; this module owns what only gathers, prints and draws: the memory events of a job by
(rank, step, phase), the measured-against-formula table, the phase-by-phase bars, the
activation plot, Table 1 of the ZeRO paper, the stage curves, and the model-state bytes of one
step under each ZeRO stage measured on the ranks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.memory import PAPER_TABLE_1, STAGE_NAMES, memory_table, zero_memory_estimate

MB = 1e6  # decimal megabytes: the paper counts decimal GB
COLORS = {
    "params": "tab:blue",
    "grads": "tab:orange",
    "optimizer": "tab:green",
    "activations": "tab:red",
    "scratch": "tab:gray",
    "buffers": "tab:purple",
}
PHASES = ("after_forward", "after_backward", "after_step")
STRATEGIES = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}  # the strategy of each stage
STAGES = tuple(STRATEGIES)


def _display(fig) -> None:
    from IPython.display import display

    display(fig)


def memory_events(job) -> dict:
    """A finished job's `memory` events keyed by (rank, step, phase)."""
    return {(e.rank, e["step"], e["phase"]): e for e in job.events if e.kind == "memory"}


def state_table(memory: dict, adam: dict, num_params: int, num_tensors: int, steps: int) -> int:
    """Print rank 0's model states at the end of the last step beside fp32 Adam's 4 + 4 + 8
    bytes per parameter, Adam's state by name, and whether every rank holds the same.
    Returns the measured total."""
    world_size = 1 + max(rank for rank, _, _ in memory)
    last = memory[0, steps - 1, "after_step"]
    formula = zero_memory_estimate(num_params, world_size, stage=0, preset="fp32_adam")
    rows = [
        ("params", last["params"], formula["params"], "4Ψ"),
        ("grads", last["grads"], formula["grads"], "4Ψ"),
        ("optimizer", last["optimizer"], formula["optimizer"], "8Ψ"),
        ("  exp_avg", adam["exp_avg"], 4 * num_params, "4Ψ momentum"),
        ("  exp_avg_sq", adam["exp_avg_sq"], 4 * num_params, "4Ψ variance"),
        ("  step", adam["step"], 0, f"{num_tensors} tensors x 4 bytes"),
    ]
    total = last["params"] + last["grads"] + last["optimizer"]
    rows.append(("total", total, formula["total"], "16Ψ"))
    print(f"{'category':<13} {'measured [B]':>13} {'formula [B]':>13} {'difference':>10}")
    for name, measured, want, note in rows:
        print(f"{name:<13} {measured:>13,} {want:>13,.0f} {measured - want:>10,.0f}   {note}")
    same = all(
        memory[r, steps - 1, "after_step"][k] == last[k]
        for r in range(world_size)
        for k in ("params", "grads", "optimizer")
    )
    print(f"every rank holds the same model states: {same}")
    return total


def phase_bars(memory: dict, num_params: int, steps: int) -> None:
    """One panel per rank: stacked bytes after forward, backward and step, first and last
    step, with 16Ψ as a dashed line."""
    from matplotlib.figure import Figure

    world_size = 1 + max(rank for rank, _, _ in memory)
    drawn = [c for c in COLORS if any(e[c] for e in memory.values())]  # skip empty categories
    short = {"after_forward": "fwd", "after_backward": "bwd", "after_step": "opt"}
    bars = [(s, p) for s in (0, steps - 1) for p in PHASES]
    labels = [short[p] + (f"\nstep {s}" if p == "after_backward" else "") for s, p in bars]
    fig = Figure(figsize=(3.3 * world_size, 4.2), layout="constrained")
    axes = fig.subplots(1, world_size, sharey=True, squeeze=False)[0]
    for rank, ax in enumerate(axes):
        bottom = [0.0] * len(bars)
        for category in drawn:
            heights = [memory[rank, s, p][category] / MB for s, p in bars]
            label = category if rank == 0 else None
            ax.bar(range(len(bars)), heights, bottom=bottom, color=COLORS[category], label=label)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        label = "16Ψ (formula)" if rank == 0 else None
        ax.axhline(16 * num_params / MB, color="black", ls="--", lw=1, label=label)
        ax.axvline(len(PHASES) - 0.5, color="lightgray", lw=1)  # first step | last step
        ax.set_xticks(range(len(bars)), labels, fontsize="small")
        ax.set_title(f"rank {rank}")
    axes[0].set_ylabel("bytes held [MB]")
    fig.legend(loc="outside lower center", ncol=len(drawn) + 1, fontsize="small")
    _display(fig)


def activation_plot(batch_sizes, measured, per_sample: int, num_params: int) -> None:
    """Measured activation bytes against the per-sample formula, log-log, with 16Ψ."""
    from matplotlib.figure import Figure

    crossover = 16 * num_params / per_sample
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    line = [1, max(max(batch_sizes), crossover) * 2]
    color = COLORS["activations"]
    ax.plot(line, [b * per_sample / MB for b in line], "--", color=color, label="formula")
    ax.plot(batch_sizes, [m / MB for m in measured], "o", color=color, label="measured (rank 0)")
    ax.axhline(16 * num_params / MB, color="black", lw=1.2, label="model states, 16Ψ")
    ax.axvline(crossover, color="gray", ls=":", lw=1)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="local batch size b",
        ylabel="bytes [MB]",
        title="activations grow with the batch; model states do not",
    )
    ax.legend(fontsize="small")
    _display(fig)
    print(f"activations pass the model states from a local batch of about {crossover:.0f}")


def table_1(num_params: float = 7.5e9) -> None:
    """Print Table 1's rows for one model from the formulas, and whether they equal the
    paper's printed cells."""
    world_sizes = list(PAPER_TABLE_1[num_params])
    text = memory_table(num_params, world_sizes)
    print(text)
    ours = {
        int(row.split()[0]): tuple(row.split()[2:])  # the P_os, P_os+g, P_os+g+p columns
        for row in text.splitlines()[1:]
    }
    paper = {n: tuple(str(v) for v in cells) for n, cells in PAPER_TABLE_1[num_params].items()}
    print(f"equal to the paper's Table 1, cell by cell: {ours == paper}")


def stage_curves(budget_gb: float = 32) -> None:
    """Model states per rank against N_d for Table 1's three models, with a device line."""
    from matplotlib.figure import Figure

    world_sizes = [2**k for k in range(11)]
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    axes = fig.subplots(1, 3, sharex=True)
    for ax, psi in zip(axes, PAPER_TABLE_1, strict=True):
        for stage, name in STAGE_NAMES.items():
            gb = [zero_memory_estimate(psi, n, stage)["total"] / 1e9 for n in world_sizes]
            ax.plot(world_sizes, gb, "o-" if stage else "--", markersize=3, label=name)
        ax.axhline(budget_gb, color="black", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="ranks N_d", title=f"Ψ = {psi:.3g}")
        ax.set_xticks(world_sizes[::2], [str(n) for n in world_sizes[::2]])
    axes[0].set_ylabel("model states per rank [GB]")
    axes[0].legend(fontsize="small")
    _display(fig)


def _one_step_bytes(make_model, make_batch, stage: int) -> dict:
    # on a rank: one AdamW step under the stage's strategy, then the bytes this rank holds
    model, optimizer = dzl.parallelize(
        make_model(),
        STRATEGIES[stage],
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    x, y = make_batch(0, 8)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # Adam's state exists from the first step on
    return dzl.model_state_bytes(model, optimizer)


def measure_stages(cluster, make_model, make_batch) -> dict:
    """{stage: rank 0's model-state bytes after one step} for stages 0-3, printed."""
    measured = {s: cluster.run(_one_step_bytes, make_model, make_batch, s)[0] for s in STAGES}
    print(f"{'stage':<10} {'params':>12} {'grads':>12} {'optimizer':>12}   bytes on rank 0")
    for stage, b in measured.items():
        cells = " ".join(f"{b[k]:>12,}" for k in ("params", "grads", "optimizer"))
        print(f"{STAGE_NAMES[stage]:<10} {cells}")
    return measured


def against_measured(formula, measured: dict, num_params: int, world_size: int) -> str:
    """Check a stage formula (fp32 Adam: 4 + 4 + 8 bytes) against bytes measured per stage.

    Allowed: 0.1% (Adam's per-tensor step counters, padding to a multiple of N_d).
    """
    worst = 0.0
    for stage, got in measured.items():
        want = formula(num_params, world_size, stage, 4, 4, 8)
        for key in ("params", "grads", "optimizer"):
            expected = want[key]
            gap = abs(got[key] - expected) / expected
            worst = max(worst, gap)
            if gap > 1e-3:
                raise AssertionError(
                    f"{STAGE_NAMES[stage]} {key}: the formula says {expected:,.0f} bytes per "
                    f"rank, rank 0 holds {got[key]:,}"
                )
    return f"and within {worst:.1e} of the bytes measured on rank 0 for every stage"


def smallest_fits(num_params: float, budget_gb: float) -> None:
    """Print, per stage, the first N_d (a power of two up to 1024) at which the model states
    of mixed-precision Adam fit `budget_gb`, or the floor a stage never goes below."""
    for stage, name in STAGE_NAMES.items():
        fits = [
            2**k
            for k in range(11)
            if zero_memory_estimate(num_params, 2**k, stage)["total"] / 1e9 <= budget_gb
        ]
        if fits:
            print(f"{name:<9} fits from N_d = {fits[0]}")
        else:
            floor = zero_memory_estimate(num_params, 10**9, stage)["total"] / 1e9
            print(f"{name:<9} never fits: it stays above {math.floor(floor)} GB at any N_d")
