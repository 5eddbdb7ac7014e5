"""Who am I? The rank-side context: rank(), world_size(), device(), and `state`, a per-rank
namespace that keeps objects between jobs.

Inside a LiveCluster worker the values come from the cluster. Elsewhere they come from an
initialised torch.distributed process group (torchrun) and LOCAL_RANK, and a plain process is
rank 0 of 1 on the CPU, so the same training code runs in all three places.
"""

from __future__ import annotations

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
    from ..comm import collectives  # the one rule for where a collective's tensors live

    return collectives.backend_device()


class RankState:
    """A namespace that lives in one process: in a LiveCluster worker it keeps a model, a batch
    or an optimizer from one `cluster.run` to the next, so a notebook can step across cells
    (forward in one cell, look at rank 1's buckets in the next, backward in a third).

        def setup():
            dzl.state.model = dzl.DDP(make_model())
        cluster.run(setup)
        cluster.run(lambda: dzl.state.model.module[0].weight.norm().item())

    Each rank has its own: nothing is shared or sent. The parent process has one too, unrelated
    to the ranks'. It is emptied when the cluster restarts (the worker processes are new).
    """

    def __getattr__(self, name: str):
        # only reached for a missing attribute: say what is there instead of a bare AttributeError
        if name.startswith("__"):
            raise AttributeError(name)
        held = ", ".join(sorted(vars(self))) or "nothing yet"
        raise AttributeError(
            f"dzl.state has no {name!r} on rank {rank()}: set it in an earlier job "
            f"(dzl.state.{name} = ...); it holds {held}. A cluster restart empties it."
        )

    def clear(self) -> None:
        """Forget everything held here."""
        vars(self).clear()

    def __contains__(self, name: str) -> bool:
        return name in vars(self)

    def __repr__(self) -> str:
        return f"dzl.state(rank {rank()}: {', '.join(sorted(vars(self))) or 'empty'})"


state = RankState()

telemetry.set_rank_source(rank)
