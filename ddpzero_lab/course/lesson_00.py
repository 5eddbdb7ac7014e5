"""Lesson 00 (the live cluster): the pictures and the event arithmetic the notebook shows but
does not teach. Each function is called in one line from a cell."""

from __future__ import annotations

from matplotlib.figure import Figure


def plot_before_after(pairs) -> Figure:
    """Bars of each rank's value before and after the all-reduce; pairs[r] = (before, after)."""
    fig = Figure(figsize=(8, 3), layout="constrained")
    ax_before, ax_after = fig.subplots(1, 2, sharey=True)
    ranks = list(range(len(pairs)))
    ax_before.bar(ranks, [b[0].item() for b, _ in pairs], color="tab:blue")
    ax_after.bar(ranks, [a[0].item() for _, a in pairs], color="tab:green")
    ax_before.set(title="before all_reduce", xlabel="rank", ylabel="value", xticks=ranks)
    ax_after.set(title="after all_reduce (SUM)", xlabel="rank", xticks=ranks)
    return fig


def last_event_per_rank(events) -> dict[int, float]:
    """Seconds from the job's first event to each rank's last one: when each rank finished."""
    t0 = min(e.time for e in events)
    done: dict[int, float] = {}
    for e in events:
        done[e.rank] = max(done.get(e.rank, 0.0), e.time - t0)
    return dict(sorted(done.items()))


def plot_events(events, world_size: int) -> Figure:
    """One tick per event, one row per rank, at the time the notebook received it."""
    fig = Figure(figsize=(8, 2.5), layout="constrained")
    ax = fig.subplots()
    t0 = min(e.time for e in events)
    for e in events:
        ax.plot(e.time - t0, e.rank, "|", markersize=14, color=f"C{e.rank}")
    finished = last_event_per_rank(events)
    slowest = max(finished, key=finished.get)
    ax.set(
        xlabel="seconds since the first event",
        ylabel="rank",
        yticks=list(range(world_size)),
        # the title is computed from the events, so it is true on any machine and world size
        title=f"step events as they arrived: rank {slowest} finished last",
    )
    return fig
