"""Ranks laid out as a grid: data parallelism along one axis, tensor parallelism along the other.

`dzl.mesh(dp=2, tp=2)` on 4 ranks puts rank r at coordinates (r // tp, r % tp): the ranks of
one row share a tensor-parallel group (they hold the slices of the same layers and see the
same data), the ranks of one column a data-parallel group (they hold the same slices and see
different data). Tensor-parallel layers (parallel/tensor.py) take `mesh.tp`, a strategy from
`parallelize` (DDP, ZeRO 1-3) takes `group=mesh.dp`: ZeRO then shards each slice over its
column, as Megatron-DeepSpeed does. `dzl.comm.traffic_by_group()` counts each group apart.

Keeping tensor parallelism inside a row of consecutive ranks follows the usual placement: in a
real cluster consecutive ranks share a node, and its NVLink carries the all-reduces that TP
issues per layer, while the data-parallel traffic, once per step, crosses nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .layout import emit_coordinates


@dataclass
class Mesh:
    """This rank's place in a dp x tp grid and the two process groups it belongs to."""

    dp_size: int
    tp_size: int
    dp_index: int  # which row (replica) this rank is in
    tp_index: int  # which slice of the layers this rank holds
    dp: object  # the process group of this rank's column (same slices, other data)
    tp: object  # the process group of this rank's row (same data, other slices)

    @property
    def coordinates(self) -> tuple[int, int]:
        return self.dp_index, self.tp_index

    def rank_at(self, dp_index: int, tp_index: int) -> int:
        return dp_index * self.tp_size + tp_index


def mesh(dp: int = 1, tp: int = 1) -> Mesh:
    """Build the dp x tp grid of this job's ranks (collective: call it on every rank alike)."""
    for name, value in (("dp", dp), ("tp", tp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    world, rank = dist.get_world_size(), dist.get_rank()
    if dp * tp != world:
        raise ValueError(f"dp x tp must be the world size: {dp} x {tp} != {world}")
    rows, columns = {}, {}
    # every rank creates every group, in the same order (new_group is collective)
    for row in range(dp):
        rows[row] = dist.new_group([row * tp + t for t in range(tp)])
    for column in range(tp):
        columns[column] = dist.new_group([d * tp + column for d in range(dp)])
    row, column = divmod(rank, tp)
    grid = Mesh(dp, tp, row, column, columns[column], rows[row])
    # the dashboard's mesh panel places each rank by these (one small event per rank)
    emit_coordinates(dp=(dp, row, grid.dp), tp=(tp, column, grid.tp))
    return grid
