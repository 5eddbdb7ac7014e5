"""Strategies for data-parallel training: parallelize() and the optimizers it returns."""

from .api import STRATEGIES, parallelize
from .param_server import ParameterServerOptimizer, message_bytes

__all__ = ["STRATEGIES", "ParameterServerOptimizer", "message_bytes", "parallelize"]
