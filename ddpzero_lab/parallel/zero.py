"""ZeRO stages 1 and 2 from scratch: optimizer state (P_os), then gradients (P_os+g), sharded.

This module owns the sharded optimizer that `parallelize(..., strategy="zero1" | "zero2")`
returns (Rajbhandari et al., "ZeRO", SC20, §5.1-5.2):

* Parameters are grouped into flat buckets (stage 1: one bucket, so the whole model is one flat
  buffer), each padded to a multiple of the world size; rank r owns the contiguous slice r of
  every bucket. The module's parameters become views into their bucket, so gathering a bucket
  updates the model in place.
* Each rank's optimizer (the user's class, built over its shards) holds state for its slice
  only: optimizer memory falls to 1/N.
* Stage 1: after backward, each bucket's gradients are reduce-scattered (each rank needs only
  its slice's gradient), the shard is stepped, and the updated slices are all-gathered: 2Ψ of
  traffic per step, as DDP's all-reduce.
* Stage 2: the reduce-scatter of a bucket starts during backward, the moment its last gradient
  is ready (as DDP's buckets), and each parameter's full gradient is released as soon as it is
  copied into its bucket; a rank keeps only its gradient shard.

Elementwise optimizers (SGD, Adam, AdamW, ...) give exactly the single-process result. One that
uses a norm per parameter tensor (LAMB, LARS) would see flat shards instead of tensors.
Not owned here: the collectives (comm/), the flat arithmetic and shard-map event (flat.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import comm, telemetry
from .ddp import broadcast_state, check_same_model
from .flat import FlatLayout, emit_shard_map, replicated

MB = 1024 * 1024


class _Bucket:
    """A flat group of parameters, padded to a multiple of N, sharded by contiguous slices."""

    def __init__(
        self, index: int, params: list[tuple[str, nn.Parameter]], world_size: int, rank: int
    ) -> None:
        self.index = index
        self.params = params
        self.layout = FlatLayout.of([p for _, p in params], align=world_size)
        first = params[0][1]
        with torch.no_grad():
            self.flat = self.layout.flatten([p.detach() for _, p in params])
        for (_, p), view in zip(params, self.layout.views(self.flat), strict=True):
            p.data = view  # the module now computes with views into the flat buffer
        self.lo, self.hi = self.layout.shard_range(rank, world_size)
        # The optimizer's parameter: this rank's slice of the flat buffer itself (a leaf that
        # shares its memory), so that stepping it updates the model with no extra copy.
        self.shard = nn.Parameter(self.flat[self.lo : self.hi])
        self.grad_flat: torch.Tensor | None = None  # full gradients, alive until reduced
        self.pending = len(params)
        self.ready: set[int] = set()
        self.used: set[int] = set()  # slots that received a real gradient this step
        self.work = None
        self.dtype, self.device = first.dtype, first.device

    def grad_buffer(self) -> torch.Tensor:
        if self.grad_flat is None:
            self.grad_flat = torch.zeros(
                self.layout.padded_numel, dtype=self.dtype, device=self.device
            )
        return self.grad_flat


class ZeroShardedOptimizer:
    """The optimizer `parallelize(..., "zero1" | "zero2")` returns; use it like a torch one."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: Callable,
        stage: int = 1,
        bucket_cap_mb: float | None = None,
        group=None,
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        if bucket_cap_mb is not None and (
            isinstance(bucket_cap_mb, bool)
            or not isinstance(bucket_cap_mb, (int, float))
            or bucket_cap_mb <= 0
        ):
            raise ValueError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeRO needs a process group: build it inside a LiveCluster job")
        self.module = module
        self.stage = stage
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_same_model(module, group)
        broadcast_state([*module.parameters(), *module.buffers()], group)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the module has no trainable parameters (requires_grad=True)")
        kinds = {(p.dtype, p.device) for _, p in named}
        if len(kinds) > 1:
            raise ValueError(
                f"ZeRO here needs one dtype and device for all parameters; got {kinds}"
            )
        self._named = named
        cap = bucket_cap_mb if bucket_cap_mb is not None else (25 if stage == 2 else None)
        self.buckets = self._make_buckets(named, cap)
        self.optimizer = optimizer([b.shard for b in self.buckets])
        self._where = {}
        for bucket in self.buckets:
            for slot, (_, p) in enumerate(bucket.params):
                self._where[id(p)] = (bucket, slot)
        self._hooks = []
        self._finalize_queued = False
        self._next_launch = 0
        if stage == 2:
            self._hooks = [p.register_post_accumulate_grad_hook(self._hook) for _, p in named]
        self._emit_shard_map()

    # -- set-up ----------------------------------------------------------------------------
    def _make_buckets(self, named, cap_mb) -> list[_Bucket]:
        # reverse order: the last layers' gradients are ready first in backward
        order = list(reversed(named))
        groups, current, size = [], [], 0
        for name, p in order:
            nbytes = p.numel() * p.element_size()
            if current and cap_mb is not None and size + nbytes > cap_mb * MB:
                groups.append(current)
                current, size = [], 0
            current.append((name, p))
            size += nbytes
        if current:
            groups.append(current)
        return [_Bucket(i, g, self.world_size, self.rank) for i, g in enumerate(groups)]

    def _emit_shard_map(self) -> None:
        owners: dict[str, list] = {}
        for bucket in self.buckets:
            for index, (name, _) in enumerate(bucket.params):
                owners[name] = bucket.layout.owners(index, self.world_size)
        grads = (lambda n, i: owners[n]) if self.stage == 2 else (lambda n, i: replicated(i))
        emit_shard_map(
            f"zero{self.stage}",
            self._named,
            lambda i, n: (replicated(n), grads(self._named[i][0], n), owners[self._named[i][0]]),
            self.world_size,
        )

    # -- the torch.optim surface ------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p in self._named:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        for bucket in self.buckets:
            bucket.shard.grad = None

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        # the flat parameter buffers are the module's parameters (counted there); the shards
        # share them. A rank's gradient shards are gradients; bucket buffers are scratch.
        return {
            "params": [b.flat for b in self.buckets],
            "grads": [b.shard.grad for b in self.buckets if b.shard.grad is not None],
            "scratch": [b.grad_flat for b in self.buckets if b.grad_flat is not None],
        }

    # -- stage 2: reduce-scatter during backward ---------------------------------------------
    def _hook(self, param: torch.Tensor) -> None:
        bucket, slot = self._where[id(param)]
        if not self._finalize_queued:
            self._finalize_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize_backward)
        if slot in bucket.ready:
            raise RuntimeError("a parameter received a gradient twice in one step")
        bucket.layout.views(bucket.grad_buffer())[slot].copy_(param.grad)
        param.grad = None  # the full gradient is in the bucket now: release it
        bucket.ready.add(slot)
        bucket.used.add(slot)
        bucket.pending -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.pending:
                return
            self._launch(bucket)
            self._next_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        buffer = bucket.grad_buffer()
        buffer.div_(self.world_size)  # pre-divide: the sum is the mean
        bucket.shard.grad = torch.empty_like(bucket.shard)
        bucket.work = comm.reduce_scatter(
            bucket.shard.grad, buffer, group=self.group, async_op=True, tag=f"grads{bucket.index}"
        )

    def _finalize_backward(self) -> None:
        for bucket in self.buckets:
            for slot in range(len(bucket.params)):
                if slot not in bucket.ready:  # no gradient this step: it contributes zeros
                    bucket.ready.add(slot)
                    bucket.pending -= 1
        self._launch_ready()
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.grad_flat = None  # only the shard's gradient stays
            bucket.work = None
            bucket.ready = set()
            bucket.pending = len(bucket.params)
        self._next_launch = 0
        self._finalize_queued = False

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ZeRO's step() takes no closure")
        start = time.time()
        if self.stage == 1:
            for bucket in self.buckets:
                bucket.used = {i for i, (_, p) in enumerate(bucket.params) if p.grad is not None}
            self._reduce_scatter_gradients()
        elif any(b.shard.grad is None for b in self.buckets):
            raise RuntimeError("step() before backward(): no gradients to apply")
        keep = self._unused_slices()
        self.optimizer.step()
        for view, saved in keep:  # a parameter no rank used keeps its value, as in one process
            view.copy_(saved)
        for bucket in self.buckets:
            bucket.used = set()
        for bucket in self.buckets:  # the updated slices, to every rank
            mine = bucket.shard.detach().clone()  # the input must not alias the output
            comm.all_gather(bucket.flat, mine, group=self.group, tag=f"params{bucket.index}")
        telemetry.emit("log", text=f"zero{self.stage} step in {time.time() - start:.4f} s")
        return None

    def _unused_slices(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The parts of this rank's shards that belong to parameters no rank used this step.

        A single process skips a parameter whose .grad is None; a flat shard cannot skip
        elements, so their values are saved before the step and put back after it (their
        optimizer state stays zero: a zero gradient moves neither momentum nor Adam's moments).
        """
        used = torch.tensor(
            [int(i in b.used) for b in self.buckets for i in range(len(b.params))],
            dtype=torch.int32,
        )
        comm.all_reduce(used, group=self.group, tag="used_mask")
        keep, k = [], 0
        for bucket in self.buckets:
            for index in range(len(bucket.params)):
                if used[k] == 0:
                    begin = bucket.layout.offsets[index]
                    end = begin + int(bucket.layout.shapes[index].numel())
                    a, b = max(begin, bucket.lo), min(end, bucket.hi)
                    if a < b:
                        view = bucket.flat[a:b]
                        keep.append((view, view.clone()))
                k += 1
        return keep

    def _reduce_scatter_gradients(self) -> None:
        for bucket in self.buckets:
            buffer = bucket.grad_buffer()
            for (_, p), view in zip(bucket.params, bucket.layout.views(buffer), strict=True):
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
            buffer.div_(self.world_size)
            shard_grad = torch.empty_like(bucket.shard)
            comm.reduce_scatter(shard_grad, buffer, group=self.group, tag=f"grads{bucket.index}")
            bucket.shard.grad = shard_grad
            bucket.grad_flat = None  # scratch: freed once reduced

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state (the sharded form)."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size") != self.world_size or state.get("rank") != self.rank:
            raise ValueError(
                f"this optimizer shard was saved by rank {state.get('rank')} of "
                f"{state.get('world_size')}; this is rank {self.rank} of {self.world_size}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
