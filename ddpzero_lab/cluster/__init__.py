"""The live cluster: persistent torch.distributed workers (see cluster.py).

`LiveCluster` and `Job` are imported on first use (module `__getattr__`): a rank that only
trains imports `cluster.context` (its rank and device) and nothing of the parent's machinery.
"""

from typing import TYPE_CHECKING

from .context import RankState, device, in_worker, rank, state, world_size
from .errors import ClusterError, RankError, RankFailure

if TYPE_CHECKING:
    from .cluster import Job, LiveCluster

__all__ = [
    "ClusterError",
    "Job",
    "LiveCluster",
    "RankError",
    "RankFailure",
    "RankState",
    "device",
    "in_worker",
    "rank",
    "state",
    "world_size",
]


def __getattr__(name: str):
    if name in ("Job", "LiveCluster"):
        from . import cluster

        return getattr(cluster, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
