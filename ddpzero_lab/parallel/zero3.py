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
  backward reaches the unit. As each gradient is ready it is copied into the unit's flat
  gradient buffer; when the unit's last one is, the buffer is reduce-scattered (async) and the
  unit's parameters are freed. Each rank steps only its shard; nothing is gathered after the
  step (the next forward gathers). Traffic per step: Ψ (forward all-gather) + Ψ (backward
  all-gather) + Ψ (reduce-scatter) = 3Ψ, against DDP's 2Ψ.
* Optional prefetch: while a unit runs, the next unit's all-gather is already in flight (the
  order is recorded in the first forward).

Collectives are launched in an order that every rank agrees on (units in a fixed order; a unit
whose gradients are ready early waits for the ones before it), so that ranks whose data leave
different parameters unused never pair different collectives.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import comm
from .ddp import broadcast_state, check_same_model
from .flat import FlatLayout, emit_shard_map
from .precision import cast_at_edges, check_precision
from .wrapper import WrappedOptimizer
from .zero import ShardedOptimizerState, clip_grads_, emit_step, gather_flats, keep_unused

UnitPolicy = Callable[[str, nn.Module], bool]


_CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # they hold modules but have no forward


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def default_units(root: nn.Module) -> set[str]:
    """Each child of the root that holds parameters; for a child that is a ModuleList or
    ModuleDict (never called itself: the root calls its elements), its elements."""
    names = set()
    for name, child in root.named_children():
        if isinstance(child, _CONTAINERS):
            names |= {f"{name}.{n}" for n, c in child.named_children() if _holds_parameters(c)}
        elif _holds_parameters(child):
            names.add(name)
    return names


class _Flat:
    """One flat group of a unit's parameters (trainable or frozen), sharded by slices."""

    def __init__(self, unit: str, params, world_size: int, rank: int, dtype, trainable: bool):
        self.unit = unit
        self.params = params  # [(name, parameter)]
        self.trainable = trainable
        self.dtype = dtype  # the compute dtype: what is gathered and reduced
        self.device = params[0][1].device
        self.layout = FlatLayout.of([p for _, p in params], align=world_size)
        self.lo, self.hi = self.layout.shard_range(rank, world_size)
        with torch.no_grad():
            full = self.layout.flatten([p.detach().float() for _, p in params])
        master = full[self.lo : self.hi].clone()
        # the master weights: fp32, stepped by the optimizer (a leaf for trainable groups)
        self.master = nn.Parameter(master) if trainable else master
        # what this rank contributes to a gather: the master itself in fp32, a bf16 copy else
        self.local = self.master if dtype == torch.float32 else master.to(dtype)
        # The whole flat buffer, one storage for the life of the unit. Freeing resizes that
        # storage to 0 bytes and gathering gives the bytes back: tensors that autograd saved in
        # forward (views of the parameters, such as a transposed weight) share it, so they
        # hold no memory between forward and backward and see the values again once backward
        # has gathered the unit. At rest the parameters themselves are empty tensors, so that
        # touching one outside its unit gives an error, not a read of freed memory.
        self.full = torch.empty(self.layout.padded_numel, dtype=dtype, device=self.device)
        self._nbytes = self.full.untyped_storage().nbytes()
        self.grad_full: torch.Tensor | None = None  # gradients, alive until reduce-scattered
        self.grad_shard: torch.Tensor | None = None  # this rank's reduced gradient slice
        self.work = None
        self.used: set[int] = set()
        self.free()

    def begin_gather(self, group, async_op: bool):
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

    def free(self) -> None:
        for _, p in self.params:
            p.data = torch.empty(0, dtype=self.dtype, device=self.device)
        self.full.untyped_storage().resize_(0)

    def grad_buffer(self) -> torch.Tensor:
        if self.grad_full is None:
            self.grad_full = torch.zeros(
                self.layout.padded_numel, dtype=self.dtype, device=self.device
            )
        return self.grad_full


class _Unit:
    def __init__(self, index: int, name: str, module: nn.Module, flats: list[_Flat]) -> None:
        self.index = index
        self.name = name or "(root)"
        self.module = module
        self.flats = flats
        self.trainable = [f for f in flats if f.trainable]
        self.gathered = False
        self.gather_works: list = []
        self.pending = 0  # trainable parameters whose gradient is not in yet


class Zero3:
    """The engine behind strategy "zero3": hooks on the module, shards, collectives."""

    def __init__(
        self,
        module: nn.Module,
        units: UnitPolicy | None = None,
        prefetch: bool = False,
        precision: str = "fp32",
        group=None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeRO-3 needs a process group: build it inside a LiveCluster job")
        if units is not None and not callable(units):
            raise TypeError("units must be a callable (name, module) -> bool")
        self.dtype = check_precision(precision)
        self.precision = precision
        self.module = module
        self.group = group
        self.prefetch = bool(prefetch)
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_same_model(module, group)
        broadcast_state([*module.parameters(), *module.buffers()], group)
        params = list(module.parameters())
        if any(not p.is_floating_point() for p in params):
            raise ValueError("ZeRO-3 here shards floating-point parameters only")
        if len({p.device for p in params}) > 1:
            raise ValueError("ZeRO-3 here needs every parameter on one device")
        if units is None:
            chosen = default_units(module)
            units = lambda name, mod: name in chosen  # noqa: E731
        self.units = self._make_units(units)
        self._order: list[_Unit] = []  # units in the order of the first forward
        self._recording = True
        self._finalize_queued = False
        self._next_launch = 0
        self._steps = 0
        self._forward_at = time.time()
        self._backward_end: float | None = None
        self._exposed_s = 0.0  # what the last backward left waiting for reduce-scatters
        self._handles = []
        self._where: dict[int, tuple[_Unit, _Flat, int]] = {}
        for unit in self.units:
            for flat in unit.trainable:
                for slot, (_, p) in enumerate(flat.params):
                    self._where[id(p)] = (unit, flat, slot)
                    self._handles.append(p.register_post_accumulate_grad_hook(self._grad_ready))
            self._handles.append(unit.module.register_forward_pre_hook(self._pre_forward(unit)))
            self._handles.append(unit.module.register_forward_hook(self._post_forward(unit)))
        self._handles.append(module.register_forward_pre_hook(self._root_pre_forward))
        if self.dtype != torch.float32:
            self._handles.extend(cast_at_edges(module, self.dtype))
        self._explain_empty_parameters(module)
        self._emit_shard_map()

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
            for trainable in (True, False):
                group = [(n, p) for n, p in params if p.requires_grad == trainable]
                if group:
                    flats.append(
                        _Flat(
                            unit_name or "(root)",
                            group,
                            self.world_size,
                            self.rank,
                            self.dtype,
                            trainable,
                        )
                    )
            units.append(_Unit(len(units), unit_name, module, flats))
        if not any(u.trainable for u in units):
            raise ValueError("the module has no trainable parameters (requires_grad=True)")
        return units

    def _emit_shard_map(self) -> None:
        named, owners = [], []
        for unit in self.units:
            for flat in unit.flats:
                for index, (name, _) in enumerate(flat.params):
                    shape = flat.layout.shapes[index]  # on "meta": a shape, no memory
                    named.append((name, torch.empty(shape, dtype=self.dtype, device="meta")))
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
        def hook(module, args):
            if self._recording and unit not in self._order:
                self._order.append(unit)
            self._ensure(unit)
            self._prefetch_after(unit, +1)

        return hook

    def _post_forward(self, unit: _Unit):
        def hook(module, args, output):
            if unit.module is self.module:
                self._recording = False  # the first forward is over: the order is known
            if torch.is_grad_enabled():
                for t in _tensors(output):
                    if t.requires_grad:
                        t.register_hook(self._pre_backward(unit))
            self._free(unit)
            return output

        return hook

    def _pre_backward(self, unit: _Unit):
        def hook(grad):
            if not self._finalize_queued:
                self._finalize_queued = True
                self._backward_end = None
                for u in self.units:
                    u.pending = sum(len(f.params) for f in u.trainable)
                torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
            self._ensure(unit)
            self._prefetch_after(unit, -1)
            return grad

        return hook

    def _grad_ready(self, param: torch.Tensor) -> None:
        unit, flat, slot = self._where[id(param)]
        flat.layout.views(flat.grad_buffer())[slot].copy_(param.grad)
        param.grad = None  # the full gradient is in the flat buffer now
        flat.used.add(slot)
        unit.pending -= 1
        if unit.pending == 0:
            self._launch_in_order()
        for done in self._backward_order()[: self._next_launch]:
            # a unit whose reduce-scatter has completed needs its full gradients no more
            for f in done.trainable:
                if f.work is not None and f.work[0].is_completed():
                    self._collect(f)

    def _collect(self, flat: _Flat) -> None:
        """Take a finished reduce-scatter's shard; drop the full gradient buffer."""
        work, shard = flat.work
        work.wait()
        flat.grad_shard = shard if flat.grad_shard is None else flat.grad_shard + shard
        flat.grad_full = None
        flat.work = None

    def _launch_in_order(self) -> None:
        order = self._backward_order()
        while self._next_launch < len(order):
            unit = order[self._next_launch]
            if unit.pending:
                return
            self._launch(unit)
            self._next_launch += 1

    def _backward_order(self) -> list[_Unit]:
        return [u for u in reversed(self.units) if u.trainable]

    def _launch(self, unit: _Unit) -> None:
        for flat in unit.trainable:
            buffer = flat.grad_buffer()
            buffer.div_(self.world_size)  # pre-divide: the sum is the mean
            shard = torch.empty(flat.hi - flat.lo, dtype=self.dtype, device=flat.device)
            flat.work = (
                comm.reduce_scatter(
                    shard, buffer, group=self.group, async_op=True, tag=f"grads:{unit.name}"
                ),
                shard,
            )
        # Every use of its trainable parameters is behind us (each use feeds their gradient):
        # they can go. Frozen ones may still be needed for the gradient of the unit's input,
        # and are freed at the end of backward.
        for flat in unit.trainable:
            flat.free()

    def _finalize(self) -> None:
        self._backward_end = time.time()
        for unit in self.units:
            unit.pending = 0  # parameters with no gradient contribute zeros
        self._launch_in_order()
        for unit in self.units:
            for flat in unit.trainable:
                if flat.work is not None:
                    self._collect(flat)
            if unit.gathered or unit.gather_works:
                self._free(unit)
        self._exposed_s = time.time() - self._backward_end
        self._next_launch = 0
        self._finalize_queued = False

    # -- for the optimizer -----------------------------------------------------------------
    def flats(self, trainable: bool = True) -> list[_Flat]:
        return [f for u in self.units for f in u.flats if f.trainable or not trainable]

    def full_values(self) -> dict[int, torch.Tensor]:
        """{id(parameter): its full fp32 value}, gathered from the shards (collective)."""
        return gather_flats(
            [(f.layout, f.master, f.params) for u in self.units for f in u.flats], self.group
        )


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class Zero3Optimizer(ShardedOptimizerState, WrappedOptimizer):
    """The optimizer `parallelize(..., "zero3")` returns: it steps this rank's shards."""

    def __init__(self, engine: Zero3, optimizer: Callable) -> None:
        self.engine = engine
        self.stage = 3
        self.group = engine.group
        self.world_size, self.rank = engine.world_size, engine.rank
        self._flats = engine.flats()
        masters = [f.master for f in self._flats]
        self._adopt(masters, optimizer(masters))
        self.params = []  # module parameters never hold a gradient past backward

    def _shards(self) -> list[torch.Tensor]:
        return [f.master for f in self._flats]

    def full_values(self) -> dict[int, torch.Tensor]:
        return self.engine.full_values()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for flat in self._flats:
            flat.grad_shard = None

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        flats = self.engine.flats(trainable=False)
        mixed = self.engine.dtype != torch.float32
        return {
            "params": [f.local for f in flats] + [f.full for f in flats],  # 0 bytes when freed
            "grads": [f.grad_shard for f in flats if f.grad_shard is not None],
            "optimizer": [f.master for f in flats] if mixed else [],
            "scratch": [f.grad_full for f in flats if f.grad_full is not None],
        }

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ZeRO's step() takes no closure")
        if any(f.grad_shard is None for f in self._flats):
            raise RuntimeError("step() before backward(): no gradients to apply")
        start = time.time()
        engine = self.engine
        for flat in self._flats:
            flat.master.grad = flat.grad_shard.to(flat.master.dtype)
        keep = keep_unused(
            [(f.layout, f.lo, f.hi, f.master, f.used) for f in self._flats], self.group
        )
        self.optimizer.step()
        for view, saved in keep:
            view.copy_(saved)
        for flat in self._flats:
            flat.used = set()
            if flat.local is not flat.master:
                flat.local.copy_(flat.master)  # the bf16 shard the next gathers send
                flat.master.grad = None  # the fp32 gradient lives only inside step()
        backward_end = engine._backward_end or start
        emit_step(engine._steps, engine._forward_at, backward_end, start, engine._exposed_s)
        engine._steps += 1
        return None

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip to the global gradient norm across all shards (after backward, before step)."""
        grads = [f.grad_shard for f in self._flats if f.grad_shard is not None]
        return clip_grads_(grads, max_norm, self.group)

    def _flat_shards(self) -> list[tuple[int, int, int]]:
        return [(f.lo, f.hi, f.layout.numel) for f in self._flats]
