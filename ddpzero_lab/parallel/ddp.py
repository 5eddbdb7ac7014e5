"""DDP from scratch: gradients averaged across ranks by bucketed all-reduces that overlap
with backward, as torch.nn.parallel.DistributedDataParallel does.

This module owns the DDP wrapper: the start-up checks and broadcast, the gradient buckets
(in reverse parameter order, then in the order gradients really arrived, as Li et al.,
"PyTorch Distributed", VLDB 2020, §3.2 describe), the per-parameter hooks that launch each
bucket's all-reduce the moment its last gradient is ready, the end-of-backward step that waits
for them, `no_sync()`, unused parameters, the teaching modes and gradient compression. The
collectives themselves come from comm/ (counted), the flat-buffer arithmetic from flat.py.

Modes, for teaching and comparison:
  mode="naive"     one all-reduce per parameter after backward (no buckets, no overlap)
  overlap=False    buckets, all launched after backward
  overlap=True     buckets launched during backward (the default, as torch)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .. import comm, telemetry
from .flat import FlatLayout, emit_shard_map, replicated

MB = 1024 * 1024
_COMPRESSION = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class _Bucket:
    index: int
    params: list[int]  # indices into DDP._params
    buffer: torch.Tensor
    views: list[torch.Tensor]
    pending: int = 0
    work: object = None
    low: torch.Tensor | None = None  # the compressed copy in flight
    launched_at: float = 0.0
    ready_params: set[int] = field(default_factory=set)


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def check_same_model(module: nn.Module, group=None) -> None:
    """Raise ValueError, on every rank, if the ranks' parameter names and shapes differ."""
    signature = [(name, tuple(p.shape), str(p.dtype)) for name, p in module.named_parameters()]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, signature, group=group)
    reference = gathered[0]
    for rank, other in enumerate(gathered[1:], start=1):
        if other == reference:
            continue
        for i, (mine, theirs) in enumerate(zip(reference, other, strict=False)):
            if mine != theirs:
                raise ValueError(
                    f"the model differs between ranks: parameter #{i} is {mine[0]} "
                    f"{list(mine[1])} {mine[2]} on rank 0 but {theirs[0]} {list(theirs[1])} "
                    f"{theirs[2]} on rank {rank}; build the same model on every rank"
                )
        raise ValueError(
            f"the model differs between ranks: rank 0 has {len(reference)} parameters, rank "
            f"{rank} has {len(other)}; build the same model on every rank"
        )


def broadcast_state(tensors: list[torch.Tensor], group=None, tag: str = "init") -> None:
    """Copy rank 0's values into `tensors` on every rank, one broadcast per dtype/device."""
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    src = _global_rank(group, 0)
    with torch.no_grad():
        for items in by_kind.values():
            layout = FlatLayout.of(items)
            flat = layout.flatten([t.detach() for t in items])
            comm.broadcast(flat, src, group=group, tag=tag)
            for t, view in zip(items, layout.views(flat), strict=True):
                t.copy_(view)


class DDP(nn.Module):
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
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        for name, value in (("bucket_cap_mb", bucket_cap_mb), ("first_bucket_mb", first_bucket_mb)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number of MB, got {value!r}")
        if mode not in ("bucketed", "naive"):
            raise ValueError(f"mode must be 'bucketed' or 'naive', got {mode!r}")
        if compression not in _COMPRESSION:
            raise ValueError(f"compression must be None, 'bf16' or 'fp16', got {compression!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DDP needs a process group: build it inside a LiveCluster job or after "
                "torch.distributed.init_process_group"
            )
        self.module = module
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
        self._arrival: list[int] = []
        self._rebuild_pending = False
        self._rebuilt = False
        self._finalize_queued = False
        self._forward_at = time.time()
        self._backward_at: float | None = None
        self._build_buckets(list(reversed(range(len(self._params)))))
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._make_hook(i))
            for i, (_, p) in enumerate(self._params)
        ]
        # every rank holds everything: parameters, gradients, optimizer state
        emit_shard_map(
            "ddp",
            self._params,
            lambda i, n: (replicated(n), replicated(n), replicated(n)),
            self.world_size,
        )

    # -- buckets ----------------------------------------------------------------------------
    def _build_buckets(self, order: list[int]) -> None:
        """Group parameters, in `order`, into buckets of at most bucket_cap_mb (the first one
        first_bucket_mb, so that communication starts early in backward)."""
        self._buckets: list[_Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}
        if self.mode == "naive":
            return
        current: list[int] = []
        current_bytes = 0
        cap = self.first_bucket_mb * MB

        def close() -> None:
            nonlocal current, current_bytes, cap
            if not current:
                return
            tensors = [self._params[i][1] for i in current]
            layout = FlatLayout.of(tensors)
            first = tensors[0]
            buffer = torch.zeros(layout.numel, dtype=first.dtype, device=first.device)
            bucket = _Bucket(len(self._buckets), list(current), buffer, layout.views(buffer))
            for slot, i in enumerate(current):
                self._where[i] = (bucket.index, slot)
            self._buckets.append(bucket)
            current, current_bytes, cap = [], 0, self.bucket_cap_mb * MB

        for i in order:
            p = self._params[i][1]
            if current and (
                current_bytes + p.numel() * p.element_size() > cap
                or p.dtype != self._params[current[0]][1].dtype
                or p.device != self._params[current[0]][1].device
            ):
                close()
            current.append(i)
            current_bytes += p.numel() * p.element_size()
        close()
        self._reset_iteration()

    def _reset_iteration(self) -> None:
        for bucket in self._buckets:
            bucket.pending = len(bucket.params)
            bucket.ready_params = set()
            bucket.work = None
            bucket.low = None
        self._next_launch = 0
        self._finalize_queued = False
        self._backward_at = None

    @property
    def bucket_params(self) -> list[list[str]]:
        """Parameter names in each bucket, in launch order."""
        return [[self._params[i][0] for i in b.params] for b in self._buckets]

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"scratch": [b.buffer for b in self._buckets]}

    # -- forward ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._rebuild_pending:
            self._rebuild_from_arrival()
        if self.broadcast_buffers and torch.is_grad_enabled():
            buffers = list(self.module.buffers())
            if buffers and self.world_size > 1:
                broadcast_state(buffers, self.group, tag="buffers")
        self._forward_at = time.time()
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally, without communication, inside this block; the first
        backward after it averages the accumulated sum."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    # -- backward ------------------------------------------------------------------------------
    def _make_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            if not self._sync:
                return
            if not self._finalize_queued:
                self._finalize_queued = True
                self._backward_at = time.time()
                torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
            if self.mode == "naive":
                return
            if self._step == 0 and self.rebuild_buckets:
                self._arrival.append(index)
            bucket_index, slot = self._where[index]
            bucket = self._buckets[bucket_index]
            if index in bucket.ready_params:
                raise RuntimeError(
                    f"parameter {self._params[index][0]} received a gradient twice in one step; "
                    "run extra backward passes inside ddp.no_sync()"
                )
            view = bucket.views[slot]
            if param.grad.data_ptr() != view.data_ptr():
                view.copy_(param.grad)
            bucket.ready_params.add(index)
            bucket.pending -= 1
            if bucket.pending == 0 and self.overlap:
                self._launch_ready()

        return hook

    def _launch_ready(self) -> None:
        # Strictly in bucket order on every rank: collectives pair up by order of issue.
        while self._next_launch < len(self._buckets):
            bucket = self._buckets[self._next_launch]
            if bucket.pending:
                return
            self._launch(bucket)
            self._next_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.buffer.div_(self.world_size)  # pre-divide, as torch does: the sum is the mean
        bucket.launched_at = time.time()
        target = bucket.buffer
        low = _COMPRESSION[self.compression]
        if low is not None:
            bucket.low = target.to(low)
            target = bucket.low
        bucket.work = comm.all_reduce(
            target, group=self.group, async_op=True, tag=f"bucket{bucket.index}"
        )

    def _finalize(self) -> None:
        """Runs once at the end of backward (an autograd-engine callback)."""
        backward_end = time.time()
        try:
            if self.mode == "naive":
                self._naive_all_reduce()
                self._emit_step(backward_end)
                return
            unready = [i for b in self._buckets for i in b.params if i not in b.ready_params]
            globally_unused: set[int] = set()
            if unready:
                if not self.find_unused_parameters:
                    names = ", ".join(self._params[i][0] for i in unready[:5])
                    more = f" and {len(unready) - 5} more" if len(unready) > 5 else ""
                    raise RuntimeError(
                        f"parameters received no gradient in this step: {names}{more}. If the "
                        "model skips them on purpose, build DDP with find_unused_parameters=True "
                        "(every rank must make the same choice)"
                    )
                for i in unready:
                    bucket_index, slot = self._where[i]
                    bucket = self._buckets[bucket_index]
                    bucket.views[slot].zero_()  # this rank's share of the global batch: 0
                    bucket.ready_params.add(i)
                    bucket.pending -= 1
            if self.find_unused_parameters:
                used = [1] * len(self._params)
                for i in unready:
                    used[i] = 0
                mask = torch.tensor(used, dtype=torch.int32, device=self._params[0][1].device)
                comm.all_reduce(mask, group=self.group, tag="unused_mask")
                globally_unused = {i for i, u in enumerate(mask.tolist()) if u == 0}
            self._launch_ready()
            for bucket in self._buckets:
                bucket.work.wait()
                if bucket.low is not None:
                    bucket.buffer.copy_(bucket.low)
                for slot, i in enumerate(bucket.params):
                    if i in globally_unused:
                        continue  # no rank used it: leave .grad as it was, like one process
                    p = self._params[i][1]
                    if p.grad is None or p.grad.data_ptr() != bucket.views[slot].data_ptr():
                        p.grad = bucket.views[slot]
            self._emit_step(backward_end)
        finally:
            if self._step == 0 and self.rebuild_buckets and not self._rebuilt:
                self._rebuild_pending = True
            self._step += 1
            self._reset_iteration()

    def _naive_all_reduce(self) -> None:
        missing = [name for name, p in self._params if p.grad is None]
        if missing:
            raise RuntimeError(
                f"mode='naive' needs a gradient for every parameter; none for {missing[:5]}"
            )
        for name, p in self._params:
            p.grad.div_(self.world_size)
            comm.all_reduce(p.grad, group=self.group, tag=name)

    def _emit_step(self, backward_end: float) -> None:
        done = time.time()
        intervals = sorted(
            (b.launched_at, getattr(b.work, "completed_at", None) or done)
            for b in self._buckets
            if b.work is not None or self.mode != "naive"
        )
        if self.mode == "naive":  # one all-reduce per parameter, all after backward
            intervals = [(backward_end, done)]
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
            buckets=len(self._buckets),
            forward_start=self._forward_at,
            backward_end=backward_end,
        )

    def _rebuild_from_arrival(self) -> None:
        """Rebuild buckets in the order gradients arrived in the first step, rank 0's order
        on every rank (the ranks must agree on bucket contents)."""
        self._rebuild_pending = False
        self._rebuilt = True
        seen = list(dict.fromkeys(self._arrival))
        rest = [i for i in reversed(range(len(self._params))) if i not in set(seen)]
        # on the parameters' device: nccl moves only CUDA tensors
        order = torch.tensor(seen + rest, dtype=torch.int64, device=self._params[0][1].device)
        comm.broadcast(order, _global_rank(self.group, 0), group=self.group, tag="bucket_order")
        new_order = order.tolist()
        if new_order != [i for b in self._buckets for i in b.params]:
            self._build_buckets(new_order)
