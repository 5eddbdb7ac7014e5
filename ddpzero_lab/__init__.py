"""ddpzero_lab: see data parallelism and ZeRO work on a live torch.distributed cluster.

This module only re-exports the public API (DESIGN.md §3). The notebook's machinery (the
LiveCluster, dashboards, the memory calculator) is imported on first use, through the module
`__getattr__` below: a rank under torchrun that only trains imports neither the cluster's
parent side nor matplotlib or ipywidgets (tests/test_lean_ranks.py checks it).
"""

from typing import TYPE_CHECKING

from . import faults
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .cluster import ClusterError, RankError, device, rank, state, world_size
from .comm import Link, reset_traffic, set_link, traffic
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
    mesh,
    parallelize,
    strategy_of,
)
from .planning import plan, plan_table
from .projection import profile_step, project
from .telemetry import emit

if TYPE_CHECKING:
    from .cluster.cluster import Job, LiveCluster
    from .viz import Dashboard, MemoryCalculator

__version__ = "0.1.0"

# public name -> the module that defines it, imported when the name is first read
_LAZY = {
    "Job": "ddpzero_lab.cluster.cluster",
    "LiveCluster": "ddpzero_lab.cluster.cluster",
    "Dashboard": "ddpzero_lab.viz",
    "MemoryCalculator": "ddpzero_lab.viz",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    "ClusterError",
    "DDP",
    "Dashboard",
    "GradScaler",
    "Job",
    "Link",
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
    "mesh",
    "model_state_bytes",
    "parallelize",
    "peak_memory_estimate",
    "profile_step",
    "project",
    "plan",
    "plan_table",
    "reset_traffic",
    "set_link",
    "traffic",
    "rank",
    "state",
    "strategy_of",
    "world_size",
    "zero_memory_estimate",
]
