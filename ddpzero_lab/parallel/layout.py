"""What each rank holds of each layer, said in telemetry events for the dashboard's mesh panel.

Three small events (numbers and short strings only):
  `mesh`      a rank's coordinates: `dzl.mesh` sends dp/tp, a PipelineStage sends pp, each with
              its process group's ranks ("0,2"; "world" for the default group);
  `layout`    per parameter: its full shape and the slice this rank holds of it, along the
              dimension tensor parallelism splits (Megatron: a column-parallel layer's rows of
              W, a row-parallel layer's columns), or all of it;
  `pipeline`  one PipelineStage step: the forward and backward span of each micro-batch and the
              waits for messages, in seconds from the step's start (sent by parallel/pipeline.py).
Who owns which ZeRO shard of a slice is the strategy's `shard_map` (parallel/flat.py); the
panel puts the two together. Nothing here draws.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from .. import telemetry

REPLICATED = -1  # tp_dim of a parameter every rank of its tensor-parallel group holds whole


def group_label(group) -> str:
    """The name `comm.traffic_by_group()` gives a process group: its ranks, or "world"."""
    if group is None or group is dist.group.WORLD:
        return "world"
    return ",".join(map(str, dist.get_process_group_ranks(group)))


def emit_coordinates(**dims) -> None:
    """Send this rank's place along some mesh dimensions: name=(size, index, group)."""
    fields = {}
    for name, (size, index, group) in dims.items():
        fields[f"{name}_size"], fields[f"{name}_index"] = int(size), int(index)
        fields[f"{name}_group"] = group_label(group)
    telemetry.emit("mesh", **fields)


def parameter_layout(module: nn.Module) -> list[dict]:
    """[{name, shape (full), tp_dim, start, end, tp_group}] for each parameter of `module`:
    the slice [start, end) along tp_dim this rank holds (tp_dim REPLICATED: all of it)."""
    from .tensor import ColumnParallelLinear, RowParallelLinear

    split: dict[int, tuple[list[int], int, int, int, str]] = {}
    for layer in module.modules():
        if isinstance(layer, ColumnParallelLinear):
            rows, group = layer.rows, group_label(layer.group)
            split[id(layer.weight)] = (
                [layer.out_features, layer.in_features],
                0,
                rows.start,
                rows.stop,
                group,
            )
            if layer.bias is not None:
                split[id(layer.bias)] = ([layer.out_features], 0, rows.start, rows.stop, group)
        elif isinstance(layer, RowParallelLinear):
            cols, group = layer.columns, group_label(layer.group)
            split[id(layer.weight)] = (
                [layer.out_features, layer.in_features],
                1,
                cols.start,
                cols.stop,
                group,
            )
    entries = []
    for name, p in module.named_parameters():
        shape, dim, start, end, group = split.get(
            id(p), (list(p.shape), REPLICATED, 0, p.shape[0] if p.dim() else 1, "")
        )
        entries.append(
            {
                "name": name,
                "shape": shape,
                "tp_dim": dim,
                "start": start,
                "end": end,
                "tp_group": group,
            }
        )
    return entries


def emit_layout(module: nn.Module) -> list[dict]:
    """Send which slice of which layer this rank holds (call it on every rank, with the
    module before or after `parallelize`: names are the module's own). Returns the entries."""
    entries = parameter_layout(getattr(module, "module", module))
    telemetry.emit("layout", params=entries)
    return entries
