"""Strategy: what a module was made into, and the one place that says so.

`parallelize`, `dzl.DDP`, `dzl.fully_shard` and `dzl.Zero3` record a `Strategy` for the model
they return: its name, the user's module inside any wrapper, the optimizer that steps it, the
ZeRO-3 engine where parameters are sharded, and where the authoritative fp32 values live.
`full_state_dict`, `full_grads`, checkpoints, the memory accounting and the lessons ask it
(`strategy_of(model)`, or `model.strategy`), instead of attributes hidden on the module.

A module that a strategy keeps (ZeRO and the parameter server train the user's own module,
not a wrapper) gets a subclass of its own class mixed with `StrategyModule`, as FSDP2's
`fully_shard` does: it is still an instance of its class, its `state_dict()` keys and its
repr do not change, and it answers `model.strategy`. DDP is a wrapper (as torch's): the
wrapper knows the strategy, its `.module` is the user's module.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_STRATEGIES: weakref.WeakKeyDictionary[Any, Strategy] = weakref.WeakKeyDictionary()
# Memory probes: a layer above (memory.py's tracker) samples what is alive at the moments a
# strategy allocates or frees a transient buffer (a gradient into its bucket, a gather, a
# reduce-scatter's receive buffer), so that a peak is seen when it happens, not at the end of
# a phase. Empty outside a tracked step: one list test per call.
_PROBES: list[Callable[[str], None]] = []


def add_memory_probe(probe: Callable[[str], None]) -> None:
    """probe(where) is called at each of the strategies' allocation points."""
    _PROBES.append(probe)


def remove_memory_probe(probe: Callable[[str], None]) -> None:
    if probe in _PROBES:
        _PROBES.remove(probe)


def memory_probe(where: str) -> None:
    """Tell the memory probes that a transient buffer was just allocated or is about to go."""
    for probe in _PROBES:
        probe(where)


_MIXED: dict[type, type] = {}  # a module class -> its StrategyModule subclass


class Strategy:
    """What a model is: `name` ("local", "ddp", "zero1", "zero2", "zero3", "fully_shard",
    "param_server"), `module` (the user's module), `optimizer` (None where the user builds
    it: DDP, fully_shard), `engine` (the Zero3 engine where parameters are sharded)."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        optimizer: Any = None,
        engine: Any = None,
        full_values: Callable[[], dict[int, torch.Tensor]] | None = None,
        frozen_masters: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.optimizer = optimizer
        self.engine = engine
        self._full_values = full_values
        # fp32 values of frozen parameters from before a low-precision cast (checkpoints save
        # these, not the bf16 / fp16 copies the module computes with)
        self.frozen_masters = frozen_masters or {}

    @property
    def shards_parameters(self) -> bool:
        """True where a rank holds only a slice of each parameter at rest (ZeRO-3)."""
        return self.engine is not None

    def full_values(self) -> dict[int, torch.Tensor]:
        """{id(parameter): full fp32 value} where the module's own tensors are not it (shards,
        master weights); collective for sharded strategies. Empty: the module's tensors are
        the values."""
        values = dict(self.frozen_masters)
        if self._full_values is not None:
            values.update(self._full_values())
        return values

    def __repr__(self) -> str:
        return f"Strategy({self.name!r}, module={type(self.module).__name__})"


class StrategyModule:
    """Mixed into a module that a strategy trains in place: it knows its strategy."""

    @property
    def strategy(self) -> Strategy:
        return _STRATEGIES[self]


def attach(model: nn.Module, strategy: Strategy) -> nn.Module:
    """Record `strategy` for `model`; a plain module gets the StrategyModule mixin."""
    cls = type(model)
    if not isinstance(model, StrategyModule):
        mixed = _MIXED.get(cls)
        if mixed is None:
            # the same name and module: repr(model) and error messages read as before
            mixed = type(cls.__name__, (StrategyModule, cls), {"__module__": cls.__module__})
            mixed.__qualname__ = cls.__qualname__
            _MIXED[cls] = mixed
        model.__class__ = mixed
    _STRATEGIES[model] = strategy
    return model


def detach(model: nn.Module) -> None:
    """Forget the strategy of `model` and give it its own class back (its sharding undone)."""
    _STRATEGIES.pop(model, None)
    cls = type(model)
    if isinstance(model, StrategyModule) and _MIXED.get(cls.__bases__[-1]) is cls:
        model.__class__ = cls.__bases__[-1]  # (StrategyModule, the module's own class)


def strategy_of(model: Any) -> Strategy | None:
    """The Strategy of a model that parallelize, DDP, fully_shard or Zero3 returned (or of the
    module inside it); None for a plain module."""
    try:
        found = _STRATEGIES.get(model)
    except TypeError:  # not weak-referenceable: not ours
        return None
    if found is None and getattr(model, "module", None) is not None:
        try:
            found = _STRATEGIES.get(model.module)
        except TypeError:
            return None
    return found
