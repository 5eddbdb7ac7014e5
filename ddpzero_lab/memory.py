"""Where memory goes: per-rank byte accounting, a tracker, and the ZeRO paper's model.

This module owns three things:

* `model_state_bytes(model, optimizer)`: the bytes this rank holds for parameters, gradients
  and optimizer state, counted from the real tensors. Every storage is counted once, in full,
  whatever views share it: a flat buffer with padding counts as the whole buffer. Module
  buffers (BatchNorm statistics) and scratch memory (communication buffers) get their own keys
  and are never folded into the three. A strategy that holds tensors the module and optimizer
  do not show (flat shards, fp32 master weights, buckets) lists them in a `memory_tensors()`
  method on the model or the optimizer: {category: [tensors]}.
* `MemoryTracker`: emits `memory` events at the phases of a step (after_forward,
  after_backward, after_step) with model state by category, activation bytes measured with
  saved-tensor hooks, process RSS (and CUDA figures on a GPU). `parallelize` attaches one.
* `zero_memory_estimate(...)`: the model of Rajbhandari et al., "ZeRO: Memory Optimizations
  Toward Training Trillion Parameter Models", SC20, §5.1 and Table 1: with Ψ parameters, N_d
  data-parallel ranks and K bytes of optimizer state per parameter, a rank holds
      stage 0 (DP)        (2 + 2 + K)·Ψ
      stage 1 (P_os)      2Ψ + 2Ψ + K·Ψ/N_d
      stage 2 (P_os+g)    2Ψ + (2 + K)·Ψ/N_d
      stage 3 (P_os+g+p)  (2 + 2 + K)·Ψ/N_d
  for mixed-precision Adam (2-byte parameters and gradients, K = 12: fp32 master weights,
  momentum and variance). `FP32_ADAM` is the plain float32 preset (4 + 4 + 8).

It knows nothing of processes or widgets.
"""

from __future__ import annotations

import contextlib
import math
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import nn

from . import telemetry
from .parallel.strategy import add_memory_probe, remove_memory_probe, strategy_of

CATEGORIES = ("params", "grads", "optimizer", "buffers", "scratch")
# what a strategy's memory_tensors() may also name: gathered parameters (ZeRO-3's units in
# full) and communication buffers (buckets, receive buffers); model_state_bytes folds them
# into params and scratch, the tracker's peak keeps them apart
_FOLDED = {"gathered": "params", "comm": "scratch"}
# the tracker's peak, by category: what a rank holds at its worst moment
PEAK_CATEGORIES = (
    "params",
    "grads",
    "optimizer",
    "activations",
    "gathered",
    "comm",
    "other",
)
PHASES = ("forward", "backward", "step")


# --- counting real tensors ---------------------------------------------------------------


def _storage_identity(t: torch.Tensor) -> int:
    """The storage object itself (stable while it lives, across resizes)."""
    return t.untyped_storage()._cdata


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr())


def _tensors_in(obj: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value, depth + 1)


def _strategy_tensors(*owners: Any) -> dict[str, list[torch.Tensor]]:
    found: dict[str, list[torch.Tensor]] = {}
    for owner in owners:
        provide = getattr(owner, "memory_tensors", None)
        if callable(provide):
            for category, tensors in provide().items():
                if category not in CATEGORIES and category not in _FOLDED:
                    raise ValueError(f"memory_tensors(): unknown category {category!r}")
                found.setdefault(category, []).extend(tensors)
    return found


def _state_groups(model: nn.Module, optimizer: Any) -> dict[str, list[torch.Tensor]]:
    """The tensors of each category, strategies' own kept apart ("gathered", "comm")."""
    module = getattr(model, "module", model)
    groups: dict[str, list[torch.Tensor]] = {c: [] for c in (*CATEGORIES, *_FOLDED)}
    groups["params"].extend(module.parameters())
    groups["grads"].extend(p.grad for p in module.parameters() if p.grad is not None)
    inner = getattr(optimizer, "optimizer", optimizer)  # wrappers keep the torch optimizer
    if isinstance(inner, torch.optim.Optimizer):
        groups["optimizer"].extend(_tensors_in(inner.state))
    groups["buffers"].extend(module.buffers())
    for category, tensors in _strategy_tensors(model, optimizer).items():
        groups[category].extend(tensors)
    return groups


def _count(
    groups: dict[str, list[torch.Tensor]], order: Iterable[str], counted: set | None = None
) -> dict[str, int]:
    """Bytes per category, each storage once and in full, the first category in `order` that
    holds it winning (`counted`: keys of storages counted elsewhere already, left out)."""
    seen: set[tuple] = set()
    counted = counted or set()
    totals = {}
    for category in order:
        total = 0
        for t in groups[category]:
            storage = t.untyped_storage()
            # the address alone: CUDA's unified addressing keeps device and host allocations
            # apart in one process (a device's tuple would cost more than the count itself)
            key = storage.data_ptr()
            if key in seen or key in counted:
                continue
            seen.add(key)
            total += storage.nbytes()
        totals[category] = total
    return totals


def model_state_bytes(model: nn.Module, optimizer: Any = None) -> dict[str, int]:
    """Bytes this rank holds: {"params", "grads", "optimizer", "buffers", "scratch"}.

    Counted from the tensors themselves, each storage once and in full; the first category a
    storage is found in wins, in the order params, grads, optimizer, buffers, scratch.
    Without `optimizer`, the one the model's strategy steps it with (parallelize's).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    record = strategy_of(model)
    if optimizer is None and record is not None:
        optimizer = record.optimizer  # the optimizer parallelize built for this model
    groups = _state_groups(model, optimizer)
    for category, into in _FOLDED.items():
        groups[into].extend(groups.pop(category))
    return _count(groups, CATEGORIES)


def optimizer_state_breakdown(optimizer: Any) -> dict[str, int]:
    """Optimizer bytes by state name, e.g. {"exp_avg": ..., "exp_avg_sq": ..., "step": ...}:
    the small per-tensor scalars (Adam's step counters) are shown, not rounded away."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        return {}
    out: dict[str, int] = {}
    seen: set[tuple] = set()
    for state in inner.state.values():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                key = _storage_key(value)
                if key not in seen:
                    seen.add(key)
                    out[name] = out.get(name, 0) + value.untyped_storage().nbytes()
    return out


# --- the tracker ----------------------------------------------------------------------------


class _Saved:
    """A tensor autograd saved for backward, as the tracker's pack hook hands it to autograd:
    it lives exactly as long as autograd holds it (until its node's backward has run), and
    gives its bytes back to the count when it goes."""

    __slots__ = ("tensor", "key", "counter")

    def __init__(self, tensor: torch.Tensor, key: int, counter: _ActivationCounter) -> None:
        self.tensor, self.key, self.counter = tensor, key, counter

    def __del__(self) -> None:
        self.counter.release(self.key)


class _ActivationCounter:
    """The bytes autograd holds for backward (saved-tensor hooks), each storage once, leaving
    out model state (parameters, buffers, a strategy's parameter buffers: ZeRO-3 gathers units
    into them). `live` goes up as forward saves and down as backward frees: the activations
    alive at any moment, for the price of a dictionary update per saved tensor."""

    def __init__(self) -> None:
        self.exclude: set[int] = set()
        self.refs: dict[int, list[int]] = {}  # storage identity -> [references, bytes]
        self.live = 0
        self.saved = 0  # bytes saved since the last forward began, each storage once
        self._seen: set[int] = set()
        # tensors a checkpoint's recompute saves (checkpointing.py): counted while alive
        self.watched: dict[int, tuple[Any, int]] = {}

    def begin_forward(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.saved = 0
        self._seen = set()

    def pack(self, t: torch.Tensor):
        key = _storage_identity(t)
        if key in self.exclude:
            return t
        entry = self.refs.get(key)
        if entry is None:
            # the _Saved object keeps the storage alive, so its identity stays unique
            nbytes = t.untyped_storage().nbytes()
            self.refs[key] = [1, nbytes]
            self.live += nbytes
        else:
            entry[0] += 1
        if key not in self._seen:
            self._seen.add(key)
            self.saved += self.refs[key][1]
        return _Saved(t, key, self)

    def watch(self, t: torch.Tensor) -> None:
        key = _storage_identity(t)
        if key in self.exclude or key in self.refs or key in self.watched:
            return
        from torch.multiprocessing.reductions import StorageWeakRef

        self.watched[key] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())

    def alive(self) -> int:
        """Bytes alive now: what autograd holds, and what recomputes saved and still live."""
        if self.watched:
            for key in [k for k, (ref, _) in self.watched.items() if ref.expired()]:
                del self.watched[key]
        return self.live + sum(n for _, n in self.watched.values())

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.refs[key]
            self.live -= entry[1]


class MemoryTracker:
    """Emits a `memory` event at each phase of a training step, with the phase's peak.

    attach(model, optimizer) hooks the model's forward (after_forward) and the optimizer's
    step (after_backward just before it, after_step just after). The learner's loop does not
    change. Each event carries the model state by category at that moment, the activations
    alive, process RSS (and CUDA figures on a GPU), and the peak of the phase that just ended
    (forward, backward or the optimizer step): `peak` and `peak_<category>` for each of
    PEAK_CATEGORIES, the split at the worst moment; `tracker.peaks[phase]` keeps the last.

    On a CPU the peak is counted from the tensors alive, each storage once, sampled where
    memory can only have gone up: the end of forward, each gradient copied into its bucket,
    each bucket launched and reduced, each ZeRO-3 unit gathered or about to be freed, each
    checkpointed block recomputed, and the edges of the step. Activations are the bytes
    autograd holds for backward (saved-tensor hooks that release their count as backward frees
    them). Not seen: autograd's temporaries (the gradient flowing between layers) and what a
    collective allocates inside itself (gloo's reduce-scatter receives into a buffer the size
    of its input). On CUDA the allocator's own `max_memory_allocated`, reset at each phase,
    is reported beside it (`cuda_peak`), and sees everything.

    Cost: a sample walks the parameter and optimizer tensors (microseconds for lesson-sized
    models); it happens at the points above only during a step.
    """

    def __init__(self, emit: bool = True) -> None:
        self.emit = emit
        self.step = 0
        self.activations = 0
        self.last: dict[str, dict] = {}
        self.peaks: dict[str, dict[str, int]] = {}
        # the most activation bytes held at once in each phase of the last step (the peak's
        # split above is at the moment of the highest total, which may hold fewer)
        self.activation_peaks: dict[str, int] = {}
        self.samples = 0
        self._phase: str | None = None
        self._peak: dict[str, int] | None = None
        self._model: nn.Module | None = None
        self._optimizer: Any = None
        self._counter = _ActivationCounter()
        self._hooks_ctx: contextlib.AbstractContextManager | None = None
        self._handles: list = []
        self._device: torch.device | None = None
        self._static: tuple[set, dict[str, int]] | None = None
        self._params: list[torch.Tensor] = []
        self._buffers: list[torch.Tensor] = []
        self._parts: dict[str, int] | None = None  # the last sample, by internal category

        counter = self._counter

        def pack(t: torch.Tensor):
            return counter.pack(t)

        # activation checkpointing shows this hook the tensors checkpoints keep (checkpointing.py)
        pack._ddpzero_observer = counter
        self._pack = pack

    def attach(self, model: nn.Module, optimizer: Any) -> MemoryTracker:
        if self._model is not None:
            raise RuntimeError("this MemoryTracker is already attached")
        self._model, self._optimizer = model, optimizer
        self._device = next(iter(model.parameters()), torch.empty(0)).device
        self._handles.append(model.register_forward_pre_hook(self._before_forward))
        self._handles.append(model.register_forward_hook(self._after_forward, always_call=True))
        if isinstance(optimizer, torch.optim.Optimizer):
            # torch's own step hooks: the optimizer's step stays a bound method, which
            # learning-rate schedulers rely on
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        else:
            original_step = optimizer.step

            def step(opt, *args, **kwargs):
                self._before_step(opt, args, kwargs)
                out = original_step(*args, **kwargs)
                self._after_step(opt, args, kwargs)
                return out

            optimizer.step = types.MethodType(step, optimizer)
            self._original_step = original_step
        # each gradient as it lands (after the strategy's own hook: registered later, run later)
        module = getattr(model, "module", model)
        self._params = list(module.parameters())  # the same objects for good (ZeRO-3 swaps .data)
        self._buffers = list(module.buffers())
        for p in self._params:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        add_memory_probe(self._probe)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        remove_memory_probe(self._probe)
        if self._optimizer is not None and getattr(self, "_original_step", None) is not None:
            self._optimizer.step = self._original_step
        self._model = self._optimizer = None
        self._phase = None

    # -- phases --------------------------------------------------------------------------
    def _begin(self, phase: str) -> None:
        self._phase = phase
        self._peak = None
        self.activation_peaks[phase] = 0
        if phase == "forward" or (phase == "backward" and self._static is None):
            self._freeze_static()  # (backward changes what forward left: nothing static)
        elif phase == "step":
            self._static = None  # the step creates and updates optimizer state
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        self.sample()

    def _end(self) -> dict[str, int]:
        self.sample()
        peak = dict(self._peak or {})
        if self._device is not None and self._device.type == "cuda":
            peak["cuda_peak"] = torch.cuda.max_memory_allocated(self._device)
        if self._phase is not None:
            self.peaks[self._phase] = peak
        self._phase = None
        return peak

    def _on_grad(self, param) -> None:
        if self._phase is not None:
            self.sample()

    def _probe(self, where: str) -> None:
        if self._phase is not None:
            self.sample()

    def sample(self) -> dict[str, int]:
        """Count what is alive now, by PEAK_CATEGORIES (plus "total"); keep it if it is the
        phase's highest."""
        self.samples += 1
        model, optimizer = self._model, self._optimizer
        if self._static is None:
            groups = _state_groups(model, optimizer)
            counted: set = set()
            fixed = {}
        else:
            # forward and backward change no optimizer state and no module buffer: those
            # were counted once as the phase began (`_freeze_static`), the rest is walked
            # (gradients, the strategy's buffers and shards)
            counted, fixed = self._static
            found = _strategy_tensors(model, optimizer)
            params = self._params
            record = strategy_of(model)
            walked = params if record is not None and record.shards_parameters else []
            groups = {
                "gathered": found.get("gathered", []),
                "params": walked + found.get("params", []),
                "grads": [p.grad for p in params if p.grad is not None] + found.get("grads", []),
                "optimizer": found.get("optimizer", []),
                "comm": found.get("comm", []),
                "buffers": found.get("buffers", []),
                "scratch": found.get("scratch", []),
            }
        # gathered first: a ZeRO-3 parameter is a view of its unit's gathered buffer while bound
        order = ("gathered", "params", "grads", "optimizer", "comm", "buffers", "scratch")
        parts = _count(groups, order, counted)
        for category, value in fixed.items():
            parts[category] += value
        self._parts = parts
        now = {c: parts.get(c, 0) for c in PEAK_CATEGORIES}
        now["other"] = parts["buffers"] + parts["scratch"]
        now["activations"] = self._counter.alive()
        if self._phase is not None and now["activations"] > self.activation_peaks.get(
            self._phase, -1
        ):
            self.activation_peaks[self._phase] = now["activations"]
        now["total"] = sum(now.values())
        if self._peak is None or now["total"] > self._peak["total"]:
            self._peak = now
        return now

    def _freeze_static(self) -> None:
        """Count the parameters, the optimizer's state and the module's buffers once for this
        phase."""
        inner = getattr(self._optimizer, "optimizer", self._optimizer)
        state = list(_tensors_in(inner.state)) if isinstance(inner, torch.optim.Optimizer) else []
        # the module's parameters too: no strategy changes their storage during forward and
        # backward but ZeRO-3, which binds them to gathered views (walked at each sample)
        record = strategy_of(self._model)
        sharded = record is not None and record.shards_parameters
        groups = {
            "params": [] if sharded else self._params,
            "optimizer": state,
            "buffers": self._buffers,
        }
        fixed = _count(groups, ("params", "optimizer", "buffers"))
        counted = {
            t.untyped_storage().data_ptr()
            for t in groups["params"] + groups["optimizer"] + groups["buffers"]
        }
        self._static = (counted, fixed)

    def _before_forward(self, module, args) -> None:
        if not torch.is_grad_enabled():
            return
        # parameters and buffers are model state; autograd also saves BatchNorm's running
        # statistics, which must not count twice (nor a strategy's parameter buffers:
        # ZeRO-3 gathers units into them during forward)
        state = [*self._params, *self._buffers]
        found = _strategy_tensors(module, self._optimizer)
        state += found.get("params", []) + found.get("gathered", [])
        self._counter.begin_forward({_storage_identity(t) for t in state})
        # keep them alive through forward: a storage freed meanwhile (ZeRO-3 swaps a
        # parameter's placeholder for its gathered view) could lend its identity to an
        # activation, which would then go uncounted
        self._keep = [t.untyped_storage() for t in state]
        if self._phase is not None:
            self._end()  # a forward again before step (gradient accumulation)
        self._begin("forward")
        self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._counter.unpack)
        self._hooks_ctx.__enter__()

    def _after_forward(self, module, args, output) -> None:
        if self._hooks_ctx is None:
            return
        self._hooks_ctx.__exit__(None, None, None)
        self._hooks_ctx = None
        self._keep = []
        self.activations = self._counter.saved
        peak = self._end()
        self.record("after_forward", peak)
        self._begin("backward")

    def _before_step(self, optimizer, args, kwargs) -> None:
        peak = self._end() if self._phase == "backward" else {}
        self.record("after_backward", peak)
        self._begin("step")

    def _after_step(self, optimizer, args, kwargs) -> None:
        peak = self._end() if self._phase == "step" else {}
        self.record("after_step", peak)
        self.step += 1

    def record(self, phase: str, peak: dict[str, int] | None = None) -> dict:
        """Measure now and emit a `memory` event for `phase`; returns the fields."""
        fields: dict[str, Any] = {"phase": phase, "step": self.step}
        parts = self._parts if peak else None  # a phase just ended: its last sample is now
        if parts is None:
            fields.update(model_state_bytes(self._model, self._optimizer))
        else:  # model_state_bytes' categories, from the sample (one walk, not two)
            fields.update(
                params=parts["gathered"] + parts["params"],
                grads=parts["grads"],
                optimizer=parts["optimizer"],
                buffers=parts["buffers"],
                scratch=parts["comm"] + parts["scratch"],
            )
        # activations live from forward until backward has consumed them
        fields["activations"] = self._counter.alive()
        for key, value in (peak or {}).items():
            fields["peak" if key == "total" else f"peak_{key}"] = value
        fields["rss"] = _rss()
        device = self._device
        if device is not None and device.type == "cuda":
            fields["cuda_allocated"] = torch.cuda.memory_allocated(device)
            fields["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
            fields["cuda_reserved"] = torch.cuda.memory_reserved(device)
        fields["time_s"] = time.perf_counter()
        self.last[phase] = fields
        if self.emit:
            telemetry.emit("memory", **{k: v for k, v in fields.items() if k != "time_s"})
        return fields


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - no psutil: report nothing rather than fail a step
        return 0


# --- the ZeRO paper's model ----------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each kind of model state."""

    params: float
    grads: float
    optimizer: float  # K in the paper

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


MIXED_ADAM = Precision(params=2, grads=2, optimizer=12)  # the paper's setting
FP32_ADAM = Precision(params=4, grads=4, optimizer=8)
PRESETS = {"mixed_adam": MIXED_ADAM, "fp32_adam": FP32_ADAM}
STAGE_NAMES = {0: "DP", 1: "P_os", 2: "P_os+g", 3: "P_os+g+p"}


def zero_memory_estimate(
    num_params: float,
    world_size: int,
    stage: int,
    params_bytes: float | None = None,
    grads_bytes: float | None = None,
    optimizer_bytes_per_param: float | None = None,
    preset: str = "mixed_adam",
) -> dict[str, float]:
    """Model-state bytes per rank under ZeRO `stage` (0-3), by category, plus "total".

    Defaults are the paper's mixed-precision Adam (2 + 2 + 12 bytes per parameter);
    preset="fp32_adam" gives 4 + 4 + 8; explicit byte counts override the preset.
    """
    if (
        isinstance(num_params, bool)
        or not isinstance(num_params, Real)
        or num_params < 0
        or not math.isfinite(num_params)
    ):
        raise ValueError(f"num_params must be a non-negative number, got {num_params!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if stage not in STAGE_NAMES or isinstance(stage, bool):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    base = PRESETS[preset]
    per = Precision(
        params=base.params if params_bytes is None else params_bytes,
        grads=base.grads if grads_bytes is None else grads_bytes,
        optimizer=base.optimizer
        if optimizer_bytes_per_param is None
        else optimizer_bytes_per_param,
    )
    for name, value in (
        ("params_bytes", per.params),
        ("grads_bytes", per.grads),
        ("optimizer_bytes_per_param", per.optimizer),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, Real)
            or value < 0
            or (not math.isfinite(value))
        ):
            raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    psi, n = float(num_params), world_size
    out = {
        "params": per.params * psi / (n if stage >= 3 else 1),
        "grads": per.grads * psi / (n if stage >= 2 else 1),
        "optimizer": per.optimizer * psi / (n if stage >= 1 else 1),
    }
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


# Table 1 of the ZeRO paper: GB per device (decimal), for Ψ = 7.5B, 128B and 1T parameters,
# K = 12, columns P_os, P_os+g, P_os+g+p. Kept as printed, to test the model against.
PAPER_TABLE_1 = {
    7.5e9: {
        1: (120, 120, 120),
        4: (52.5, 41.3, 30),
        16: (35.6, 21.6, 7.5),
        64: (31.4, 16.6, 1.88),
        256: (30.4, 15.4, 0.47),
        1024: (30.1, 15.1, 0.12),
    },
    128e9: {
        1: (2048, 2048, 2048),
        4: (896, 704, 512),
        16: (608, 368, 128),
        64: (536, 284, 32),
        256: (518, 263, 8),
        1024: (513, 257, 2),
    },
    1e12: {
        1: (16000, 16000, 16000),
        4: (7000, 5500, 4000),
        16: (4750, 2875, 1000),
        64: (4187, 2218, 250),
        256: (4046, 2054, 62.5),
        1024: (4011, 2013, 15.6),
    },
}


def memory_table(
    num_params: float,
    world_sizes: Iterable[int],
    preset: str = "mixed_adam",
    **bytes_per_param: float,
) -> str:
    """Table 1's layout for one model: GB per rank (decimal) for each stage and world size."""
    rows = [f"{'N_d':>6} " + " ".join(f"{STAGE_NAMES[s]:>10}" for s in range(4))]
    for n in world_sizes:
        cells = []
        for stage in range(4):
            gb = (
                zero_memory_estimate(num_params, n, stage, preset=preset, **bytes_per_param)[
                    "total"
                ]
                / 1e9
            )
            cells.append(f"{format_gb(gb):>10}")
        rows.append(f"{n:>6} " + " ".join(cells))
    return "\n".join(rows)


def format_gb(gb: float) -> str:
    """A GB figure as Table 1 prints it: whole GB (cut, not rounded) from 100 GB up, one
    decimal from 10 GB, two below (half up), trailing zeros dropped: 4187, 41.3, 7.5, 0.12."""
    from decimal import ROUND_HALF_UP, Decimal

    if gb >= 100:
        return str(int(gb))
    places = Decimal("0.1") if gb >= 10 else Decimal("0.01")
    text = f"{Decimal(repr(gb)).quantize(places, rounding=ROUND_HALF_UP):f}"
    return text.rstrip("0").rstrip(".")


# --- the peak: model state at rest plus what a step holds on top of it ---------------------


def peak_memory_estimate(
    num_params: float,
    world_size: int,
    strategy: str,
    activation_bytes: float = 0,
    *,
    bucket_bytes: Iterable[float] | None = None,
    unit_params: Iterable[float] | None = None,
    prefetch: bool = False,
    root_params: float | None = None,
    params_bytes: float = 4,
    grads_bytes: float = 4,
    optimizer_bytes_per_param: float = 8,
    reduce_scatter_receive: bool = False,
) -> dict[str, float]:
    """Bytes per rank at the worst moment of a step, by phase, for `strategy` ("ddp",
    "zero1", "zero2", "zero3"); defaults are fp32 AdamW (4 + 4 + 8 bytes per parameter).

    At rest (after the step) a rank holds the ZeRO paper's model state. A step adds, with
    P = params_bytes·Ψ, G = grads_bytes·Ψ, O = optimizer_bytes_per_param·Ψ, A the activation
    bytes saved by one forward (`activation_bytes`), N = world_size:

    * forward: the parameters, the optimizer state and A (gradients were zeroed: set to
      None); DDP keeps its buckets (G) all along; ZeRO-3 holds a unit gathered in full with
      the root's parameters (and the next unit when prefetching).
    * backward, early (the first gradients arrive while the activations are still held):
      ZeRO-1 allocates its gradient buffer (G), ZeRO-2 its first bucket of full gradients,
      ZeRO-3 the unit's full gradient buffer; late (activations gone): DDP holds every fresh
      `.grad` beside its buckets (G + G), ZeRO-2 the last bucket, its received slice and the
      shards reduced so far, ZeRO-3 the first unit's gradients and shards.
      `reduce_scatter_receive`: the gloo reduce-scatter (comm/) receives into a buffer the
      size of its input while in flight; a CPU count of live tensors does not see it.
    * step: the model state at rest (the ZeRO paper's formula).

    `bucket_bytes`: ZeRO-2's buckets of full gradients, in launch order (default one bucket of
    min(G, 25 MB)); `unit_params`: ZeRO-3's units' trainable parameters in forward order, the
    root's own being the rest of Ψ unless `root_params` says (default one unit of Ψ),
    gathered one at a time with the root's, two with `prefetch` (the next one's all-gather in
    flight).

    Returns "at_rest", "forward", "backward", "step", "peak" (their maximum) and "transient"
    (peak - at_rest). Not modelled: autograd's temporaries (the gradient flowing between
    layers) and, on a GPU, the caching allocator's slack; the tracker's CPU count leaves
    them out too, `cuda_peak` does not.
    """
    if strategy not in ("ddp", "zero1", "zero2", "zero3"):
        raise ValueError(f"strategy must be 'ddp', 'zero1', 'zero2' or 'zero3', got {strategy!r}")
    stage = 0 if strategy == "ddp" else int(strategy[-1])
    for name, value in (("activation_bytes", activation_bytes), ("params_bytes", params_bytes)):
        if isinstance(value, bool) or not isinstance(value, Real) or value < 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    rest = zero_memory_estimate(
        num_params,
        world_size,
        stage,
        params_bytes=params_bytes,
        grads_bytes=grads_bytes,
        optimizer_bytes_per_param=optimizer_bytes_per_param,
    )
    psi, n, a = float(num_params), world_size, float(activation_bytes)
    p, g, o = rest["params"], grads_bytes * psi, rest["optimizer"]
    if stage == 0:
        forward = p + o + g + a
        backward = max(forward, p + o + g + g)  # buckets + every fresh .grad
    elif stage == 1:
        forward = p + o + a
        backward = p + o + g + a  # the in-place gradient buffer, from the first gradient
    elif stage == 2:
        buckets = list(bucket_bytes) if bucket_bytes is not None else [min(g, 25 * 2**20)]
        forward = p + o + a
        backward = p + o + _reducing(buckets, [0.0] * len(buckets), a, n, reduce_scatter_receive)
    else:
        units = [float(u) for u in (unit_params if unit_params is not None else [psi])]
        # the root's own parameters: gathered throughout
        root = psi - sum(units) if root_params is None else float(root_params)
        ahead = [
            units[i + 1] if prefetch and i + 1 < len(units) else 0.0 for i in range(len(units))
        ]
        behind = [units[i - 1] if prefetch and i else 0.0 for i in range(len(units))]
        largest = max(u + x for u, x in zip(units, ahead, strict=True))
        forward = p + o + a + params_bytes * (root + largest)
        # backward order: the forward's last unit first, each gathered (with the one before it
        # when prefetching) while its gradients fill; the root's gradients (a tied output
        # layer's) fill from the first gradient to the end
        gathered = [params_bytes * (root + u + x) for u, x in zip(units, behind, strict=True)]
        backward = (
            p
            + o
            + grads_bytes * root
            + _reducing(
                [grads_bytes * u for u in reversed(units)],
                list(reversed(gathered)),
                a,
                n,
                reduce_scatter_receive,
            )
        )
    step = rest["total"]
    peak = max(forward, backward, step)
    return {
        "at_rest": step,
        "forward": forward,
        "backward": backward,
        "step": step,
        "peak": peak,
        "transient": peak - step,
    }


def _reducing(buckets: list[float], beside: list[float], a: float, n: int, receive: bool):
    """ZeRO-2/3's transient in backward, at its worst. Bucket i fills (beside[i]: what else is
    held meanwhile, ZeRO-3's gathered unit) while bucket i-1's reduce-scatter is in flight
    (its full gradients and the slice it receives, and with `receive` the input-sized buffer
    of gloo's exchange) beside the slices reduced before: the reducer keeps one reduce-scatter
    in flight. Or bucket i has just been launched, beside[i] still held (ZeRO-3 frees the
    unit after launching its reduce-scatter). The activations `a` are counted whole while
    buckets fill (the first gradients arrive with most of them still held) and not once a
    bucket is sent."""
    extra = 1 + 1 / n + (1 if receive else 0)  # a bucket in flight, per byte of gradients
    worst = 0.0
    for i, filling in enumerate(buckets):
        in_flight = buckets[i - 1] * extra if i else 0.0
        reduced = sum(buckets[: max(i - 1, 0)]) / n
        worst = max(worst, a + beside[i] + filling + in_flight + reduced)
        # bucket i just launched (bucket i-1 taken first: its slice kept), what is beside it
        # still held (ZeRO-3 frees a unit after launching its reduce-scatter); the
        # activations are counted as gone: the unit's backward has freed its own, and the
        # first gradients' moment above counts them whole
        worst = max(worst, beside[i] + filling * extra + sum(buckets[:i]) / n)
    return worst


def peak_memory_estimate_for(
    module: nn.Module,
    strategy: str,
    world_size: int,
    activation_bytes: float = 0,
    *,
    units=None,
    prefetch: bool = False,
    bucket_cap_mb: float = 25,
    optimizer_bytes_per_param: float = 8,
    reduce_scatter_receive: bool = False,
) -> dict[str, float]:
    """`peak_memory_estimate` with the sizes read off a plain fp32 module: Ψ (trainable
    parameters), ZeRO-2's buckets (25 MB by default, in backward order), ZeRO-3's units
    (`units=` as parallelize's; default each child of the root holding parameters) and the
    most parameters gathered at once (a unit with the root's own, and the next unit too with
    `prefetch`)."""
    from .parallel.zero3 import default_units

    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    psi = sum(p.numel() for _, p in trainable)
    options: dict[str, Any] = {}
    if strategy == "zero2":
        buckets, size = [], 0
        for _, p in reversed(trainable):
            nbytes = 4 * p.numel()
            if size and size + nbytes > bucket_cap_mb * 2**20:
                buckets.append(size)
                size = 0
            size += nbytes
        options["bucket_bytes"] = [*buckets, size]
    if strategy == "zero3":
        default = default_units(module)
        chosen = units or (lambda name, mod: name in default)
        names = [n for n, m in module.named_modules() if n and chosen(n, m)]
        owner: dict[int, str] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            holders = [u for u in names if name.startswith(u + ".")]
            # a parameter used in several places (tied) goes to their common ancestor
            unit = max(holders, key=len) if holders else ""
            if id(p) in owner and owner[id(p)] != unit:
                unit = ""
            owner[id(p)] = unit
        sizes: dict[str, int] = {}
        numel = {id(p): p.numel() for _, p in module.named_parameters()}
        for key, unit in owner.items():
            sizes[unit] = sizes.get(unit, 0) + numel[key]
        options["unit_params"] = [sizes[u] for u in names if sizes.get(u)]
        options["prefetch"] = prefetch
    return peak_memory_estimate(
        psi,
        world_size,
        strategy,
        activation_bytes,
        optimizer_bytes_per_param=optimizer_bytes_per_param,
        reduce_scatter_receive=reduce_scatter_receive,
        **options,
    )


def _attach_tracker(model: nn.Module, optimizer: Any) -> None:
    MemoryTracker().attach(model, optimizer)


def _register() -> None:
    from .parallel import api

    if _attach_tracker not in api._TRACKERS:
        api.register_tracker(_attach_tracker)


_register()  # parallelize(..., track_memory=True) attaches a tracker
