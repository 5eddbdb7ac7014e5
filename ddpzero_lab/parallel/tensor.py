"""Tensor parallelism from scratch, as Megatron-LM splits a transformer layer (Shoeybi et al.,
"Megatron-LM", 2019, §3).

Where data parallelism copies the model and splits the batch, tensor parallelism splits each
weight matrix across the `tp` ranks of a group, every rank seeing the whole batch:

* `ColumnParallelLinear`: rank r holds rows r of W (output features out/tp); its output is
  this rank's slice of the features. Its input must be the same on every rank, and in
  backward the input's gradient is the *sum* of the ranks' partial gradients: the conjugate
  operator `f` (identity forward, all-reduce backward) sits at its input.
* `RowParallelLinear`: rank r holds columns r of W (input features in/tp) and takes the
  slice r of its input; the ranks' partial products add up to the output: `g` (all-reduce
  forward, identity backward) sits at its output; the bias is added once, after the sum.
* `TensorParallelMLP` = column-parallel, GeLU (elementwise: it needs no communication),
  row-parallel: one all-reduce in forward, one in backward. `TensorParallelAttention` splits
  the heads the same way (Q, K, V column-parallel, the output projection row-parallel). A
  transformer layer of both: two all-reduces forward and two backward, the paper's count.

`load_full` fills each layer from a full nn.Linear (rank r takes its slice), so a model
split this way computes what the full one computes: the tests compare it with one process
and with torch.distributed.tensor.parallel's ColwiseParallel / RowwiseParallel.
The collectives go through comm/ (counted, tagged "tp:...").
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .. import comm


def _rank_and_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class _CopyToTensorParallel(torch.autograd.Function):
    """Megatron's `f`: identity forward; backward sums the gradient over the group."""

    @staticmethod
    def forward(ctx, x, group, tag):
        ctx.group, ctx.tag = group, tag
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        comm.all_reduce(grad, group=ctx.group, tag=ctx.tag)
        return grad, None, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's `g`: forward sums the partial results over the group; identity backward."""

    @staticmethod
    def forward(ctx, x, group, tag):
        out = x.contiguous().clone()
        comm.all_reduce(out, group=group, tag=tag)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def copy_to_tensor_parallel(x: torch.Tensor, group=None, tag: str = "tp:f") -> torch.Tensor:
    return _CopyToTensorParallel.apply(x, group, tag)


def reduce_from_tensor_parallel(x: torch.Tensor, group=None, tag: str = "tp:g") -> torch.Tensor:
    return _ReduceFromTensorParallel.apply(x, group, tag)


def _split(size: int, parts: int, what: str) -> int:
    if size % parts:
        raise ValueError(f"{what} ({size}) must divide evenly over {parts} tensor-parallel ranks")
    return size // parts


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T + b_r: this rank's `out_features / tp` output features."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None):
        super().__init__()
        rank, size = _rank_and_size(group)
        self.group, self.in_features, self.out_features = group, in_features, out_features
        self.local_out = _split(out_features, size, "out_features")
        self.weight = nn.Parameter(torch.empty(self.local_out, in_features))
        self.bias = nn.Parameter(torch.zeros(self.local_out)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.rows = slice(rank * self.local_out, (rank + 1) * self.local_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_parallel(x, self.group, "tp:f")
        return nn.functional.linear(x, self.weight, self.bias)

    def load_full(self, linear: nn.Linear) -> ColumnParallelLinear:
        """Take this rank's rows of a full layer's weight and bias."""
        with torch.no_grad():
            self.weight.copy_(linear.weight[self.rows])
            if self.bias is not None:
                self.bias.copy_(linear.bias[self.rows])
        return self


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, + b: takes this rank's `in_features / tp` inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None):
        super().__init__()
        rank, size = _rank_and_size(group)
        self.group, self.in_features, self.out_features = group, in_features, out_features
        self.local_in = _split(in_features, size, "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in))
        # the bias is added after the sum: every rank holds it whole (and the same gradient)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.columns = slice(rank * self.local_in, (rank + 1) * self.local_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = nn.functional.linear(x, self.weight)
        out = reduce_from_tensor_parallel(partial, self.group, "tp:g")
        return out if self.bias is None else out + self.bias

    def load_full(self, linear: nn.Linear) -> RowParallelLinear:
        """Take this rank's columns of a full layer's weight, and its whole bias."""
        with torch.no_grad():
            self.weight.copy_(linear.weight[:, self.columns])
            if self.bias is not None:
                self.bias.copy_(linear.bias)
        return self


class TensorParallelMLP(nn.Module):
    """Linear(d, hidden) -> GeLU -> Linear(hidden, d), split Megatron's way: the first by
    columns, the second by rows; one all-reduce forward, one backward."""

    def __init__(self, d_model: int, hidden: int, group=None):
        super().__init__()
        self.up = ColumnParallelLinear(d_model, hidden, group=group)
        self.down = RowParallelLinear(hidden, d_model, group=group)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))

    def load_full(self, up: nn.Linear, down: nn.Linear) -> TensorParallelMLP:
        self.up.load_full(up)
        self.down.load_full(down)
        return self


class TensorParallelAttention(nn.Module):
    """Multi-head self-attention with its heads split over the group: Q, K and V
    column-parallel (whole heads per rank), the output projection row-parallel. One
    all-reduce forward, one backward. `causal`: each position sees itself and the past."""

    def __init__(self, d_model: int, heads: int, group=None, causal: bool = True):
        super().__init__()
        _, size = _rank_and_size(group)
        self.local_heads = _split(heads, size, "heads")
        self.head_dim = _split(d_model, heads, "d_model over heads")
        self.causal = causal
        self.q = ColumnParallelLinear(d_model, d_model, group=group)
        self.k = ColumnParallelLinear(d_model, d_model, group=group)
        self.v = ColumnParallelLinear(d_model, d_model, group=group)
        self.out = RowParallelLinear(d_model, d_model, group=group)

    def forward(self, x):  # x: (batch, sequence, d_model), the same on every rank
        b, t, _ = x.shape
        # one f for the three projections: the input's gradient is summed once
        x = copy_to_tensor_parallel(x, self.q.group, "tp:f")

        def heads(layer):
            y = nn.functional.linear(x, layer.weight, layer.bias)
            return y.view(b, t, self.local_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q), heads(self.k), heads(self.v)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        y = y.transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim)
        return self.out(y)

    def load_full(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, out: nn.Linear):
        for mine, full in ((self.q, q), (self.k, k), (self.v, v), (self.out, out)):
            mine.load_full(full)
        return self
