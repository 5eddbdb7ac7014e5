"""The messages a LiveCluster's parent and its workers send each other on the worker's pipe.

One typed record per kind of message, read by field name on both sides (worker.py sends and
receives them, hub.py and spawn.py on the parent's side), so that adding a field cannot
silently shift another. This module owns only their shape: what each side does with them
lives in worker.py (the rank) and hub.py (the parent).

They are NamedTuples rather than dataclasses because an event message crosses the pipe for
every collective: a NamedTuple pickles as its class and its fields, about half the cost of a
dataclass. Nothing unpacks them by position.
"""

from __future__ import annotations

from typing import Any, NamedTuple

# --- parent -> worker ------------------------------------------------------------------------


class Task(NamedTuple):
    """Run a function on this rank; payload is cloudpickle of (fn, args, kwargs)."""

    job_id: int
    payload: bytes


class Cancel(NamedTuple):
    """Stop that job if it is running or still queued on this rank."""

    job_id: int


class Where(NamedTuple):
    """Say where the main thread is now (answered with WhereReply carrying the same token)."""

    token: int


class Shutdown(NamedTuple):
    """Finish the task loop and exit."""


# --- worker -> parent ------------------------------------------------------------------------


class Ready(NamedTuple):
    """The rank joined the process group; info: pid, device, backend, threads, time."""

    rank: int
    info: dict


class StartupError(NamedTuple):
    """The rank could not join the process group; traceback is the formatted text."""

    rank: int
    traceback: str


class EventMessage(NamedTuple):
    """A telemetry event emitted on the rank; job_id is None outside any job."""

    job_id: int | None
    event: Any  # telemetry.Event


class Output(NamedTuple):
    """What fn printed: whole lines on "stdout" or "stderr"."""

    job_id: int | None
    stream: str
    text: str


class Result(NamedTuple):
    """How a job ended on one rank.

    status: "ok" (payload: cloudpickle of the value), "error" (payload: a dict with type,
    message, traceback and the pickled exception or None) or "cancelled" (payload: None).
    seq: the process group's sequence number when the job ended (None if unknown); the parent
    compares it across ranks to tell whether they are still in step.
    """

    job_id: int
    rank: int
    status: str
    payload: Any
    seq: int | None


class WhereReply(NamedTuple):
    """The main thread's innermost frames: [(file, line, function, source)], innermost last."""

    token: int
    rank: int
    frames: list


ToWorker = Task | Cancel | Where | Shutdown
ToParent = Ready | StartupError | EventMessage | Output | Result | WhereReply
