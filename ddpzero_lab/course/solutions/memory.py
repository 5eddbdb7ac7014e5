"""Solutions to lesson 04 (memory anatomy): ZeRO's per-rank memory formulas."""

import math  # noqa: F401 - the names every notebook imports, available to the solutions

import torch  # noqa: F401
import torch.distributed as dist  # noqa: F401
from torch import nn  # noqa: F401

import ddpzero_lab as dzl  # noqa: F401


def my_zero_memory(
    num_params, world_size, stage, params_bytes=2, grads_bytes=2, optimizer_bytes=12
):
    """Model-state bytes one rank holds under ZeRO `stage` (0-3), by category and in total."""
    params = params_bytes * num_params
    grads = grads_bytes * num_params
    optimizer = optimizer_bytes * num_params
    if stage >= 1:  # P_os: each rank keeps the optimizer state of its 1/N_d of the parameters
        optimizer /= world_size
    if stage >= 2:  # P_os+g: and only the gradients of its shard
        grads /= world_size
    if stage >= 3:  # P_os+g+p: and only its shard of the parameters
        params /= world_size
    return {
        "params": params,
        "grads": grads,
        "optimizer": optimizer,
        "total": params + grads + optimizer,
    }
