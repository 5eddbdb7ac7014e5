"""Mixed precision as a policy, as FSDP2's `MixedPrecisionPolicy`, and fp16's loss scaling.

This module owns:

* `MixedPrecisionPolicy(param_dtype, reduce_dtype, modules)`: which modules compute in the low
  precision (`param_dtype`, bf16 or fp16: their parameters are stored in it, their inputs are
  cast to it and their outputs back to fp32), and in which dtype gradients are communicated
  (`reduce_dtype`: fp32, or None for the param dtype). Modules it does not cover (norms, by
  default) keep fp32 parameters and compute in fp32. `precision="bf16-mixed"` and
  `"fp16-mixed"` are shorthands for the ZeRO paper's scheme: the whole model in the low dtype,
  gradients communicated in it too, inputs cast at the model's edges (`modules=None`).
* the casts (`cast_at_edges`, `to_compute_dtype`) and `MasterWeightsOptimizer`, which keeps an
  fp32 master copy of replicated low-precision parameters (strategies local and ddp). The
  sharded strategies keep their fp32 masters in their shards themselves (zero.py, zero3.py).
* `GradScaler`: dynamic loss scaling for fp16, used exactly as torch's `torch.amp.GradScaler`
  (scale / unscale_ / step / update), done right for sharded gradients as FSDP's
  `ShardedGradScaler`: the inf/NaN check covers every shard on every rank (one all-reduce of a
  found_inf flag, MAX), so a step with an overflow anywhere is skipped on every rank together.

The bytes per parameter follow the paper's split (Rajbhandari et al., SC20, §3.1): 2 for the
low-precision parameters, 2 for their gradients, K = 12 for the optimizer (4 for the fp32
master weights, 4 + 4 for Adam's two moments), in bf16 and in fp16 alike. The fp32 gradient
the optimizer needs exists only inside `step()`. (With reduce_dtype=torch.float32 the
gradients are held in fp32 once reduced: 4 bytes instead of 2.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .wrapper import WrappedOptimizer

LOW_DTYPES = (torch.bfloat16, torch.float16)
# what the default policy casts: the modules whose matmuls dominate; norms stay fp32
DEFAULT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Embedding,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.MultiheadAttention,
)


@dataclass(frozen=True)
class MixedPrecisionPolicy:
    """Which modules compute in a low precision, and in which dtype gradients are reduced.

    param_dtype:  torch.bfloat16 or torch.float16: the covered modules' parameters are stored
                  (and gathered, in ZeRO-3) in it and their forward runs in it.
    reduce_dtype: the dtype of the gradient collectives: torch.float32, or None for
                  param_dtype (the ZeRO paper's fp16 gradients).
    modules:      a tuple of module classes, or a predicate module -> bool, choosing the
                  modules that compute in param_dtype (default: Linear, Embedding, Conv,
                  MultiheadAttention; LayerNorm and the other norms stay fp32); None: the
                  whole model, every parameter, inputs cast at the model's edges (what the
                  "bf16-mixed" and "fp16-mixed" shorthands mean).
    fp16 needs loss scaling: train with `dzl.GradScaler` (as torch's GradScaler).
    """

    param_dtype: torch.dtype = torch.bfloat16
    reduce_dtype: torch.dtype | None = torch.float32
    modules: tuple | Callable[[nn.Module], bool] | None = DEFAULT_MODULES

    def __post_init__(self) -> None:
        if self.param_dtype not in LOW_DTYPES:
            raise ValueError(
                f"param_dtype must be torch.bfloat16 or torch.float16, got {self.param_dtype!r}"
            )
        if self.reduce_dtype not in (None, torch.float32, self.param_dtype):
            raise ValueError(
                "reduce_dtype must be torch.float32 or None (the param dtype, "
                f"{self.param_dtype}), got {self.reduce_dtype!r}"
            )
        modules = self.modules
        if not (modules is None or callable(modules) and not isinstance(modules, tuple)):
            if isinstance(modules, type):
                modules = (modules,)
            if not isinstance(modules, tuple) or not all(
                isinstance(m, type) and issubclass(m, nn.Module) for m in modules
            ):
                raise TypeError(
                    "modules must be a tuple of nn.Module classes, a predicate module -> bool, "
                    f"or None (the whole model); got {self.modules!r}"
                )
            object.__setattr__(self, "modules", modules)

    @property
    def whole_model(self) -> bool:
        return self.modules is None

    @property
    def comm_dtype(self) -> torch.dtype:
        """The dtype gradients are communicated in."""
        return self.reduce_dtype or self.param_dtype

    def covers(self, module: nn.Module) -> bool:
        if self.modules is None:
            return True
        if isinstance(self.modules, tuple):
            return isinstance(module, self.modules)
        return bool(self.modules(module))

    def covered(self, root: nn.Module) -> list[nn.Module]:
        """The modules of `root` that compute in param_dtype (the root alone when the
        policy is the whole model)."""
        if self.modules is None:
            return [root]
        return [m for m in root.modules() if self.covers(m)]

    def dtypes(self, root: nn.Module) -> dict[int, torch.dtype]:
        """{id(parameter): the dtype it is stored in} for root's floating-point parameters: a
        parameter of a covered module (directly) in param_dtype, the rest in fp32."""
        out = {id(p): torch.float32 for p in root.parameters() if p.is_floating_point()}
        if self.modules is None:
            return dict.fromkeys(out, self.param_dtype)
        for module in self.covered(root):
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    out[id(p)] = self.param_dtype
        return out


SHORTHANDS = {
    "fp32": None,
    "bf16-mixed": MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=None, modules=None),
    "fp16-mixed": MixedPrecisionPolicy(torch.float16, reduce_dtype=None, modules=None),
}
PRECISIONS = tuple(SHORTHANDS)


def as_policy(precision) -> MixedPrecisionPolicy | None:
    """The policy for `precision` ("fp32": None, a shorthand, or a MixedPrecisionPolicy)."""
    if isinstance(precision, MixedPrecisionPolicy) or precision is None:
        return precision
    if isinstance(precision, str) and precision in SHORTHANDS:
        return SHORTHANDS[precision]
    raise ValueError(
        f"precision must be one of {PRECISIONS} or a dzl.MixedPrecisionPolicy, got {precision!r}"
    )


def check_precision(precision) -> torch.dtype:
    """The low dtype of `precision` (fp32 when none)."""
    policy = as_policy(precision)
    return torch.float32 if policy is None else policy.param_dtype


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
    """The optimizer of a model whose parameters are (partly) in a low precision: it steps
    fp32 master copies (made from the parameters' fp32 values before they were cast) and
    copies the result back."""

    def __init__(
        self, params: list[nn.Parameter], masters: list[torch.Tensor], optimizer: Callable
    ) -> None:
        self.params = list(params)
        self.masters = [nn.Parameter(m.detach().float().clone()) for m in masters]
        self.inv_scale = 1.0  # set by GradScaler.unscale_: applied as the gradients go to fp32
        self._adopt(self.masters, optimizer(self.masters))

    def _shards(self) -> list[torch.Tensor]:
        return self.masters

    def full_values(self) -> dict[int, torch.Tensor]:
        """{id(parameter): its fp32 master value}."""
        return {id(p): m.detach().clone() for p, m in zip(self.params, self.masters, strict=True)}

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"optimizer": self.masters}  # fp32 master weights: part of K, as in the paper

    def scaler_grads(self) -> list[torch.Tensor]:
        """The gradients step() applies (for GradScaler's inf/NaN check)."""
        return [p.grad for p in self.params if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("step() takes no closure here")
        for p, master in zip(self.params, self.masters, strict=True):
            master.grad = None if p.grad is None else unscaled(p.grad, self.inv_scale)
        self.optimizer.step()
        for p, master in zip(self.params, self.masters, strict=True):
            p.copy_(master)
            master.grad = None  # the fp32 gradient lives only inside step()
        return None

    def clip_grad_norm_(self, max_norm: float) -> float:
        from .zero import clip_scaled_

        # replicated gradients: no communication; the norm is summed in fp64
        return clip_scaled_(self, self.scaler_grads(), max_norm, distributed=False)


def unscaled(grad: torch.Tensor, inv_scale: float) -> torch.Tensor:
    """`grad` in fp32, times inv_scale (the loss scale undone after the cast, so that small
    fp16 gradients do not underflow on the way)."""
    out = grad.float()
    if inv_scale != 1.0:
        out = (out if out is not grad else out.clone()).mul_(inv_scale)
    return out


def to_compute_dtype(module: nn.Module, policy: MixedPrecisionPolicy) -> list[torch.Tensor]:
    """Cast the module's parameters that `policy` covers to its param_dtype in place (buffers
    stay as they are); returns fp32 copies of every parameter's value from before the cast,
    in parameter order."""
    dtypes = policy.dtypes(module)
    masters = []
    with torch.no_grad():
        for p in module.parameters():
            masters.append(p.detach().float().clone())
            if id(p) in dtypes:
                p.data = p.data.to(dtypes[id(p)])
    return masters


def register_casts(module: nn.Module, policy: MixedPrecisionPolicy) -> list:
    """The casts of `policy`: around the whole model (policy.modules None), or around each
    covered module (inputs to param_dtype, outputs back to fp32). Returns the hook handles."""
    handles = []
    for covered in policy.covered(module):
        handles.extend(cast_at_edges(covered, policy.param_dtype))
    return handles


class GradScaler:
    """Dynamic loss scaling for fp16, used as torch's `torch.amp.GradScaler`:

        scaler = dzl.GradScaler()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)            # optional: before clipping
        optimizer.clip_grad_norm_(1.0)        # clips the unscaled gradients
        scaler.step(optimizer)                # skipped if any gradient is inf/NaN, anywhere
        scaler.update()
        optimizer.zero_grad()

    Sharded gradients (ZeRO-1/2/3) are checked as FSDP's ShardedGradScaler checks them: each
    rank looks at the gradients it steps (its shards), then one all-reduce of the found_inf
    flag (MAX) over the optimizer's group tells every rank, so all skip the step together and
    the scale falls on all of them alike. The scale is multiplied by `backoff_factor` after a
    step with an overflow and by `growth_factor` after `growth_interval` steps in a row
    without one (torch's defaults). The loss scale is undone when the gradients are cast to
    fp32 for the master weights, not in the low precision where small values would underflow.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ) -> None:
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int):
            raise TypeError(f"growth_interval must be an int, got {growth_interval!r}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval!r}")
        self._scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self._growth_tracker = 0
        self._enabled = bool(enabled)
        self._per_optimizer: dict[int, dict] = {}  # id(optimizer) -> {"unscaled", "found_inf"}
        self._optimizers: list = []  # ours, whose inv_scale update() resets

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        return self._scale if self._enabled else 1.0

    def get_growth_tracker(self) -> int:
        return self._growth_tracker

    def scale(self, outputs):
        """outputs (a loss, or a nested structure of tensors) times the current scale."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            return outputs * self._scale
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError(f"scale() takes a tensor or a list/tuple of them, got {type(outputs)}")

    def unscale_(self, optimizer) -> None:
        """Undo the scale on `optimizer`'s gradients and look for inf/NaN in them, on every
        rank (collective for a distributed optimizer: call it on every rank)."""
        if not self._enabled:
            return
        state = self._per_optimizer.setdefault(id(optimizer), {})
        if state.get("unscaled"):
            raise RuntimeError("unscale_() was already called on this optimizer since update()")
        inv_scale = 1.0 / self._scale
        grads_of = getattr(optimizer, "scaler_grads", None)
        if callable(grads_of):  # ours: the gradients stay scaled until step() casts them
            grads = grads_of()
            optimizer.inv_scale = inv_scale
            self._optimizers.append(optimizer)
        else:  # a plain torch optimizer: unscale in place, as torch's GradScaler
            grads = [
                p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None
            ]
            with torch.no_grad():
                for g in grads:
                    g.mul_(inv_scale)
        state["found_inf"] = _found_inf(grads, getattr(optimizer, "group", None))
        state["unscaled"] = True

    def step(self, optimizer, *args, **kwargs):
        """optimizer.step() unless a gradient on some rank is inf/NaN (then nothing, on every
        rank). Unscales first if unscale_() was not called."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        state = self._per_optimizer.setdefault(id(optimizer), {})
        if state.get("stepped"):
            raise RuntimeError("step() was already called on this optimizer since update()")
        if not state.get("unscaled"):
            self.unscale_(optimizer)
        state["stepped"] = True
        if state["found_inf"]:
            return None  # skipped: parameters and optimizer state unchanged on every rank
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale: float | None = None) -> None:
        """Back off after a step with an overflow, grow after growth_interval good steps."""
        if not self._enabled:
            return
        if new_scale is not None:
            self._scale = float(new_scale)
        else:
            found = [s["found_inf"] for s in self._per_optimizer.values() if "found_inf" in s]
            if not found:
                raise RuntimeError("update() without a step(): no inf/NaN checks were recorded")
            if any(found):
                self._scale *= self._backoff_factor
                self._growth_tracker = 0
            else:
                self._growth_tracker += 1
                if self._growth_tracker == self._growth_interval:
                    self._scale *= self._growth_factor
                    self._growth_tracker = 0
        self._per_optimizer = {}
        self._reset_inv_scales()

    def _reset_inv_scales(self) -> None:
        for opt in list(self._optimizers):
            opt.inv_scale = 1.0
        self._optimizers = []

    def state_dict(self) -> dict:
        return {
            "scale": self._scale,
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": self._growth_tracker,
        }

    def load_state_dict(self, state: dict) -> None:
        self._scale = float(state["scale"])
        self._growth_factor = float(state["growth_factor"])
        self._backoff_factor = float(state["backoff_factor"])
        self._growth_interval = int(state["growth_interval"])
        self._growth_tracker = int(state["_growth_tracker"])


def _found_inf(grads: list[torch.Tensor], group=None) -> bool:
    """Whether any of `grads`, on any rank of `group`, holds an inf or NaN: each rank checks
    what it holds (its shards), one all-reduce (MAX) of the flag tells every rank."""
    from .. import comm

    device = grads[0].device if grads else comm.backend_device(group)
    flags = [torch.logical_not(torch.isfinite(g).all()) for g in grads if g.numel()]
    found = torch.zeros(1, dtype=torch.float32, device=device)
    if flags:  # one flag for all of this rank's gradients, one host sync
        found = torch.stack(flags).any().float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        comm.all_reduce(found, op=dist.ReduceOp.MAX, group=group, tag="found_inf")
    return bool(found.item())
