"""Lesson 08's helpers (ZeRO-3: prefetch and mixed precision).

This module owns what notebook 08 calls in one line and the learner need not study: the check
that prefetch gathers the next unit while one runs, the timing harness with and without
prefetch (in this machine's time or under an emulated link) with the projection's figure
beside it, the floating-point formats table, the self-check of the bytes-per-rank exercise, and
the measured table and picture of stages 0 to 3 in both precisions. The per-step trace and
the measurement job on the ranks are lesson 07's (`lesson_07.trace_step_on_rank`,
`lesson_07.measure_on_rank`): one implementation, two lessons.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

import ddpzero_lab as dzl

from . import lesson_07

MB = 1e6
STRATEGIES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}  # strategy -> its ZeRO stage
PRECISIONS = {"fp32": "fp32_adam", "bf16-mixed": "mixed_adam"}  # precision -> formula preset
PARTS = ("params", "grads", "optimizer")


# -- prefetch --------------------------------------------------------------------------------
def prefetch_check(without: list[dict], with_prefetch: list[dict]) -> str:
    """Raise AssertionError unless, as a unit starts its forward, the next unit's gather is
    already under way with prefetch (more than the unit's own buffer is held) and never
    without. Returns a one-line report for rank 0."""
    counts = {}
    for label, traces in (("without", without), ("with", with_prefetch)):
        per_rank = []
        for t in traces:
            rest = 4 * sum(t["padded"].values()) // t["world_size"]
            starts = [s for s in t["samples"] if s[2] == "starts"]
            # held beyond the slices and the running unit: another unit's buffer, in flight
            early = sum(s[3] - rest > 4 * t["padded"][s[1]] for s in starts)
            per_rank.append((early, len(starts), max(s[3] for s in t["samples"])))
        counts[label] = per_rank
    assert all(early == 0 for early, _, _ in counts["without"]), "gathered early without prefetch"
    assert all(early > 0 for early, _, _ in counts["with"]), "prefetch never gathered early"
    (off, n, peak_off), (on, _, peak_on) = counts["without"][0], counts["with"][0]
    return (
        f"rank 0: the next unit was in flight at {off} of {n} unit starts without prefetch, "
        f"{on} of {n} with; peak parameter bytes {peak_off:,} -> {peak_on:,}"
    )


def _time_on_rank(make_model, local_batch, optimizer, steps, prefetch, link=None):
    model, opt = dzl.parallelize(
        make_model(), "zero3", optimizer=optimizer, prefetch=prefetch, track_memory=False
    )
    dzl.set_link(link)  # after the set-up's broadcasts: only the steps are emulated
    seconds = []
    try:
        for step in range(steps):
            x, y = local_batch(step)
            dist.barrier()  # every rank starts the step together: the slowest one sets the pace
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if x.is_cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    finally:
        dzl.set_link(None)
    return seconds[2:]  # the first steps warm up; the first one also records the unit order


def time_prefetch(cluster, make_model, local_batch, optimizer, steps=12, runs=3, link=None) -> dict:
    """Median step time of the slowest rank, without and with prefetch, in alternating runs
    (neither always goes first); prints the result against the run-to-run spread. `link`: an
    emulated link (comm/link.py) for the timed steps; None: this machine's own time."""
    ms = {False: [], True: []}
    cluster.run(_time_on_rank, make_model, local_batch, optimizer, 3, True)  # warm up, untimed
    # one bar for all the jobs (a parent-side loop), not one line per job
    order = [(False, True) if run % 2 == 0 else (True, False) for run in range(runs)]
    jobs = [prefetch for pair in order for prefetch in pair]
    args = (make_model, local_batch, optimizer, steps)
    for prefetch in tqdm(jobs, desc="timing prefetch off/on", leave=False):
        per_rank = cluster.run(_time_on_rank, *args, prefetch, link)
        slowest = [max(each) for each in zip(*per_rank, strict=True)]  # it sets the pace
        ms[prefetch].append(1e3 * statistics.median(slowest))
    if link is not None:
        print(f"measured under {link.describe()}, {cluster.world_size} ranks:")
    for prefetch, values in ms.items():
        runs_text = ", ".join(f"{v:.1f}" for v in values)
        median = statistics.median(values)
        print(f"prefetch={prefetch!s:<5}: median step {median:6.1f} ms ({runs_text})")
    difference = statistics.median(ms[True]) - statistics.median(ms[False])
    spread = max(max(v) - min(v) for v in ms.values())  # how much runs of one setting vary
    verdict = "within" if abs(difference) <= spread else "beyond"
    print(
        f"difference {difference:+.1f} ms per step, {verdict} the {spread:.1f} ms that runs of "
        f"one setting differ by (backend {cluster.backend})"
    )
    return ms


def profile_on_rank(make_model, local_batch, optimizer) -> dzl.projection.StepProfile:
    """dzl.profile_step of the model on this rank, unit by unit (every rank at once: compute
    here shares the cores as it does in a step)."""
    return dzl.profile_step(make_model(), lambda: local_batch(0), optimizer=optimizer)


def prefetch_projection(profile, link, world_size: int, measured: dict) -> dict:
    """dzl.project's step time for ZeRO-3 without and with prefetch, beside the measured one
    (`time_prefetch`'s result); prints both gains. Returns {prefetch: projected ms}."""
    projected = {}
    for prefetch in (False, True):
        row = dzl.project(profile, "zero3", [world_size], link, prefetch=prefetch)[0]
        projected[prefetch] = 1e3 * row.step_s
    got = {prefetch: statistics.median(values) for prefetch, values in measured.items()}
    print(f"ZeRO-3, {world_size} ranks, ms per step under {link.describe()}:")
    print(f"{'':<28}{'prefetch off':>13}{'on':>8}{'gain':>7}")
    for label, row in (("measured (live cluster)", got), ("projection (dzl.project)", projected)):
        print(f"{label:<28}{row[False]:>13.0f}{row[True]:>8.0f}{row[False] / row[True]:>6.2f}x")
    return projected


# -- mixed precision -------------------------------------------------------------------------
def formats() -> None:
    """Bits and limits of the three float formats, from torch.finfo."""
    print(f"{'format':<10}{'bits':>5}{'stored mantissa':>17}{'eps':>11}{'largest':>11}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        info = torch.finfo(dtype)
        mantissa = round(-torch.log2(torch.tensor(info.eps)).item())  # eps = 2**-stored bits
        name = str(dtype).split(".")[-1]
        print(f"{name:<10}{info.bits:>5}{mantissa:>17}{info.eps:>11.2e}{info.max:>11.2e}")


def _padding_on_rank(make_model, optimizer) -> int:
    """Padding elements in this rank's slices of ZeRO-3's flat buffers."""
    model, _ = dzl.parallelize(make_model(), "zero3", optimizer=optimizer, track_memory=False)
    return sum(
        max(0, min(u["slice"][1], u["padded"]) - max(u["slice"][0], u["numel"]))
        for u in lesson_07.units_of(model)
    )


def check_state_bytes(cluster, candidate, make_model, local_batch, optimizer) -> str:
    """Measure ZeRO-3's bytes per rank in both precisions; raise AssertionError unless
    candidate(padded, world_size, precision) predicts them (AdamW's 4-byte step counter per
    parameter leaf aside, and its moments of the padding, which it does not keep)."""
    # the optimizer holds one leaf per trainable parameter (its piece of this rank's shard,
    # possibly empty): AdamW keeps one step counter per leaf, and no moments for padding
    counters = 4 * sum(p.requires_grad for p in make_model().parameters())
    padding = cluster.run(_padding_on_rank, make_model, optimizer)
    lines = []
    for precision in PRECISIONS:
        per_rank = cluster.run(
            lesson_07.measure_on_rank, "zero3", make_model, local_batch, optimizer, precision
        )
        for rank, r in enumerate(per_rank):
            want = dict(r["held"])
            want["optimizer"] -= counters  # AdamW's step counters: not model state
            want["optimizer"] += 8 * padding[rank]  # the formula counts two fp32 moments there
            got = candidate(r["padded"], len(per_rank), precision)
            if {k: got.get(k) for k in PARTS} != want:
                raise AssertionError(
                    f"{precision}, rank {rank}: you predict {got}, the rank holds {want}"
                )
        lines.append(f"{precision} {want}")
    return "; ".join(lines)


# -- stages 0 to 3 ---------------------------------------------------------------------------
def measure_stages(cluster, make_model, local_batch, optimizer) -> dict:
    """{(strategy, precision): per-rank results of lesson_07.measure_on_rank} for all eight."""
    runs = [(s, p) for p in PRECISIONS for s in STRATEGIES]
    return {
        (s, p): cluster.run(lesson_07.measure_on_rank, s, make_model, local_batch, optimizer, p)
        for s, p in tqdm(runs, desc="stages 0-3 x 2 precisions", leave=False)
    }


def stage_table(measured: dict, num_params: int) -> None:
    """Print rank 0's bytes per stage and precision, its formula (notebook 04) and the bytes
    sent per step; check every run against its formula on every rank (raises)."""
    n = len(next(iter(measured.values())))
    print(f"rank 0, N = {n}, Ψ = {num_params:,}: bytes held, and sent per step")
    head = "".join(f"{p:>11}" for p in PARTS)
    print(f"{'':<8}{'precision':<12}{head}{'total':>11}{'formula':>11}{'sent':>11}")
    for (strategy, precision), per_rank in measured.items():
        stage, preset = STRATEGIES[strategy], PRECISIONS[precision]
        lesson_07.memory_check(per_rank, num_params, stage, preset)  # raises if off
        held = per_rank[0]["held"]
        formula = dzl.zero_memory_estimate(num_params, n, stage, preset=preset)["total"]
        sent = sum(per_rank[0]["per_step"].values())
        cells = "".join(f"{held[p]:>11,}" for p in PARTS)
        print(
            f"{strategy:<8}{precision:<12}{cells}{sum(held.values()):>11,}"
            f"{formula:>11,.0f}{sent:>11,.0f}"
        )


def plot_stages(measured: dict, num_params: int):
    """Stacked bars of rank 0's model states per stage, one panel per precision, with each
    stage's formula marked."""
    from matplotlib.figure import Figure

    n = len(next(iter(measured.values())))
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    colors = {"params": "tab:blue", "grads": "tab:orange", "optimizer": "tab:green"}
    for ax, (precision, preset) in zip(axes, PRECISIONS.items(), strict=True):
        for x, (strategy, stage) in enumerate(STRATEGIES.items()):
            held, bottom = measured[strategy, precision][0]["held"], 0.0
            for part, color in colors.items():
                label = part if x == 0 else None
                ax.bar(x, held[part] / MB, bottom=bottom, color=color, width=0.6, label=label)
                bottom += held[part] / MB
            formula = dzl.zero_memory_estimate(num_params, n, stage, preset=preset)["total"]
            label = "formula (04)" if x == 0 else None
            ax.plot([x + 0.38], [formula / MB], marker="<", color="black", label=label)
        ax.set_xticks(range(len(STRATEGIES)), [f"{s}\nstage {t}" for s, t in STRATEGIES.items()])
        ax.set_title(f"{precision}, N = {n}", fontsize=10)
    axes[0].set_ylabel("model states, rank 0 [MB]")
    axes[1].legend(fontsize="small")
    return fig
