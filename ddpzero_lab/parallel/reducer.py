"""The one gradient reducer of every data-parallel strategy: DDP, ZeRO-1, ZeRO-2 and ZeRO-3.

Read top to bottom, it is the machinery of torch's `Reducer` (Li et al., "PyTorch
Distributed", VLDB 2020, §3.2-3.3):

1. a hook on every parameter copies its gradient into its bucket's gradient buffer
   (`_on_grad_ready`);
2. readiness is counted per bucket; a bucket whose last gradient is in is launched, always in
   bucket order, so every rank issues the same collectives in the same order whatever its
   data (`_launch_ready_buckets`);
3. the reduction is one visible branch (`_launch`): DDP all-reduces the whole bucket, ZeRO
   reduce-scatters it, each rank receiving only its own slice (ZeRO-2 is DDP with the
   all-reduce split into a reduce-scatter and an all-gather);
4. at the end of backward (an autograd-engine callback) the buckets not launched yet are
   launched in order, with zeros for parameters that got no gradient on this rank, then the
   unused-parameter mask is all-reduced after the last bucket, as torch does, and every
   bucket is waited for (`_finalize_backward`).

Unused parameters, one policy for all strategies: a parameter that got no gradient on a rank
contributes zeros; one that got no gradient on any rank keeps `.grad` None (`unused`), so the
optimizer skips it as one process would. When the forward pass shows that a parameter cannot
get a gradient (it is not in the autograd graph of the outputs, found as torch's
`find_unused_parameters` finds it), it is marked ready as backward starts, so that its bucket
does not hold back the ones after it.

Launch policies: "when_ready" (DDP, ZeRO-2: during backward), "on_request" (ZeRO-3: by each
unit's post-backward hook, so the autograd graph places it; the rest at the end of backward)
and "at_step" (ZeRO-1: every bucket when the optimizer steps, `flush()`).
It owns no parameters and no optimizer: buckets are the strategy's `FlatShards`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .. import comm
from .flat import FlatShards
from .strategy import memory_probe

REDUCE_OPS = ("all_reduce", "reduce_scatter")
LAUNCH_POLICIES = ("when_ready", "on_request", "at_step")
_LOW = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Bucket:
    """A bucket's state for one reduction: which gradients are in, and its collective."""

    def __init__(self, index: int, storage: FlatShards) -> None:
        self.index = index
        self.storage = storage
        self.ready: set[int] = set()  # positions in storage.params with their gradient in
        self.work = None
        self.launched_at = 0.0
        self.incoming: torch.Tensor | None = None  # what a reduce-scatter in flight fills
        self.low: torch.Tensor | None = None  # a compressed copy in flight (DDP)
        self.reduced = False  # its result is taken (this backward)
        self.grad_shard: torch.Tensor | None = None  # ZeRO: the reduced slice, accumulated
        self.fresh: torch.Tensor | None = None  # HSDP: this backward's slice, not yet averaged
        self.post_divide = False  # divide the received slice by N, not the bucket before

    @property
    def pending(self) -> int:
        return len(self.storage) - len(self.ready)

    @property
    def launched(self) -> bool:
        return self.work is not None


class Reducer:
    """Reduce the gradients of `buckets` across the ranks of `group`.

    reduce:  "all_reduce" (DDP: every rank gets the averaged bucket) or "reduce_scatter"
             (ZeRO: rank r gets the averaged slice r, in `bucket.grad_shard`).
    launch:  "when_ready", "on_request" or "at_step" (see the module's docstring).
    grads:   "view" (after reduction `.grad` is a view into the bucket, as torch's
             gradient_as_bucket_view) or "release" (the full gradient is dropped as soon as it
             is copied into the bucket: ZeRO-2 and 3 keep only their shard).
    in_place: reduce-scatter into the bucket's own slice (ZeRO-1: no second gradient buffer).
    find_unused_parameters: False raises when a parameter gets no gradient (torch's DDP
             default); True applies the unused-parameter policy and sends the mask.
    replicate_group: hybrid sharding (ZeRO within `group`, replicas across this group, as
             FSDP's HSDP): each reduced slice is all-reduced across the replicas.
    reduce_dtype: communicate in this dtype (a MixedPrecisionPolicy's reduce_dtype: fp16 or
             bf16 gradients summed in fp32), or a callable bucket index -> dtype (ZeRO-3's
             units with policies of their own); None: in the bucket's own dtype.
    """

    def __init__(
        self,
        buckets: Sequence[FlatShards],
        reduce: str,
        group=None,
        launch: str = "when_ready",
        grads: str = "view",
        in_place: bool = False,
        find_unused_parameters: bool = True,
        compression: str | None = None,
        reduce_dtype: torch.dtype | Callable[[int], torch.dtype | None] | None = None,
        tag: str | Callable[[int], str] = "bucket",  # or bucket index -> its tag
        on_finished: Callable[[float], None] | None = None,
        replicate_group=None,
    ) -> None:
        if reduce not in REDUCE_OPS:
            raise ValueError(f"reduce must be one of {REDUCE_OPS}, got {reduce!r}")
        if launch not in LAUNCH_POLICIES:
            raise ValueError(f"launch must be one of {LAUNCH_POLICIES}, got {launch!r}")
        self.reduce = reduce
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.launch = launch
        self.grads = grads
        self.in_place = in_place
        self.find_unused_parameters = find_unused_parameters
        self.compression = compression
        self.reduce_dtype = reduce_dtype
        self.tag = tag
        self.on_finished = on_finished
        # hybrid sharding (HSDP): the shards are replicated across this group's ranks, each
        # replica on other data: the reduced slice is then averaged across the replicas
        self.replicate_group = replicate_group
        self.enabled = True  # False inside DDP's no_sync()
        self.arrival: list[int] = []  # ids of parameters in the order gradients arrived
        self.record_arrival = False
        self.unused: set[int] = set()  # ids of parameters no rank used since the last reset
        self._used_here: set[int] = set()  # ids with a gradient on this rank since then
        self._reached: set[int] | None = None  # ids in the forward's autograd graph
        self._backward_started = False
        self.backward_end: float | None = None
        self._hooks: list = []
        self.set_buckets(buckets)

    # -- set-up -------------------------------------------------------------------------------
    def set_buckets(self, storages: Sequence[FlatShards]) -> None:
        """(Re)build the buckets, in launch order, and hook every parameter in them."""
        for handle in self._hooks:
            handle.remove()
        self.buckets = [Bucket(i, s) for i, s in enumerate(storages)]
        self._where: dict[int, tuple[Bucket, int]] = {}
        for bucket in self.buckets:
            for position, (_, p) in enumerate(bucket.storage.params):
                self._where[id(p)] = (bucket, position)
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
            for b in self.buckets
            for _, p in b.storage.params
        ]
        self._next = 0  # the next bucket to launch, in order

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def name_of(self, param_id: int) -> str:
        bucket, position = self._where[param_id]
        return bucket.storage.params[position][0]

    # -- forward: which parameters can get a gradient -----------------------------------------
    def prepare_for_backward(self, outputs) -> None:
        """Record the parameters in the autograd graph of `outputs` (torch's
        find_unused_parameters traversal); the others are marked ready as backward starts."""
        if not torch.is_grad_enabled() or not self.enabled:
            return
        reached = self._reached if self._reached is not None else set()
        stack = [t.grad_fn for t in tensors_in(outputs) if t.grad_fn is not None]
        seen = set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)  # an AccumulateGrad node
            if variable is not None:
                reached.add(id(variable))
            stack.extend(n for n, _ in node.next_functions if n is not None)
        self._reached = reached

    # -- 1. a gradient is ready ---------------------------------------------------------------
    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if not self.enabled:
            return  # no_sync(): gradients accumulate locally in .grad
        self.start_backward()
        if self.record_arrival:
            self.arrival.append(id(param))
        bucket, position = self._where[id(param)]
        view = bucket.storage.views(bucket.storage.grad_buffer())[position]
        if position in bucket.ready and id(param) in self._used_here and self.launch != "at_step":
            raise RuntimeError(
                f"parameter {self.name_of(id(param))} received a gradient twice in one backward; "
                "run extra backward passes inside no_sync() (DDP) or between steps"
            )
        if bucket.launched:
            raise RuntimeError(
                f"parameter {self.name_of(id(param))} received its gradient after its bucket was "
                "reduced: it was used outside the module's forward (e.g. in the loss); use it "
                "inside forward"
            )
        if param.grad.data_ptr() != view.data_ptr():
            view.copy_(param.grad)
        if self.grads == "release":
            param.grad = None  # the bucket holds it now (ZeRO-2/3 keep only the shard)
        elif self.in_place:
            param.grad = view  # ZeRO-1: later accumulation goes into the bucket itself
        self._used_here.add(id(param))
        self._mark_ready(bucket, position)

    def start_backward(self) -> None:
        if self._backward_started:
            return
        self._backward_started = True
        torch.autograd.Variable._execution_engine.queue_callback(self._finalize_backward)
        if (
            self._reached is not None
            and self.launch == "when_ready"
            and self.find_unused_parameters
        ):
            # parameters the forward did not reach cannot get a gradient: ready now (zeros)
            for bucket in self.buckets:
                for position, (_, p) in enumerate(bucket.storage.params):
                    if id(p) not in self._reached and position not in bucket.ready:
                        self._mark_unused(bucket, position)
        self._reached = None

    # -- 2. count readiness, launch in order ----------------------------------------------------
    def _mark_ready(self, bucket: Bucket, position: int) -> None:
        bucket.ready.add(position)
        if self.launch == "when_ready" and bucket.pending == 0:
            self._launch_ready_buckets()

    def _mark_unused(self, bucket: Bucket, position: int) -> None:
        """No gradient on this rank: its share of the global batch contributes zeros."""
        bucket.storage.views(bucket.storage.grad_buffer())[position].zero_()
        self._mark_ready(bucket, position)

    def _launch_ready_buckets(self) -> None:
        # Strictly in bucket order on every rank: collectives pair up by order of issue.
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    # -- 3. the one branch: all-reduce (DDP) or reduce-scatter (ZeRO) ---------------------------
    def _launch(self, bucket: Bucket) -> None:
        storage = bucket.storage
        buffer = storage.grad_buffer()
        bucket.launched_at = time.time()
        tag = self.tag(bucket.index) if callable(self.tag) else f"{self.tag}{bucket.index}"
        # the dtype on the wire: DDP's compression, or the policy's reduce_dtype
        reduce_dtype = self.reduce_dtype
        if callable(reduce_dtype):  # per bucket (ZeRO-3: each unit's own policy)
            reduce_dtype = reduce_dtype(bucket.index)
        wire = _LOW[self.compression] or reduce_dtype
        # The sum divided by N is the mean. Divided before the sum (as torch does) where the
        # sum could overflow (fp16, bf16) and for the all-reduce; a reduce-scatter in fp32
        # divides only the slice it receives, 1/N of the work (`_take_result`).
        bucket.post_divide = self.reduce == "reduce_scatter" and (wire or buffer.dtype) not in (
            torch.float16,
            torch.bfloat16,
        )
        if not bucket.post_divide:
            buffer.div_(self.world_size)
        if wire is not None and wire != buffer.dtype:
            bucket.low = buffer.to(wire)  # a copy in flight, copied back (DDP) when done
            buffer = bucket.low
        if self.reduce == "reduce_scatter" and self.grads == "release":
            # P_os+g keeps one reduce-scatter in flight: the one before this is taken (waited
            # for, its full gradients and receive buffer freed) as this one starts, so that a
            # rank holds at most two buckets of full gradients, whatever the timing: the
            # peak is bounded (ZeRO-R's constant-size buffers, §6.3), not one bucket per
            # layer still in flight
            for earlier in self.buckets:
                if earlier is not bucket and earlier.launched and not earlier.reduced:
                    self._take_result(earlier)
        if self.reduce == "all_reduce":  # DDP: every rank receives the whole averaged bucket
            bucket.work = comm.all_reduce(buffer, group=self.group, async_op=True, tag=tag)
        else:  # ZeRO: rank r receives only the averaged slice r, the one it steps
            if self.in_place and bucket.low is None:
                bucket.incoming = buffer[storage.lo : storage.hi]
            else:
                bucket.incoming = torch.empty(
                    storage.shard_numel, dtype=buffer.dtype, device=buffer.device
                )
            bucket.work = comm.reduce_scatter(
                bucket.incoming, buffer, group=self.group, async_op=True, tag=tag
            )
        if _probing():
            memory_probe("launch")  # the bucket and its receive buffer (or low copy) alive

    def launch_bucket(self, index: int) -> None:
        """Launch bucket `index` now (launch="on_request"): its parameters with no gradient
        on this rank contribute zeros. Callers request in an order every rank agrees on."""
        bucket = self.buckets[index]
        if bucket.launched:
            return
        if self.launch != "at_step":
            self.start_backward()
        for position in range(len(bucket.storage)):
            if position not in bucket.ready:
                self._mark_unused(bucket, position)
        self._launch(bucket)

    def release_completed(self) -> None:
        """Drop the full gradient buffers of buckets whose reduce-scatter has completed (an
        opportunistic release; `_launch` bounds what is in flight)."""
        for bucket in self.buckets:
            if self.grads == "release" and bucket.work is not None and bucket.work.is_completed():
                self._take_result(bucket)

    # -- 4. the end of backward -----------------------------------------------------------------
    def _finalize_backward(self) -> None:
        """Runs once at the end of backward (an autograd-engine callback)."""
        self.backward_end = time.time()
        if self.launch != "at_step":
            self.flush()
        else:
            self._backward_started = False

    def flush(self) -> None:
        """Launch what is not launched yet, in bucket order, send the unused mask after the
        last bucket, and wait for every bucket."""
        try:
            unready = [
                (bucket, position)
                for bucket in self.buckets
                if not bucket.launched
                for position in range(len(bucket.storage))
                if position not in bucket.ready
            ]
            if unready and not self.find_unused_parameters:
                names = [bucket.storage.params[pos][0] for bucket, pos in unready]
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                raise RuntimeError(
                    f"parameters received no gradient in this step: {', '.join(names[:5])}{more}. "
                    "If the model skips them on purpose, build DDP with "
                    "find_unused_parameters=True (every rank must make the same choice)"
                )
            for bucket in self.buckets:
                if not bucket.launched:
                    self.launch_bucket(bucket.index)
            if self.find_unused_parameters:
                self._all_reduce_unused_mask()
            for bucket in self.buckets:
                self._take_result(bucket)
            if self.replicate_group is not None:
                self._average_across_replicas()
            if self.on_finished is not None:
                self.on_finished(self.backward_end or time.time())
        finally:
            self._reset_backward()

    def _all_reduce_unused_mask(self) -> None:
        """After the last bucket, as torch's reducer: which parameters no rank used."""
        params = [p for b in self.buckets for _, p in b.storage.params]
        if not params:
            return  # a ZeRO-3 module with frozen parameters only
        used = torch.tensor(
            [int(id(p) in self._used_here) for p in params],
            dtype=torch.int32,
            device=params[0].device,  # nccl moves only CUDA tensors
        )
        comm.all_reduce(used, group=self.group, tag="unused_mask")
        if self.replicate_group is not None:  # used by no rank of any replica
            comm.all_reduce(used, group=self.replicate_group, tag="unused_mask:replicas")
        self.unused = {id(p) for p, u in zip(params, used.tolist(), strict=True) if u == 0}

    def _take_result(self, bucket: Bucket) -> None:
        if bucket.work is None or bucket.reduced:
            return
        bucket.work.wait()
        bucket.reduced = True
        storage = bucket.storage
        if self.reduce == "all_reduce":
            if bucket.low is not None:
                storage.grad.copy_(bucket.low)
                bucket.low = None
            if self.grads == "view":
                for (_, p), view in zip(storage.params, storage.views(storage.grad), strict=True):
                    if id(p) in self.unused:
                        continue  # no rank used it: .grad stays as it was, as in one process
                    if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                        p.grad = view
            return
        if _probing():
            memory_probe("reduced")  # the full bucket and the reduced slice, both alive
        incoming, bucket.incoming = bucket.incoming, None
        bucket.low = None
        if bucket.post_divide:
            incoming.div_(self.world_size)
        if self.grads == "release":
            storage.grad = None  # only the shard stays (P_os+g)
        if self.replicate_group is not None:
            # HSDP: averaged across the replicas in flush(), in bucket order on every rank
            # (results are taken here as they complete, an order no two ranks share)
            bucket.fresh = incoming
            return
        self._accumulate(bucket, incoming)

    def _accumulate(self, bucket: Bucket, incoming: torch.Tensor) -> None:
        if self.in_place:
            bucket.grad_shard = incoming  # a view of the bucket: accumulation happens there
        elif bucket.grad_shard is None:
            bucket.grad_shard = incoming
        else:  # gradient accumulation over several backward passes sums, as .grad does
            bucket.grad_shard.add_(incoming)

    def _average_across_replicas(self) -> None:
        replicas = dist.get_world_size(self.replicate_group)
        for bucket in self.buckets:
            if bucket.fresh is None:
                continue
            incoming, bucket.fresh = bucket.fresh, None
            incoming.div_(replicas)
            comm.all_reduce(incoming, group=self.replicate_group, tag="grads:replicas")
            self._accumulate(bucket, incoming)

    def _reset_backward(self) -> None:
        for bucket in self.buckets:
            bucket.ready = set()
            bucket.work = None
            bucket.reduced = False
        self._next = 0
        self._backward_started = False
        self._reached = None
        if self.launch == "when_ready" and self.grads == "view":
            self._used_here = set()  # DDP: .grad itself carries what was used

    def zero_grad(self) -> None:
        """Forget the reduced shards and what was used (the optimizer's zero_grad)."""
        for bucket in self.buckets:
            bucket.grad_shard = None
        self._used_here = set()
        self.unused = set()


def _probing() -> bool:
    from .strategy import _PROBES

    return bool(_PROBES)


def tensors_in(value):
    """The tensors in a (nested) tuple, list or dict, in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
