"""Who am I? The rank-side context: rank(), world_size(), device().

Inside a LiveCluster worker the values come from the cluster. Elsewhere they come from an
initialised torch.distributed process group (torchrun) and LOCAL_RANK, and a plain process is
rank 0 of 1 on the CPU, so the same training code runs in all three places.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import telemetry


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    device: torch.device
    backend: str


_context: RankContext | None = None
_job_end_hooks: list[Callable[[], None]] = []


def set_context(context: RankContext | None) -> None:
    global _context
    _context = context


def at_job_end(hook: Callable[[], None]) -> None:
    """Call hook() in the worker after each job's fn has returned or raised (once added, for
    every job). For state a job sets up for itself alone, such as ddpzero_lab.faults'."""
    if hook not in _job_end_hooks:
        _job_end_hooks.append(hook)


def run_job_end_hooks() -> None:
    for hook in list(_job_end_hooks):
        try:
            hook()
        except Exception:  # noqa: BLE001 - a failing clean-up must not stop the task loop
            pass


def in_worker() -> bool:
    """True inside a LiveCluster worker process."""
    return _context is not None


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's rank (0 outside any distributed setting)."""
    if _context is not None:
        return _context.rank
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def world_size() -> int:
    """The number of ranks (1 outside any distributed setting)."""
    if _context is not None:
        return _context.world_size
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def device() -> torch.device:
    """The device this rank computes on: its own GPU under nccl, else the CPU."""
    if _context is not None:
        return _context.device
    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


telemetry.set_rank_source(rank)
