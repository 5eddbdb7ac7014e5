"""Solutions for notebook 15 (from this laptop to 1,024 GPUs).

Each function is pasted over its stub by CI: it uses only its arguments and torch, nn, dist,
dzl and math.
"""

import math  # noqa: F401 - the names every notebook imports

import torch  # noqa: F401
import torch.distributed as dist  # noqa: F401
from torch import nn  # noqa: F401

import ddpzero_lab as dzl  # noqa: F401


def ddp_step_seconds(forward_s, backward_s, grad_bytes, optimizer_s, link, world_size):
    """One DDP step with overlap, one gradient bucket per unit, on `world_size` GPUs.

    forward_s[i], backward_s[i], grad_bytes[i]: unit i, in forward order. Forward runs the
    units in order, backward in reverse. When unit i's backward ends, its bucket's all-reduce
    is launched; it takes link.seconds("all_reduce", grad_bytes[i], world_size). The link
    carries one all-reduce at a time, in launch order. The optimizer (optimizer_s) starts
    once backward and the last all-reduce are both done. Returns the step's seconds.
    """
    t = sum(forward_s)
    link_free = 0.0  # when the last all-reduce launched so far is over
    for i in reversed(range(len(forward_s))):
        t += backward_s[i]  # unit i's gradients are ready: its bucket goes on the link
        begin = max(t, link_free)  # after the bucket ahead of it
        link_free = begin + link.seconds("all_reduce", grad_bytes[i], world_size)
    return max(t, link_free) + optimizer_s
