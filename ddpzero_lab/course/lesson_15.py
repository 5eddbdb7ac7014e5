"""Lesson 15 (from this laptop to 1,024 GPUs): the timing harness, tables and pictures the
notebook calls in one line.

`measure_step` times a strategy's training step inside a rank under an emulated link (the
slowest rank counts); `gpt_profile` writes a step profile for a transformer from its FLOPs, as
`profile_step` would measure it on an accelerator; the rest print or draw what the projection
(ddpzero_lab/projection.py) and the memory formulas (memory.py) compute. Nothing here decides
a result: the notebook's cells do.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch

from ..comm.link import ACCELERATORS, Link
from ..memory import zero_memory_estimate
from ..projection import StepProfile, UnitProfile, project

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
STAGES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}
COLORS = {"ddp": "#4C72B0", "zero1": "#55A868", "zero2": "#DD8452", "zero3": "#C44E52"}
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _show(fig) -> None:
    from IPython.display import display

    display(fig)


def scaled_like(name: str, like: Link) -> Link:
    """The preset link `name`, scaled by the same factor as `like` (the same accelerator on
    the same machine), so that two links compare at one compute rate."""
    return replace(Link.preset(name), scale=like.scale, accelerator=like.accelerator)


# -- measured under emulation ----------------------------------------------------------------
def measure_step(strategy: str, make_model, batch, link: Link, steps: int = 3, **options):
    """Inside a rank: the median seconds of `steps` training steps (after one warm-up) of
    `strategy` with every collective under `link`; the slowest rank's median, on every rank."""
    from ..parallel.api import parallelize
    from ..projection import slowest_rank, time_steps

    model, opt = parallelize(
        make_model(),
        strategy,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),  # profile_step's default
        track_memory=False,
        **options,
    )
    seconds = time_steps(model, opt, lambda step: batch(), link, steps)
    return slowest_rank(statistics.median(seconds))


def error_table(measured: dict, projected: dict, link: Link) -> dict:
    """Measured against projected step time per (N, strategy) (seconds, or Projections);
    returns the errors."""
    print(f"step time: measured under {link.describe()}, against the projection")
    print(f"{'N':>3} {'strategy':<9}{'measured':>10}{'projection':>12}{'error':>8}")
    errors = {}
    for (n, strategy), seconds in measured.items():
        guess = getattr(projected[n, strategy], "step_s", projected[n, strategy])
        errors[n, strategy] = guess / seconds - 1
        print(
            f"{n:>3} {strategy:<9}{seconds * 1e3:>8.0f}ms{guess * 1e3:>10.0f}ms"
            f"{errors[n, strategy]:>+8.1%}"
        )
    return errors


def plot_measured(measured: dict, projected: dict, link: Link) -> None:
    """Bars: each strategy's step measured under the emulated link beside its projection
    (Projections), the projection's exposed communication hatched on top of its compute."""
    from matplotlib.figure import Figure

    sizes = sorted({n for n, _ in measured})
    fig = Figure(figsize=(4 + 2.5 * len(sizes), 3.4), layout="constrained")
    axes = fig.subplots(1, len(sizes), squeeze=False)[0]
    for ax, n in zip(axes, sizes, strict=True):
        xs = range(len(STRATEGIES))
        got = [measured[n, s] * 1e3 for s in STRATEGIES]
        rows = [projected[n, s] for s in STRATEGIES]
        busy = [(r.compute_s + r.optimizer_s) * 1e3 for r in rows]
        exposed = [r.exposed_comm_s * 1e3 for r in rows]
        ax.bar([x - 0.2 for x in xs], got, 0.4, color="#4C72B0", label="measured under emulation")
        right = [x + 0.2 for x in xs]
        ax.bar(right, busy, 0.4, color="#DD8452", label="projection: compute + Adam")
        ax.bar(right, exposed, 0.4, bottom=busy, color="#DD8452", alpha=0.5, hatch="//")
        ax.bar(right, [0] * len(rows), 0.4, color="none", hatch="//", label="… exposed comm")
        ax.set_xticks(list(xs), STRATEGIES)
        ax.set(ylabel="step (ms, this machine)", title=f"N = {n}")
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(f"measured under {link.describe()}, and the projection", fontsize=10)
    _show(fig)


# -- projected to 1,024 GPUs -----------------------------------------------------------------
def gpt_profile(
    layers: int,
    hidden: int,
    tokens: int,
    accelerator: str = "h100",
    mfu: float = 0.5,
    hbm_bytes_per_s: float = 3.35e12,
) -> StepProfile:
    """A step of a GPT's `layers` blocks (12·hidden² parameters each, bf16) on `tokens`
    tokens per GPU, timed from FLOPs as on `accelerator` at `mfu` of its peak: forward
    2·Ψ·tokens FLOP, backward twice that (Kaplan et al., 2020). Adam's step streams about 32
    bytes per parameter (fp32 master, m, v, gradient, read and written) through HBM."""
    rate = ACCELERATORS[accelerator] * mfu
    numel = 12 * hidden * hidden
    forward_s = 2 * numel * tokens / rate
    units = [UnitProfile(f"block{i}", [numel], forward_s, 2 * forward_s) for i in range(layers)]
    return StepProfile(units, 32 * numel * layers / hbm_bytes_per_s, element_size=2)


def scaling(profile: StepProfile, links: dict, world_sizes=WORLD_SIZES) -> dict:
    """{(link label, strategy): [Projection per world size]}, ZeRO-3 with prefetch."""
    return {
        (label, s): project(profile, s, world_sizes, link, prefetch=s == "zero3")
        for label, link in links.items()
        for s in STRATEGIES
    }


def plot_scaling(rows: dict, title: str) -> None:
    """Step time and scaling efficiency (step at 1 GPU / step at N) against N, per link."""
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(label for label, _ in rows))
    fig = Figure(figsize=(10, 3.4 * len(labels)), layout="constrained")
    axes = fig.subplots(len(labels), 2, squeeze=False)
    for (time_ax, eff_ax), label in zip(axes, labels, strict=True):
        for strategy in STRATEGIES:
            runs = rows[label, strategy]
            sizes = [r.world_size for r in runs]
            step = [r.step_s for r in runs]
            color = COLORS[strategy]
            time_ax.plot(sizes, [s * 1e3 for s in step], "o-", color=color, label=strategy)
            eff_ax.plot(sizes, [step[0] / s for s in step], "o-", color=color, label=strategy)
        time_ax.set(xlabel="GPUs", ylabel="step (ms)", ylim=(0, None))
        time_ax.set_title(f"projection: step time, {label}")
        eff_ax.set(xscale="log", ylim=(0, 1.05), xlabel="GPUs", ylabel="scaling efficiency")
        eff_ax.set_title(f"projection: efficiency, {label}")
        for ax in (time_ax, eff_ax):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        eff_ax.legend(fontsize=8)
    fig.suptitle(title)
    _show(fig)


def scaling_table(rows: dict, at=(8, 64, 1024)) -> dict:
    """Scaling efficiency at a few N, and ZeRO-3's step over DDP's; returns both by key."""
    labels = list(dict.fromkeys(label for label, _ in rows))
    out = {}
    print(f"{'link':<16}{'strategy':<9}" + "".join(f"{f'N={n}':>9}" for n in at))
    for label in labels:
        for strategy in STRATEGIES:
            runs = {r.world_size: r for r in rows[label, strategy]}
            eff = [runs[1].step_s / runs[n].step_s for n in at]
            out[label, strategy] = dict(zip(at, eff, strict=True))
            print(f"{label:<16}{strategy:<9}" + "".join(f"{e:>9.0%}" for e in eff))
        ddp = {r.world_size: r.step_s for r in rows[label, "ddp"]}
        zero3 = {r.world_size: r.step_s for r in rows[label, "zero3"]}
        out[label, "zero3/ddp"] = {n: zero3[n] / ddp[n] for n in at}
        print(f"{label:<16}{'zero3/ddp':<9}" + "".join(f"{zero3[n] / ddp[n]:>8.2f}×" for n in at))
    return out


# -- memory ------------------------------------------------------------------------------------
def largest_fitting(stage: int, world_size: int, gpu_bytes: float) -> float:
    """The most parameters whose model states fit `gpu_bytes` per GPU under ZeRO `stage`
    (mixed-precision Adam): the states grow in proportion to Ψ, so one division."""
    per_param = zero_memory_estimate(1e9, world_size, stage)["total"] / 1e9
    return gpu_bytes / per_param


def plot_memory(world_size: int, gpu_gb: float, psis) -> dict:
    """Model states per GPU against Ψ for stages 0-3 on `world_size` GPUs, and the GPU's
    memory as a line; returns the largest Ψ that fits, per strategy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    fits = {}
    for strategy, stage in STAGES.items():
        gb = [zero_memory_estimate(p, world_size, stage)["total"] / 1e9 for p in psis]
        ax.plot(psis, gb, "-", color=COLORS[strategy], label=strategy)
        fits[strategy] = largest_fitting(stage, world_size, gpu_gb * 1e9)
    ax.axhline(gpu_gb, color="black", linestyle="--", label=f"{gpu_gb:g} GB GPU")
    ax.set(xscale="log", yscale="log", xlabel="parameters Ψ", ylabel="model states per GPU (GB)")
    ax.set_title(f"formula: mixed-precision Adam (16 bytes/parameter) on {world_size} GPUs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _show(fig)
    for strategy, psi in fits.items():
        print(f"{strategy:<6} fits up to {psi / 1e9:>7,.1f} B parameters on {world_size} GPUs")
    return fits


# -- the exercise's cases ------------------------------------------------------------------------
def bucket_per_unit_cases(seed: int = 0, cases: int = 12):
    """Random step profiles whose every unit is one bf16 tensor of 16-80 MB: DDP's buckets
    (1 MB, then 25 MB) then hold one unit each. Yields (profile, world_size, link)."""
    g = torch.Generator().manual_seed(seed)
    links = [Link.preset(name) for name in ("nvlink4", "ib-100g", "eth-10g")]
    for case in range(cases):
        units = 1 + case % 6
        numel = torch.randint(8_000_000, 40_000_000, (units,), generator=g).tolist()
        forward = (torch.rand(units, generator=g) * 0.01).tolist()
        profile = StepProfile(
            [UnitProfile(f"unit{i}", [numel[i]], forward[i], 2 * forward[i]) for i in range(units)],
            optimizer_s=float(torch.rand((), generator=g)) * 0.01,
            element_size=2,
        )
        yield profile, WORLD_SIZES[case % len(WORLD_SIZES)], links[case % len(links)]


# -- the practitioner's decision -----------------------------------------------------------------
def decision_table(plans: dict) -> dict:
    """For each (model, GPUs): how many layouts fit, the fastest one, and the best plain
    data-parallel one (tp = pp = 1) for comparison. Returns {key: (fastest, best plain)}."""
    print(
        f"{'model':<6}{'GPUs':>6}{'fit':>9}  {'fastest layout':<30}{'step s':>7}{'GB/GPU':>7}"
        f"{'MFU':>5}"
        f"   {'best with tp = pp = 1'}"
    )
    out = {}
    for (model, gpus), layouts in plans.items():
        fitting = [x for x in layouts if x.fits]
        plain = [x for x in layouts if x.tp == x.pp == 1]  # fitting first, then by memory
        fastest = fitting[0] if fitting else None
        best_plain = plain[0] if plain and plain[0].fits else None
        out[model, gpus] = (fastest, best_plain)
        first = (
            f"{fastest.name:<30}{fastest.step_s:>7.2f}{fastest.memory['total'] / 1e9:>7.1f}"
            f"{fastest.mfu:>5.0%}"
            if fastest
            else f"{'nothing fits':<49}"
        )
        if best_plain:
            second = f"{best_plain.strategy} {best_plain.step_s:.2f} s"
        else:  # the least memory it could take: still too much, and what dominates it
            least = plain[0].memory
            second = (
                f"does not fit: {least['total'] / 1e9:.0f} GB/GPU at least, "
                f"{least['activations'] / 1e9:.0f} GB of it activations"
            )
        print(f"{model:<6}{gpus:>6,}{f'{len(fitting)}/{len(layouts)}':>9}  {first}   {second}")
    return out
