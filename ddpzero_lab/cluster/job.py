"""Job: one function running on every rank of a LiveCluster, from submit to its result.

A job owns what belongs to one run: the ranks' outcomes as they arrive, their events and
printed output, waiting (with the grace the other ranks get after one failed), cancelling,
and settling: it takes a snapshot of where every rank stands (report.py), cancels the ranks
still running, marks those that do not answer as stuck, asks the recovery policy
(recovery.py) what to do, carries that out (ends the stuck ranks, has the cluster replace its
workers), and keeps the result or the error that wait() returns.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
import warnings
import weakref
from numbers import Real
from typing import TYPE_CHECKING

from .. import telemetry
from . import recovery, report
from .messages import Cancel
from .recovery import Outcome
from .spawn import Generation

if TYPE_CHECKING:
    from .cluster import LiveCluster

CANCEL_GRACE_S = 1.5  # how long a cancelled rank may take to answer before it counts as stuck


class Job:
    """A function running on every rank. Returned by `LiveCluster.submit`.

    `wait(timeout=None)` returns the per-rank results (a list indexed by rank) or raises
    RankError, printing what the ranks print as it arrives, each line prefixed by its rank;
    `done()` says whether every rank has finished; `events` are the telemetry events the ranks
    emitted so far (readable while the job runs); `output` is what they printed; `cancel()`
    stops it.
    """

    def __init__(
        self,
        cluster: LiveCluster,
        gen: Generation,
        job_id: int,
        name: str,
        dashboard: telemetry.EventConsumer | None,
        files: dict[str, str] | None = None,
    ):
        self.id = job_id
        self._files = files or {}
        self.name = name
        self.world_size = gen.world_size
        self.submitted_at = time.time()
        self._cluster_ref = weakref.ref(cluster)
        self._hub = cluster._hub
        self._grace = cluster.grace
        self._timeout = cluster.timeout
        # Where every rank stood just before the job was settled (cancels, kills)
        self._flight: report.Snapshot | None = None
        self._gen = gen
        self._dashboard = dashboard
        self._log = telemetry.EventLog()
        self._cond = threading.Condition()
        self._outcomes: list[Outcome | None] = [None] * gen.world_size
        self._first_failure: float | None = None
        self._settled = False
        self._ended_notified = False
        self._wait_end_notified = False
        self._results: list | None = None
        self._error: BaseException | None = None
        self.consumer_errors: list[str] = []
        # What fn printed: (rank, "stdout" | "stderr", text), in arrival order. wait() also
        # prints it in the caller, prefixed by the rank.
        self.output: list[tuple[int, str, str]] = []
        self._pending_output: queue.SimpleQueue = queue.SimpleQueue()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<Job {self.id} {self.name!r} {state}, {len(self._log)} events>"

    # -- read by the learner --------------------------------------------------------------
    @property
    def events(self) -> list[telemetry.Event]:
        """The events received so far, in arrival order (a snapshot)."""
        return self._log.snapshot()

    def done(self) -> bool:
        with self._cond:
            return self._settled or all(o is not None for o in self._outcomes)

    def wait(self, timeout: float | None = None) -> list:
        """Block until every rank has finished; return the results, indexed by rank.

        Raises RankError if any rank failed (after recovering the cluster where needed) and
        TimeoutError if `timeout` seconds pass first (the job keeps running). A
        KeyboardInterrupt cancels the job on every rank, recovers the cluster, and is re-raised.
        """
        if timeout is not None and (not isinstance(timeout, Real) or timeout < 0):
            raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self._cond:
                while not self._settled:
                    if all(o is not None for o in self._outcomes):
                        break
                    now = time.monotonic()
                    if self._first_failure is not None and now - self._first_failure >= self._grace:
                        break
                    if deadline is not None and now >= deadline:
                        raise TimeoutError(
                            f"job {self.id} ({self.name}) is still running after {timeout} s; "
                            "it goes on: call job.wait() again, or job.cancel() to stop it. "
                            "Where the ranks are:\n" + self.where()
                        )
                    self._cond.wait(0.1 if deadline is None else min(0.1, deadline - now))
                    self._print_output()
            self._settle(interrupted=False)
        except KeyboardInterrupt:
            self._settle(interrupted=True)
            raise
        finally:
            self._print_output()
            self._notify_wait_end()
        return self._final()

    def where(self) -> str:
        """Where each rank is now, one line per rank, from its flight record: the collective
        it waits in (op, sequence number, tag, for how long), or the last one it left and
        what it did since (user code, finished, died). Readable while ranks are blocked.
        Once a failed job is settled, it says where they stood then."""
        if self._settled and self._flight is not None:
            snapshot = self._flight
        else:
            with self._cond:
                outcomes = list(self._outcomes)
            snapshot = report.take_snapshot(self._gen, outcomes)
        return "\n".join(report.where_lines(snapshot, self.id, self._files))

    def _notify_wait_end(self) -> None:
        # In the caller's thread (the notebook cell's): a dashboard refreshes what the saved
        # notebook will show. Once per job.
        hook = getattr(self._dashboard, "on_wait_end", None)
        if hook is None or self._wait_end_notified or not self.done():
            return
        self._wait_end_notified = True
        try:
            hook(self)
        except Exception as exc:  # noqa: BLE001
            self.consumer_errors.append(f"{type(exc).__name__}: {exc}")

    def save_events(self, path) -> str:
        """Write the events received so far as JSON lines (replay them with
        dzl.Dashboard.from_events(path))."""
        import json

        with open(path, "w", encoding="utf-8") as fh:
            for event in self._log.snapshot():
                fh.write(json.dumps({**event.to_dict(), "job": event.job}) + "\n")
        return str(path)

    def _print_output(self) -> None:
        # Runs in the caller's thread (the notebook cell's), so the lines land in that cell.
        while True:
            try:
                rank, stream, text = self._pending_output.get_nowait()
            except queue.Empty:
                return
            target = sys.stderr if stream == "stderr" else sys.stdout
            lines = text.splitlines(keepends=True)
            target.write("".join(f"[rank {rank}] {line}" for line in lines))
            if not text.endswith("\n"):
                target.write("\n")
            target.flush()

    def cancel(self) -> None:
        """Stop the job on every rank (ranks stuck in a collective are ended and replaced)."""
        self._settle(interrupted=True)

    # -- called by the consumer thread ----------------------------------------------------
    def _on_event(self, event: telemetry.Event) -> None:
        self._log.append(event)
        if self._dashboard is not None:
            try:
                self._dashboard.on_event(event)
            except Exception as exc:  # noqa: BLE001 - recorded, shown by wait()
                if len(self.consumer_errors) < 10:
                    self.consumer_errors.append(f"{type(exc).__name__}: {exc}")

    def _on_output(self, rank: int, stream: str, text: str) -> None:
        self.output.append((rank, stream, text))
        self._pending_output.put((rank, stream, text))
        with self._cond:
            self._cond.notify_all()

    def _on_outcome(self, rank: int, outcome: Outcome) -> None:
        with self._cond:
            if self._outcomes[rank] is not None and outcome.status != "died":
                return
            if self._outcomes[rank] is not None and self._outcomes[rank].status != "stuck":
                return  # already reported; a later death (e.g. after restart) changes nothing
            self._outcomes[rank] = outcome
            if outcome.status != "ok" and self._first_failure is None:
                self._first_failure = time.monotonic()
            complete = all(o is not None and o.status == "ok" for o in self._outcomes)
            self._cond.notify_all()
        if complete:
            self._notify_end()

    def _notify_end(self) -> None:
        # Runs on the consumer thread (directly or via call_soon), once.
        with self._cond:
            if self._ended_notified:
                return
            self._ended_notified = True
        self._hub.jobs.pop(self.id, None)
        end = getattr(self._dashboard, "on_job_end", None)
        if end is not None:
            try:
                end(self)
            except Exception as exc:  # noqa: BLE001
                self.consumer_errors.append(f"{type(exc).__name__}: {exc}")

    # -- settling: decide the outcome and recover the cluster -----------------------------
    def _settle(self, interrupted: bool) -> None:
        cluster = self._cluster_ref()
        # The cluster's lock serialises settling with submit/restart/close. The hub's lock is
        # never held while waiting: the consumer thread needs it to deliver the outcomes.
        with cluster._lock if cluster is not None else contextlib.nullcontext():
            if self._settled:
                return
            # Before anything is cancelled or ended: where every rank stands now.
            with self._cond:
                outcomes = list(self._outcomes)
            self._flight = report.take_snapshot(self._gen, outcomes)
            current = cluster is not None and self._gen.number == cluster._generation
            if current:
                self._cancel_pending()
            with self._cond:
                for rank, outcome in enumerate(self._outcomes):
                    if outcome is None:
                        self._outcomes[rank] = Outcome("stuck")
                outcomes = list(self._outcomes)
            action = recovery.decide(
                recovery.Observation(
                    outcomes=tuple(outcomes),
                    collective_failed=report.collective_failures(self._flight, self.id),
                    broken=self._gen.broken,
                    can_replace=current and not cluster.closed,
                )
            )
            for rank in action.kill:
                self._gen.kill(rank)
            if action.replace_workers:
                cluster._replace_workers(action.reason, keep=self)
            self._finish(self._build_error(outcomes, action.replace_workers, action.reason))

    def _cancel_pending(self) -> None:
        """Ask the ranks still running to stop, and give them CANCEL_GRACE_S to answer."""
        pending = [r for r, o in enumerate(self._outcomes) if o is None]
        for rank in pending:
            self._gen.send(rank, Cancel(self.id))
        deadline = time.monotonic() + CANCEL_GRACE_S
        with self._cond:
            while any(self._outcomes[r] is None for r in pending):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(0.05, left))

    def _abandon(self, reason: str) -> None:
        """End the job without waiting for its ranks: the workers are gone (restart, close)."""
        with self._cond:
            if self._settled:
                return
            for rank, outcome in enumerate(self._outcomes):
                if outcome is None:
                    self._outcomes[rank] = Outcome("cancelled")
            outcomes = list(self._outcomes)
        self._finish(self._build_error(outcomes, False, reason))

    def _finish(self, error: BaseException | None) -> None:
        with self._cond:
            if self._settled:
                return
            self._error = error
            self._settled = True
            self._cond.notify_all()
        self._hub.jobs.pop(self.id, None)
        self._hub.call_soon(self._notify_end)

    def _has_failure(self) -> bool:
        with self._cond:
            return self._first_failure is not None

    def _build_error(
        self, outcomes: list[Outcome], restarted: bool, reason: str | None
    ) -> BaseException | None:
        faults = [e["text"] for e in self._log.of_kind("fault") if e.get("text")]
        return report.build_error(
            self.id,
            self.name,
            outcomes,
            self._files,
            restarted,
            reason,
            report.hang_report(
                self._flight, self.id, self.name, self._timeout, self._files, faults
            ),
        )

    def _final(self) -> list:
        if self.consumer_errors:
            warnings.warn(
                f"the dashboard raised while consuming events of job {self.id}: "
                + "; ".join(self.consumer_errors[:3]),
                RuntimeWarning,
                stacklevel=3,
            )
            self.consumer_errors = []
        if self._error is not None:
            raise self._error
        if self._results is None:
            self._results = report.load_results(self._outcomes, self.id, strict=True)
        return self._results
