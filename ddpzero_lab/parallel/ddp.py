"""DDP from scratch: gradients averaged across ranks by bucketed all-reduces that overlap
with backward, as torch.nn.parallel.DistributedDataParallel does.

This module owns the DDP wrapper: the bucket plan (in reverse parameter order, then in the
order gradients really arrived, as Li et al., "PyTorch Distributed", VLDB 2020, §3.2
describe), `no_sync()`, the buffers' broadcast, the teaching modes and gradient compression.
The gradient hooks, readiness, launch order, end-of-backward wait and unused parameters are
the one reducer's (reducer.py, its all-reduce branch: ZeRO-2 differs from DDP there only);
the start-up checks are group.py's, the collectives comm/'s (counted), the flat buffers
flat.py's. parallelize(..., "ddp") returns this wrapper; it knows its strategy
(`model.strategy`, strategy.py).

Modes, for teaching and comparison:
  mode="naive"     one all-reduce per parameter after backward (no buckets, no overlap)
  overlap=False    buckets, all launched after backward
  overlap=True     buckets launched during backward (the default, as torch)
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn

from .. import comm, telemetry
from .flat import FlatShards, emit_shard_map, replicated
from .group import broadcast_state, check_process_group, check_same_model, global_rank
from .reducer import Reducer
from .strategy import Strategy, StrategyModule, attach
from .wrapper import claim

MB = 1024 * 1024
_COMPRESSIONS = (None, "bf16", "fp16")


class DDP(StrategyModule, nn.Module):
    """Data-parallel wrapper: like torch's DistributedDataParallel, built in Python.

    `.module` is the wrapped module and `parameters()` are its parameters, so an optimizer is
    built as usual. After `loss.backward()` every parameter's `.grad` holds the mean of the
    ranks' gradients.

    bucket_cap_mb / first_bucket_mb: bucket sizes (torch's defaults: 25 and 1 MB).
    overlap: launch each bucket during backward (True) or all after it (False).
    mode: "bucketed" (default) or "naive" (one all-reduce per parameter after backward).
    find_unused_parameters: allow parameters that get no gradient in a step.
    compression: None, "bf16" or "fp16": the all-reduce runs on a half-size copy.
    broadcast_buffers: copy rank 0's buffers (BatchNorm statistics) before every forward.
    rebuild_buckets: after the first step, rebuild buckets in gradient arrival order.
    reduce_dtype: all-reduce low-precision gradients in this dtype (e.g. torch.float32 for a
        MixedPrecisionPolicy's reduce_dtype); None: in the gradients' own dtype.
    """

    def __init__(
        self,
        module: nn.Module,
        bucket_cap_mb: float = 25,
        first_bucket_mb: float = 1,
        overlap: bool = True,
        broadcast_buffers: bool = True,
        find_unused_parameters: bool = False,
        mode: str = "bucketed",
        compression: str | None = None,
        rebuild_buckets: bool = True,
        group=None,
        reduce_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        for name, value in (("bucket_cap_mb", bucket_cap_mb), ("first_bucket_mb", first_bucket_mb)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number of MB, got {value!r}")
        if mode not in ("bucketed", "naive"):
            raise ValueError(f"mode must be 'bucketed' or 'naive', got {mode!r}")
        if compression not in _COMPRESSIONS:
            raise ValueError(f"compression must be None, 'bf16' or 'fp16', got {compression!r}")
        check_process_group("DDP")
        claim("ddp", module, self)
        self.module = module
        attach(self, Strategy("ddp", module))  # parallelize adds the optimizer it builds
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.first_bucket_mb = float(first_bucket_mb)
        self.overlap = bool(overlap)
        self.broadcast_buffers = bool(broadcast_buffers)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.mode = mode
        self.compression = compression
        self.rebuild_buckets = bool(rebuild_buckets) and mode == "bucketed"

        check_same_model(module, group)
        broadcast_state([*module.parameters(), *module.buffers()], group)

        self._params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self._sync = True
        self._step = 0
        self._rebuild_pending = False
        self._rebuilt = False
        self._forward_at = time.time()
        # DDP is the reducer with all-reduce, gradients left in the buckets (torch's
        # gradient_as_bucket_view)
        self.reducer = Reducer(
            self._make_buckets(list(reversed(range(len(self._params))))),
            "all_reduce",
            group,
            launch="when_ready" if self.overlap else "on_request",
            grads="view",
            find_unused_parameters=self.find_unused_parameters,
            compression=compression,
            reduce_dtype=reduce_dtype,
            on_finished=self._end_of_step,
        )
        self.reducer.record_arrival = self.rebuild_buckets
        self._naive_queued = False
        if mode == "naive":
            self.reducer.remove()  # one all-reduce per parameter after backward instead
            self._hooks = [
                p.register_post_accumulate_grad_hook(self._naive_hook) for _, p in self._params
            ]
        # every rank holds everything: parameters, gradients, optimizer state
        emit_shard_map(
            "ddp",
            self._params,
            lambda i, n: (replicated(n), replicated(n), replicated(n)),
            self.world_size,
        )

    # -- buckets ----------------------------------------------------------------------------
    def _make_buckets(self, order: list[int]) -> list[FlatShards]:
        """Group parameters, in `order`, into buckets of at most bucket_cap_mb (the first one
        first_bucket_mb, so that communication starts early in backward)."""
        if self.mode == "naive":
            return []
        groups: list[list[int]] = []
        current: list[int] = []
        current_bytes = 0
        cap = self.first_bucket_mb * MB
        for i in order:
            p = self._params[i][1]
            first = self._params[current[0]][1] if current else p
            if current and (
                current_bytes + p.numel() * p.element_size() > cap
                or (p.dtype, p.device) != (first.dtype, first.device)
            ):
                groups.append(current)
                current, current_bytes, cap = [], 0, self.bucket_cap_mb * MB
            current.append(i)
            current_bytes += p.numel() * p.element_size()
        if current:
            groups.append(current)
        buckets = [FlatShards([self._params[i] for i in g]) for g in groups]
        for bucket in buckets:
            bucket.grad_buffer()  # gradients live here: allocated once, kept
        return buckets

    @property
    def bucket_params(self) -> list[list[str]]:
        """Parameter names in each bucket, in launch order."""
        return [[name for name, _ in b.storage.params] for b in self.reducer.buckets]

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        buckets = self.reducer.buckets
        # the buckets are what is all-reduced (and, after backward, what .grad views)
        return {
            "comm": [b.storage.grad for b in buckets]
            + [b.low for b in buckets if b.low is not None]
        }

    # -- forward ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._rebuild_pending:
            self._rebuild_from_arrival()
        if self.broadcast_buffers and torch.is_grad_enabled():
            buffers = list(self.module.buffers())
            if buffers and self.world_size > 1:
                broadcast_state(buffers, self.group, tag="buffers")
        self._forward_at = time.time()
        output = self.module(*args, **kwargs)
        if self.find_unused_parameters and self._sync and self.mode != "naive":
            self.reducer.prepare_for_backward(output)
        return output

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally, without communication, inside this block; the first
        backward after it averages the accumulated sum."""
        previous, self._sync = self._sync, False
        self.reducer.enabled = False
        try:
            yield
        finally:
            self._sync = previous
            self.reducer.enabled = previous

    # -- backward: the reducer does it; here what is DDP's own ----------------------------------
    def _end_of_step(self, backward_end: float) -> None:
        try:
            self._emit_step(backward_end)
        finally:
            if self._step == 0 and self.rebuild_buckets and not self._rebuilt:
                self._rebuild_pending = True
                self.reducer.record_arrival = False
            self._step += 1

    def _naive_hook(self, param: torch.Tensor) -> None:
        if self._sync and not self._naive_queued:
            self._naive_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._naive_all_reduce)

    def _naive_all_reduce(self) -> None:
        backward_end = time.time()
        self._naive_queued = False
        missing = [name for name, p in self._params if p.grad is None]
        if missing:
            raise RuntimeError(
                f"mode='naive' needs a gradient for every parameter; none for {missing[:5]}"
            )
        for name, p in self._params:
            p.grad.div_(self.world_size)
            comm.all_reduce(p.grad, group=self.group, tag=name)
        self._emit_step(backward_end)
        self._step += 1

    def _emit_step(self, backward_end: float) -> None:
        done = time.time()
        if self.mode == "naive":  # one all-reduce per parameter, all after backward
            intervals = [(backward_end, done)]
        else:
            intervals = sorted(
                (b.launched_at, getattr(b.work, "completed_at", None) or done)
                for b in self.reducer.buckets
            )
        comm_s, cursor = 0.0, float("-inf")
        for start, end in intervals:  # the union of the buckets' in-flight intervals
            start = max(start, cursor)
            if end > start:
                comm_s += end - start
                cursor = end
        telemetry.emit(
            "step",
            step=self._step,
            compute_s=backward_end - self._forward_at,
            comm_s=comm_s,
            exposed_comm_s=done - backward_end,
            buckets=len(self.reducer.buckets),
            forward_start=self._forward_at,
            backward_end=backward_end,
        )

    def _rebuild_from_arrival(self) -> None:
        """Rebuild buckets in the order gradients arrived in the first step, rank 0's order
        on every rank (the ranks must agree on bucket contents)."""
        self._rebuild_pending = False
        self._rebuilt = True
        index = {id(p): i for i, (_, p) in enumerate(self._params)}
        seen = list(dict.fromkeys(index[k] for k in self.reducer.arrival))
        rest = [i for i in reversed(range(len(self._params))) if i not in set(seen)]
        # on the parameters' device: nccl moves only CUDA tensors
        order = torch.tensor(seen + rest, dtype=torch.int64, device=self._params[0][1].device)
        comm.broadcast(order, global_rank(self.group, 0), group=self.group, tag="bucket_order")
        new_order = [index[id(p)] for b in self.reducer.buckets for _, p in b.storage.params]
        if order.tolist() != new_order:
            self.reducer.set_buckets(self._make_buckets(order.tolist()))
