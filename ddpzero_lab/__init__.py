"""ddpzero_lab: see data parallelism and ZeRO work on a live torch.distributed cluster.

This module only re-exports the public API (DESIGN.md §3).
"""

from . import faults
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .cluster import ClusterError, Job, LiveCluster, RankError, device, rank, state, world_size
from .comm import reset_traffic, traffic
from .memory import MemoryTracker, model_state_bytes, peak_memory_estimate, zero_memory_estimate
from .parallel import (
    DDP,
    GradScaler,
    MixedPrecisionPolicy,
    Zero3,
    ZeroOptimizer,
    clip_grad_norm_,
    full_grads,
    full_state_dict,
    fully_shard,
    parallelize,
    strategy_of,
)
from .telemetry import emit
from .viz import Dashboard, MemoryCalculator

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    "ClusterError",
    "DDP",
    "Dashboard",
    "GradScaler",
    "Job",
    "LiveCluster",
    "MemoryCalculator",
    "MemoryTracker",
    "MixedPrecisionPolicy",
    "RankError",
    "Zero3",
    "ZeroOptimizer",
    "clip_grad_norm_",
    "device",
    "emit",
    "faults",
    "full_grads",
    "full_state_dict",
    "fully_shard",
    "model_state_bytes",
    "parallelize",
    "peak_memory_estimate",
    "reset_traffic",
    "traffic",
    "rank",
    "state",
    "strategy_of",
    "world_size",
    "zero_memory_estimate",
]
