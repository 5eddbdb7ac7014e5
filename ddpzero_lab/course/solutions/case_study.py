"""Solutions for lesson 09 (case study: ResNet-18 under DDP and ZeRO-1/2/3)."""

import math  # noqa: F401 - the names every solution may use (exercises.py)

import torch
import torch.distributed as dist  # noqa: F401
from torch import nn  # noqa: F401

import ddpzero_lab as dzl  # noqa: F401


def my_rank_indices(num_samples, world_size, rank, *, epoch, seed, global_batch_size, drop_last):
    """The data-set indices this rank reads in `epoch`, in order (see the notebook's contract)."""
    # 1. the epoch's order: the same permutation on every rank
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_samples, generator=generator).tolist()
    # 2. whole global batches: drop the incomplete last one, or pad it from the start
    if drop_last:
        order = order[: num_samples // global_batch_size * global_batch_size]
    else:
        total = -(-num_samples // global_batch_size) * global_batch_size  # round up
        while len(order) < total:
            order += order[: total - len(order)]
    # 3. this rank's positions: r, r + N, r + 2N, ...
    return order[rank::world_size]
