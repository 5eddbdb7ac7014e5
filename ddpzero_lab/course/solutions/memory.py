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


def my_ddp_peak(num_params, activation_bytes, params_bytes=4, grads_bytes=4, optimizer_bytes=8):
    """Bytes one DDP rank holds at the worst moment of forward, backward and the step."""
    state = (params_bytes + optimizer_bytes) * num_params
    buckets = grads_bytes * num_params  # one gradient copy, held all along
    forward = state + buckets + activation_bytes  # every activation saved by the end
    # backward: early, the activations are still held; late, every fresh .grad has arrived
    # beside the buckets and the activations are gone. The worse of the two moments:
    backward = state + buckets + max(activation_bytes, grads_bytes * num_params)
    step = state + buckets  # the step: the model state at rest
    return {"forward": forward, "backward": backward, "step": step}
