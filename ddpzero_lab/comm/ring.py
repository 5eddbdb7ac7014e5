"""Ring collectives built from point-to-point messages, for teaching and for measuring.

`ring_all_reduce`, `ring_reduce_scatter` and `ring_all_gather` do what torch.distributed's
collectives do, but step by step in Python: every rank sends one chunk to its right
neighbour and receives one from its left neighbour, N-1 times per phase. They count the
bytes they really send and receive (op names "ring_all_reduce", ...) so that tests and
lessons can hold the measurement against `cost_model.traffic_model`.

The all-reduce is the bandwidth-optimal ring (Patarasuk & Yuan, JPDC 2009): a
reduce-scatter (after it, each rank holds one fully reduced chunk) followed by an all-gather
(each rank passes the reduced chunks on). Chunks are as equal as possible, so any size works,
including fewer elements than ranks and none at all.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from . import collectives
from .collectives import _check_pair, _check_tensor, _group_info
from .cost_model import chunk_numels

_REDUCERS = {
    dist.ReduceOp.SUM: torch.Tensor.add_,
    dist.ReduceOp.AVG: torch.Tensor.add_,  # divided by N at the end
    dist.ReduceOp.PRODUCT: torch.Tensor.mul_,
    dist.ReduceOp.MAX: lambda acc, x: torch.maximum(acc, x, out=acc),
    dist.ReduceOp.MIN: lambda acc, x: torch.minimum(acc, x, out=acc),
}


def _reducer(op):
    for key, fn in _REDUCERS.items():
        if op == key:
            return fn
    raise ValueError(f"ring collectives support SUM, AVG, PRODUCT, MAX and MIN, got {op!r}")


class _Ring:
    """This rank's place in the ring and a tally of the bytes it really moves."""

    def __init__(self, group) -> None:
        self.world_size, self.rank, _ = _group_info(group)
        self.group = group
        self.right = (self.rank + 1) % self.world_size
        self.left = (self.rank - 1) % self.world_size
        # Global ranks of the neighbours (send/recv address ranks of the default group).
        if group is not None:
            self.right = dist.get_global_rank(group, self.right)
            self.left = dist.get_global_rank(group, self.left)
        self.sent = 0
        self.recv = 0

    def exchange(self, outgoing: torch.Tensor, incoming: torch.Tensor) -> None:
        """Send `outgoing` to the right while receiving `incoming` from the left.

        Both are posted together (`batch_isend_irecv`), then both are waited for: if every rank
        sent first and received after, each would wait for a neighbour that is itself still
        sending, which deadlocks a transport that hands large messages over only once the
        receiver is ready (a rendezvous protocol). An empty chunk is not sent at all; the
        neighbour knows its size too and does not wait for it.
        """
        # P2POp accepts only torch's own isend / irecv (by identity), wherever dist.isend points
        ops = []
        if outgoing.numel():
            ops.append(dist.P2POp(distributed_c10d.isend, outgoing, self.right, group=self.group))
        if incoming.numel():
            ops.append(dist.P2POp(distributed_c10d.irecv, incoming, self.left, group=self.group))
        if not ops:
            return
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        if outgoing.numel():
            self.sent += outgoing.numel() * outgoing.element_size()
        if incoming.numel():
            self.recv += incoming.numel() * incoming.element_size()


def _launch_times(tensor: torch.Tensor) -> dict:
    """On a GPU a ring's host times are launch times (NCCL's wait() does not block the host):
    its event says so. comm's own ops are timed with CUDA events there instead."""
    return {"timing": "host"} if tensor.is_cuda else {}


def _flat_view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(-1)


def ring_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, tag=None):
    """All-reduce `tensor` in place with a ring of send/recv (reduce-scatter + all-gather)."""
    _check_tensor("tensor", tensor)
    reduce_ = _reducer(op)
    ring = _Ring(group)
    n, r = ring.world_size, ring.rank
    start = time.time()
    flat = _flat_view(tensor)
    chunks = flat.tensor_split(n)
    buffer = torch.empty(max(chunk_numels(flat.numel(), n)), dtype=flat.dtype, device=flat.device)
    # Phase 1, reduce-scatter: at step s rank r passes on its partial sum of chunk r-s and
    # adds the partial sum of chunk r-s-1 arriving from the left. After N-1 steps rank r
    # holds chunk r+1 reduced over all ranks.
    for step in range(n - 1):
        outgoing = chunks[(r - step) % n]
        target = chunks[(r - step - 1) % n]
        incoming = buffer[: target.numel()]
        ring.exchange(outgoing, incoming)
        reduce_(target, incoming)
    # Phase 2, all-gather: the reduced chunks travel once around the ring.
    for step in range(n - 1):
        ring.exchange(chunks[(r + 1 - step) % n], chunks[(r - step) % n])
    if op == dist.ReduceOp.AVG:
        tensor.div_(n)
    collectives.record(
        "ring_all_reduce",
        tensor.numel() * tensor.element_size(),
        ring.sent,
        ring.recv,
        start,
        time.time(),
        tag,
        **_launch_times(tensor),
    )


def ring_reduce_scatter(output, input, op=dist.ReduceOp.SUM, group=None, tag=None):
    """Reduce-scatter with a ring: rank r ends with chunk r of the reduced `input`.

    `input` is not modified; it holds world_size equal chunks, `output` one chunk.
    """
    world_size, _, _ = _group_info(group)
    _check_pair(output, input, -world_size, "ring_reduce_scatter")
    reduce_ = _reducer(op)
    ring = _Ring(group)
    n, r = ring.world_size, ring.rank
    start = time.time()
    chunks = _flat_view(input).tensor_split(n)
    # The partial sum travelling through this rank. It starts as this rank's own chunk r-1,
    # so that after N-1 hops the sum that arrives here, plus this rank's part, is chunk r.
    partial = chunks[(r - 1) % n].clone()
    incoming = torch.empty_like(partial)
    for step in range(n - 1):
        ring.exchange(partial, incoming)
        partial = chunks[(r - step - 2) % n].clone()
        reduce_(partial, incoming)
    if op == dist.ReduceOp.AVG:
        partial.div_(n)
    output.copy_(partial.view_as(output))
    collectives.record(
        "ring_reduce_scatter",
        input.numel() * input.element_size(),
        ring.sent,
        ring.recv,
        start,
        time.time(),
        tag,
        **_launch_times(input),
    )


def ring_all_gather(output, input, group=None, tag=None):
    """All-gather with a ring: `output` chunk r is rank r's `input`, on every rank."""
    world_size, _, _ = _group_info(group)
    _check_pair(output, input, world_size, "ring_all_gather")
    ring = _Ring(group)
    n, r = ring.world_size, ring.rank
    start = time.time()
    chunks = _flat_view(output).tensor_split(n)
    chunks[r].copy_(input.reshape(-1))
    # At step s rank r passes on chunk r-s (its own first, then what it just received).
    for step in range(n - 1):
        ring.exchange(chunks[(r - step) % n], chunks[(r - step - 1) % n])
    collectives.record(
        "ring_all_gather",
        output.numel() * output.element_size(),
        ring.sent,
        ring.recv,
        start,
        time.time(),
        tag,
        **_launch_times(output),
    )
