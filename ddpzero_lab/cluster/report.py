"""Where each rank stood, and the error a failed job raises.

This module owns what the learner reads about a job: the snapshot of every rank's position
(its flight record, what the parent knows of its end, and for a rank in user code or in a raw
torch.distributed call, its main thread's frames), the one-line-per-rank description of it
(`Job.where()`), the report a RankError carries when collectives were involved, and turning the
ranks' outcomes into a RankError or ClusterError. It decides nothing about recovery
(recovery.py) and sends nothing but "where" questions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cloudpickle

from . import flight
from .errors import (
    OOM_HINT,
    ClusterError,
    RankError,
    RankFailure,
    describe_exitcode,
    name_ranks,
    restore_source,
)
from .messages import Where
from .recovery import Outcome

if TYPE_CHECKING:
    from .spawn import Generation

WHERE_WAIT_S = 0.5  # how long a snapshot waits for the ranks to say where they are


@dataclass(frozen=True)
class Snapshot:
    """Where every rank stood at one moment."""

    time: float
    records: dict[int, flight.RankRecord | None]  # each rank's flight record
    outcomes: tuple[Outcome | None, ...]  # what the parent knew of each rank's end of the job
    frames: dict[int, list]  # the main thread's innermost frames, from ranks asked for them


def take_snapshot(gen: Generation, outcomes: list[Outcome | None]) -> Snapshot:
    """Read every rank's flight record, and ask the ranks that still run and are in no numbered
    op where their main thread is: they may be in user code, or blocked in a raw
    torch.distributed call that comm/ never saw."""
    records = {r: gen.flight_record(r) for r in range(len(outcomes))}
    ask = [
        r
        for r in range(len(outcomes))
        if outcomes[r] is None
        and r not in gen.dead
        and not (records[r] is not None and records[r].current is not None)
    ]
    frames: dict[int, list] = {}
    if ask:
        with gen.cond:
            token = next(gen.tokens)
            gen.frames[token] = frames
        for rank in ask:
            gen.send(rank, Where(token))
        # A rank whose main thread holds the GIL in C++ cannot answer: do not wait long.
        deadline = time.monotonic() + WHERE_WAIT_S
        with gen.cond:
            while len(frames) < len(ask) and time.monotonic() < deadline:
                gen.cond.wait(max(0.0, min(0.05, deadline - time.monotonic())))
            gen.frames.pop(token, None)
    return Snapshot(time.time(), records, tuple(outcomes), dict(frames))


def fate(outcome: Outcome | None) -> str:
    """What the parent knows of a rank, in the words flight.describe expects."""
    if outcome is None or outcome.status == "stuck":
        return "running"
    if outcome.status == "died":
        return f"died ({describe_exitcode(outcome.exitcode)})"
    return {"ok": "returned", "error": "raised"}.get(outcome.status, outcome.status)


def where_lines(snapshot: Snapshot, job_id: int, files: dict[str, str]) -> list[str]:
    """One line per rank: the op it waits in, or the last one it left and what it did since."""
    return [
        flight.describe(
            r,
            snapshot.records[r],
            job_id,
            fate(snapshot.outcomes[r]),
            snapshot.time,
            flight.place(snapshot.frames.get(r), files),
        )
        for r in range(len(snapshot.outcomes))
    ]


def collective_failures(snapshot: Snapshot | None, job_id: int) -> frozenset[int]:
    """Ranks whose last counted collective in this job did not end well (flight records)."""
    if snapshot is None:
        return frozenset()
    return frozenset(
        rank
        for rank, rec in snapshot.records.items()
        if rec is not None
        and rec.last is not None
        and rec.last.job == job_id
        and rec.last.status != flight.OK
    )


def hang_report(
    snapshot: Snapshot | None,
    job_id: int,
    job_name: str,
    timeout: float,
    files: dict[str, str],
    faults: list[str],
) -> str:
    """Where the ranks stood when the job was settled, if collectives were involved, and the
    faults injected on purpose (ddpzero_lab.faults; `faults` are their descriptions)."""
    lines = []
    if snapshot is not None:
        mine = [rec for rec in snapshot.records.values() if rec is not None and rec.job == job_id]
        waiting = any(rec.current is not None for rec in mine)
        failed = [
            rec.last for rec in mine if rec.last and rec.last.job == job_id and rec.last.status
        ]
        if any(last.status == flight.TIMED_OUT for last in failed):
            head = f"job {job_id} ({job_name}) timed out after {timeout:g} s"
        else:
            head = f"where each rank was when job {job_id} ({job_name}) failed"
        raw = any(
            (p := flight.place(f)) is not None and p.raw_collective
            for f in snapshot.frames.values()
        )
        if waiting or failed or raw:
            lines.append(f"{head}: " + "; ".join(where_lines(snapshot, job_id, files)))
    if faults:
        lines.append("faults injected on purpose (ddpzero_lab.faults): " + "; ".join(faults))
    if any("SIGKILL" in text for text in faults):  # not the OOM killer: the fault
        lines = [line.replace(OOM_HINT, " (the injected fault)") for line in lines]
    return "\n".join(lines)


def load_results(outcomes, job_id: int, strict: bool) -> list:
    """The values the ranks returned, indexed by rank (None where a rank did not return).
    strict: a value that cannot be unpickled here raises ClusterError instead of being None."""
    results = []
    for o in outcomes:
        if o is not None and o.status == "ok":
            try:
                results.append(cloudpickle.loads(o.payload))
            except Exception as exc:  # noqa: BLE001
                if strict:
                    raise ClusterError(
                        f"a result of job {job_id} could not be unpickled in this process "
                        f"({type(exc).__name__}: {exc}); return plain values"
                    ) from exc
                results.append(None)
        else:
            results.append(None)
    return results


def _failure(rank: int, o: Outcome, files: dict[str, str]) -> RankFailure:
    if o.status == "error":
        info = o.payload or {}
        exc = None
        if info.get("exception") is not None:
            try:
                exc = cloudpickle.loads(info["exception"])
            except Exception:  # noqa: BLE001 - the text is enough
                exc = None
        text = restore_source(info.get("traceback", ""), files)
        return RankFailure(
            rank,
            "exception",
            info.get("type", "?"),
            info.get("message", ""),
            text,
            exception=exc,
        )
    if o.status == "died":
        return RankFailure(rank, "died", exitcode=o.exitcode, stderr=o.stderr)
    return RankFailure(rank, o.status)


def build_error(
    job_id: int,
    job_name: str,
    outcomes: list[Outcome],
    files: dict[str, str],
    restarted: bool,
    reason: str | None,
    report: str,
) -> BaseException | None:
    """The error a settled job raises from wait(), or None if every rank returned.

    A job no rank failed on its own (interrupt, cancel(), restart(), close()) is a
    ClusterError saying why it was stopped; otherwise a RankError naming each failed rank."""
    failures = {r: _failure(r, o, files) for r, o in enumerate(outcomes) if o.status != "ok"}
    if not failures:
        return None
    if all(f.kind in ("cancelled", "stuck") for f in failures.values()):
        why = f": {reason}" if reason else ""
        replaced = "; the workers were replaced" if restarted else ""
        return ClusterError(f"job {job_id} ({job_name}) was cancelled{why}{replaced}")
    ok = [r for r, o in enumerate(outcomes) if o.status == "ok"]
    note = ""
    if ok and any(f.is_comm_error for f in failures.values()):
        waiting = [r for r, f in failures.items() if f.is_comm_error]
        note = (
            f"{name_ranks(ok).capitalize()} returned normally while {name_ranks(waiting)} waited "
            "in a collective: every rank must call the same collectives in the same order "
            "(did one rank skip one?)."
        )
    return RankError(
        failures,
        len(outcomes),
        job_name=f"job {job_id} ({job_name})",
        results=load_results(outcomes, job_id, strict=False),
        restarted=restarted,
        note=note,
        report=report,
    )
