"""Solutions to notebook 07's exercises (ZeRO-3: parameters gathered just in time)."""

import math  # noqa: F401 - the names every notebook imports, available to each solution

import torch
import torch.distributed as dist
from torch import nn  # noqa: F401

import ddpzero_lab as dzl


def gather_run_free(shard, layout, module, x):
    """One unit's step in ZeRO-3: all-gather its flat buffer from every rank's slice, point
    the module's parameters at it, run the module, then free the buffer's storage."""
    assert layout.padded_numel == dist.get_world_size() * shard.numel()
    # 1. gather: every rank's slice, end to end (rank r's lands at [r*S, (r+1)*S))
    full = torch.empty(layout.padded_numel, dtype=shard.dtype, device=shard.device)
    dzl.comm.all_gather(full, shard, tag="my_gather")
    # 2. bind: the parameters become views of the full buffer (nothing is copied)
    for p, view in zip(module.parameters(), layout.views(full), strict=True):
        p.data = view
    # 3. run
    out = module(x)
    # 4. free: the storage goes back to 0 bytes; the parameters, views of it, hold nothing
    full.untyped_storage().resize_(0)
    return out
