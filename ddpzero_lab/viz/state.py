"""What the dashboard knows: the events of a run, folded into small per-panel summaries.

This module owns the aggregation (memory per rank and phase, shard maps, traffic per op and
rank, timeline intervals, losses) and the expectations drawn beside the measurements (the ZeRO
memory formula, the traffic model per step). It draws nothing and knows no processes: it is
fed `telemetry.Event`s, live or replayed from a file.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..memory import zero_memory_estimate
from ..telemetry import Event
from .mesh_state import MESH_PANELS, MeshState

MEMORY_PARTS = ("params", "grads", "optimizer", "activations", "buffers", "scratch")
# the phase whose peak a memory event carries (the tracker's `peak` field): the one just ended
PEAK_PHASES = {"after_forward": "forward", "after_backward": "backward", "after_step": "step"}
# The ZeRO stage whose formula describes each strategy's model state.
STRATEGY_STAGE = {"ddp": 0, "local": 0, "zero1": 1, "zero2": 2, "zero3": 3}
# Bytes each rank sends per step, in units of the gradient bytes B (ring models).
TRAFFIC_PER_STEP = {
    "ddp": lambda n, r: 2 * (n - 1) / n,
    "zero1": lambda n, r: 2 * (n - 1) / n,
    "zero2": lambda n, r: 2 * (n - 1) / n,
    "zero3": lambda n, r: 3 * (n - 1) / n,
    "param_server": lambda n, r: (n - 1) if r == 0 else 1,
}
TIMELINE_LIMIT = 4000


class DashboardState:
    """Thread-safe fold of events; `snapshot()` gives the panels a consistent copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.memory: dict[tuple[int, str], dict[str, float]] = {}
        self.peak: dict[int, float] = defaultdict(float)
        # the tracker's peak of each phase, the highest of the run: (rank, phase) -> bytes
        self.phase_peaks: dict[tuple[int, str], float] = {}
        # a peak formula per phase (peak_memory_estimate's dict), set by the learner
        self.expected_peak: dict[str, float] = {}
        self.shard_map: dict[str, Any] | None = None
        self.traffic: dict[tuple[int, str], dict[str, float]] = {}
        self.sent_over_time: dict[int, list[tuple[float, float]]] = defaultdict(list)
        self.steps: dict[int, int] = defaultdict(int)  # steps completed per rank
        self.intervals: deque = deque(maxlen=TIMELINE_LIMIT)  # (rank, kind, start, end)
        self.losses: dict[int, list[tuple[int, float]]] = defaultdict(list)
        self.ranks: set[int] = set()
        self.events_seen = 0
        self.steps_seen = 0  # the highest step any rank reported, plus one: the status line's
        self.t0: float | None = None
        self.link: str | None = None  # the emulated link the collectives' times are on, if any
        self.mesh = MeshState()  # coordinates, layouts, traffic per group, pipeline steps
        # bumped whenever a panel's data changes: the dashboard redraws only those panels
        self.versions: dict[str, int] = dict.fromkeys(
            ("memory", "shards", "traffic", "timeline", "loss", *MESH_PANELS), 0
        )

    # -- folding ---------------------------------------------------------------------------
    def update(self, event: Event) -> None:
        with self._lock:
            self.events_seen += 1
            if event.rank >= 0:
                self.ranks.add(event.rank)
            kind = event.kind
            self._bump(*self.mesh.update(event))
            if kind == "memory":
                self._memory(event)
                self._bump("memory", "traffic")  # steps completed move the expectation
            elif kind == "collective":
                self._collective(event)
                self._bump("traffic", "timeline")
            elif kind == "step":
                self._step(event)
                self._bump("timeline", "traffic")
            elif kind == "loss":
                self.losses[event.rank].append((int(event["step"]), float(event["loss"])))
                self.steps_seen = max(self.steps_seen, int(event["step"]) + 1)
                self._bump("loss")
            elif kind == "shard_map":
                self.shard_map = dict(event.fields)
                self.shard_map["world_size"] = int(event.get("world_size", 0) or 0)
                self._bump("shards", "memory", "traffic")

    def _bump(self, *panels: str) -> None:
        for panel in panels:
            self.versions[panel] += 1

    def _first_time(self, t: float) -> None:
        if self.t0 is None or t < self.t0:
            self.t0 = t

    def _memory(self, e: Event) -> None:
        parts = {k: float(e.get(k, 0) or 0) for k in MEMORY_PARTS}
        self.memory[(e.rank, str(e["phase"]))] = parts
        self.peak[e.rank] = max(self.peak[e.rank], sum(parts.values()))
        phase = PEAK_PHASES.get(str(e["phase"]))
        if phase is not None and e.get("peak"):
            key = (e.rank, phase)
            self.phase_peaks[key] = max(self.phase_peaks.get(key, 0.0), float(e["peak"]))
        if e["phase"] == "after_step":
            self.steps[e.rank] = max(self.steps[e.rank], int(e.get("step", 0)) + 1)
            self.steps_seen = max(self.steps_seen, self.steps[e.rank])

    def _collective(self, e: Event) -> None:
        key = (e.rank, str(e["op"]))
        entry = self.traffic.setdefault(key, {"calls": 0, "bytes": 0, "sent": 0, "recv": 0})
        entry["calls"] += 1
        for field in ("bytes", "sent", "recv"):
            entry[field] += float(e.get(field, 0) or 0)
        start, end = float(e["start"]), float(e["end"])
        self._first_time(start)
        series = self.sent_over_time[e.rank]
        total = (series[-1][1] if series else 0.0) + float(e.get("sent", 0) or 0)
        series.append((end, total))
        self.intervals.append((e.rank, str(e["op"]), start, end))
        if e.get("link"):
            self.link = str(e["link"])

    def _step(self, e: Event) -> None:
        # forward start and backward end are in the event; older recordings have only the
        # durations, counted back from the moment the event was sent
        end = e.get("backward_end") or e.time - float(e.get("exposed_comm_s", 0) or 0)
        start = e.get("forward_start") or end - float(e.get("compute_s", 0) or 0)
        self._first_time(start)
        self.intervals.append((e.rank, "compute", start, end))
        self.steps[e.rank] = max(self.steps[e.rank], int(e.get("step", 0)) + 1)
        self.steps_seen = max(self.steps_seen, self.steps[e.rank])

    # -- reading -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "memory": dict(self.memory),
                "peak": dict(self.peak),
                "phase_peaks": dict(self.phase_peaks),
                "expected_peak": dict(self.expected_peak),
                "shard_map": self.shard_map,
                "traffic": {k: dict(v) for k, v in self.traffic.items()},
                "sent_over_time": {r: list(v) for r, v in self.sent_over_time.items()},
                "steps": dict(self.steps),
                "intervals": list(self.intervals),
                "losses": {r: list(v) for r, v in self.losses.items()},
                "ranks": sorted(self.ranks),
                "events_seen": self.events_seen,
                "versions": dict(self.versions),
                "t0": self.t0,
                "link": self.link,
                "expected_memory": self._expected_memory(),
                "expected_sent_per_step": self._expected_traffic(),
                **self.mesh.snapshot(),
            }

    def expect_peak(self, estimate: dict[str, float] | None) -> None:
        """Draw `estimate`'s forward, backward and step bytes (peak_memory_estimate's dict)
        beside each rank's measured peaks; None removes them."""
        phases = tuple(PEAK_PHASES.values())
        with self._lock:
            self.expected_peak = {p: float(estimate[p]) for p in phases} if estimate else {}
            self._bump("memory")

    def _world_size(self) -> int:
        if self.shard_map and self.shard_map.get("world_size"):
            return int(self.shard_map["world_size"])
        return max(self.ranks) + 1 if self.ranks else 1

    def _expected_memory(self) -> dict[int, float]:
        """The ZeRO formula's model state per rank for the running strategy, with K (optimizer
        bytes per parameter) taken from what the ranks hold in all (it depends on the
        optimizer: 8 for Adam in float32, 4 for SGD with momentum)."""
        if not self.shard_map:
            return {}
        stage = STRATEGY_STAGE.get(str(self.shard_map.get("strategy")))
        if stage is None:
            return {}
        n = self._world_size()
        psi = sum(int(p["numel"]) for p in self.shard_map.get("params", []))
        element = float(self.shard_map.get("element_size", 4))
        after = [v for (r, phase), v in self.memory.items() if phase == "after_step"]
        if not psi or not after:
            return {}
        held = sum(v["optimizer"] for v in after)
        k = held / psi if stage >= 1 else max(v["optimizer"] for v in after) / psi
        total = zero_memory_estimate(
            psi, n, stage, params_bytes=element, grads_bytes=element, optimizer_bytes_per_param=k
        )["total"]
        return {r: total for r in range(n)}

    def _expected_traffic(self) -> dict[int, float]:
        if not self.shard_map:
            return {}
        rule = TRAFFIC_PER_STEP.get(str(self.shard_map.get("strategy")))
        if rule is None:
            return {}
        n = self._world_size()
        grad_bytes = sum(int(p["numel"]) for p in self.shard_map.get("params", [])) * float(
            self.shard_map.get("element_size", 4)
        )
        return {r: rule(n, r) * grad_bytes for r in range(n)}


def load_events(source: str | Path | Iterable) -> list[Event]:
    """Events from a JSON-lines file (as Job.save_events writes) or from an iterable of
    Events or dicts."""
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    else:
        rows = list(source)
    events = []
    for row in rows:
        if isinstance(row, Event):
            events.append(row)
            continue
        row = dict(row)
        kind, rank, when = row.pop("kind"), int(row.pop("rank")), float(row.pop("time"))
        job = row.pop("job", None)
        events.append(Event(kind=kind, rank=rank, time=when, fields=row, job=job))
    return events
