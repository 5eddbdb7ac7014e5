"""Solutions for lesson 10 (gradient accumulation and sharded checkpoints)."""

import math  # noqa: F401 - the names every solution may use (exercises.py)

import torch  # noqa: F401
import torch.distributed as dist  # noqa: F401
from torch import nn  # noqa: F401

import ddpzero_lab as dzl  # noqa: F401


def accumulate_and_step(model, optimizer, micro_batches, loss_fn):
    """One optimizer step over this rank's micro-batches; returns the mean of their losses."""
    k = len(micro_batches)
    mean_loss = 0.0
    for i, (x, y) in enumerate(micro_batches):
        loss = None
        if i < k - 1:
            # not the last: the gradients only add up in .grad, nothing is sent
            with model.no_sync():
                loss = loss_fn(model(x), y)
                (loss / k).backward()  # / k: the sum of k gradients is the mean's gradient
        else:
            # the last backward, outside no_sync(): DDP all-reduces the accumulated sum once
            loss = loss_fn(model(x), y)
            (loss / k).backward()
        mean_loss += loss.item() / k
    optimizer.step()
    optimizer.zero_grad()
    return mean_loss
