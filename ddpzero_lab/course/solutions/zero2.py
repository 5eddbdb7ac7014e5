"""Solutions for notebook 06 (ZeRO-2: gradients reduce-scattered).

Each function is pasted over its stub by CI: it uses only its arguments and torch, nn, dist,
dzl and math.
"""

import math  # noqa: F401 - the names every notebook imports

import torch
import torch.distributed as dist  # noqa: F401
from torch import nn  # noqa: F401

import ddpzero_lab as dzl


def my_reduce_scatter(grads):
    """This rank's slice of the mean over the ranks of one bucket's gradients.

    grads: this rank's full gradients of the bucket's parameters, in bucket order.
    Returns a flat tensor of padded_numel / N elements: slice r of the mean, on rank r,
    where padded_numel is the total element count rounded up to a multiple of N.
    """
    world_size = dzl.world_size()
    numel = sum(g.numel() for g in grads)
    padded = -(-numel // world_size) * world_size  # rounded up to a multiple of N
    # 1. flatten into one buffer; the padding stays zero
    buffer = torch.zeros(padded, dtype=grads[0].dtype, device=grads[0].device)
    buffer[:numel] = torch.cat([g.reshape(-1) for g in grads])
    # 2. pre-divide: the sum over the ranks is then the mean
    buffer.div_(world_size)
    # 3. rank r receives the sum over the ranks of slice r
    shard = torch.empty(padded // world_size, dtype=buffer.dtype, device=buffer.device)
    dzl.comm.reduce_scatter(shard, buffer, tag="my_bucket")
    return shard
