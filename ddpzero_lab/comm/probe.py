"""Measure this cluster's α and β: a ping-pong between ranks 0 and 1, fitted by least squares.

Call it on every rank (it is collective); every rank gets the same AlphaBeta back. The probe's
own messages use torch.distributed directly, so they do not show in the traffic counters.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from .collectives import _group_info
from .cost_model import AlphaBeta, fit_alpha_beta

DEFAULT_SIZES = tuple(4**k for k in range(2, 12))  # 16 B .. 4 MiB


def probe_alpha_beta(sizes=DEFAULT_SIZES, repeats: int = 5, group=None) -> AlphaBeta:
    """Fit seconds = α + bytes·β to one-way message times between ranks 0 and 1.

    One-way time is half the median round trip of `repeats` ping-pongs per size. With one
    rank there is no link to measure, and AlphaBeta(0, 0) comes back.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sizes = sorted({int(s) for s in sizes})
    if len(sizes) < 2 or sizes[0] < 1:
        raise ValueError("sizes must hold at least two distinct positive byte counts")
    world_size, rank, _ = _group_info(group)
    if world_size == 1:
        return AlphaBeta(0.0, 0.0)
    peer = dist.get_global_rank(group, 1 - rank) if group is not None and rank < 2 else 1 - rank
    one_way: list[float] = []
    if rank < 2:
        for size in sizes:
            message = torch.zeros(size, dtype=torch.uint8)
            rounds = []
            for _ in range(repeats + 1):  # the first round warms the connection up
                start = time.perf_counter()
                if rank == 0:
                    dist.send(message, peer, group=group)
                    dist.recv(message, peer, group=group)
                else:
                    dist.recv(message, peer, group=group)
                    dist.send(message, peer, group=group)
                rounds.append(time.perf_counter() - start)
            one_way.append(statistics.median(rounds[1:]) / 2)
    fit = torch.zeros(2, dtype=torch.float64)
    if rank == 0:
        model = fit_alpha_beta([float(s) for s in sizes], one_way)
        fit[0], fit[1] = model.alpha, model.beta
    root = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(fit, root, group=group)
    return AlphaBeta(alpha=float(fit[0]), beta=float(fit[1]))
