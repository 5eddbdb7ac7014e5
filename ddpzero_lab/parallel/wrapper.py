"""The base of the optimizers strategies return: a torch Optimizer around the real one.

This module owns what the parameter server's and ZeRO's optimizers share: being a
`torch.optim.Optimizer` (so learning-rate schedulers and step hooks accept them) whose
param_groups and state are those of the optimizer they wrap, and `zero_grad`. It owns no
communication and no sharding.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# modules a strategy has wrapped (and the wrappers themselves), with the strategy's name
_WRAPPED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def claim(strategy: str, *modules: nn.Module) -> None:
    """Mark `modules` as wrapped by `strategy`; refuse one that a strategy wraps already (a
    second set of hooks would reduce every gradient twice)."""
    for module in modules:
        if module in _WRAPPED:
            raise ValueError(
                f"this module is already wrapped by {_WRAPPED[module]!r}: parallelize (or wrap) "
                "a plain module once, and train with the model and optimizer that call returned"
            )
    for module in modules:
        _WRAPPED[module] = strategy


def unclaim(module: nn.Module) -> None:
    """Forget that a strategy wraps `module` (its wrapping was undone)."""
    _WRAPPED.pop(module, None)


class WrappedOptimizer(torch.optim.Optimizer):
    """Subclasses set `self.params` (the module's parameters whose .grad the loop fills) and
    call `_adopt(optimizer_params, inner)`; `_shards()` lists tensors whose .grad the wrapper
    itself fills (cleared by zero_grad too)."""

    params: list[torch.Tensor]

    def _adopt(self, optimizer_params: list[torch.Tensor], inner) -> None:
        self.optimizer = inner
        torch.optim.Optimizer.__init__(self, optimizer_params, {})
        self.param_groups = inner.param_groups if inner is not None else []
        self.state = inner.state if inner is not None else {}

    def _shards(self) -> list[torch.Tensor]:
        return []

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        for shard in self._shards():
            shard.grad = None
