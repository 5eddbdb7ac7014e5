"""Activation checkpointing per block: keep a block's inputs, recompute its insides in backward.

This module owns `apply_activation_checkpointing(module, policy)`, which `parallelize(...,
activation_checkpointing=...)` calls before the strategy is built. Each chosen block's forward
runs under `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` (Chen et al. 2016,
"Training Deep Nets with Sublinear Memory Cost"; the ZeRO paper's ZeRO-R, §6.1): autograd keeps
only the block's inputs, and backward runs the block's forward again to get what it saved.
Activation memory falls from every block's insides to the blocks' inputs plus one block's
insides at a time, for one more forward per block.

The block's module, its parameters and its state_dict keys do not change (the forward is
replaced on the instance, as ZeRO-3 does for the root), so strategies see the same module.
ZeRO-3 gathers a unit before its backward (a hook on the unit's outputs), so the recompute,
which calls the block's own forward and not its module hooks, finds its parameters there;
units nested inside a checkpointed block do see their hooks run again, and ask `recomputing()`
to tell the recompute from a forward.

Memory accounting: checkpoint saves a block's inputs with the saved-tensor hooks active around
it (the memory tracker's count them), but what the recompute saves again goes to checkpoint's
own hooks. When the outer hooks carry an observer (a `_ddpzero_observer` attribute on the pack
function), the recompute shows it each tensor it saves (`observer.watch(t)`), which it counts
until the tensor's storage is gone. It owns no communication and no optimizer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .strategy import memory_probe

CheckpointPolicy = Callable[[str, nn.Module], bool]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
_RECOMPUTING = [0]  # depth of recomputes in progress (backward runs one at a time)


def recomputing() -> bool:
    """True while backward recomputes a checkpointed block's forward."""
    return _RECOMPUTING[0] > 0


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def blocks_with_parameters(root: nn.Module, containers: tuple[type, ...]) -> set[str]:
    """Each child of the root that holds parameters; a child that is one of `containers`
    gives its elements instead (ZeRO-3's default units and the checkpointed blocks)."""
    names = set()
    for name, child in root.named_children():
        if isinstance(child, containers):
            names |= {f"{name}.{n}" for n, c in child.named_children() if _holds_parameters(c)}
        elif _holds_parameters(child):
            names.add(name)
    return names


def default_blocks(root: nn.Module) -> set[str]:
    """Each child of the root that holds parameters; a child that is a container (Sequential,
    ModuleList, ModuleDict) gives its elements instead: a transformer's blocks one by one."""
    return blocks_with_parameters(root, _CONTAINERS)


def choose_blocks(module: nn.Module, policy) -> list[str]:
    """Names of the blocks `policy` chooses (True: `default_blocks`; a callable (name, module)
    -> bool), the outermost only (a block inside a checkpointed one is recomputed with it),
    never the root."""
    if policy is True:
        chosen = default_blocks(module)
    elif callable(policy):
        chosen = {n for n, m in module.named_modules() if n and policy(n, m)}
    else:
        raise TypeError(
            "activation_checkpointing must be True, False/None or a callable (name, module) "
            f"-> bool, got {policy!r}"
        )
    outermost = [n for n in chosen if not any(n.startswith(o + ".") for o in chosen)]
    return sorted(outermost, key=lambda n: [m for m, _ in module.named_modules()].index(n))


def apply_activation_checkpointing(module: nn.Module, policy=True) -> list[str]:
    """Checkpoint each block that `policy` chooses (see `choose_blocks`); returns their names.
    A block whose forward is already checkpointed is left as it is."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    names = choose_blocks(module, policy)
    for name in names:
        block = module.get_submodule(name)
        if getattr(block.forward, "_ddpzero_checkpointed", False):
            continue
        block.forward = _checkpointed(block.forward)
    return names


def _observer():
    """The memory observer of the saved-tensor hooks active now (the tracker's), if any."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return None if top is None else getattr(top[0], "_ddpzero_observer", None)


def _checkpointed(forward: Callable) -> Callable:
    def run(calls: list[int], observer, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            return forward(*args, **kwargs)
        # a recompute, in backward: what it saves lives until the block's backward uses it
        _RECOMPUTING[0] += 1
        try:
            inner = torch._C._autograd._top_saved_tensors_default_hooks(False)
            if observer is None or inner is None:
                return forward(*args, **kwargs)
            inner_pack, inner_unpack = inner

            def pack(t):
                observer.watch(t)
                return inner_pack(t)

            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, inner_unpack):
                    return forward(*args, **kwargs)
            finally:
                # the block's insides are back: this backward's worst moment for activations
                # (checkpoint's early stop ends the recompute with an exception once the last
                # tensor it needs is saved: that moment too)
                memory_probe("recomputed")
        finally:
            _RECOMPUTING[0] -= 1

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled() or recomputing():
            return forward(*args, **kwargs)
        # (the inputs the checkpoint keeps are saved with the hooks active here, so an
        # observer counts them as it counts any saved tensor)
        fn = functools.partial(run, [0], _observer())
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    checkpointed._ddpzero_checkpointed = True
    return checkpointed


def _same(t):
    return t


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
