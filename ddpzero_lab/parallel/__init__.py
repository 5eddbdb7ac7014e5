"""Strategies for data-parallel training: parallelize() and the optimizers it returns."""

from .api import STRATEGIES, full_state_dict, parallelize
from .ddp import DDP
from .param_server import ParameterServerOptimizer, message_bytes
from .precision import GradScaler, MixedPrecisionPolicy
from .zero import ZeroOptimizer, ZeroShardedOptimizer

__all__ = [
    "ZeroOptimizer",
    "ZeroShardedOptimizer",
    "full_state_dict",
    "DDP",
    "GradScaler",
    "MixedPrecisionPolicy",
    "STRATEGIES",
    "ParameterServerOptimizer",
    "message_bytes",
    "parallelize",
]
