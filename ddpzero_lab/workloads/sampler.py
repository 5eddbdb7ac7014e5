"""Sharding a data set across ranks: DistributedSampler's semantics, written out.

This module owns which sample indices each rank reads. It mirrors
`torch.utils.data.DistributedSampler` (same permutation for the same seed and epoch, same
padding, same interleaving), so a test can compare the two index for index, and adds two
things the course needs: a global batch size, so that the last uneven part is padded or dropped
to whole global batches (every rank then takes the same number of equal local batches, which
is what keeps data parallelism equivalent to one process on the concatenated batch), and a
required choice between padding and dropping, instead of a default that silently repeats or
loses samples.

Not owned here: loading the samples (data.py) or the training loop (train.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    """Yields this rank's share of a (shuffled) pass over a data set.

    The epoch's order is `torch.randperm(len(dataset))` seeded with `seed + epoch` (call
    `set_epoch(e)` before each epoch, as with DistributedSampler), or 0..N-1 when
    `shuffle=False`. The order is cut to a whole number of units, a unit being one global batch
    when `global_batch_size` is given and `num_replicas` samples otherwise:

    * `drop_last=True` drops the incomplete last unit;
    * `drop_last=False` pads it with samples from the start of the order (so some samples are
      seen twice in that epoch).

    Rank r takes positions r, r + num_replicas, r + 2 * num_replicas, ... Cut into local batches
    of `global_batch_size // num_replicas`, rank r's k-th local batch is its part of the k-th
    global batch, and the ranks' parts are disjoint and together cover that global batch.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int,
        rank: int,
        *,
        drop_last: bool,
        shuffle: bool = True,
        seed: int = 0,
        global_batch_size: int | None = None,
    ) -> None:
        for name, value, low in (("num_replicas", num_replicas, 1), ("rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if rank >= num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas - 1}], got {rank}")
        if not isinstance(drop_last, bool):
            raise TypeError(
                "drop_last must be True (drop the incomplete last global batch) or False (pad "
                f"it with samples from the start of the epoch), got {drop_last!r}"
            )
        length = len(dataset)
        unit = num_replicas
        if global_batch_size is not None:
            if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
                raise TypeError(f"global_batch_size must be an int, got {global_batch_size!r}")
            if global_batch_size < num_replicas or global_batch_size % num_replicas:
                raise ValueError(
                    f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                    f"num_replicas ({num_replicas}): every rank takes an equal local batch"
                )
            if length < global_batch_size:
                raise ValueError(
                    f"the data set has {length} samples, fewer than one global batch of "
                    f"{global_batch_size}; use a smaller batch size or a larger data set"
                )
            unit = global_batch_size
        elif length == 0:
            raise ValueError("the data set is empty")
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.global_batch_size = global_batch_size
        self.epoch = 0
        units = length // unit if drop_last else math.ceil(length / unit)
        self.total_size = units * unit
        self.num_samples = self.total_size // num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order to yield (the shuffle is seeded by seed + epoch)."""
        self.epoch = int(epoch)

    def epoch_order(self) -> list[int]:
        """The whole epoch's order, all ranks' samples, after padding or dropping."""
        length = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(length, generator=generator).tolist()
        else:
            order = list(range(length))
        if self.total_size <= length:
            return order[: self.total_size]
        padding = self.total_size - length
        # repeat the order as often as needed (a tiny data set may need more than one copy)
        return order + (order * math.ceil(padding / length))[:padding]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
