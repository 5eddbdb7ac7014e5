"""Communication the learner can see: counted collectives, rings from send/recv, cost models."""

from . import wire
from .collectives import (
    TimedWork,
    all_gather,
    all_reduce,
    backend_device,
    barrier,
    broadcast,
    flush_gpu_timing,
    irecv,
    isend,
    recv,
    reduce_scatter,
    reset_traffic,
    send,
    traffic,
    traffic_by_group,
)
from .cost_model import AlphaBeta, bytes_source, chunk_numels, fit_alpha_beta, traffic_model
from .link import Link, compute_rate, set_link
from .probe import probe_alpha_beta
from .ring import ring_all_gather, ring_all_reduce, ring_reduce_scatter

__all__ = [
    "AlphaBeta",
    "Link",
    "compute_rate",
    "set_link",
    "TimedWork",
    "all_gather",
    "all_reduce",
    "backend_device",
    "barrier",
    "broadcast",
    "bytes_source",
    "chunk_numels",
    "fit_alpha_beta",
    "flush_gpu_timing",
    "irecv",
    "isend",
    "probe_alpha_beta",
    "recv",
    "reduce_scatter",
    "reset_traffic",
    "ring_all_gather",
    "ring_all_reduce",
    "ring_reduce_scatter",
    "send",
    "traffic",
    "traffic_by_group",
    "traffic_model",
    "wire",
]
