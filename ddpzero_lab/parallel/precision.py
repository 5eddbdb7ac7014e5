"""Mixed precision as the ZeRO paper models it: bf16 for compute and communication, fp32 for
the master weights and the optimizer state.

This module owns the precision names, the casts at the model's edges (floating-point inputs to
the compute dtype on the way in, outputs back to fp32 on the way out, so that the loss is
computed in fp32) and `MasterWeightsOptimizer`, which keeps an fp32 master copy of replicated
bf16 parameters (strategies local and ddp). The sharded strategies keep their fp32 masters in
their shards themselves (zero.py, zero3.py).

The bytes per parameter follow the paper's split (Rajbhandari et al., SC20, §3.1): 2 for the
bf16 parameters, 2 for the bf16 gradients, K = 12 for the optimizer (4 for the fp32 master
weights, 4 + 4 for Adam's two moments). The fp32 gradient the optimizer needs exists only
inside `step()`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .wrapper import WrappedOptimizer

PRECISIONS = ("fp32", "bf16-mixed")
COMPUTE_DTYPE = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16}


def check_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return COMPUTE_DTYPE[precision]


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        cast = [_cast(v, dtype) for v in value]
        return type(value)(cast) if not hasattr(value, "_fields") else type(value)(*cast)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def cast_at_edges(module: nn.Module, dtype: torch.dtype) -> list:
    """Cast the module's floating-point inputs to `dtype` and its outputs back to fp32.
    Returns the hook handles."""

    def inputs(mod, args, kwargs):
        return _cast(args, dtype), _cast(kwargs, dtype)

    def outputs(mod, args, output):
        return _cast(output, torch.float32)

    return [
        module.register_forward_pre_hook(inputs, with_kwargs=True),
        module.register_forward_hook(outputs),
    ]


class MasterWeightsOptimizer(WrappedOptimizer):
    """The optimizer of a model whose parameters are bf16: it steps fp32 master copies (made
    from the parameters' fp32 values before they are cast) and copies the result back."""

    def __init__(
        self, params: list[nn.Parameter], masters: list[torch.Tensor], optimizer: Callable
    ) -> None:
        self.params = list(params)
        self.masters = [nn.Parameter(m.detach().float().clone()) for m in masters]
        self._adopt(self.masters, optimizer(self.masters))

    def _shards(self) -> list[torch.Tensor]:
        return self.masters

    def full_values(self) -> dict[int, torch.Tensor]:
        """{id(parameter): its fp32 master value}."""
        return {id(p): m.detach().clone() for p, m in zip(self.params, self.masters, strict=True)}

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"optimizer": self.masters}  # fp32 master weights: part of K, as in the paper

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("step() takes no closure here")
        for p, master in zip(self.params, self.masters, strict=True):
            master.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        for p, master in zip(self.params, self.masters, strict=True):
            p.copy_(master)
            master.grad = None  # the fp32 gradient lives only inside step()
        return None

    def clip_grad_norm_(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))


def to_compute_dtype(module: nn.Module, dtype: torch.dtype) -> list[torch.Tensor]:
    """Cast the module's floating-point parameters to `dtype` in place (buffers stay as they
    are); returns fp32 copies of their values from before the cast, in parameter order."""
    masters = []
    with torch.no_grad():
        for p in module.parameters():
            masters.append(p.detach().float().clone())
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return masters
