"""What the mesh panels know: the events of a run with several dimensions of parallelism.

It folds `mesh` events (each rank's coordinates and group names), `layout` events (the slice of
each layer a rank holds), the strategy's `shard_map` (ZeRO's owners within a data-parallel
group), `collective` events by process group, and `pipeline` events (a stage's spans per step).
It draws nothing; `DashboardState` holds one and merges its snapshot into its own.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

from ..comm.cost_model import bytes_source
from ..telemetry import Event

MESH_PANELS = ("mesh", "group_traffic", "pipeline")  # the panels this state feeds
PIPELINE_STEPS_KEPT = 4  # per rank: enough to find the newest step every stage has reported


def counted(op: str) -> bool:
    """Whether the bytes a rank sends in `op` are counted as they go (the message sizes, or
    ring.py's own rings) rather than the cost model's figures for the op asked for."""
    return bytes_source(op) == "payload"


class MeshState:
    """Not thread-safe by itself: DashboardState calls it under its own lock."""

    def __init__(self) -> None:
        self.coordinates: dict[int, dict[str, Any]] = defaultdict(dict)
        self.layouts: dict[int, list[dict]] = {}
        self.group_traffic: dict[int, dict[str, dict[str, float]]] = defaultdict(dict)
        self.pipeline: dict[int, deque] = defaultdict(lambda: deque(maxlen=PIPELINE_STEPS_KEPT))

    def update(self, event: Event) -> tuple[str, ...]:
        """Fold one event; returns the panels whose picture it changes."""
        kind = event.kind
        if kind == "mesh":
            self.coordinates[event.rank].update(event.fields)
            return ("mesh", "group_traffic")
        if kind == "layout":
            self.layouts[event.rank] = list(event.get("params", []))
            return ("mesh",)
        if kind == "shard_map":
            return ("mesh",)  # DashboardState keeps the map itself
        if kind == "collective":
            group = str(event.get("group") or "world")
            by_model = "counted" if counted(str(event["op"])) else "model"
            entry = self.group_traffic[event.rank].setdefault(group, {"model": 0.0, "counted": 0.0})
            entry[by_model] += float(event.get("sent", 0) or 0)
            return ("group_traffic",)
        if kind == "pipeline":
            self.pipeline[event.rank].append(dict(event.fields))
            return ("pipeline",)
        return ()

    def snapshot(self) -> dict[str, Any]:
        return {
            "coordinates": {r: dict(c) for r, c in self.coordinates.items()},
            "layouts": {r: list(v) for r, v in self.layouts.items()},
            "group_traffic": {
                r: {g: dict(v) for g, v in groups.items()}
                for r, groups in self.group_traffic.items()
            },
            "pipeline": {r: list(v) for r, v in self.pipeline.items()},
        }
