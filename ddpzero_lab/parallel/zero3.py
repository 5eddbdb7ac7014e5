"""ZeRO stage 3 from scratch (P_os+g+p): parameters sharded at rest, gathered just in time.

This module owns `parallelize(..., strategy="zero3")` (Rajbhandari et al., "ZeRO", SC20,
§5.3):

* The model is cut into units: submodules chosen by a policy (default: each child of the root
  that holds parameters, and the root itself for whatever is left). A parameter belongs to the
  innermost unit that contains every use of it, so a weight tied between two units (an output
  layer sharing the embedding's) belongs to their common ancestor.
* Each unit's parameters live in one flat buffer padded to a multiple of N; rank r keeps only
  its contiguous slice r (in fp32: the master weights the optimizer steps). At rest every
  parameter is an empty tensor and the flat buffer's storage is resized to 0 bytes, so the
  views of the parameters that autograd saved for backward hold no memory either.
* Before a unit's forward its parameters are all-gathered (in the compute dtype), and freed
  again when its forward ends; a hook on the unit's outputs gathers them once more when
  backward reaches the unit: each unit is gathered once for forward and once for backward.
  As each gradient is ready it is copied into the unit's flat gradient buffer (reducer.py);
  the unit's post-backward hook (an autograd function on the unit's inputs, run when
  backward has left the unit) requests its reduce-scatter (async) and frees the unit's
  parameters. Each rank steps only its shard; nothing is gathered after the step (the next
  forward gathers). Traffic per step: Ψ (forward all-gather) + Ψ (backward all-gather) + Ψ
  (reduce-scatter) = 3Ψ, against DDP's 2Ψ.
* Optional prefetch: while a unit runs, the next unit's all-gather is already in flight (the
  order is recorded in the first forward).
* Mixed precision per unit (`fully_shard(..., mp_policy=)`, as FSDP2): each unit's flats are
  stored, gathered and reduced in the dtypes of its own call's policy.

Every collective is placed by the model's own order: gathers by the forward's and backward's
unit order, reduce-scatters by the autograd graph, so ranks whose data leave different
parameters unused (inside a unit) still pair the same collectives. A unit that one rank skips
entirely cannot work (as with FSDP): the others wait in its all-gather until the timeout,
whose report names the unit.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import comm
from .checkpointing import blocks_with_parameters, recomputing
from .flat import FlatShards, emit_shard_map
from .group import check_process_group, check_same_model, start_replicas_alike
from .precision import MixedPrecisionPolicy, as_policy, cast_at_edges, register_casts
from .reducer import Reducer, tensors_in
from .strategy import Strategy, attach, detach, memory_probe, strategy_of
from .wrapper import WrappedOptimizer, claim, unclaim
from .zero import (
    ShardedOptimizerState,
    clip_grads_,
    clip_scaled_,
    emit_step,
    gather_values,
    set_leaf_grads,
)

UnitPolicy = Callable[[str, nn.Module], bool]


_CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # they hold modules but have no forward


def default_units(root: nn.Module) -> set[str]:
    """Each child of the root that holds parameters; for a child that is a ModuleList or
    ModuleDict (never called itself: the root calls its elements), its elements."""
    return blocks_with_parameters(root, _CONTAINERS)


class _Flat:
    """One flat group of a unit's parameters (trainable or frozen): a FlatShards whose slice
    this rank keeps, and the full buffer gathered for forward and backward."""

    def __init__(self, unit: str, params, world_size: int, rank: int, dtype, trainable: bool):
        self.unit = unit
        self.storage = FlatShards(params, world_size, rank, dtype)
        self.params = self.storage.params  # [(name, parameter)]
        self.layout, self.lo, self.hi = self.storage.layout, self.storage.lo, self.storage.hi
        self.trainable = trainable
        self.dtype = dtype  # the compute dtype: what is gathered and reduced
        self.device = self.storage.device
        full = self.storage.flatten(torch.float32)
        # the master weights: fp32, stepped by the optimizer through one leaf per parameter
        self.master = full[self.lo : self.hi].clone()
        self.leaves = self.storage.shard_leaves(self.master) if trainable else []
        # what this rank contributes to a gather: the master itself in fp32, a bf16 copy else
        self.local = self.master if dtype == torch.float32 else self.master.to(dtype)
        # The whole flat buffer, one storage for the life of the unit. Freeing resizes that
        # storage to 0 bytes and gathering gives the bytes back: tensors that autograd saved in
        # forward (views of the parameters, such as a transposed weight) share it, so they
        # hold no memory between forward and backward and see the values again once backward
        # has gathered the unit. At rest the parameters themselves are empty tensors, so that
        # touching one outside its unit gives an error, not a read of freed memory.
        self.full = torch.empty(self.layout.padded_numel, dtype=dtype, device=self.device)
        self._nbytes = self.full.untyped_storage().nbytes()
        self.reduced = None  # the reducer's bucket of a trainable flat (its grad_shard)
        # FSDP2-style (shard_parameters=True): where each parameter is registered
        # [(module, attribute, index in params)] and the shard parameter shown there at rest
        self.slots: list[tuple[nn.Module, str, int]] = []
        self.exposed: list[nn.Parameter] = []
        self.free()

    @property
    def grad_full(self) -> torch.Tensor | None:
        """The full gradient buffer, alive until reduce-scattered."""
        return self.storage.grad

    @property
    def grad_shard(self) -> torch.Tensor | None:
        """This rank's reduced gradient slice."""
        return None if self.reduced is None else self.reduced.grad_shard

    def begin_gather(self, group, async_op: bool):
        if self.exposed and self.local is not self.master:
            self.local.copy_(self.master)  # an outside optimizer stepped the fp32 shard
        self.full.untyped_storage().resize_(self._nbytes)  # the same storage, memory again
        return comm.all_gather(
            self.full,
            self.local.detach(),
            group=group,
            async_op=async_op,
            tag=f"params:{self.unit}",
        )

    def bind(self) -> None:
        for (_, p), view in zip(self.params, self.layout.views(self.full), strict=True):
            p.data = view
        for module, attribute, index in self.slots:  # the full parameter, while in use
            module._parameters[attribute] = self.params[index][1]

    def free(self) -> None:
        for _, p in self.params:
            p.data = torch.empty(0, dtype=self.dtype, device=self.device)
        self.full.untyped_storage().resize_(0)
        for module, attribute, index in self.slots:  # this rank's shard, at rest
            module._parameters[attribute] = self.exposed[index]


class _Unit:
    def __init__(self, index: int, name: str, module: nn.Module, flats: list[_Flat]) -> None:
        self.index = index
        self.name = name or "(root)"
        self.module = module
        self.flats = flats
        self.trainable = [f for f in flats if f.trainable]
        self.gathered = False
        self.gather_works: list = []
        self.calls = 0  # forward calls this step
        self.hooked = 0  # of which with a post-backward hook (an input that requires grad)
        self.fired = 0  # post-backward hooks run so far


# FSDP2-style sharding: modules chosen as units by fully_shard (or Zero3), and the engine of
# each module it was last called on (a later call on an ancestor takes its units over)
# (with the mixed-precision policy of its own fully_shard call, FSDP2's per-module mp_policy)
_CHOSEN: weakref.WeakKeyDictionary[nn.Module, MixedPrecisionPolicy | None] = (
    weakref.WeakKeyDictionary()
)
_ENGINES: weakref.WeakKeyDictionary[nn.Module, Zero3] = weakref.WeakKeyDictionary()
# the module's own parameters, 0-element at rest: {id: (weak reference, how it is sharded)}
_PLACEHOLDERS: dict[int, tuple[weakref.ref, str]] = {}


class Zero3:
    """ZeRO-3 on a module, FSDP2-like (`dzl.Zero3(model)`, or `dzl.fully_shard` unit by unit).

    `Zero3(model)` cuts the model into units (`units=`, a callable (name, module) -> bool;
    default: each child of the root holding parameters, plus every submodule passed to
    `dzl.fully_shard` before) and shards them across the ranks of `group`. Afterwards, as
    with FSDP2's `fully_shard`, `model.parameters()` are this rank's shards: one
    nn.Parameter per original parameter holding this rank's contiguous piece of it (1-D,
    possibly 0 elements where another rank owns all of it); after backward `.grad` holds
    the reduced (averaged) piece of the gradient, so any torch optimizer built afterwards
    over `model.parameters()` (param groups too) trains as one process on the global batch.
    While a unit runs, its module attributes are the full parameters again.

    `dzl.full_grads(model)` gathers the full gradients, `dzl.full_state_dict(model)` the full
    parameters (both collective). Clip with `engine.clip_grad_norm_(max_norm)` (the global
    norm over every rank's shards), not torch.nn.utils.clip_grad_norm_ (this rank's only).

    Every rank must run the forward of every unit in every step, as with FSDP: a unit that
    one rank skips entirely leaves the others waiting in its all-gather or reduce-scatter
    until the collective timeout (tagged with the unit's name, e.g. "params:block.1").

    `shard_parameters=False` is `parallelize(..., "zero3")`'s mode: the module's parameters
    stay 0-element placeholders and the returned optimizer steps the shards.
    """

    def __init__(
        self,
        module: nn.Module,
        units: UnitPolicy | None = None,
        prefetch: bool = False,
        precision: str | MixedPrecisionPolicy | None = "fp32",
        group=None,
        shard_parameters: bool = True,
        replicate_group=None,
    ) -> None:
        check_process_group("ZeRO-3")
        if units is not None and not callable(units):
            raise TypeError("units must be a callable (name, module) -> bool")
        self.shard_parameters = bool(shard_parameters)
        self._unit_policies: dict[str, MixedPrecisionPolicy | None] = {}
        if self.shard_parameters:
            units = self._take_over_units(module, units)
        for name, p in module.named_parameters():
            entry = _PLACEHOLDERS.get(id(p))
            if entry is not None and entry[0]() is p:
                raise ValueError(
                    f"parameter {name} is already sharded by ZeRO-3 through another module (a "
                    "weight tied between modules?): shard a module that contains every module "
                    "using it (their common parent, e.g. the root) instead"
                )
        claim("zero3", module)
        # the mixed-precision policy: each flat holds one dtype (a unit's fp32 norms and its
        # low-precision weights are two flats)
        self.policy = as_policy(precision)
        self.dtype = torch.float32 if self.policy is None else self.policy.param_dtype
        self.precision = precision
        self.module = module
        self.group = group
        self.prefetch = bool(prefetch)
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_same_model(module, group)
        start_replicas_alike(module, group, replicate_group)
        params = list(module.parameters())
        self._original_dtypes = {id(p): p.dtype for p in params}
        if any(not p.is_floating_point() for p in params):
            raise ValueError("ZeRO-3 here shards floating-point parameters only")
        if len({p.device for p in params}) > 1:
            raise ValueError("ZeRO-3 here needs every parameter on one device")
        if units is None:
            chosen = default_units(module)
            units = lambda name, mod: name in chosen  # noqa: E731
        self._dtypes = self._parameter_dtypes(module)
        self.units = self._make_units(units)
        self._order: list[_Unit] = []  # units in the order of the first forward
        self._recording = True
        self.gathers = 0  # all-gathers of a unit completed (forward, backward, recompute)
        self._steps = 0
        self._forward_at = time.time()
        self._backward_end: float | None = None
        self._exposed_s = 0.0  # what the last backward left waiting for reduce-scatters
        # the reducer: one bucket per trainable flat, in backward order (the last unit's
        # first); each unit's reduce-scatter is requested by its post-backward hook, so the
        # autograd graph, not the arrival of gradients, places it
        trainable = [f for u in reversed(self.units) for f in u.trainable]
        self.reducer = Reducer(
            [f.storage for f in trainable],
            "reduce_scatter",
            group,
            launch="on_request",
            grads="release",
            reduce_dtype=lambda index: self._reduce_dtype(trainable[index]),
            tag=lambda index: f"grads:{trainable[index].unit}",  # a hang names the unit
            on_finished=self._end_of_backward,
            replicate_group=replicate_group,
        )
        for flat, bucket in zip(trainable, self.reducer.buckets, strict=True):
            flat.reduced = bucket
        self._bucket_index = {id(f): i for i, f in enumerate(trainable)}
        self._handles = []
        for unit in self.units:
            self._handles.append(
                unit.module.register_forward_pre_hook(self._pre_forward(unit), with_kwargs=True)
            )
            self._handles.append(unit.module.register_forward_hook(self._post_forward(unit)))
        self._handles.append(module.register_forward_pre_hook(self._root_pre_forward))
        self._handles.extend(self._register_casts(module))
        self._explain_empty_parameters(module)
        self._emit_shard_map()
        mode = "fully_shard" if self.shard_parameters else "parallelize"
        for p in params:
            _PLACEHOLDERS[id(p)] = (weakref.ref(p), mode)
        _watch_optimizers()
        if self.shard_parameters:
            self._expose_shards()
            # checkpoints, full_state_dict and full_grads ask the module's strategy
            attach(
                module, Strategy("fully_shard", module, engine=self, full_values=self.full_values)
            )
            _ENGINES[module] = self
            _CHOSEN[module] = self.policy

    # -- FSDP2-style: the module's parameters are this rank's shards -----------------------
    def _take_over_units(self, module: nn.Module, units: UnitPolicy | None) -> UnitPolicy:
        """Units: those of `units` (None: fully_shard's and the default), and every
        submodule fully_shard was called on, whose own sharding is undone first (its
        mixed-precision policy is kept for it: `_unit_policies`)."""
        chosen = {n for n, m in module.named_modules() if m is not module and m in _CHOSEN}
        self._unit_policies = {
            n: _CHOSEN[m] for n, m in module.named_modules() if m is not module and m in _CHOSEN
        }
        for sub in module.modules():
            engine = _ENGINES.pop(sub, None) if sub is not module else None
            if engine is not None:
                engine._undo()
        base = units
        if base is None:
            default = default_units(module)
            base = lambda name, mod: name in default  # noqa: E731
        return lambda name, mod: name in chosen or bool(base(name, mod))

    # -- mixed precision, per unit --------------------------------------------------------
    def _own_policies(self) -> dict[str, MixedPrecisionPolicy | None]:
        """Units whose fully_shard call gave a policy other than this call's."""
        return {n: p for n, p in self._unit_policies.items() if p != self.policy}

    def _parameter_dtypes(self, module: nn.Module) -> dict[int, torch.dtype]:
        """{id(parameter): its dtype}: this call's policy, then each unit's own (outer units
        first, so that the innermost call decides)."""
        dtypes = self.policy.dtypes(module) if self.policy is not None else {}
        own = self._own_policies()
        if own and self.policy is not None and self.policy.whole_model:
            raise ValueError(
                f"units {sorted(own)} have a mixed-precision policy of their own, inside a "
                "root whose policy casts only at the model's edges (modules=None, as "
                "'bf16-mixed' and 'fp16-mixed'): give the root a per-module policy "
                "(dzl.MixedPrecisionPolicy(param_dtype=..., modules=(nn.Linear, ...))) or the "
                "units the same policy as the root"
            )
        for name in sorted(own, key=lambda n: n.count(".")):
            unit, policy = module.get_submodule(name), own[name]
            if policy is None:
                dtypes.update((id(p), torch.float32) for p in unit.parameters())
            else:
                dtypes.update(policy.dtypes(unit))
        return dtypes

    def _register_casts(self, module: nn.Module) -> list:
        """Casts at the edges of the modules that compute in a low precision: this call's
        policy outside the units with a policy of their own, theirs inside them."""
        own = self._own_policies()
        inside = {id(m) for name in own for m in module.get_submodule(name).modules()}
        handles = []
        if self.policy is not None:
            for covered in self.policy.covered(module):
                if id(covered) not in inside:
                    handles.extend(cast_at_edges(covered, self.policy.param_dtype))
        for name, policy in own.items():
            if policy is not None:
                handles.extend(register_casts(module.get_submodule(name), policy))
        return handles

    def _reduce_dtype(self, flat: _Flat) -> torch.dtype | None:
        """The dtype a flat's gradients are reduced in: its unit's policy's reduce_dtype."""
        policy = self._own_policies().get(flat.unit if flat.unit != "(root)" else "", self.policy)
        return None if policy is None else policy.reduce_dtype

    def _expose_shards(self) -> None:
        where: dict[int, list[tuple[nn.Module, str]]] = {}
        for mod in self.module.modules():
            for attribute, p in mod._parameters.items():
                if p is not None:
                    where.setdefault(id(p), []).append((mod, attribute))
        for flat in self.flats(trainable=False):
            if flat.trainable:
                flat.exposed = list(flat.leaves)
            else:
                flat.exposed = [
                    nn.Parameter(view, requires_grad=False)
                    for view in flat.storage.shard_views(flat.master)
                ]
            flat.slots = [
                (mod, attribute, index)
                for index, (_, p) in enumerate(flat.params)
                for mod, attribute in where[id(p)]
            ]
            flat.free()

    def _undo(self) -> None:
        """Give the module its full parameters back and remove every hook (collective): a
        later fully_shard on an ancestor makes this module one of its units."""
        values = self.full_values()
        for handle in self._handles:
            handle.remove()
        self.reducer.remove()
        self.module.__dict__.pop("forward", None)
        for flat in self.flats(trainable=False):
            for mod, attribute, index in flat.slots:
                mod._parameters[attribute] = flat.params[index][1]
            flat.slots, flat.exposed = [], []
            for _, p in flat.params:
                p.data = values[id(p)].to(self._original_dtypes[id(p)])
                _PLACEHOLDERS.pop(id(p), None)
        detach(self.module)
        unclaim(self.module)

    def _deliver_grads(self) -> None:
        """After backward: each shard parameter's .grad gets (or accumulates) its piece of
        the reduced slice; one that no rank used keeps its .grad, as in one process."""
        for flat in self.flats():
            if flat.grad_shard is None:
                continue
            pieces = flat.storage.shard_views(flat.grad_shard)
            for (_, p), leaf, piece in zip(flat.params, flat.leaves, pieces, strict=True):
                if id(p) in self.reducer.unused:
                    continue
                if leaf.grad is None:
                    leaf.grad = piece.to(leaf.dtype)
                else:
                    leaf.grad.add_(piece)
        self.reducer.zero_grad()  # the next backward starts from zero: .grad accumulates

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        return self.module.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)

    def full_grads(self) -> dict[str, torch.Tensor | None]:
        """{name: full gradient} as one process would hold it, None for a parameter without
        one, keyed as module.named_parameters() (collective: call it on every rank)."""
        out: dict[str, torch.Tensor | None] = {}
        unused = self.reducer.unused
        for flat in self.flats(trainable=False):
            if not flat.trainable:
                out.update((name, None) for name, _ in flat.params)
                continue
            if self.shard_parameters:
                grads = [leaf.grad for leaf in flat.leaves]
            elif flat.grad_shard is None:
                grads = [None] * len(flat.params)
            else:
                views = flat.storage.shard_views(flat.grad_shard)
                grads = [
                    None if id(p) in unused else v
                    for (_, p), v in zip(flat.params, views, strict=True)
                ]
            shard = torch.zeros(flat.storage.shard_numel, device=flat.device)
            for view, grad in zip(flat.storage.shard_views(shard), grads, strict=True):
                if grad is not None:
                    view.copy_(grad)
            full = flat.storage.all_gather(shard, group=self.group, tag="full_grads")
            for (name, _), view, grad in zip(
                flat.params, flat.storage.views(full), grads, strict=True
            ):
                out[name] = None if grad is None else view.clone()
        return {name: out[name] for name, _ in self.module.named_parameters() if name in out}

    def full_state_dict(self) -> dict:
        from .api import full_state_dict

        return full_state_dict(self.module)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the shard parameters' gradients to the global norm (every rank's shards)."""
        return clip_grads_(
            [leaf.grad for f in self.flats() for leaf in f.leaves if leaf.grad is not None],
            max_norm,
            self.group,
        )

    # -- set-up ----------------------------------------------------------------------------
    def _make_units(self, policy: UnitPolicy) -> list[_Unit]:
        chosen = {name: mod for name, mod in self.module.named_modules() if policy(name, mod)}
        for name, mod in chosen.items():
            if isinstance(mod, _CONTAINERS):
                raise ValueError(
                    f"unit {name!r} is a {type(mod).__name__}, which is never called (it has no "
                    "forward of its own), so its parameters would never be gathered: choose its "
                    "elements as units instead"
                )
        chosen[""] = self.module  # the root takes whatever no other unit holds
        # every place each parameter appears (a tied weight appears under several modules)
        uses: dict[int, list[str]] = {}
        named: dict[int, tuple[str, nn.Parameter]] = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            uses.setdefault(id(p), []).append(name)
            named.setdefault(id(p), (name, p))
        members: dict[str, list[tuple[str, nn.Parameter]]] = {u: [] for u in chosen}
        for key, paths in uses.items():
            owners = [
                set(u for u in chosen if u == "" or path.startswith(u + ".")) for path in paths
            ]
            common = set.intersection(*owners)
            owner = max(common, key=lambda u: (u.count(".") + 1 if u else 0, len(u)))
            members[owner].append(named[key])
        units = []
        for unit_name, module in chosen.items():  # module order: roughly forward order
            params = members[unit_name]
            if not params and unit_name != "":
                continue
            flats = []
            dtypes = list(dict.fromkeys(self._dtypes.get(id(p), torch.float32) for _, p in params))
            for trainable in (True, False):
                for dtype in dtypes:
                    group = [
                        (n, p)
                        for n, p in params
                        if p.requires_grad == trainable
                        and self._dtypes.get(id(p), torch.float32) == dtype
                    ]
                    if group:
                        flats.append(
                            _Flat(
                                unit_name or "(root)",
                                group,
                                self.world_size,
                                self.rank,
                                dtype,
                                trainable,
                            )
                        )
            units.append(_Unit(len(units), unit_name, module, flats))
        if not any(u.trainable for u in units) and not self.shard_parameters:
            raise ValueError("the module has no trainable parameters (requires_grad=True)")
        return units

    def _emit_shard_map(self) -> None:
        named, owners = [], []
        for unit in self.units:
            for flat in unit.flats:
                for index, (name, _) in enumerate(flat.params):
                    shape = flat.layout.shapes[index]  # on "meta": a shape, no memory
                    named.append((name, torch.empty(shape, dtype=flat.dtype, device="meta")))
                    owners.append(flat.layout.owners(index, self.world_size))
        emit_shard_map(
            "zero3", named, lambda i, n: (owners[i], owners[i], owners[i]), self.world_size
        )

    def _explain_empty_parameters(self, module: nn.Module) -> None:
        """A parameter used outside its unit's forward is an empty tensor then, and torch's
        error only speaks of sizes: add what happened and what to do."""
        forward = module.forward

        def explained(*args, **kwargs):
            try:
                return forward(*args, **kwargs)
            except RuntimeError as exc:
                freed = [
                    f"{u.name} ({', '.join(n for f in u.flats for n, _ in f.params)[:120]})"
                    for u in self.units
                    if not u.gathered and u.module is not self.module
                ]
                if not freed:
                    raise
                raise RuntimeError(
                    f"{exc}\n\nZeRO-3: a unit's parameters are empty tensors (0 elements) "
                    "except while that unit runs its forward or backward. If the error above "
                    "involves a size of 0, a parameter was used outside its unit, "
                    "e.g. read directly by a parent module's forward. Units not running then: "
                    f"{'; '.join(freed)}. Make the module that uses it a unit (units=), or leave "
                    "the parameter to a unit that contains every module using it."
                ) from exc

        module.forward = explained

    # -- gather and free -------------------------------------------------------------------
    def _gather(self, unit: _Unit, async_op: bool = False) -> None:
        if unit.gathered or unit.gather_works:
            return
        unit.gather_works = [f.begin_gather(self.group, async_op) for f in unit.flats]
        if not async_op:
            self._bind(unit)

    def _bind(self, unit: _Unit) -> None:
        for work in unit.gather_works:
            if work is not None:
                work.wait()
        for flat in unit.flats:
            flat.bind()
        unit.gather_works = []
        unit.gathered = True
        self.gathers += 1
        memory_probe("gathered")  # a unit in full: ZeRO-3's transient

    def _ensure(self, unit: _Unit) -> None:
        if unit.gathered:
            return
        if unit.gather_works:
            self._bind(unit)  # a prefetch already started it
        else:
            self._gather(unit)

    def _free(self, unit: _Unit) -> None:
        if unit.gather_works:
            self._bind(unit)  # never leave a gather in flight
        memory_probe("free")
        for flat in unit.flats:
            flat.free()
        unit.gathered = False

    def _prefetch_after(self, unit: _Unit, step: int) -> None:
        if not self.prefetch or self._recording or unit not in self._order:
            return
        at = self._order.index(unit) + step
        if 0 <= at < len(self._order):
            self._gather(self._order[at], async_op=True)

    # -- hooks -----------------------------------------------------------------------------
    def _root_pre_forward(self, module, args) -> None:
        self._forward_at = time.time()

    def _pre_forward(self, unit: _Unit):
        def hook(module, args, kwargs):
            if recomputing():
                # backward recomputes a checkpointed block that contains this unit: gather it
                # (if its backward has not already), but it is no new call: its gradients
                # come through the first forward's graph, its post-backward hook is that one's
                self._ensure(unit)
                return None
            if self._recording and unit not in self._order:
                self._order.append(unit)
            self._ensure(unit)
            self._prefetch_after(unit, +1)
            if not torch.is_grad_enabled():
                return None
            unit.calls += 1
            return self._register_post_backward(unit, args, kwargs)

        return hook

    def _register_post_backward(self, unit: _Unit, args, kwargs):
        """Pass the unit's inputs through an identity whose backward runs once the gradients
        of the unit's inputs, and so of all its parameters, are computed (FSDP2's
        RegisterPostBackwardFunction): the unit's reduce-scatter goes there."""
        inputs = [t for t in tensors_in((args, kwargs)) if t.requires_grad]
        if not inputs:
            return None
        unit.hooked += 1
        outputs = iter(_PostBackward.apply(lambda: self._post_backward(unit), *inputs))
        return _replace(args, inputs, outputs), _replace(kwargs, inputs, outputs)

    def _post_forward(self, unit: _Unit):
        def hook(module, args, output):
            if recomputing():
                return output  # its backward is next: its post-backward hook frees it
            if unit.module is self.module:
                self._recording = False  # the first forward is over: the order is known
            if torch.is_grad_enabled():
                for t in tensors_in(output):
                    if t.requires_grad:
                        t.register_hook(self._pre_backward(unit))
            self._free(unit)
            return output

        return hook

    def _pre_backward(self, unit: _Unit):
        def hook(grad):
            self.reducer.start_backward()
            self._ensure(unit)
            self._prefetch_after(unit, -1)
            return grad

        return hook

    def _post_backward(self, unit: _Unit) -> None:
        unit.fired += 1
        if unit.fired < unit.calls or unit.hooked < unit.calls:
            return  # a unit called again in forward: its gradients are not all in yet
        for flat in unit.trainable:
            self.reducer.launch_bucket(self._bucket_index[id(flat)])
        # Every use of its trainable parameters is behind us: they can go. Frozen ones may
        # still be needed for the gradient of the unit's input, and go at the end of backward.
        memory_probe("free")
        for flat in unit.trainable:
            flat.free()

    def _end_of_backward(self, backward_end: float) -> None:
        """After the reducer has launched the rest (units whose inputs need no gradient, such
        as the first one's) and waited for every reduce-scatter."""
        self._backward_end = backward_end
        if self.shard_parameters:
            self._deliver_grads()
        for unit in self.units:
            if unit.gathered or unit.gather_works:
                self._free(unit)
            unit.calls = unit.hooked = unit.fired = 0
        self._exposed_s = time.time() - backward_end

    # -- for the optimizer -----------------------------------------------------------------
    def flats(self, trainable: bool = True) -> list[_Flat]:
        return [f for u in self.units for f in u.flats if f.trainable or not trainable]

    def full_values(self) -> dict[int, torch.Tensor]:
        """{id(parameter): its full fp32 value}, gathered from the shards (collective); the
        shard parameters shown at rest (shard_parameters=True) map to it too."""
        values = gather_values(
            [(f.storage, f.master) for u in self.units for f in u.flats], self.group
        )
        for flat in self.flats(trainable=False):
            for (_, p), shown in zip(flat.params, flat.exposed, strict=False):
                values[id(shown)] = values[id(p)]
        return values


def fully_shard(
    module: nn.Module,
    *,
    prefetch: bool = False,
    precision: str | MixedPrecisionPolicy | None = "fp32",
    mp_policy: MixedPrecisionPolicy | None = None,
    group=None,
) -> nn.Module:
    """Shard `module` with ZeRO-3, FSDP2's way: call it on each submodule you want as a unit
    (innermost first), then on the root; returns `module`. A call on a module containing
    earlier ones makes those its units (undoing their own sharding), so after the root's
    call `model.parameters()` are this rank's shards (see `Zero3`): build the optimizer
    then. Every rank must make the same calls, and run every unit in every step.

    Each call's `precision` (or `mp_policy=`, FSDP2's name for it) stays with its unit, as
    FSDP2's per-module MixedPrecisionPolicy: a unit's parameters are stored, gathered and
    computed in its policy's param_dtype and its gradients reduced in its reduce_dtype; a
    unit sharded in "fp32" inside a low-precision root stays fp32. The root's policy covers
    what no unit's call decides; it must then cast per module (MixedPrecisionPolicy with
    `modules=`), not only at the model's edges."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"fully_shard takes a torch.nn.Module, got {type(module).__name__}")
    if mp_policy is not None:
        if precision not in ("fp32", None):
            raise ValueError("give precision= or mp_policy= (the same thing), not both")
        precision = mp_policy
    Zero3(
        module,
        units=lambda name, mod: False,  # only the submodules fully_shard was called on
        prefetch=prefetch,
        precision=precision,
        group=group,
    )
    return module


def full_grads(model) -> dict[str, torch.Tensor | None]:
    """Full gradients per parameter name, as one process on the global batch would hold
    them after backward (None where it would have none). Collective for ZeRO-3 (a model
    from fully_shard, Zero3 or parallelize(..., "zero3")); for replicated strategies
    (local, ddp) copies of .grad."""
    if isinstance(model, Zero3):
        return model.full_grads()
    module = getattr(model, "module", model)
    record = strategy_of(model)
    if record is not None and record.engine is not None:
        return record.engine.full_grads()
    return {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in module.named_parameters()
    }


_WATCHING = False


def _watch_optimizers() -> None:
    """Refuse, at its first step, an optimizer holding the 0-element placeholders that a
    ZeRO-3 module's parameters are at rest: it would step nothing, silently."""
    global _WATCHING
    if not _WATCHING:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(_refuse_placeholders)
        _WATCHING = True


def _refuse_placeholders(optimizer, args, kwargs) -> None:
    if not _PLACEHOLDERS:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = _PLACEHOLDERS.get(id(p))
            if entry is None or entry[0]() is not p:
                continue
            if entry[1] == "parallelize":
                raise RuntimeError(
                    "this optimizer holds the parameters of a module sharded by "
                    "parallelize(..., 'zero3'): at rest they are 0-element placeholders that "
                    "never get a gradient, so it would step nothing. Train with the optimizer "
                    "parallelize returned (parallelize(module, 'zero3', optimizer=lambda "
                    "params: torch.optim.AdamW(params, ...))), or shard FSDP2's way: "
                    "dzl.fully_shard(model) (or dzl.Zero3(model)), then build the optimizer "
                    "over model.parameters() (this rank's shards)"
                )
            raise RuntimeError(
                "this optimizer was built over the module's parameters before "
                "dzl.fully_shard / dzl.Zero3 sharded it: those are now 0-element placeholders "
                "that never get a gradient, so it would step nothing. Build the optimizer "
                "after the last fully_shard call (on the root), over model.parameters()"
            )


class _PostBackward(torch.autograd.Function):
    """Identity in forward; its backward calls `callback` (then passes the gradients on)."""

    @staticmethod
    def forward(ctx, callback, *inputs):
        ctx.callback = callback
        return tuple(t.view_as(t) for t in inputs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback()
        return (None, *grads)


def _replace(value, old: list, new):
    """`value` with each tensor in `old` (by identity) replaced by the next of `new`."""
    if isinstance(value, torch.Tensor):
        return next(new) if any(value is t for t in old) else value
    if isinstance(value, tuple):
        return tuple(_replace(v, old, new) for v in value)
    if isinstance(value, list):
        return [_replace(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _replace(v, old, new) for k, v in value.items()}
    return value


class Zero3Optimizer(ShardedOptimizerState, WrappedOptimizer):
    """The optimizer `parallelize(..., "zero3")` returns: it steps this rank's shards.

    `optimizer` is called with one leaf per trainable parameter, in module.parameters() order
    (this rank's piece of each), so it may build param groups as for the module itself."""

    def __init__(self, engine: Zero3, optimizer: Callable) -> None:
        self.engine = engine
        self.stage = 3
        self.group = engine.group
        self.world_size, self.rank = engine.world_size, engine.rank
        self._flats = engine.flats()
        leaf_of = {
            id(p): leaf
            for f in self._flats
            for (_, p), leaf in zip(f.params, f.leaves, strict=True)
        }
        ordered = [leaf_of[id(p)] for p in engine.module.parameters() if id(p) in leaf_of]
        self.inv_scale = 1.0  # set by GradScaler.unscale_: applied as gradients go to fp32
        self._adopt(ordered, optimizer(ordered))
        self.params = []  # module parameters never hold a gradient past backward

    def _shards(self) -> list[torch.Tensor]:
        return [leaf for f in self._flats for leaf in f.leaves]

    def sharded(self):
        return [(f.storage, f.leaves) for f in self._flats]

    def full_values(self) -> dict[int, torch.Tensor]:
        return self.engine.full_values()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.engine.reducer.zero_grad()

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        flats = self.engine.flats(trainable=False)
        buckets = self.engine.reducer.buckets
        return {
            "params": [f.local for f in flats],
            "gathered": [f.full for f in flats],  # 0 bytes when freed
            "grads": [f.grad_shard for f in flats if f.grad_shard is not None],
            # the fp32 masters of low-precision flats (an fp32 flat's master is its `local`)
            "optimizer": [f.master for f in flats if f.local is not f.master],
            # full gradients until reduce-scattered, and what the reduce-scatters receive
            "comm": [f.grad_full for f in flats if f.grad_full is not None]
            + [t for b in buckets for t in (b.incoming, b.low) if t is not None],
        }

    def scaler_grads(self) -> list[torch.Tensor]:
        """This rank's reduced gradient shards (GradScaler checks them for inf/NaN)."""
        return [f.grad_shard for f in self._flats if f.grad_shard is not None]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ZeRO's step() takes no closure")
        if any(f.grad_shard is None for f in self._flats):
            raise RuntimeError("step() before backward(): no gradients to apply")
        start = time.time()
        engine = self.engine
        for flat in self._flats:
            set_leaf_grads(
                flat.storage, flat.leaves, flat.grad_shard, engine.reducer.unused, self.inv_scale
            )
        self.optimizer.step()
        for flat in self._flats:
            if flat.local is not flat.master:
                flat.local.copy_(flat.master)  # the bf16 shard the next gathers send
            for leaf in flat.leaves:
                leaf.grad = None  # the fp32 gradient lives only inside step()
        backward_end = engine._backward_end or start
        emit_step(engine._steps, engine._forward_at, backward_end, start, engine._exposed_s)
        engine._steps += 1
        return None

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip to the global gradient norm across all shards (after backward, before step)."""
        return clip_scaled_(self, self.scaler_grads(), max_norm, self.group)
