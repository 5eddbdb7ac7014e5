"""The flight recorder's parent side: where each rank stands, in words.

The record itself (its layout, the rank's writer `install` / `recorder`, the reader
`read_record`) lives in `ddpzero_lab.comm.flight`, below comm/, so that a rank that only trains
never imports the LiveCluster; this module re-exports it and adds what the parent makes of a
record: `place` (where a rank's main thread is, from its frames) and `describe` (one rank's
place in a sentence, for a RankError or `Job.where()`). A rank that is not in a numbered op is
asked for its main thread's frames instead (worker.py), which tells user code from a raw
torch.distributed call that comm/ never saw.
"""

from __future__ import annotations

import linecache
import os
import sysconfig
from dataclasses import dataclass

from ..comm import flight as _record
from ..comm.flight import (  # noqa: F401 - re-exported: the parent reads records with them
    CANCELLED,
    FAILED,
    IDLE,
    NO_PEER,
    OK,
    RAISED,
    RETURNED,
    RUNNING,
    TIMED_OUT,
    WAITING,
    FlightRecorder,
    OpRecord,
    RankRecord,
    install,
    read_record,
)


def __getattr__(name: str):
    # `recorder` is rebound by install(): read it from where it lives, never a stale copy
    if name == "recorder":
        return _record.recorder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- the parent's wording -------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """Where a rank's main thread is, from its innermost frames."""

    user: str  # the innermost frame of user code: "train.py:12 in train: `loss.backward()`"
    library: str  # the library function it is in, if any: "torch.distributed.all_reduce"
    raw_collective: bool  # inside torch.distributed's own collectives (not comm/'s)


_LIBRARY_ROOTS = ("torch", "ddpzero_lab")


def _library_module(path: str) -> str | None:
    """'torch.distributed.distributed_c10d' for a file of a library, None for user code."""
    parts = path.replace("\\", "/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _LIBRARY_ROOTS and i < len(parts) - 1:
            return ".".join([*parts[i:-1], parts[-1].removesuffix(".py")])
    stdlib = sysconfig.get_paths().get("stdlib")
    if stdlib and path.startswith(stdlib):
        return parts[-1].removesuffix(".py")
    return None


def place(frames: list | None, files: dict[str, str] | None = None) -> Place | None:
    """Read [(file, line, function, source)] (innermost last, as worker.main_thread_frames
    gives them) into a Place. `files` maps function names to the files fn's code came from
    (errors.code_files): code sent by value has its file name blanked."""
    if not frames:
        return None
    files = files or {}
    user, library, raw = "", "", False
    for filename, lineno, name, source in reversed(frames):
        if filename == "<dynamic-code>" and name in files:
            filename = files[name]
            source = linecache.getline(filename, lineno).strip()
        module = _library_module(filename)
        if module is None:
            shown = f"{os.path.basename(filename)}:{lineno} in {name}"
            user = f"{shown}: `{source}`" if source else shown
            break
        if module == "torch.distributed.distributed_c10d":
            library, raw = f"torch.distributed.{name}", True
        elif not library:
            library = f"{module}.{name}"
    return Place(user, library, raw)


def _ago(seconds: float) -> str:
    return f"{max(0.0, seconds):.1f} s"


def _last_op(record: RankRecord, job: int, one: str = "one") -> str:
    last = record.last
    if last is None:
        return "it has not called a collective yet"
    earlier = "" if last.job == job else " (in an earlier job)"
    return f"its last {one}{earlier} was {last.label()}"


def _at(where: Place | None) -> str:
    if where is None or not (where.user or where.library):
        return ""
    if where.user and where.library:
        return f"; now in {where.library}, called at {where.user}"
    return f"; now at {where.user or where.library}"


def describe(
    rank: int,
    record: RankRecord | None,
    job: int,
    fate: str,
    now: float,
    where: Place | None = None,
) -> str:
    """One rank's place, in words, for a RankError or `Job.where()`.

    fate: what the parent knows of the rank: "running", "returned", "raised", "cancelled", or
    "died (...)". `now` is the time of the reading; `where` the main thread's place, for a
    rank that runs outside any numbered op.
    """
    if fate == "running" and where is not None and where.raw_collective:
        last = _last_op(record, job, "numbered one") if record is not None else "no record"
        return (
            f"rank {rank} is in {where.library}, called at {where.user or '?'} (a raw "
            f"torch.distributed call, which ddpzero_lab.comm does not number); {last}"
        )
    if record is None:
        tail = "" if fate == "running" else f"; it {fate}"
        return f"rank {rank}: no flight record (it has not started){tail}"
    if record.job != job:
        return f"rank {rank} has not started this job ({fate})"
    current, last = record.current, record.last
    if current is not None:
        if fate.startswith("died"):
            return f"rank {rank} {fate} while waiting in {current.label()}"
        return f"rank {rank} is waiting in {current.label()} for {_ago(now - current.start)}"
    if last is not None and last.job == job and last.status != OK:
        waited = _ago(last.end - last.start)
        if last.status == TIMED_OUT:
            text = (
                f"rank {rank} waited in {last.label()} for {waited}, until the process "
                "group's timeout ended it"
            )
        else:
            text = f"rank {rank} failed in {last.label()} after {waited} (a peer failed or left)"
        return text if fate in ("raised", "running") else f"{text}; it {fate}"
    last_op = _last_op(record, job)
    if fate == "running":
        return (
            f"rank {rank} is not in a collective: {last_op}, then it ran user code "
            f"(last seen {_ago(now - record.updated)} ago){_at(where)}"
        )
    if fate == "returned":
        return f"rank {rank} finished the job (fn returned): {last_op}"
    if fate == "raised":
        return f"rank {rank} raised in user code (see below): {last_op}"
    if fate.startswith("died"):
        return f"rank {rank} {fate} in user code: {last_op}"
    return f"rank {rank} was {fate}: {last_op}"
