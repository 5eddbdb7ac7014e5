"""Solutions for notebook 14 (tensor and pipeline parallelism, and ZeRO in a 2-D mesh).

Each function is pasted over its stub by CI: it uses only its arguments and torch, nn, dist,
dzl and math.
"""

import math  # noqa: F401 - the names every notebook imports

import torch
import torch.distributed as dist  # noqa: F401
from torch import nn  # noqa: F401

import ddpzero_lab as dzl


def f_and_g(group=None):
    """Megatron's two conjugate operators for the tensor-parallel `group`: returns (f, g).

    f(x): identity in forward; in backward, the gradient summed over the group (all-reduce).
          It sits before a column-parallel layer, whose input every rank shares.
    g(x): the sum over the group in forward (all-reduce); identity in backward.
          It sits after a row-parallel layer, whose ranks each hold a partial product.
    Neither may change its argument: all-reduce a copy (dzl.comm.all_reduce works in place).
    """

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            dzl.comm.all_reduce(grad, group=group, tag="tp:f")
            return grad

    class G(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            out = x.contiguous().clone()
            dzl.comm.all_reduce(out, group=group, tag="tp:g")
            return out

        @staticmethod
        def backward(ctx, grad):
            return grad

    return F.apply, G.apply


def one_f_one_b(stage, stages, micro_batches):
    """The 1F1B order of work of pipeline stage `stage` (0 = first) of `stages`, for
    `micro_batches` micro-batches: a list of ("F", i) and ("B", i).

    Warm-up: stages - stage - 1 forwards (no more than micro_batches). Steady state: one
    forward, then one backward, in turn. Cool-down: the backwards left. Micro-batches go in
    order 0, 1, 2, ... in each kind.
    """
    warmup = min(stages - stage - 1, micro_batches)
    order = [("F", i) for i in range(warmup)]
    forward = warmup
    for backward in range(micro_batches):
        if forward < micro_batches:
            order.append(("F", forward))
            forward += 1
        order.append(("B", backward))
    return order
