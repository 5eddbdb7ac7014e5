"""Solutions to notebook 08's exercises (ZeRO-3: prefetch and mixed precision)."""

import math  # noqa: F401 - the names every notebook imports, available to each solution

import torch  # noqa: F401
import torch.distributed as dist  # noqa: F401
from torch import nn  # noqa: F401

import ddpzero_lab as dzl  # noqa: F401


def zero3_state_bytes(padded, world_size, precision):
    """Bytes of model state one rank holds under ZeRO-3 with AdamW, by kind."""
    # bytes per element: fp32 keeps 4 + 4 + 8; bf16-mixed 2 + 2 + 12 (fp32 master + 2 moments)
    per_element = {"fp32": (4, 4, 8), "bf16-mixed": (2, 2, 12)}[precision]
    shard = padded // world_size  # every kind is sharded: a rank keeps 1/N of the padded units
    return {
        kind: b * shard
        for kind, b in zip(("params", "grads", "optimizer"), per_element, strict=True)
    }
