"""Solutions for notebook 05 (ZeRO-1: the optimizer state sharded).

Each function is pasted over its stub by CI: it uses only its arguments and torch, nn, dist,
dzl and math.
"""

import math  # noqa: F401 - the names every notebook imports

import torch
import torch.distributed as dist  # noqa: F401
from torch import nn  # noqa: F401

import ddpzero_lab as dzl


def sharded_step(params, layout, shard, optimizer):
    """ZeRO-1's update on this rank, for gradients already averaged over the ranks (by DDP).

    params: the model's parameters; each .grad is the mean over the ranks.
    layout: a FlatLayout of params, padded to a multiple of N.
    shard: an nn.Parameter holding this rank's slice [lo, hi) of the flat parameters.
    optimizer: a torch optimizer built on [shard] only.
    Afterwards every rank's params hold the updated values, all slices included.
    """
    lo, hi = layout.shard_range(dzl.rank(), dzl.world_size())
    with torch.no_grad():
        # 1. slice: the averaged gradient of this rank's elements only
        flat_grad = layout.flatten([p.grad for p in params])
        shard.grad = flat_grad[lo:hi].clone()
        # 2. step: the ordinary optimizer, whose state covers the slice only
        optimizer.step()
        # 3. all-gather: every rank's updated slice, into every rank's parameters
        flat = torch.empty(layout.padded_numel, dtype=shard.dtype, device=shard.device)
        dzl.comm.all_gather(flat, shard.detach(), tag="params")
        for p, view in zip(params, layout.views(flat), strict=True):
            p.copy_(view)
