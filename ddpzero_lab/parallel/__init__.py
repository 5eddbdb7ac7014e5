"""Strategies for data-parallel training: parallelize() and the optimizers it returns."""

from .api import STRATEGIES, parallelize
from .ddp import DDP
from .param_server import ParameterServerOptimizer, message_bytes

__all__ = ["DDP", "STRATEGIES", "ParameterServerOptimizer", "message_bytes", "parallelize"]
