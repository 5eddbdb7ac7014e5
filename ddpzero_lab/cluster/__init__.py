"""The live cluster: persistent torch.distributed workers (see cluster.py)."""

from .cluster import Job, LiveCluster
from .context import RankState, device, in_worker, rank, state, world_size
from .errors import ClusterError, RankError, RankFailure

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
