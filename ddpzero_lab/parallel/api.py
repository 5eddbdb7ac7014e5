"""parallelize(): one entry point that turns a module and an optimizer into a strategy.

This module owns argument checking and the choice of strategy; each strategy lives in its
own module. Strategies not built yet say so plainly instead of running something else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..cluster.context import in_worker
from .precision import (
    MasterWeightsOptimizer,
    MixedPrecisionPolicy,
    as_policy,
    register_casts,
    to_compute_dtype,
)
from .strategy import Strategy, attach, strategy_of

# What a layer above attaches to every parallelized model with track_memory on (memory.py
# registers its tracker here): parallel/ imports nothing from the layers above it.
_TRACKERS: list[Callable] = []


def register_tracker(attach: Callable) -> None:
    """attach(model, optimizer) is called by parallelize(..., track_memory=True)."""
    _TRACKERS.append(attach)


STRATEGIES = ("local", "ddp", "zero1", "zero2", "zero3", "param_server")


def parallelize(
    module: nn.Module,
    strategy: str = "ddp",
    optimizer: Callable | None = None,
    track_memory: bool | None = None,
    precision: str | MixedPrecisionPolicy = "fp32",
    activation_checkpointing: bool | Callable | None = None,
    **options,
):
    """Return (model, optimizer) for `strategy`; call inside a rank, every rank alike.

    module:    a plain torch.nn.Module with the same initial values on every rank (strategies
               that need it broadcast rank 0's values).
    optimizer: a callable that builds a torch optimizer from parameters, e.g.
               `lambda params: torch.optim.AdamW(params, lr=1e-3)`.
    track_memory: emit `memory` events at each phase of a step (default: on inside a
               LiveCluster rank, off elsewhere).
    precision: "fp32", a dzl.MixedPrecisionPolicy (all but param_server: which modules
               compute in bf16 or fp16, in which dtype gradients are reduced), or a shorthand:
               "bf16-mixed" / "fp16-mixed", bf16 / fp16 parameters and gradients for compute
               and communication, fp32 master weights and optimizer state; inputs are cast
               to the low dtype and outputs back to fp32 at the model's edges. fp16 needs loss
               scaling: train with dzl.GradScaler (used as torch's GradScaler).
    activation_checkpointing: True (each child of the root holding parameters, the elements
               of a container child: a transformer's blocks one by one) or a callable
               (name, module) -> bool choosing the blocks; each runs under
               torch.utils.checkpoint (use_reentrant=False): its insides are recomputed in
               backward instead of kept (checkpointing.py). Works with every strategy.
    options:   ddp: bucket_cap_mb=, overlap=, ...; zero1/zero2: bucket_cap_mb=, group=,
               replicate_group= (hybrid sharding, as FSDP's HSDP: ZeRO within `group`, the
               shards replicated across `replicate_group`, e.g. a mesh's rows and columns);
               zero2 also overlap= (True: each bucket reduce-scattered during backward;
               False: all after it);
               zero3: units=, replicate_group=
               (a callable (name, module) -> bool choosing the units; default each child of
               the root with parameters), prefetch= (all-gather the next unit while one runs),
               group=; param_server: group=.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if optimizer is None:
        raise TypeError(
            "parallelize needs optimizer=, a callable that builds one from parameters, e.g. "
            "optimizer=lambda params: torch.optim.SGD(params, lr=0.1)"
        )
    if isinstance(optimizer, torch.optim.Optimizer) or not callable(optimizer):
        raise TypeError(
            "optimizer must be a callable that builds the optimizer from parameters (the "
            "strategy decides which parameters each rank's optimizer holds), e.g. "
            "optimizer=lambda params: torch.optim.SGD(params, lr=0.1)"
        )
    if activation_checkpointing is not None and activation_checkpointing is not False:
        from .checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(module, activation_checkpointing)
    policy = as_policy(precision)
    if policy is not None and strategy == "param_server":
        raise ValueError("the parameter server trains in fp32 only (precision='fp32')")
    mixed = policy is not None and strategy != "zero3"  # zero3 casts its own shards
    if mixed and strategy != "local":
        # the fp32 masters are taken before the cast: take them from rank 0's values, as the
        # strategy would have broadcast them
        from .group import check_same_model, start_replicas_alike

        check_same_model(module, options.get("group"))
        start_replicas_alike(module, options.get("group"), options.get("replicate_group"))
    masters = to_compute_dtype(module, policy) if mixed else None
    if mixed:
        register_casts(module, policy)
    if mixed and policy.reduce_dtype is not None and strategy in ("ddp", "zero1", "zero2"):
        options = {**options, "reduce_dtype": policy.reduce_dtype}

    def replicated_optimizer():
        params = [p for p in module.parameters() if p.requires_grad]
        if masters is None:
            return optimizer(params)
        fp32 = [m for p, m in zip(module.parameters(), masters, strict=True) if p.requires_grad]
        return MasterWeightsOptimizer(params, fp32, optimizer)

    frozen = {}  # fp32 values of frozen parameters from before the cast
    if masters is not None:
        frozen = {
            id(p): m
            for p, m in zip(module.parameters(), masters, strict=True)
            if not p.requires_grad
        }
    if strategy == "local":
        if options:
            raise TypeError(f"strategy 'local' takes no options, got {sorted(options)}")
        model, opt = module, replicated_optimizer()
        record = Strategy("local", module, opt)
    elif strategy == "ddp":
        from .ddp import DDP

        model = DDP(module, **options)
        opt = replicated_optimizer()
        record = model.strategy
        record.optimizer = opt
    elif strategy in ("zero1", "zero2"):
        from .zero import ZeroShardedOptimizer

        allowed = {"group", "bucket_cap_mb", "reduce_dtype", "replicate_group"}
        if strategy == "zero2":
            allowed.add("overlap")  # stage 1 reduces in step(): nothing to overlap
        if set(options) - allowed:
            extra = ", overlap=" if strategy == "zero2" else ""
            raise TypeError(
                f"strategy {strategy!r} takes group=, replicate_group={extra} and "
                f"bucket_cap_mb=, got {sorted(options)}"
            )
        model = module
        opt = ZeroShardedOptimizer(
            module, optimizer, stage=int(strategy[-1]), masters=masters, **options
        )
        record = Strategy(strategy, module, opt)
    elif strategy == "zero3":
        from .zero3 import Zero3, Zero3Optimizer

        if set(options) - {"group", "units", "prefetch", "replicate_group"}:
            raise TypeError(
                "strategy 'zero3' takes units=, prefetch=, group= and replicate_group=, got "
                f"{sorted(options)}"
            )
        engine = Zero3(module, precision=policy, shard_parameters=False, **options)
        model, opt = module, Zero3Optimizer(engine, optimizer)
        record = Strategy("zero3", module, opt, engine=engine)
    else:
        from .param_server import ParameterServerOptimizer

        if set(options) - {"group"}:
            raise TypeError(f"strategy 'param_server' takes only group=, got {sorted(options)}")
        model, opt = module, ParameterServerOptimizer(module, optimizer, **options)
        record = Strategy("param_server", module, opt)
    # the authoritative fp32 values live in the shards or master weights
    if strategy == "zero3" or masters is not None:
        record._full_values = getattr(opt, "full_values", None)
    record.frozen_masters = frozen
    if strategy != "ddp":
        attach(model, record)
    if track_memory is None:
        track_memory = in_worker()
    if track_memory:
        for tracker in _TRACKERS:
            tracker(model, opt)
    return model, opt


def full_state_dict(model: nn.Module) -> dict:
    """Full, unsharded tensors, keyed exactly as the original module's state_dict(), on every
    rank (call it on every rank: strategies that shard parameters at rest gather them). With
    mixed precision (bf16 or fp16) the parameters are the fp32 master weights. For DDP and ZeRO
    stages 1-2 in fp32 every rank already holds the full parameters."""
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # dzl.Zero3: a wrapper that is not a module
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    module = getattr(model, "module", model)
    record = strategy_of(model)
    values = record.full_values() if record is not None else {}
    by_name = dict(module.named_parameters(remove_duplicate=False))
    out = {}
    for key, value in module.state_dict(keep_vars=True).items():
        param = by_name.get(key)
        out[key] = values[id(param)] if id(param) in values else value.detach().clone()
    return out


def clip_grad_norm_(model, max_norm: float) -> float:
    """Clip the gradients of a model any strategy returned to the global 2-norm, the one
    torch.nn.utils.clip_grad_norm_ gives in one process on the global batch; returns that
    norm before clipping. Call it after backward, before step, on every rank (sharded
    strategies add up every rank's shards in one all-reduce). torch's own clip would use
    this rank's shards alone under ZeRO-2/3 and fully_shard, and the unreduced gradients
    under ZeRO-1. The parameter server reduces inside step(): clip there is refused."""
    record = strategy_of(model)
    if record is None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    if record.name == "param_server":
        raise ValueError(
            "the parameter server reduces gradients inside step(): there is no global "
            "gradient to clip before it"
        )
    clip = getattr(record.optimizer, "clip_grad_norm_", None)  # ZeRO's, master weights'
    if clip is None and record.engine is not None:
        clip = record.engine.clip_grad_norm_  # fully_shard / Zero3: the shards' .grad
    if clip is not None:
        return float(clip(max_norm))
    params = [p for p in record.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))  # replicated: DDP, local
