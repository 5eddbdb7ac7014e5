"""Flat buffers: many tensors laid end to end in one, and the shard arithmetic on it.

This module owns the layout math shared by DDP's gradient buckets and ZeRO's flat shards: the
offset of each tensor in a flat buffer, padding of the buffer to a multiple of the world size
(ZeRO's partitioning: rank r owns the contiguous slice r, so one tensor may be split across
ranks), views of each tensor into a buffer, and which rank owns which element range of which
tensor. It communicates nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import telemetry


@dataclass(frozen=True)
class FlatLayout:
    """Where each of a list of tensors sits in one flat buffer."""

    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    numel: int  # elements of real data
    padded_numel: int  # buffer length: numel rounded up to a multiple of `align`

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor], align: int = 1) -> FlatLayout:
        return cls.from_shapes([t.shape for t in tensors], align)

    @classmethod
    def from_shapes(cls, shapes: Sequence[torch.Size], align: int = 1) -> FlatLayout:
        if align < 1:
            raise ValueError(f"align must be >= 1, got {align}")
        offsets, total = [], 0
        for shape in shapes:
            offsets.append(total)
            total += int(torch.Size(shape).numel())
        padded = -(-total // align) * align
        return cls(tuple(torch.Size(s) for s in shapes), tuple(offsets), total, padded)

    def sizes(self) -> list[int]:
        return [int(s.numel()) for s in self.shapes]

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor as a view into `buffer` (which must hold at least numel elements)."""
        if buffer.numel() < self.numel:
            raise ValueError(f"buffer has {buffer.numel()} elements, the layout needs {self.numel}")
        return [
            buffer[offset : offset + int(shape.numel())].view(shape)
            for shape, offset in zip(self.shapes, self.offsets, strict=True)
        ]

    def flatten(self, tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None):
        """Copy `tensors` into a flat buffer (new, zero-padded, unless `out` is given)."""
        if out is None:
            first = tensors[0]
            out = torch.zeros(self.padded_numel, dtype=first.dtype, device=first.device)
        for view, t in zip(self.views(out), tensors, strict=True):
            view.copy_(t)
        return out

    # -- sharding (ZeRO) --------------------------------------------------------------------
    def shard_range(self, rank: int, world_size: int) -> tuple[int, int]:
        """[start, end) of rank's slice of the padded buffer."""
        if self.padded_numel % world_size:
            raise ValueError(
                f"padded length {self.padded_numel} is not a multiple of world_size {world_size}"
            )
        size = self.padded_numel // world_size
        return rank * size, (rank + 1) * size

    def overlap(self, index: int, lo: int, hi: int) -> tuple[int, int] | None:
        """The part of tensor `index` inside the buffer range [lo, hi), in buffer positions,
        or None if they do not meet."""
        begin = self.offsets[index]
        a, b = max(begin, lo), min(begin + int(self.shapes[index].numel()), hi)
        return (a, b) if a < b else None

    def owners(self, index: int, world_size: int) -> list[tuple[int, int, int]]:
        """For tensor `index`: [(rank, start, end)] of its elements (in the tensor's own
        flattened numbering) that each rank owns."""
        begin = self.offsets[index]
        out = []
        for rank in range(world_size):
            span = self.overlap(index, *self.shard_range(rank, world_size))
            if span is not None:
                out.append((rank, span[0] - begin, span[1] - begin))
        return out


def emit_shard_map(
    strategy: str, named: Sequence[tuple[str, torch.Tensor]], holders, world_size: int
) -> None:
    """Emit the `shard_map` event describing who holds what (rank 0 speaks for all).

    holders(index, numel) -> (params, grads, optimizer) owner lists, each a list of
    [rank, start, end] ranges (rank telemetry.EVERY_RANK for replicated).
    """
    from ..cluster.context import rank

    if rank() != 0:
        return
    entries = []
    for index, (name, p) in enumerate(named):
        owned_params, owned_grads, owned_state = holders(index, p.numel())
        entries.append(
            telemetry.shard_map_entry(name, p.numel(), owned_params, owned_grads, owned_state)
        )
    element = named[0][1].element_size() if named else 4
    telemetry.emit(
        "shard_map", strategy=strategy, world_size=world_size, element_size=element, params=entries
    )


def replicated(numel: int) -> list[list[int]]:
    return [[telemetry.EVERY_RANK, 0, int(numel)]]


class FlatShards:
    """The one sharded storage: a list of tensors laid end to end in one flat buffer, padded
    to a multiple of `world_size`, rank r owning the contiguous slice [lo, hi) (ZeRO's
    partitioning; world_size=1: one unsharded buffer, as a DDP bucket).

    It knows the per-parameter views of any buffer of its length, the piece of each parameter
    that falls into this rank's slice (`pieces`, `shard_views`), and holds the gradient buffer
    that the reducer fills and reduces (`grad`). It owns no communication but the gather of
    the full buffer from every rank's slice.
    """

    def __init__(
        self,
        params: Sequence[tuple[str, torch.Tensor]],
        world_size: int = 1,
        rank: int = 0,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not params:
            raise ValueError("FlatShards needs at least one tensor")
        self.params = list(params)  # [(name, tensor)]
        self.world_size, self.rank = world_size, rank
        self.layout = FlatLayout.of([p for _, p in self.params], align=world_size)
        self.lo, self.hi = self.layout.shard_range(rank, world_size)
        first = self.params[0][1]
        self.dtype = dtype or first.dtype  # of the gradient buffer and the gathered values
        self.device = first.device
        self.grad: torch.Tensor | None = None  # the gradient buffer, padded, while alive
        self.data: torch.Tensor | None = None  # the parameters' flat buffer, where one is kept
        # this rank's piece of each tensor, (start, end) in buffer positions, empty where the
        # tensor lies outside [lo, hi): one piece per tensor, so each gets its own leaf
        self.pieces = []
        for offset, size in zip(self.layout.offsets, self.layout.sizes(), strict=True):
            a = min(max(offset, self.lo), self.hi)
            self.pieces.append((a, max(a, min(offset + size, self.hi))))

    def __len__(self) -> int:
        return len(self.params)

    @property
    def shard_numel(self) -> int:
        return self.hi - self.lo

    def flatten(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new padded flat copy of the tensors' current values."""
        with torch.no_grad():
            values = [p.detach().to(dtype or p.dtype) for _, p in self.params]
            return self.layout.flatten(values)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor, shaped as itself, as a view into a buffer of this layout."""
        return self.layout.views(buffer)

    def shard_views(self, shard: torch.Tensor) -> list[torch.Tensor]:
        """This rank's piece of each tensor as a 1-D view into `shard` (a tensor of this
        rank's slice, shard_numel elements); 0 elements for a tensor outside the slice."""
        return [shard[a - self.lo : b - self.lo] for a, b in self.pieces]

    def piece_ranges(self) -> list[tuple[int, int]]:
        """(start, end) of each piece in its tensor's own flattened numbering."""
        return [
            (a - offset, b - offset)
            for (a, b), offset in zip(self.pieces, self.layout.offsets, strict=True)
        ]

    def shard_leaves(self, shard: torch.Tensor) -> list[torch.nn.Parameter]:
        """One optimizer leaf per tensor, sharing memory with its piece of `shard`: stepping
        the leaf updates the shard in place, and a leaf whose .grad is None is skipped exactly
        as one process skips a parameter with no gradient."""
        return [torch.nn.Parameter(view) for view in self.shard_views(shard.detach())]

    def grad_buffer(self) -> torch.Tensor:
        """The gradient buffer, zero-filled when it is (re)allocated."""
        if self.grad is None:
            self.grad = torch.zeros(self.layout.padded_numel, dtype=self.dtype, device=self.device)
        return self.grad

    def owners(self, index: int) -> list[tuple[int, int, int]]:
        return self.layout.owners(index, self.world_size)

    def all_gather(
        self, shard: torch.Tensor, out: torch.Tensor | None = None, group=None, tag: str = "params"
    ) -> torch.Tensor:
        """The full padded buffer from every rank's slice `shard` (collective)."""
        from .. import comm

        if out is None:
            out = torch.empty(self.layout.padded_numel, dtype=shard.dtype, device=shard.device)
        # the input must not alias the output
        mine = shard.detach().clone() if _aliases(shard, out) else shard.detach().contiguous()
        comm.all_gather(out, mine, group=group, tag=tag)
        return out


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
