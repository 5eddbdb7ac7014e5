"""Bytes on the wire: what the transport really sent for one collective, next to the model.

The counters of `collectives.py` hold the *model's* bytes (cost_model.py: ring and chain).
This module measures instead: on one machine the ranks talk over the loopback interface, whose
kernel counters (/proc/net/dev, Linux) count every byte each rank puts on it, TCP/IP headers
included (about 0.1%: some 66 bytes per segment of up to 64 KB on loopback). With nothing else
using loopback meanwhile, the counters' growth during one op, less a barrier's, is the op's
traffic summed over the ranks: the model's Σ_r sent_r.

Measured this way on gloo (N = 2, 4 MB of float32), the model holds within 0.2% for
ddpzero_lab's all-reduce, reduce-scatter, all-gather and broadcast, while gloo's own
reduce-scatter (dist.reduce_scatter_tensor) sends twice the model's bytes: the bytes of an
all-reduce (which is why comm/ runs its own on gloo).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

NET_DEV = Path("/proc/net/dev")


def loopback_bytes() -> int | None:
    """Bytes sent on the loopback interface since boot (None where there is no such counter:
    not Linux)."""
    try:
        lines = NET_DEV.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])  # transmit bytes
    return None


def wire_bytes(op: Callable[[], object], repeats: int = 3, settle: float = 0.02) -> int | None:
    """Bytes all ranks together put on loopback while running `op` once (collective: call it
    on every rank; rank 0 returns the figure, the others None). The least of `repeats`
    measurements, less a barrier's own bytes: other traffic can only add to a figure."""
    rank = dist.get_rank()

    def between_barriers(body: Callable[[], object]) -> int | None:
        dist.barrier()
        time.sleep(settle)  # let the barrier's packets land before reading the counter
        before = loopback_bytes() if rank == 0 else None
        dist.barrier()
        body()
        dist.barrier()
        time.sleep(settle)
        after = loopback_bytes() if rank == 0 else None
        return None if before is None or after is None else after - before

    op()  # warm-up: connections and buffers
    measured = [between_barriers(op) for _ in range(repeats)]
    baseline = [between_barriers(lambda: None) for _ in range(repeats)]
    if rank != 0 or None in measured or None in baseline:
        return None
    return max(min(measured) - min(baseline), 0)
