"""Lesson 04 (memory anatomy): the tables, the plots and the per-stage measurement.

The notebook teaches the byte counts and the ZeRO stage formulas and keeps the training loop
in view; this module owns what only gathers, prints and draws: the memory events of a job by
(rank, step, phase), the measured-against-formula table, the phase-by-phase bars, the
activation plot, Table 1 of the ZeRO paper, the stage curves, and the model-state bytes of one
step under each ZeRO stage measured on the ranks. Section 6 (peak versus at rest): each
strategy's peak per phase against the peak formula, drawn with the dashboard's memory panel;
the tiny GPT's activations against batch and sequence length; activation checkpointing's
saving and its step-time cost, timed with plain and checkpointed steps interleaved.
"""

from __future__ import annotations

import math
import statistics
import time

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


# -- section 6: peak versus at rest ------------------------------------------------------------

PEAK_PHASES = ("forward", "backward", "step")
PEAK_STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


def _train_steps(make_model, make_batch, strategy: str, local_batch: int, steps: int) -> None:
    # on a rank: `steps` AdamW steps; parallelize's tracker sends the memory events (and peaks)
    model, optimizer = dzl.parallelize(
        make_model(), strategy, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3)
    )
    for step in range(steps):
        x, y = make_batch(step, local_batch)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def measure_peaks(cluster, make_model, make_batch, local_batch: int, steps: int = 3) -> dict:
    """Train each strategy `steps` steps and fold its events into a memory dashboard with the
    peak formula (activations: what rank 0's last forward saved). Returns {strategy: {"peaks":
    {phase: rank 0's last peak event}, "activations", "formula", "dashboard"}}."""
    from ddpzero_lab.memory import peak_memory_estimate_for
    from ddpzero_lab.viz import Dashboard

    out = {}
    world_size = cluster.world_size
    for strategy in PEAK_STRATEGIES:
        job = cluster.submit(_train_steps, make_model, make_batch, strategy, local_batch, steps)
        job.wait()
        events = memory_events(job)
        peaks = {
            phase: events[0, steps - 1, f"after_{phase}"]
            for phase in ("forward", "backward", "step")
        }
        activations = peaks["forward"]["activations"]  # saved by the forward
        formula = peak_memory_estimate_for(make_model(), strategy, world_size, activations)
        dash = Dashboard(panels=("memory",)).feed(job.events).expect_peak(formula)
        out[strategy] = {
            "peaks": peaks,
            "activations": activations,
            "formula": formula,
            "dashboard": dash,
        }
    return out


def peak_table(measured: dict) -> None:
    """Print rank 0's peak per phase beside the formula, and the peak over model state at
    rest (the step's peak: the optimizer step holds the model state and nothing else)."""
    print(
        f"{'':<7}{'at rest':>9}" + "".join(f"{p:>19}" for p in PEAK_PHASES) + f"{'peak/rest':>11}"
    )
    print(f"{'':<7}{'':>9}" + "".join(f"{'measured formula':>19}" for _ in PEAK_PHASES))
    for strategy, m in measured.items():
        rest = m["peaks"]["step"]["peak"]
        cells = "".join(
            f"{m['peaks'][p]['peak'] / MB:>10.2f}{m['formula'][p] / MB:>9.2f}" for p in PEAK_PHASES
        )
        peak = max(m["peaks"][p]["peak"] for p in PEAK_PHASES)
        print(f"{strategy:<7}{rest / MB:>9.2f}{cells}{peak / rest:>11.2f}")
    print("MB on rank 0, last step; formula: dzl.peak_memory_estimate_for")


def peak_panels(measured: dict) -> None:
    """The dashboard's memory panel of each strategy's run, side by side."""
    from matplotlib.figure import Figure

    from ddpzero_lab.viz.panels import draw_memory

    fig = Figure(figsize=(11, 3.4), layout="constrained")
    axes = fig.subplots(1, len(measured))
    for i, (ax, (strategy, m)) in enumerate(zip(axes, measured.items(), strict=True)):
        draw_memory(ax, m["dashboard"].state.snapshot(), legend=i == len(measured) - 1)
        ax.set_title(strategy, fontsize=9, loc="left")  # in place of the panel's long title
    top = max(ax.get_ylim()[1] for ax in axes)  # one scale: the strategies side by side
    for ax in axes:
        ax.set_ylim(0, top)
    fig.suptitle(
        "the dashboard's memory panel per strategy: bars held after backward; letters: "
        "measured peak of forward (F), backward (B), step (S); grey: peak formula",
        fontsize=9,
    )
    _display(fig)


GPT = {"vocab_size": 65, "block_size": 256, "n_layer": 4}  # the tiny GPT of 11, 4 blocks


def _gpt(checkpointing: bool, seed: int = 0):
    from ddpzero_lab.memory import MemoryTracker
    from ddpzero_lab.workloads.models import tiny_gpt

    torch.manual_seed(seed)
    model, optimizer = dzl.parallelize(
        tiny_gpt(**GPT),
        "ddp",
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        activation_checkpointing=checkpointing or None,
        track_memory=False,
    )
    return model, optimizer, MemoryTracker(emit=False).attach(model, optimizer)


def _gpt_step(model, optimizer, batch: int, length: int, step: int = 0) -> None:
    g = torch.Generator().manual_seed(1000 * dzl.rank() + step)
    idx = torch.randint(0, GPT["vocab_size"], (batch, length + 1), generator=g)
    logits = model(idx[:, :-1].to(dzl.device()))
    target = idx[:, 1:].reshape(-1).to(dzl.device())
    nn.functional.cross_entropy(logits.reshape(-1, GPT["vocab_size"]), target).backward()
    optimizer.step()
    optimizer.zero_grad()


def _gpt_activations(shapes) -> list[int]:
    # on a rank: the bytes the forward saved for backward, one step per (batch, length)
    model, optimizer, tracker = _gpt(False)
    saved = []
    for batch, length in shapes:
        _gpt_step(model, optimizer, batch, length)
        saved.append(tracker.activations)
    return saved


def gpt_activations(cluster, batches, lengths, length: int, batch: int) -> dict:
    """Rank 0's activation bytes of the tiny GPT for each local batch (sequence `length`) and
    each sequence length (local `batch`), beside its model state (16Ψ); printed and drawn."""
    from matplotlib.figure import Figure

    from ddpzero_lab.workloads.models import tiny_gpt

    shapes = [(b, length) for b in batches] + [(batch, t) for t in lengths]
    saved = cluster.run(_gpt_activations, shapes)[0]
    by_batch, by_length = saved[: len(batches)], saved[len(batches) :]
    psi = sum(p.numel() for p in tiny_gpt(**GPT).parameters())
    fig = Figure(figsize=(9, 3), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, xs, ys, label in (
        (axes[0], batches, by_batch, f"local batch (sequence length {length})"),
        (axes[1], lengths, by_length, f"sequence length (local batch {batch})"),
    ):
        ax.plot(xs, [y / MB for y in ys], "o-", color=COLORS["activations"], label="activations")
        ax.axhline(16 * psi / MB, color="black", lw=1.2, label="model state, 16Ψ")
        ax.set(xlabel=label, xlim=(0, 1.05 * max(xs)), xticks=xs)  # linear: a line through 0
    axes[0].set(ylabel="bytes on rank 0 [MB]", ylim=(0, None))
    axes[0].legend(fontsize="small")
    fig.suptitle("tiny GPT: activations (measured) grow with batch and sequence length", fontsize=9)
    _display(fig)
    for name, xs, ys in (("batch", batches, by_batch), ("length", lengths, by_length)):
        steps = ", ".join(f"{y / MB:.2f}" for y in ys)
        print(f"{name:<7} {xs}: {steps} MB")
    return {"batch": by_batch, "length": by_length, "num_params": psi}


def _checkpointing(batch: int, length: int, steps: int) -> dict:
    # on a rank: activation bytes with and without checkpointing, then step times, the two
    # models stepping in turn (interleaved: a slow moment slows both alike)
    runs = {name: _gpt(name == "checkpointed") for name in ("plain", "checkpointed")}
    out: dict = {}
    for name, (model, optimizer, tracker) in runs.items():
        _gpt_step(model, optimizer, batch, length)
        out[name] = {"forward": tracker.activations, "held": max(tracker.activation_peaks.values())}
        tracker.detach()  # time the model, not its instrumentation
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(1 + steps):  # step 0 warms up
        for name, (model, optimizer, _) in runs.items():
            torch.distributed.barrier()  # the ranks start each step together
            start = time.perf_counter()
            _gpt_step(model, optimizer, batch, length, step)
            if step:
                times[name].append(time.perf_counter() - start)
    out["ratio"] = statistics.median(
        c / p for p, c in zip(times["plain"], times["checkpointed"], strict=True)
    )
    return out


def checkpointing_cost(cluster, batch: int, length: int, steps: int) -> dict:
    """Activation bytes of the tiny GPT with and without activation checkpointing on rank 0,
    the blocks' inputs that checkpointing keeps, and the step-time ratio (the slowest rank's
    median of interleaved steps); printed."""
    per_rank = cluster.run(_checkpointing, batch, length, steps)
    result = dict(per_rank[0])
    result["ratio"] = max(r["ratio"] for r in per_rank)
    channels = 64  # tiny_gpt's default width
    result["block_inputs"] = GPT["n_layer"] * 4 * batch * length * channels
    for name in ("plain", "checkpointed"):
        r = result[name]
        saved, held = r["forward"] / MB, r["held"] / MB
        print(f"{name:<13} saved by forward {saved:6.2f} MB, most held {held:6.2f} MB")
    print(f"the {GPT['n_layer']} blocks' inputs: {result['block_inputs'] / MB:.2f} MB")
    fell = result["checkpointed"]["held"] / result["plain"]["held"]
    print(f"checkpointed / plain: activations held {fell:.2f}x, step time {result['ratio']:.2f}x")
    print("(step time: the slowest rank's median over interleaved steps, on shared cores)")
    return result
