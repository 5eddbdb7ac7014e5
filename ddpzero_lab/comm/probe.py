"""Measure this cluster's α and β: a ping-pong between ranks 0 and 1, fitted by least squares.

Call it on every rank (it is collective); every rank gets the same AlphaBeta back. The probe's
own messages use torch.distributed directly, so they do not show in the traffic counters.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from . import collectives
from .collectives import _group_info
from .cost_model import AlphaBeta, fit_alpha_beta

DEFAULT_SIZES = tuple(4**k for k in range(2, 12))  # 16 B .. 4 MiB


def probe_alpha_beta(sizes=DEFAULT_SIZES, repeats: int = 5, group=None) -> AlphaBeta:
    """Fit seconds = α + bytes·β to one-way message times between ranks 0 and 1, and measure
    γ, the time per byte of a float32 add on rank 0.

    One-way time is half the median round trip of `repeats` ping-pongs per size; the fit
    minimises relative error (see fit_alpha_beta). With one rank there is no link to measure:
    α = β = 0 and only γ is measured.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sizes = sorted({int(s) for s in sizes})
    if len(sizes) < 2 or sizes[0] < 1:
        raise ValueError("sizes must hold at least two distinct positive byte counts")
    world_size, rank, _ = _group_info(group)
    if world_size == 1:
        return AlphaBeta(0.0, 0.0, _add_seconds_per_byte())
    device = collectives.backend_device(group)  # nccl moves only CUDA tensors
    peer = dist.get_global_rank(group, 1 - rank) if group is not None and rank < 2 else 1 - rank
    one_way: list[float] = []
    if rank < 2:
        for size in sizes:
            message = torch.zeros(size, dtype=torch.uint8, device=device)
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
    fit = torch.zeros(3, dtype=torch.float64, device=collectives.backend_device(group))
    if rank == 0:
        model = fit_alpha_beta([float(s) for s in sizes], one_way)
        fit[0], fit[1], fit[2] = model.alpha, model.beta, _add_seconds_per_byte()
    root = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(fit, root, group=group)
    return AlphaBeta(alpha=float(fit[0]), beta=float(fit[1]), gamma=float(fit[2]))


def _add_seconds_per_byte(nbytes: int = 4 * 2**20, repeats: int = 5) -> float:
    """γ: seconds per byte of `a += b` in float32, the reduction a ring step performs."""
    a = torch.ones(nbytes // 4)
    b = torch.ones(nbytes // 4)
    a += b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a += b
        times.append(time.perf_counter() - start)
    return statistics.median(times) / nbytes
