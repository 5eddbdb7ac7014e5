"""Strategies for data-parallel training: parallelize() and the optimizers it returns."""

from .api import STRATEGIES, clip_grad_norm_, full_state_dict, parallelize
from .checkpointing import apply_activation_checkpointing
from .ddp import DDP
from .mesh import Mesh, mesh
from .param_server import ParameterServerOptimizer, message_bytes
from .precision import GradScaler, MixedPrecisionPolicy
from .strategy import Strategy, strategy_of
from .zero import ZeroOptimizer, ZeroShardedOptimizer
from .zero3 import Zero3, full_grads, fully_shard

__all__ = [
    "apply_activation_checkpointing",
    "ZeroOptimizer",
    "ZeroShardedOptimizer",
    "full_state_dict",
    "clip_grad_norm_",
    "full_grads",
    "fully_shard",
    "Zero3",
    "DDP",
    "GradScaler",
    "MixedPrecisionPolicy",
    "STRATEGIES",
    "ParameterServerOptimizer",
    "message_bytes",
    "parallelize",
    "Mesh",
    "mesh",
    "Strategy",
    "strategy_of",
]
