"""Solutions to lesson 02 (parameter server vs all-reduce)."""

import math  # noqa: F401 - every solutions module offers the names a notebook imports

import torch
import torch.distributed as dist  # noqa: F401
from torch import nn  # noqa: F401

import ddpzero_lab as dzl


def all_reduce_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Called on every rank after backward(): average the gradients over the ranks, then step.

    1. flatten every parameter's .grad into ONE tensor (one message: one latency, not many);
    2. sum it over the ranks with one dzl.comm.all_reduce (counted in dzl.traffic());
    3. divide by the world size and copy each slice back into its parameter's .grad;
    4. call optimizer.step().
    """
    params = [p for p in model.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # one message of B bytes
    dzl.comm.all_reduce(flat, tag="gradients")  # the sum over all ranks, on every rank
    flat /= dzl.world_size()  # the mean: the gradient of the whole batch
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    optimizer.step()
