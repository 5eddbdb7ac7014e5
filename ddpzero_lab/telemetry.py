"""Telemetry: the events a rank emits and the parent-side log that collects them.

This module owns the `Event` record, `emit()` (called inside a rank, or in a plain process),
the thread-safe `EventLog` a job keeps, the sinks a rank's events go to, and the small consumer
interface that dashboards implement. It knows nothing about processes: the cluster installs a
*sink* in each worker that ships events to the parent.

Outside a LiveCluster (a script, a test, a rank under torchrun) nothing consumes the events,
so they land in `local_log`, a ring buffer that keeps the last `LOCAL_LOG_CAP` (10,000) events
and drops older ones (`local_log.dropped` counts them): a long job's memory stays flat.
To keep a whole run, attach a sink. Under torchrun, one JSON-lines file per rank:

    from ddpzero_lab import telemetry
    telemetry.record_jsonl("events-rank{rank}.jsonl")   # on every rank, after init_process_group
    ... train ...
    telemetry.set_sink(None)                            # closes the file; back to local_log

and replay the files together in a notebook (a GPU run recorded under torchrun):

    dzl.Dashboard.from_events(sorted(glob.glob("events-rank*.jsonl")))

Events are small: numbers, short strings and flat lists/dicts of them, never tensors (a tensor
would drag its storage through the pipe on every step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# The kinds DESIGN.md §4 defines. Other kinds are allowed (lessons add their own); these names
# and their fields are a contract with the dashboards, so they are listed here once.
KNOWN_KINDS = ("collective", "memory", "shard_map", "step", "loss", "log")

_RESERVED_FIELDS = ("kind", "rank", "time")
_MAX_DEPTH = 6  # shard maps nest: list of params -> dict -> list of ranges -> pair


@dataclasses.dataclass(frozen=True)
class Event:
    """One telemetry record: what happened (`kind`), on which rank, when, and its fields.

    `time` is wall-clock seconds (`time.time()`), comparable across the processes of one
    machine, which is what a per-rank timeline needs.
    """

    kind: str
    rank: int
    time: float
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    job: int | None = None

    def __getitem__(self, name: str) -> Any:
        if name == "kind":
            return self.kind
        if name == "rank":
            return self.rank
        if name == "time":
            return self.time
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "time": self.time, **self.fields}


@runtime_checkable
class EventConsumer(Protocol):
    """What `cluster.run(..., dashboard=d)` needs of `d`.

    `on_event` is called from the cluster's single consumer thread, once per event, in arrival
    order. It must be quick and must not print (output from a background thread lands in
    whichever notebook cell runs next): set widget state, append to a list. Optional methods
    `on_job_start(job)` and `on_job_end(job)` are called on the same thread when present;
    `on_submit()` on the caller's thread before the ranks get the job (a dashboard builds its
    figures there, rather than taking the CPU from the ranks' first steps) and `on_wait_end(job)`
    on the caller's thread when `run`/`wait` returns.
    """

    def on_event(self, event: Event) -> None: ...


class EventLog:
    """A thread-safe list of events, readable while it grows.

    `maxlen` None (a job's log in the parent) keeps every event; a number makes it a ring
    buffer that keeps the newest `maxlen` and counts in `dropped` the ones it let go.
    """

    def __init__(self, maxlen: int | None = None) -> None:
        if maxlen is not None and (isinstance(maxlen, bool) or maxlen < 1):
            raise ValueError(f"maxlen must be None or a positive int, got {maxlen!r}")
        self.maxlen = maxlen
        self.dropped = 0
        self._events: deque[Event] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def append(self, event: Event) -> None:
        with self._lock:
            if self.maxlen is not None and len(self._events) == self.maxlen:
                self.dropped += 1
            self._events.append(event)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.snapshot() if e.kind == kind]

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
            self.dropped = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.snapshot())


# --- the emitting side --------------------------------------------------------------------

# Where emit() sends events. A LiveCluster worker replaces it with a function that ships the
# event to the parent; a plain process keeps the newest LOCAL_LOG_CAP in `local_log`.
LOCAL_LOG_CAP = 10_000
local_log = EventLog(maxlen=LOCAL_LOG_CAP)
_sink: Callable[[Event], None] = local_log.append
_default_rank: Callable[[], int] = lambda: 0  # noqa: E731 - replaced by the cluster context


def set_sink(sink: Callable[[Event], None] | None) -> None:
    """Route this process's events to `sink` (None: back to the process-local ring buffer).

    `set_sink(None)` ends a recording (`record_jsonl`): it closes the file and puts back the
    sink the recording replaced (a LiveCluster worker's). Another sink put in a recording's
    place leaves it open: faults.py wraps the current sink and restores it later.
    """
    global _sink
    previous = _sink
    _sink = local_log.append if sink is None else sink
    if sink is None and isinstance(previous, JsonlSink):
        previous.close()
        _sink = getattr(previous, "replaced", None) or local_log.append


def get_sink() -> Callable[[Event], None]:
    """Where this process's events go now (to restore it after a temporary sink)."""
    return _sink


class JsonlSink:
    """A sink that appends each event to a JSON-lines file, one object per line, in the format
    `Job.save_events` writes and `Dashboard.from_events` reads.

    Lines are written as they come (a line at a time, flushed): a killed rank leaves every
    event up to its last whole line. Memory stays flat however long the job runs. `forward`,
    if given, gets every event too (inside a LiveCluster: the sink that ships it to the parent).
    """

    def __init__(self, path: str | Path, forward: Callable[[Event], None] | None = None) -> None:
        self.path = Path(path)
        self.forward = forward
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._lock = threading.Lock()  # async ops complete on autograd's threads too
        self.written = 0
        self.replaced: Callable[[Event], None] | None = None  # set by record_jsonl

    def __call__(self, event: Event) -> None:
        line = json.dumps({**event.to_dict(), "job": event.job})
        with self._lock:
            if self._file.closed:
                return  # closed while another thread emitted: the run is over
            self._file.write(line + "\n")
            self.written += 1
        if self.forward is not None:
            self.forward(event)

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r}, written={self.written})"


def record_jsonl(path: str | Path = "events-rank{rank}.jsonl") -> JsonlSink:
    """Send this process's events to a JSON-lines file and return its sink.

    `{rank}` in `path` is replaced by this process's rank (torchrun's RANK, else the process
    group's), so the same line on every rank of a torchrun job writes one file per rank. Stop
    with `set_sink(None)`, which closes the file and puts back the sink it replaced. Inside a
    LiveCluster job the events still reach the parent as well.
    """
    # torchrun sets RANK before the process group exists; elsewhere the rank source knows it
    rank = int(os.environ["RANK"]) if os.environ.get("RANK", "").isdigit() else _default_rank()
    previous = _sink
    # outside a cluster the events are in the file: the ring buffer need not keep them too
    forward = None if previous == local_log.append else previous
    sink = JsonlSink(str(path).format(rank=rank), forward=forward)
    sink.replaced = previous
    set_sink(sink)
    return sink


def set_rank_source(source: Callable[[], int]) -> None:
    """Tell emit() how to find this process's rank (the cluster context installs it)."""
    global _default_rank
    _default_rank = source


def _check_value(name: str, value: Any, depth: int = 0) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if depth < _MAX_DEPTH and isinstance(value, (list, tuple)):
        for item in value:
            _check_value(name, item, depth + 1)
        return
    if depth < _MAX_DEPTH and isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"event field {name!r}: dict keys must be str, got {key!r}")
            _check_value(name, item, depth + 1)
        return
    hint = " (use float(t) or t.tolist())" if type(value).__module__.startswith("torch") else ""
    raise TypeError(
        f"event field {name!r} has type {type(value).__name__}: events carry numbers, short "
        f"strings and lists/dicts of them{hint}"
    )


def make_event(kind: str, fields: dict[str, Any], rank: int | None = None) -> Event:
    """Validate and build an event; used by emit() and by the parent for its own events."""
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"event kind must be a non-empty str, got {kind!r}")
    for reserved in _RESERVED_FIELDS:
        if reserved in fields:
            raise ValueError(f"event field {reserved!r} is set by emit(); do not pass it")
    for name, value in fields.items():
        _check_value(name, value)
    return Event(
        kind=kind,
        rank=_default_rank() if rank is None else rank,
        time=time.time(),
        fields=dict(fields),
    )


EVERY_RANK = -1  # an owner range held by every rank (replicated)


def shard_map_entry(name: str, numel: int, params, grads, optimizer) -> dict[str, Any]:
    """One parameter of a `shard_map` event: who holds which elements of its parameters,
    gradients and optimizer state. Each of the three is a list of [rank, start, end] element
    ranges of the flattened parameter; rank EVERY_RANK (-1) means every rank holds that range.
    """
    return {
        "name": name,
        "numel": int(numel),
        "params": params,
        "grads": grads,
        "optimizer": optimizer,
    }


def emit(kind: str, **fields: Any) -> None:
    """Record an event of `kind` with `fields` on this rank.

    Inside a LiveCluster job the event reaches the parent (on `job.events` and any dashboard);
    elsewhere it goes to the sink set with `set_sink` / `record_jsonl`, else into
    `ddpzero_lab.telemetry.local_log` (the newest LOCAL_LOG_CAP events).

        dzl.emit("loss", step=i, loss=float(loss))
    """
    amend = _amenders.get(kind)
    if amend is not None:
        fields = amend(fields)
    _sink(make_event(kind, fields))


# kind -> fn(fields) -> fields, run by emit() before an event of that kind is built. comm/
# installs one for "step": on a GPU it puts the step's CUDA-event times in place of the host's.
_amenders: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def set_amender(kind: str, amend: Callable[[dict[str, Any]], dict[str, Any]] | None) -> None:
    """Have emit() pass the fields of every `kind` event through amend(fields) (None: stop)."""
    if amend is None:
        _amenders.pop(kind, None)
    else:
        _amenders[kind] = amend
