"""Lesson 12 (when things go wrong): the workload, the tables, the report parsing and the
pictures that the notebook calls in one line.

The notebook keeps what the learner studies: the training loops, the faults, the errors and the
checkpoint resume. Everything here is instrumentation: it reads a job's events or a RankError
and prints or draws them.
"""

from __future__ import annotations

import re
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

import ddpzero_lab as dzl

IN_FEATURES, HIDDEN, OUT_FEATURES = 32, 256, 8
LOCAL_BATCH = 32  # rows per rank and step

# the short names of the ops in the picture of the op logs (one box is small)
_SHORT = {"all_reduce": "ar", "broadcast": "bc", "all_gather": "ag", "reduce_scatter": "rs"}


def make_model(seed: int = 0) -> nn.Module:
    """A small MLP regression; the same seed gives the same init on every rank."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, OUT_FEATURES),
    )


def make_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3)


def local_batch(step: int):
    """Inside a rank: this rank's rows of step `step`'s global batch.

    The batch depends on the step alone, so a resumed run sees the same data as one that never
    stopped."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(dzl.world_size() * LOCAL_BATCH, IN_FEATURES, generator=g)
    y = torch.sin(2 * x[:, :OUT_FEATURES])
    mine = slice(dzl.rank() * LOCAL_BATCH, (dzl.rank() + 1) * LOCAL_BATCH)
    return x[mine].to(dzl.device()), y[mine].to(dzl.device())


def error_of(job) -> dzl.RankError:
    """The RankError of a settled job (waiting again on it raises the same error)."""
    try:
        job.wait()
    except dzl.RankError as err:
        return err
    raise AssertionError(f"job {job.name} did not fail")


# -- stragglers -----------------------------------------------------------------------------


def step_stats(job, first: int = 2) -> dict[int, dict[str, float]]:
    """{rank: mean compute, all-reduce and step period, in s} over the steps from `first` on.

    Steps 0 and 1 are left out: they include start-up and DDP's one-off broadcast of the
    bucket order, where a wait would show instead of in the all-reduce."""
    stats = {}
    for rank in range(job.world_size):
        steps = sorted(
            (e for e in job.events if e.kind == "step" and e.rank == rank and e["step"] >= first),
            key=lambda e: e["step"],
        )
        starts = [e["forward_start"] for e in steps]
        stats[rank] = {
            "compute": statistics.mean(e["compute_s"] for e in steps),
            "comm": statistics.mean(e["comm_s"] for e in steps),
            "period": statistics.mean(b - a for a, b in zip(starts, starts[1:], strict=False)),
        }
    return stats


def show_stats(runs: dict[str, dict]) -> None:
    """Print the mean compute, all-reduce and period per rank of each run, in ms."""
    print(f"{'run':<11}{'rank':<6}{'compute':>9}{'all-reduce':>12}{'period':>9}   (ms per step)")
    for label, stats in runs.items():
        for rank, s in stats.items():
            print(
                f"{label:<11}{rank:<6}{1e3 * s['compute']:>9.1f}{1e3 * s['comm']:>12.1f}"
                f"{1e3 * s['period']:>9.1f}"
            )


def plot_straggler(healthy: dict, straggler: dict, delay_s: float):
    """Each rank's mean step period split into compute, all-reduce and the rest, per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3), layout="constrained")
    ax = fig.subplots()
    width = 0.38
    for offset, stats, color, label in (
        (-width / 2, healthy, "tab:blue", "healthy"),
        (width / 2, straggler, "tab:red", "with a straggler"),
    ):
        x = [rank + offset for rank in stats]
        compute = [1e3 * s["compute"] for s in stats.values()]
        comm = [1e3 * s["comm"] for s in stats.values()]
        rest = [
            1e3 * s["period"] - a - b for s, a, b in zip(stats.values(), compute, comm, strict=True)
        ]
        first = offset < 0
        ax.bar(x, compute, width, color="0.5", label="compute" if first else None)
        ax.bar(x, comm, width, bottom=compute, color=color, label=f"all-reduce, {label}")
        ax.bar(
            x,
            rest,
            width,
            bottom=[a + b for a, b in zip(compute, comm, strict=True)],
            color="0.88",
            hatch="//",
            edgecolor="0.6",
            label="the rest (step, sleep)" if first else None,
        )
    ax.axhline(1e3 * delay_s, color="black", linestyle="--", linewidth=0.8, label="the delay")
    ax.set(
        xlabel="rank (left bar: healthy; right bar: with the straggler)",
        ylabel="ms per step (mean)",
        xticks=list(healthy),
        title="the straggler's sleep shows up as the others' all-reduce",
    )
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# -- reading the reports ----------------------------------------------------------------------


def report_places(err: dzl.RankError) -> dict[int, tuple[str, int]]:
    """Where the cluster's report says each rank stood, as who_is_where answers it:
    ("waiting in", seq) or ("finished after", seq)."""
    places = {}
    waiting = r"rank (\d+) (?:waited|failed|is waiting) in \w+ #(\d+)"
    for rank, seq in re.findall(waiting, err.report):
        places[int(rank)] = ("waiting in", int(seq))
    finished = r"rank (\d+) finished the job \(fn returned\): its last one was \w+ #(\d+)"
    for rank, seq in re.findall(finished, err.report):
        places[int(rank)] = ("finished after", int(seq))
    return places


def op_logs(job) -> dict[int, list[tuple[int, str, str, int]]]:
    """{rank: [(seq, op, tag, step), ...]}: the ops each rank completed, in order.

    DDP sends a step's all-reduce events before that step's step event, so an op belongs to
    the step after the last step event seen."""
    logs = {rank: [] for rank in range(job.world_size)}
    step_of = {rank: 0 for rank in range(job.world_size)}
    for e in job.events:  # a rank's events arrive in the order it sent them
        if e.kind == "step":
            step_of[e.rank] = e["step"] + 1
        elif e.kind == "collective":
            logs[e.rank].append((e["seq"], e["op"], e["tag"], step_of[e.rank]))
    return logs


def show_logs(logs: dict) -> None:
    for rank, log in logs.items():
        print(f"rank {rank}: " + "  ".join(f"#{seq} {op}(step {step})" for seq, op, _, step in log))


def nth_seq(log: list, op: str, nth: int) -> int:
    """The sequence number of a rank's nth completed `op` (1: the first)."""
    return [seq for seq, name, _, _ in log if name == op][nth - 1]


def plot_op_logs(logs: dict, places: dict, first_split):
    """One row per rank, one box per completed op coloured by its step; the op a rank waits in
    is a dashed box; a red line marks the first split."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    world_size = len(logs)
    seqs = sorted(
        {seq for log in logs.values() for seq, *_ in log} | {p[1] for p in places.values()}
    )
    top = max(max((step for *_, step in log), default=0) for log in logs.values()) or 1
    colors = matplotlib.colormaps["viridis"]
    fig = Figure(figsize=(10, 0.6 * world_size + 1.6), layout="constrained")
    ax = fig.subplots()
    for rank, log in logs.items():
        for seq, op, _, step in log:
            ax.add_patch(Rectangle((seq - 0.45, rank - 0.4), 0.9, 0.8, color=colors(step / top)))
            ax.text(
                seq,
                rank,
                f"{_SHORT.get(op, op[:3])}\n{step}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if step < 0.6 * top else "black",
            )
        state, seq = places[rank]
        if state == "waiting in":
            ax.add_patch(
                Rectangle(
                    (seq - 0.45, rank - 0.4),
                    0.9,
                    0.8,
                    fill=False,
                    edgecolor="tab:red",
                    linestyle="--",
                )
            )
            ax.text(seq, rank, "waits", ha="center", va="center", fontsize=7, color="tab:red")
    if first_split is not None:
        ax.axvline(first_split[0] - 0.5, color="tab:red", linewidth=1.2)
        ax.text(
            first_split[0] - 0.4,
            -0.45,
            f"first split: #{first_split[0]}",
            color="tab:red",
            fontsize=8,
            va="bottom",
        )
    ax.set(
        xlim=(seqs[0] - 0.6, seqs[-1] + 0.6),
        ylim=(world_size - 0.4, -0.8),
        xlabel="sequence number (in a box: the op, ar = all-reduce, bc = broadcast, and its step)",
        yticks=range(world_size),
        yticklabels=[f"rank {r}" for r in range(world_size)],
        title="each rank's completed ops, coloured by step",
    )
    return fig


# -- checkpoints ------------------------------------------------------------------------------


def checkpoint_root() -> Path:
    """A fresh temporary directory for the lesson's checkpoints (remove it with `remove`)."""
    return Path(tempfile.mkdtemp(prefix="dzl-lesson12-"))


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def show_checkpoints(directory: Path) -> None:
    """List a checkpoint directory: complete checkpoints have a manifest, others are never read."""
    for entry in sorted(Path(directory).iterdir()):
        if entry.is_dir():
            kind = "complete" if (entry / "manifest.json").exists() else "incomplete: never loaded"
        else:
            kind = f"-> {entry.read_text()}"
        print(f"  {entry.name:<26} {kind}")


def losses(job, rank: int = 0) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in job.events if e.kind == "loss" and e.rank == rank}


def plot_resume(reference: dict, crashed: dict, resumed: dict, resumed_from: int):
    """The loss per step of the run that never crashed, the crashed one and the resumed one."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3), layout="constrained")
    ax = fig.subplots()
    ax.plot(
        list(reference), list(reference.values()), color="0.7", linewidth=4, label="never crashed"
    )
    ax.plot(
        list(crashed),
        list(crashed.values()),
        "o-",
        color="tab:red",
        markersize=4,
        label="crashed run",
    )
    ax.plot(
        list(resumed),
        list(resumed.values()),
        "s--",
        color="tab:blue",
        markersize=4,
        label=f"resumed from the checkpoint of step {resumed_from - 1}",
    )
    ax.axvline(max(crashed) + 0.5, color="tab:red", linestyle=":", label="the crash")
    ax.set(xlabel="step", ylabel="loss (rank 0's rows)", title="crash and resume")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
