"""Tensor parallelism (parallel/tensor.py), Megatron's split: a tensor-parallel MLP and an
attention block equal the full layers in one process (outputs, gradients of every slice, and
three SGD steps), send the paper's all-reduces (one forward, one backward per block), and
agree with torch.distributed.tensor.parallel's ColwiseParallel / RowwiseParallel.

One cluster per world size (2, 4), shared by the tests of this module.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.parallel.tensor import TensorParallelAttention, TensorParallelMLP

D, HIDDEN, HEADS, SEQ, BATCH, STEPS = 8, 16, 4, 5, 3, 3
ATOL = 1e-5


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"N{n}")
def tpcluster(request):
    with dzl.LiveCluster(world_size=request.param, timeout=30.0) as cluster:
        yield cluster


def _full_mlp():
    torch.manual_seed(0)
    return nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)


def _full_attention():
    torch.manual_seed(1)
    return [nn.Linear(D, D) for _ in range(4)]  # q, k, v, out


def _attention(x, q, k, v, out):  # the full block, the reference
    b, t, _ = x.shape

    def heads(layer):
        return layer(x).view(b, t, HEADS, D // HEADS).transpose(1, 2)

    y = nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    return out(y.transpose(1, 2).reshape(b, t, D))


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, SEQ, D, generator=g), torch.randn(BATCH, SEQ, D, generator=g)


def _train(block, params, steps=STEPS):
    """SGD on `block` (a callable of x): the output and input gradient of the first step,
    and every parameter's gradient in the first step."""
    opt = torch.optim.SGD(params, lr=0.1)
    first = None
    for step in range(steps):
        x, y = _data(step)
        x.requires_grad_(True)
        out = block(x)
        nn.functional.mse_loss(out, y).backward()
        if first is None:
            first = (out.detach(), x.grad.clone(), [p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad()
    return first


def _mlp_case():
    up, down = _full_mlp()
    tp = TensorParallelMLP(D, HIDDEN).load_full(up, down)
    dzl.reset_traffic()
    x, _ = _data(0)
    x.requires_grad_(True)  # as an earlier layer's output: f's backward then runs
    tp(x).sum().backward()
    calls = dzl.traffic()["all_reduce"]["calls"]
    tp.zero_grad()
    ours = _train(tp, list(tp.parameters()))
    return ours, calls, [p.detach().clone() for p in tp.parameters()], tp.up.rows, tp.down.columns


def test_a_tensor_parallel_mlp_equals_the_full_one(tpcluster):
    up, down = _full_mlp()
    out, x_grad, grads = _train(
        lambda x: down(nn.functional.gelu(up(x))), [*up.parameters(), *down.parameters()]
    )
    for mine, calls, params, rows, columns in tpcluster.run(_mlp_case):
        my_out, my_x_grad, my_grads = mine
        assert calls == 2  # g in forward, f in backward
        torch.testing.assert_close(my_out, out, rtol=0, atol=ATOL)
        torch.testing.assert_close(my_x_grad, x_grad, rtol=0, atol=ATOL)
        up_w, up_b, down_w, down_b = grads
        for got, want in zip(
            my_grads, (up_w[rows], up_b[rows], down_w[:, columns], down_b), strict=True
        ):
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        # three steps later, each rank's slices are the full layers' slices
        for got, want in zip(
            params,
            (up.weight[rows], up.bias[rows], down.weight[:, columns], down.bias),
            strict=True,
        ):
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=ATOL)


def _attention_case():
    layers = _full_attention()
    tp = TensorParallelAttention(D, HEADS).load_full(*layers)
    dzl.reset_traffic()
    x, _ = _data(0)
    x.requires_grad_(True)  # as an earlier layer's output: f's backward then runs
    tp(x).sum().backward()
    calls = dzl.traffic()["all_reduce"]["calls"]
    tp.zero_grad()
    ours = _train(tp, list(tp.parameters()))
    return ours, calls, tp.q.rows, tp.out.columns


def test_tensor_parallel_attention_equals_the_full_block(tpcluster):
    layers = _full_attention()
    params = [p for layer in layers for p in layer.parameters()]
    out, x_grad, grads = _train(lambda x: _attention(x, *layers), params)
    for mine, calls, rows, columns in tpcluster.run(_attention_case):
        my_out, my_x_grad, my_grads = mine
        assert calls == 2  # one g for the output projection, one f for Q, K and V together
        torch.testing.assert_close(my_out, out, rtol=0, atol=ATOL)
        torch.testing.assert_close(my_x_grad, x_grad, rtol=0, atol=ATOL)
        want = [*(g[rows] for g in grads[:6]), grads[6][:, columns], grads[7]]
        for got, w in zip(my_grads, want, strict=True):
            torch.testing.assert_close(got, w, rtol=0, atol=ATOL)


def _ours_and_torchs():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    up, down = _full_mlp()
    ours = TensorParallelMLP(D, HIDDEN).load_full(up, down)
    theirs = nn.Sequential(up, nn.GELU(), down)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    parallelize_module(theirs, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    x, _ = _data(0)
    a, b = ours(x), theirs(x)
    a.sum().backward()
    b.sum().backward()
    return (
        a.detach(),
        b.detach().full_tensor() if hasattr(b, "full_tensor") else b.detach(),
        ours.up.weight.grad,
        theirs[0].weight.grad.to_local(),
    )


def test_agrees_with_torchs_colwise_and_rowwise_parallel(tpcluster):
    for ours, theirs, our_grad, their_grad in tpcluster.run(_ours_and_torchs):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
        torch.testing.assert_close(our_grad, their_grad, rtol=0, atol=ATOL)


def _uneven():
    try:
        TensorParallelMLP(D, HIDDEN + 1)
    except ValueError as exc:
        return str(exc)
    return None


def test_sizes_the_group_does_not_divide_are_refused(tpcluster):
    for message in tpcluster.run(_uneven):
        assert message is not None and "divide evenly" in message
