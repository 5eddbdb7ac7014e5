"""The process group a strategy runs on: the checks every strategy makes before it starts.

This module owns: that a process group exists (`check_process_group`), that every rank built
the same model (`check_same_model`), and copying rank 0's values to every rank
(`broadcast_state`), which DDP and each ZeRO stage do before their first step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import comm
from .flat import FlatLayout


def check_process_group(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{what} needs a process group: build it inside a LiveCluster job or after "
            "torch.distributed.init_process_group"
        )


def global_rank(group, rank: int) -> int:
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
    src = global_rank(group, 0)
    with torch.no_grad():
        for items in by_kind.values():
            layout = FlatLayout.of(items)
            flat = layout.flatten([t.detach() for t in items])
            comm.broadcast(flat, src, group=group, tag=tag)
            for t, view in zip(items, layout.views(flat), strict=True):
                t.copy_(view)


def start_replicas_alike(module: nn.Module, group=None, replicate_group=None) -> None:
    """Give every rank the values of rank 0 of `group`; with hybrid sharding (replicas of the
    sharded model across `replicate_group`), first across the replicas, so that every shard
    group starts from the values of the same rank."""
    tensors = [*module.parameters(), *module.buffers()]
    if replicate_group is not None:
        check_same_model(module, replicate_group)
        broadcast_state(tensors, replicate_group)
    broadcast_state(tensors, group)
