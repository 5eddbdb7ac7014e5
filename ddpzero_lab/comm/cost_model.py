"""Models of what a collective costs: bytes each rank sends and receives, and time (α-β).

This module owns the *formulas*; it runs nothing. `collectives.py` counts every call with
`traffic_model`, `ring.py` measures what its rings really send (the tests check the two agree),
and `AlphaBeta` predicts times that lessons put beside measured ones.

Traffic model (per rank r of N; B = payload bytes; every op modelled as a ring or chain,
the bandwidth-optimal algorithms for large messages; Patarasuk & Yuan, JPDC 2009):

  all_reduce      ring = reduce-scatter then all-gather over N chunks of the flattened
                  tensor (first numel % N chunks one element larger). Rank r sends
                  2B - size(chunk r+1) - size(chunk r+2) and receives
                  2B - size(chunk r) - size(chunk r+1) (indices mod N):
                  exactly 2(N-1)/N·B each way when numel is divisible by N.
  reduce_scatter  B = the input (N equal chunks). Sends and receives (N-1)/N·B.
  all_gather      B = the output (N equal chunks). Sends and receives (N-1)/N·B.
  broadcast       a chain from src: rank at distance d = (r - src) mod N receives B if d > 0
                  and sends B if d < N-1 (pipelined, so the time is not N times one hop).
  send / recv     B sent / B received.
  barrier         0 bytes (it is synchronisation only).
With N = 1 nothing is sent or received.

Time model (Hockney's α-β, with Thakur et al.'s γ): one message of B bytes takes α + B·β;
α is the latency, β the inverse bandwidth (seconds per byte), γ the time to reduce one byte
(an add on the CPU or GPU). For the ops above:
  all_reduce      2(N-1)·α + 2(N-1)/N·B·β + (N-1)/N·B·γ
  reduce_scatter  (N-1)·α + (N-1)/N·B·β + (N-1)/N·B·γ
  all_gather      (N-1)·α + (N-1)/N·B·β
  broadcast       (N-1)·α + B·β                  (pipelined chain)
  send / recv     α + B·β
  barrier         2(N-1)·α
(Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication Operations in
MPICH", IJHPCA 2005, give these forms.)
"""

from __future__ import annotations

from dataclasses import dataclass

OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send", "recv", "barrier")


def chunk_numels(numel: int, world_size: int) -> list[int]:
    """Element counts of the N ring chunks of a flattened tensor (as torch.tensor_split)."""
    base, extra = divmod(numel, world_size)
    return [base + (1 if i < extra else 0) for i in range(world_size)]


def traffic_model(
    op: str,
    numel: int,
    element_size: int,
    world_size: int,
    rank: int,
    src: int = 0,
) -> tuple[int, int]:
    """(bytes sent, bytes received) by `rank` for one call of `op`.

    numel is the payload's element count: the tensor for all_reduce, broadcast, send and recv;
    the *input* for reduce_scatter; the *output* for all_gather.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; one of {OPS}")
    n, r, e = world_size, rank, element_size
    total = numel * e
    if op == "send":
        return total, 0
    if op == "recv":
        return 0, total
    if n == 1 or op == "barrier":
        return 0, 0
    if op == "all_reduce":
        size = [c * e for c in chunk_numels(numel, n)]
        sent = 2 * total - size[(r + 1) % n] - size[(r + 2) % n]
        recv = 2 * total - size[r % n] - size[(r + 1) % n]
        return sent, recv
    if op in ("reduce_scatter", "all_gather"):
        moved = (n - 1) * (total // n)
        return moved, moved
    # broadcast: a chain starting at src
    distance = (r - src) % n
    return (total if distance < n - 1 else 0), (total if distance > 0 else 0)


@dataclass(frozen=True)
class AlphaBeta:
    """Hockney's model: a message of B bytes takes alpha + B * beta seconds; reducing B bytes
    takes B * gamma more (0 unless measured)."""

    alpha: float  # seconds per message (latency)
    beta: float  # seconds per byte (inverse bandwidth)
    gamma: float = 0.0  # seconds per byte reduced (computation)

    @property
    def bandwidth(self) -> float:
        """Bytes per second (1 / beta)."""
        return float("inf") if self.beta == 0 else 1.0 / self.beta

    def predict(self, op: str, nbytes: float, world_size: int) -> float:
        """Predicted seconds for one call of `op` moving a payload of nbytes (see module doc)."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; one of {OPS}")
        n, a, b, g = world_size, self.alpha, self.beta, self.gamma
        if op in ("send", "recv"):
            return a + nbytes * b
        if n == 1:
            return 0.0
        if op == "all_reduce":
            return 2 * (n - 1) * a + 2 * (n - 1) / n * nbytes * b + (n - 1) / n * nbytes * g
        if op == "reduce_scatter":
            return (n - 1) * a + (n - 1) / n * nbytes * (b + g)
        if op == "all_gather":
            return (n - 1) * a + (n - 1) / n * nbytes * b
        if op == "broadcast":
            return (n - 1) * a + nbytes * b
        return 2 * (n - 1) * a  # barrier


def fit_alpha_beta(
    nbytes: list[float], seconds: list[float], relative: bool = True, gamma: float = 0.0
) -> AlphaBeta:
    """Least-squares fit of seconds = alpha + nbytes * beta (both clipped at zero).

    relative=True minimises the *relative* error (weights 1/seconds²). Message times span
    orders of magnitude; a plain fit lets the noise of the largest messages decide alpha,
    while a relative one fits alpha on the small messages and beta on the large ones.
    """
    if len(nbytes) != len(seconds) or len(nbytes) < 2:
        raise ValueError("need at least two (nbytes, seconds) pairs of equal length")
    if len(set(nbytes)) < 2:
        raise ValueError("the message sizes must not all be equal")
    if relative and min(seconds) <= 0:
        raise ValueError("relative fitting needs positive times")
    weights = [1.0 / (y * y) if relative else 1.0 for y in seconds]
    total = sum(weights)
    mean_x = sum(w * x for w, x in zip(weights, nbytes, strict=True)) / total
    mean_y = sum(w * y for w, y in zip(weights, seconds, strict=True)) / total
    sxx = sum(w * (x - mean_x) ** 2 for w, x in zip(weights, nbytes, strict=True))
    sxy = sum(
        w * (x - mean_x) * (y - mean_y) for w, x, y in zip(weights, nbytes, seconds, strict=True)
    )
    beta = max(sxy / sxx, 0.0)
    alpha = max(mean_y - beta * mean_x, 0.0)
    return AlphaBeta(alpha=alpha, beta=beta, gamma=gamma)


def bytes_source(op: str) -> str:
    """Where an op's "sent" and "recv" figures come from: "model" for a built-in collective
    (the ring or chain model above for N ranks: what the algorithm sends, not what
    the transport did: comm/wire.py measures that), "payload" for point-to-point ops and the
    rings of ring.py built from them (the bytes handed to send and recv, exactly; the
    transport adds its headers)."""
    return "payload" if op in ("send", "recv") or op.startswith("ring_") else "model"
