"""Strategies for data-parallel training: parallelize() and the optimizers it returns."""

from .api import STRATEGIES, parallelize
from .param_server import ParameterServerOptimizer

__all__ = ["STRATEGIES", "ParameterServerOptimizer", "parallelize"]
