"""LiveCluster: persistent torch.distributed workers driven from a notebook or a script.

This module owns the parent's side: starting the workers (forkserver or spawn, never fork),
sending them tasks, collecting results and events on one consumer thread, turning every
failure into a RankError that names the ranks, recovering (restart) when the process group
can no longer be trusted, interrupts, and teardown. It knows no widgets: `dashboard=` is any
object with the `telemetry.EventConsumer` interface.

Failure policy, in one place:
  * fn raises on some ranks: the others get `grace` seconds to finish on their own, then are
    cancelled; a rank that does not respond is stuck (in a collective, usually) and is ended.
  * After a failed or cancelled job the cluster compares the ranks' process-group sequence
    numbers; if any rank was ended, died, or the ranks disagree (one did a collective the
    others did not), the process group can never agree again, so the workers are replaced.
    Otherwise the workers, and the state they hold, are kept.
  * A hung collective is ended by the process group's own timeout (`timeout`), which raises
    on the waiting rank; a dead rank is seen at once through its process sentinel.
  * When a failure involves collectives, the error says where every rank stood when the job
    was settled, from the ranks' flight records (flight.py): who waited in which op (its
    sequence number and tag) for how long, who was in user code after which op, who had
    finished or died. `Job.where()` says the same about a running job.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any

import cloudpickle

from .. import telemetry
from . import flight, worker
from .errors import (
    OOM_HINT,
    ClusterError,
    RankError,
    RankFailure,
    code_files,
    describe_exitcode,
    is_comm_error,
    restore_source,
)

BACKENDS = ("auto", "gloo", "nccl")
# Resident memory of one idle worker with torch imported, measured on Linux x86_64 (CPU
# build: about 0.3 GB). Used only to refuse a world size the machine cannot hold.
_WORKER_BYTES_ESTIMATE = 350 * 1024**2
_CANCEL_GRACE_S = 1.5
_WHERE_WAIT_S = 0.5  # how long a report waits for the ranks to say where they are


@dataclass
class _Outcome:
    status: str  # "ok" | "error" | "cancelled" | "died" | "stuck"
    payload: Any = None
    seq: int | None = None
    exitcode: int | None = None
    stderr: str = ""


class _Generation:
    """One set of worker processes and their process group. A restart makes a new one."""

    def __init__(self, number: int, world_size: int):
        self.number = number
        self.world_size = world_size
        self.procs: dict[int, mp.process.BaseProcess] = {}
        self.conns: dict[int, Any] = {}
        # Callers never write to a pipe themselves: a KeyboardInterrupt in the middle of a
        # write would leave half a message there and the worker deaf. They queue messages for
        # one sender thread instead (queue.put cannot be torn).
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sender: threading.Thread | None = None
        # multiprocessing's Process.poll is not thread-safe; the consumer thread (exit codes)
        # and callers (kill, join) take turns.
        self.proc_lock = threading.Lock()
        self.store_dir = tempfile.mkdtemp(prefix="ddpzero-")
        self.cond = threading.Condition()
        self.ready: dict[int, dict] = {}
        self.startup_errors: dict[int, str] = {}
        self.dead: dict[int, int | None] = {}
        self.eof: set[int] = set()
        self.broken: str | None = None
        # Answers to "where" requests: token -> {rank: the main thread's innermost frames}
        self.frames: dict[int, dict[int, list]] = {}
        self.tokens = itertools.count(1)
        self.stopping = False

    def flight_record(self, rank: int) -> flight.RankRecord | None:
        """The rank's flight record as it stands now (readable while the rank is blocked)."""
        return flight.read_record(worker.flight_path(os.path.join(self.store_dir, "store"), rank))

    def stderr_tail(self, rank: int, max_chars: int = 2000) -> str:
        """The last lines a rank wrote to its native stderr (see worker._redirect_native_stderr)."""
        path = worker.stderr_path(os.path.join(self.store_dir, "store"), rank)
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - max_chars))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return text.strip()

    def start_sender(self) -> None:
        self.sender = threading.Thread(
            target=self._send_loop, name=f"ddpzero-sender-{self.number}", daemon=True
        )
        self.sender.start()

    def _send_loop(self) -> None:
        while True:
            item = self.outbox.get()
            if item is None:
                return
            rank, message = item
            conn = self.conns.get(rank)
            if conn is None or rank in self.dead:
                continue
            try:
                conn.send(message)
            except (OSError, ValueError):
                pass  # the worker is gone; its sentinel reports it

    def send(self, rank: int, message: tuple) -> bool:
        """Queue a message for a worker; False if that worker is known to be dead."""
        if rank in self.dead or rank not in self.conns:
            return False
        self.outbox.put((rank, message))
        return True

    def exit_code(self, rank: int) -> int | None:
        with self.proc_lock:
            proc = self.procs[rank]
            proc.join(1.0)  # reap it: with spawn the status is not known before waitpid
            return proc.exitcode

    def kill(self, rank: int) -> None:
        with self.proc_lock:
            proc = self.procs.get(rank)
            if proc is not None and proc.is_alive():
                proc.kill()  # by pid: only processes this cluster started

    def stop(self, graceful: bool) -> None:
        self.stopping = True
        if graceful:
            for rank in self.conns:
                self.send(rank, ("shutdown",))
            deadline = time.monotonic() + 2.0
            for proc in self.procs.values():
                with self.proc_lock:
                    proc.join(max(0.0, deadline - time.monotonic()))
        for rank in self.procs:
            self.kill(rank)
        for proc in self.procs.values():
            with self.proc_lock:
                proc.join(2.0)
        self.outbox.put(None)
        if self.sender is not None and self.sender is not threading.current_thread():
            self.sender.join(2.0)
        for conn in self.conns.values():
            try:
                conn.close()
            except OSError:
                pass
        shutil.rmtree(self.store_dir, ignore_errors=True)


class _Hub:
    """State shared between callers' threads and the single consumer thread.

    It holds no reference to the LiveCluster, so a cluster that a notebook drops (by
    re-running `cluster = LiveCluster(...)`) is collected, and its finalizer ends the workers.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.gen: _Generation | None = None
        self.jobs: dict[int, Job] = {}  # jobs not yet settled (at most one runs at a time)
        self.running: Job | None = None
        self.log = telemetry.EventLog()  # events emitted outside any job
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.wake_r, self.wake_w = mp.Pipe(duplex=False)
        self.closed = False
        self.thread = threading.Thread(
            target=_consume, args=(self,), name="ddpzero-consumer", daemon=True
        )
        self.thread.start()

    def wake(self) -> None:
        try:
            self.wake_w.send(None)
        except (OSError, ValueError):
            pass

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn on the consumer thread (dashboard callbacks live there, and only there)."""
        self.calls.put(fn)
        self.wake()

    def shutdown(self) -> None:
        with self.lock:
            self.closed = True
            gen, self.gen = self.gen, None
        self.wake()
        if gen is not None:
            gen.stop(graceful=True)
        for job in list(self.jobs.values()):
            job._abandon("the cluster was closed")
        if self.thread is not threading.current_thread():
            self.thread.join(5.0)


def _consume(hub: _Hub) -> None:
    """The one consumer thread: reads every worker's pipe, notices dead workers, runs
    dashboard callbacks. It never prints."""
    while True:
        with hub.lock:
            if hub.closed:
                return
            gen = hub.gen
            watch: dict[Any, tuple[str, int]] = {}
            if gen is not None:
                for rank, conn in gen.conns.items():
                    if rank not in gen.eof:
                        watch[conn] = ("conn", rank)
                for rank, proc in gen.procs.items():
                    if rank not in gen.dead:
                        watch[proc.sentinel] = ("proc", rank)
        try:
            ready = mp.connection.wait([*watch, hub.wake_r], timeout=1.0)
        except (OSError, ValueError):
            time.sleep(0.01)  # a pipe closed under us during a restart; rebuild the list
            continue
        for obj in ready:
            if obj is hub.wake_r:
                _drain_wakeups(hub)
                continue
            what, rank = watch[obj]
            if what == "conn":
                _read_one(hub, gen, rank)
            else:
                # The process ended: read what it sent before dying, then record the death.
                conn = gen.conns[rank]
                while rank not in gen.eof and _poll(conn):
                    _read_one(hub, gen, rank)
                _on_death(hub, gen, rank, gen.exit_code(rank))


def _poll(conn) -> bool:
    try:
        return conn.poll()
    except (OSError, ValueError, EOFError):
        return False


def _drain_wakeups(hub: _Hub) -> None:
    while _poll(hub.wake_r):
        try:
            hub.wake_r.recv()
        except (EOFError, OSError):
            break
    while True:
        try:
            fn = hub.calls.get_nowait()
        except queue.Empty:
            return
        try:
            fn()
        except Exception:  # noqa: BLE001 - a faulty callback must not kill the consumer
            pass


def _read_one(hub: _Hub, gen: _Generation, rank: int) -> None:
    try:
        message = gen.conns[rank].recv()
    except (EOFError, OSError, ValueError):
        gen.eof.add(rank)
        return
    except Exception:  # noqa: BLE001 - an unreadable message: drop it, keep reading
        return
    kind = message[0]
    if kind == "event":
        _, job_id, event = message
        job = hub.jobs.get(job_id) if job_id is not None else None
        if job is not None and job._gen is gen:
            job._on_event(event)
        else:
            hub.log.append(event)
    elif kind == "output":
        _, job_id, stream, text = message
        job = hub.jobs.get(job_id)
        if job is not None and job._gen is gen:
            job._on_output(rank, stream, text)
    elif kind == "result":
        _, job_id, rank, status, payload, seq = message
        job = hub.jobs.get(job_id)
        if job is not None and job._gen is gen:
            job._on_outcome(rank, _Outcome(status, payload, seq))
    elif kind == "where":
        _, token, rank, frames = message
        with gen.cond:
            if token in gen.frames:
                gen.frames[token][rank] = frames
                gen.cond.notify_all()
    elif kind in ("ready", "startup_error"):
        with gen.cond:
            if kind == "ready":
                gen.ready[rank] = message[2]
            else:
                gen.startup_errors[rank] = message[2]
            gen.cond.notify_all()


def _on_death(hub: _Hub, gen: _Generation, rank: int, exitcode: int | None) -> None:
    with gen.cond:
        gen.dead[rank] = exitcode
        gen.eof.add(rank)
        if not gen.stopping and gen.broken is None:
            gen.broken = f"rank {rank} died ({describe_exitcode(exitcode)})"
        gen.cond.notify_all()
    if gen.stopping:
        return
    last_words = gen.stderr_tail(rank)
    for job in list(hub.jobs.values()):
        if job._gen is gen:
            job._on_outcome(rank, _Outcome("died", exitcode=exitcode, stderr=last_words))


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
        gen: _Generation,
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
        # Job._read_flight() just before the job is settled: where every rank stood
        self._flight: tuple | None = None
        self._gen = gen
        self._dashboard = dashboard
        self._log = telemetry.EventLog()
        self._cond = threading.Condition()
        self._outcomes: list[_Outcome | None] = [None] * gen.world_size
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
            return "\n".join(self._where_lines(*self._flight))
        return "\n".join(self._where_lines(*self._read_flight()))

    def _read_flight(self) -> tuple:
        """(time, {rank: flight record}, outcomes, {rank: main thread's frames}).

        The frames come from ranks that run but are not in a numbered op: they may be in user
        code, or blocked in a raw torch.distributed call that comm/ never saw.
        """
        gen = self._gen
        with self._cond:
            outcomes = list(self._outcomes)
        records = {r: gen.flight_record(r) for r in range(self.world_size)}
        ask = [
            r
            for r in range(self.world_size)
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
                gen.send(rank, ("where", token))
            # A rank whose main thread holds the GIL in C++ cannot answer: do not wait long.
            deadline = time.monotonic() + _WHERE_WAIT_S
            with gen.cond:
                while len(frames) < len(ask) and time.monotonic() < deadline:
                    gen.cond.wait(max(0.0, min(0.05, deadline - time.monotonic())))
                gen.frames.pop(token, None)
        return time.time(), records, outcomes, dict(frames)

    def _where_lines(self, now: float, records: dict, outcomes: list, frames: dict) -> list[str]:
        return [
            flight.describe(
                r,
                records[r],
                self.id,
                _fate(outcomes[r]),
                now,
                flight.place(frames.get(r), self._files),
            )
            for r in range(self.world_size)
        ]

    def _hang_report(self) -> str:
        """Where the ranks stood when the job was settled, if collectives were involved, and
        the faults injected on purpose (ddpzero_lab.faults)."""
        lines = []
        if self._flight is not None:
            now, records, outcomes, frames = self._flight
            mine = [rec for rec in records.values() if rec is not None and rec.job == self.id]
            waiting = any(rec.current is not None for rec in mine)
            failed = [
                rec.last for rec in mine if rec.last and rec.last.job == self.id and rec.last.status
            ]
            if any(last.status == flight.TIMED_OUT for last in failed):
                head = f"job {self.id} ({self.name}) timed out after {self._timeout:g} s"
            else:
                head = f"where each rank was when job {self.id} ({self.name}) failed"
            raw = any(
                (p := flight.place(f)) is not None and p.raw_collective for f in frames.values()
            )
            if waiting or failed or raw:
                where = self._where_lines(now, records, outcomes, frames)
                lines.append(f"{head}: " + "; ".join(where))
        injected = [e["text"] for e in self._log.of_kind("fault") if e.get("text")]
        if injected:
            lines.append("faults injected on purpose (ddpzero_lab.faults): " + "; ".join(injected))
        if any("SIGKILL" in text for text in injected):  # not the OOM killer: the fault
            lines = [line.replace(OOM_HINT, " (the injected fault)") for line in lines]
        return "\n".join(lines)

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

    def _on_outcome(self, rank: int, outcome: _Outcome) -> None:
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
            self._flight = self._read_flight()
            pending = [r for r, o in enumerate(self._outcomes) if o is None]
            if pending and self._gen.number == (cluster._generation if cluster else -1):
                for rank in pending:
                    self._gen.send(rank, ("cancel", self.id))
                deadline = time.monotonic() + _CANCEL_GRACE_S
                with self._cond:
                    while any(self._outcomes[r] is None for r in pending):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(min(0.05, left))
            with self._cond:
                for rank, outcome in enumerate(self._outcomes):
                    if outcome is None:
                        self._outcomes[rank] = _Outcome("stuck")
                outcomes = list(self._outcomes)
            stuck = [r for r, o in enumerate(outcomes) if o.status == "stuck"]
            for rank in stuck:
                self._gen.kill(rank)
            failed = [r for r, o in enumerate(outcomes) if o.status != "ok"]
            reason = None
            if stuck:
                reason = f"rank{'s' if len(stuck) > 1 else ''} {_join(stuck)} stuck"
            elif self._gen.broken:
                reason = self._gen.broken
            elif failed:
                seqs = {o.seq for o in outcomes if o.status in ("ok", "error", "cancelled")}
                broken_ops = self._failed_collectives(outcomes)
                if broken_ops:
                    # Even with the ranks in step: gloo closes its connections when an op
                    # times out, and NCCL aborts its communicator; the group is unusable.
                    reason = f"a collective failed on {_ranks(broken_ops)}"
                elif None in seqs or len(seqs) > 1:
                    reason = "the ranks left the job having issued different collectives"
            restarted = False
            if (
                reason is not None
                and cluster is not None
                and not cluster.closed
                and (cluster._generation == self._gen.number)
            ):
                cluster._replace_workers(reason, keep=self)
                restarted = True
            self._finish(self._build_error(outcomes, restarted, reason))

    def _failed_collectives(self, outcomes: list[_Outcome]) -> list[int]:
        """Ranks on which a collective raised: from the flight records (ops through comm/)
        and from the error messages (raw torch.distributed calls)."""
        ranks = set()
        if self._flight is not None:
            for rank, rec in self._flight[1].items():
                if rec is not None and rec.last is not None and rec.last.job == self.id:
                    if rec.last.status != flight.OK:
                        ranks.add(rank)
        for rank, o in enumerate(outcomes):
            if o.status == "error" and is_comm_error((o.payload or {}).get("message", "")):
                ranks.add(rank)
        return sorted(ranks)

    def _abandon(self, reason: str) -> None:
        """End the job without waiting for its ranks: the workers are gone (restart, close)."""
        with self._cond:
            if self._settled:
                return
            for rank, outcome in enumerate(self._outcomes):
                if outcome is None:
                    self._outcomes[rank] = _Outcome("cancelled")
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
        self, outcomes: list[_Outcome], restarted: bool, reason: str | None
    ) -> BaseException | None:
        failures: dict[int, RankFailure] = {}
        for rank, o in enumerate(outcomes):
            if o.status == "ok":
                continue
            if o.status == "error":
                info = o.payload or {}
                exc = None
                if info.get("exception") is not None:
                    try:
                        exc = cloudpickle.loads(info["exception"])
                    except Exception:  # noqa: BLE001 - the text is enough
                        exc = None
                text = restore_source(info.get("traceback", ""), self._files)
                failures[rank] = RankFailure(
                    rank,
                    "exception",
                    info.get("type", "?"),
                    info.get("message", ""),
                    text,
                    exception=exc,
                )
            elif o.status == "died":
                failures[rank] = RankFailure(rank, "died", exitcode=o.exitcode, stderr=o.stderr)
            else:
                failures[rank] = RankFailure(rank, o.status)
        if not failures:
            return None
        if all(f.kind in ("cancelled", "stuck") for f in failures.values()):
            # No rank failed on its own: the job was stopped (interrupt, cancel(), restart(),
            # close()). Say why rather than list "failures".
            why = f": {reason}" if reason else ""
            replaced = "; the workers were replaced" if restarted else ""
            return ClusterError(f"job {self.id} ({self.name}) was cancelled{why}{replaced}")
        ok = [r for r, o in enumerate(outcomes) if o.status == "ok"]
        note = ""
        if ok and any(f.is_comm_error for f in failures.values()):
            waiting = [r for r, f in failures.items() if f.is_comm_error]
            note = (
                f"{_ranks(ok).capitalize()} returned normally while {_ranks(waiting)} waited in "
                "a collective: every rank must call the same collectives in the same order "
                "(did one rank skip one?)."
            )
        return RankError(
            failures,
            self.world_size,
            job_name=f"job {self.id} ({self.name})",
            results=self._load_results(outcomes, strict=False),
            restarted=restarted,
            note=note,
            report=self._hang_report(),
        )

    def _load_results(self, outcomes: list[_Outcome], strict: bool) -> list:
        results = []
        for o in outcomes:
            if o is not None and o.status == "ok":
                try:
                    results.append(cloudpickle.loads(o.payload))
                except Exception as exc:  # noqa: BLE001
                    if strict:
                        raise ClusterError(
                            f"a result of job {self.id} could not be unpickled in this process "
                            f"({type(exc).__name__}: {exc}); return plain values"
                        ) from exc
                    results.append(None)
            else:
                results.append(None)
        return results

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
            self._results = self._load_results(self._outcomes, strict=True)
        return self._results


def _fate(outcome: _Outcome | None) -> str:
    """What the parent knows of a rank, in the words flight.describe expects."""
    if outcome is None or outcome.status == "stuck":
        return "running"
    if outcome.status == "died":
        return f"died ({describe_exitcode(outcome.exitcode)})"
    return {"ok": "returned", "error": "raised"}.get(outcome.status, outcome.status)


def _ranks(ranks) -> str:
    ranks = list(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_join(ranks)}"


def _join(ranks) -> str:
    return ", ".join(str(r) for r in ranks)


@contextlib.contextmanager
def _main_module_hidden():
    """Start a worker without re-running the caller's main script in it.

    multiprocessing (spawn, forkserver) normally imports the parent's `__main__` in each
    child, so that functions defined there can be found by name. ddpzero_lab never needs it:
    fn travels by value (cloudpickle) and the worker's entry point lives in this package. Not
    importing it makes start-up faster and lets a plain script without an
    `if __name__ == "__main__":` guard start a cluster.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main and k in main.__dict__}
    try:
        for key in saved:
            if key == "__spec__":
                main.__spec__ = None
            else:
                del main.__dict__[key]
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


def _start_forkserver_uninterruptible() -> None:
    """Start the forkserver with SIGINT ignored, which it inherits across exec.

    Jupyter's interrupt goes to the kernel's whole process group. The forkserver ignores
    SIGINT only once it has imported torch (a second or more); an interrupt before that would
    kill it half-way. Started with SIGINT ignored it is immune from the first instruction, and
    the learner's interrupt still reaches the notebook, which cleans up.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signal dispositions can only be changed from the main thread
    from multiprocessing import forkserver

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _main_module_hidden():  # the forkserver would import the caller's script too
            forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def _has_forkserver() -> bool:
    return "forkserver" in mp.get_all_start_methods()


_forkserver_ctx = None


def _context(start_method: str):
    global _forkserver_ctx
    if start_method == "forkserver":
        if _forkserver_ctx is None:
            _forkserver_ctx = mp.get_context("forkserver")
            # The forkserver imports torch once; each rank then starts by fork from it in about
            # 0.1 s instead of importing torch again (seconds), which makes restart() cheap.
            # torch._dynamo too: the first torch.optim optimizer a process builds imports it
            # (Optimizer.__init__ is wrapped to disable dynamo), a second or more per rank,
            # which every fresh worker would otherwise pay again after each restart.
            _forkserver_ctx.set_forkserver_preload(
                ["torch", "torch.distributed", "torch._dynamo", "ddpzero_lab.cluster.worker"]
            )
        _start_forkserver_uninterruptible()
        return _forkserver_ctx
    return mp.get_context(start_method)


def _warn_if_not_loopback(backend: str) -> None:
    """Warn when the ranks' sockets would listen on an interface other than loopback.

    The ranks rendezvous through a file only this user can read, and gloo (and NCCL's
    bootstrap) listen on the loopback interface (worker.py sets GLOO_SOCKET_IFNAME), so no
    other machine can reach them. DDPZERO_SOCKET_IFNAME, or NCCL_SOCKET_IFNAME for nccl, moves
    them to another interface: torch.distributed's sockets have no authentication, and anyone
    who can reach that interface can connect to the ranks and feed them data.
    """
    loopback = worker.loopback_interface()
    names = ["DDPZERO_SOCKET_IFNAME"] + (["NCCL_SOCKET_IFNAME"] if backend == "nccl" else [])
    for name in names:
        value = os.environ.get(name)
        if value and value != loopback:
            warnings.warn(
                f"{name}={value}: the ranks' sockets will listen on {value!r}, not on the "
                f"loopback interface ({loopback!r}); torch.distributed's sockets have no "
                "authentication, so anyone who can reach that interface can connect to the "
                f"ranks. Unset {name} unless the network is private.",
                RuntimeWarning,
                stacklevel=3,
            )


def _check_number(name: str, value: Any, minimum: float, integer: bool = False) -> None:
    kind = int if integer else Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


class LiveCluster:
    """`world_size` persistent worker processes, each rank of one torch.distributed group.

        with dzl.LiveCluster(world_size=4) as cluster:
            cluster.run(lambda: dzl.rank())          # -> [0, 1, 2, 3]

    backend: "auto" (nccl when there are at least world_size GPUs, else gloo), "gloo", "nccl".
    timeout: seconds a collective may wait before it fails (the process group's timeout); a
        rank that skipped a collective makes the others fail after this long.
    threads_per_rank: torch intra-op threads in each rank, set once at start.
    grace: seconds the other ranks get to finish after one rank failed.
    start_method: "forkserver" (default where available) or "spawn"; "fork" is refused.
    """

    def __init__(
        self,
        world_size: int,
        backend: str = "auto",
        *,
        timeout: float = 30.0,
        threads_per_rank: int = 1,
        grace: float = 2.0,
        start_method: str | None = None,
        start_timeout: float = 120.0,
    ):
        _check_number("world_size", world_size, 1, integer=True)
        cap = os.environ.get("DDPZERO_MAX_WORLD_SIZE")
        if cap and cap.isdigit() and world_size > int(cap):
            raise ValueError(
                f"world_size={world_size} is above this machine's cap of {cap} ranks "
                "(DDPZERO_MAX_WORLD_SIZE, set where memory is small, e.g. on mybinder); "
                f"use world_size<={cap}"
            )
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        _check_number("timeout", timeout, 0.1)
        _check_number("threads_per_rank", threads_per_rank, 1, integer=True)
        _check_number("grace", grace, 0)
        _check_number("start_timeout", start_timeout, 1)
        if start_method is None:
            start_method = "forkserver" if _has_forkserver() else "spawn"
        if start_method == "fork":
            raise ValueError(
                "start_method='fork' is not supported: forking a multi-threaded process (a "
                "Jupyter kernel, or one that has used CUDA) can deadlock; use 'forkserver' or "
                "'spawn'"
            )
        if start_method not in mp.get_all_start_methods():
            raise ValueError(
                f"start_method must be one of {mp.get_all_start_methods()}, got {start_method!r}"
            )
        self.world_size = world_size
        self.backend = self._resolve_backend(backend, world_size)
        self.timeout = float(timeout)
        self.threads_per_rank = threads_per_rank
        self.grace = float(grace)
        self.start_method = start_method
        self.start_timeout = float(start_timeout)
        self._check_memory(world_size)
        _warn_if_not_loopback(self.backend)
        self._ctx = _context(start_method)
        self._hub = _Hub()
        self._generation = 0
        self._job_ids = itertools.count(1)
        self._lock = threading.RLock()
        self.closed = False
        self.info: list[dict] = []
        self._finalizer = weakref.finalize(self, _Hub.shutdown, self._hub)
        try:
            self._start_workers()
        except BaseException:
            self.close()
            raise

    # -- set-up -------------------------------------------------------------------------
    @staticmethod
    def _resolve_backend(backend: str, world_size: int) -> str:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if backend == "auto":
            return "nccl" if gpus >= world_size else "gloo"
        if backend == "nccl" and gpus < world_size:
            raise ValueError(
                f"backend='nccl' needs one GPU per rank: world_size={world_size} but "
                f"{gpus} GPU(s) are visible; use backend='gloo' (CPU) or a smaller world_size"
            )
        return backend

    @staticmethod
    def _check_memory(world_size: int) -> None:
        try:
            import psutil

            available = psutil.virtual_memory().available
        except Exception:  # noqa: BLE001 - no way to tell: let the OS decide
            return
        need = world_size * _WORKER_BYTES_ESTIMATE
        if need > available:
            raise ValueError(
                f"world_size={world_size} needs about {need / 1e9:.1f} GB for the workers alone "
                f"(~{_WORKER_BYTES_ESTIMATE / 1e9:.2f} GB each) but {available / 1e9:.1f} GB "
                "is available; choose a smaller world_size"
            )

    def _start_workers(self) -> None:
        self._generation += 1
        gen = _Generation(self._generation, self.world_size)
        try:
            self._launch(gen)
        except BaseException:
            # An interrupt (the first start imports torch for seconds) or a failed start:
            # leave no worker and no temporary directory behind.
            gen.stop(graceful=False)
            with self._hub.lock:
                if self._hub.gen is gen:
                    self._hub.gen = None
            raise

    def _launch(self, gen: _Generation) -> None:
        store_path = os.path.join(gen.store_dir, "store")
        env = dict(os.environ)
        for rank in range(self.world_size):
            parent_conn, child_conn = self._ctx.Pipe(duplex=True)
            proc = self._ctx.Process(
                target=worker.main,
                args=(
                    rank,
                    self.world_size,
                    self.backend,
                    store_path,
                    self.timeout,
                    self.threads_per_rank,
                    child_conn,
                    env,
                ),
                name=f"ddpzero-rank{rank}",
                # daemon: multiprocessing ends the workers at interpreter exit as a last resort
                # (the worker lifts the flag on itself so it may start DataLoader workers).
                daemon=True,
            )
            with _main_module_hidden():
                proc.start()
            child_conn.close()  # so that the parent sees end-of-file when the worker dies
            gen.procs[rank] = proc
            gen.conns[rank] = parent_conn
        gen.start_sender()
        with self._hub.lock:
            self._hub.gen = gen
        self._hub.wake()
        deadline = time.monotonic() + self.start_timeout
        with gen.cond:
            while len(gen.ready) < self.world_size and not gen.startup_errors and not gen.dead:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                gen.cond.wait(min(0.2, left))
            ready, errors, dead = dict(gen.ready), dict(gen.startup_errors), dict(gen.dead)
        if len(ready) < self.world_size:
            gen_tail = gen.stderr_tail(min(dead)) if dead else ""  # read before stop() removes it
            if errors:
                rank, text = min(errors.items())
                raise ClusterError(
                    f"rank {rank} could not join the process group ({self.backend}):\n{text}"
                )
            if dead:
                rank, code = min(dead.items())
                raise ClusterError(
                    f"rank {rank} died while starting ({describe_exitcode(code)}); check memory "
                    "and that ddpzero_lab imports in a fresh Python process"
                    + (f"\nits last words on stderr:\n{tail}" if (tail := gen_tail) else "")
                )
            missing = [r for r in range(self.world_size) if r not in ready]
            raise ClusterError(
                f"ranks {_join(missing)} did not start within {self.start_timeout:.0f} s; "
                "the machine may be overloaded: try a smaller world_size or a larger start_timeout"
            )
        self.info = [ready[r] for r in range(self.world_size)]

    # -- properties -----------------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers, indexed by rank."""
        gen = self._hub.gen
        return [] if gen is None else [gen.procs[r].pid for r in range(self.world_size)]

    @property
    def generation(self) -> int:
        """How many sets of workers this cluster has started (1 + the number of restarts)."""
        return self._generation

    @property
    def events(self) -> list[telemetry.Event]:
        """Events emitted outside any job (e.g. by a background thread in a rank)."""
        return self._hub.log.snapshot()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"generation {self._generation}, pids {self.pids}"
        return f"LiveCluster(world_size={self.world_size}, backend={self.backend!r}, {state})"

    # -- jobs -----------------------------------------------------------------------------
    def submit(
        self,
        fn: Callable,
        *args: Any,
        dashboard: telemetry.EventConsumer | None = None,
        **kwargs: Any,
    ) -> Job:
        """Start fn(*args, **kwargs) on every rank and return a Job without waiting."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if dashboard is not None and not callable(getattr(dashboard, "on_event", None)):
            raise TypeError("dashboard must have an on_event(event) method (a dzl.Dashboard)")
        try:
            payload = cloudpickle.dumps((fn, args, kwargs))
        except Exception as exc:  # noqa: BLE001
            raise TypeError(
                f"fn and its arguments must be picklable to reach the ranks "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        prepare = getattr(dashboard, "on_submit", None)
        if prepare is not None:
            prepare()  # in the caller's thread, before the ranks start
        with self._lock:
            if self.closed:
                raise ClusterError("this LiveCluster is closed; start a new one")
            previous = self._hub.running
            if previous is not None and not previous._settled:
                if previous._has_failure():
                    # Nobody waited for it: recover now (restart if the process group is out
                    # of step), so that this job starts on a sound cluster. Its error stays
                    # on that job.
                    previous._settle(interrupted=False)
                elif not previous.done():
                    raise ClusterError(
                        f"job {previous.id} ({previous.name}) is still running, and one job runs "
                        "at a time (two jobs would pair their collectives with each other): "
                        "wait for it with job.wait(), or stop it with job.cancel() or "
                        "cluster.cancel()"
                    )
            gen = self._hub.gen
            if gen is None or gen.broken:
                why = gen.broken if gen is not None else "it has no workers"
                warnings.warn(
                    f"replacing the cluster's workers before this job: {why}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._replace_workers(why)
                gen = self._hub.gen
            name = getattr(fn, "__qualname__", None) or type(fn).__name__
            job = Job(self, gen, next(self._job_ids), name, dashboard, code_files(fn))
            self._hub.jobs[job.id] = job
            self._hub.running = job
            try:
                start = getattr(dashboard, "on_job_start", None)
                if start is not None:
                    self._hub.call_soon(lambda: start(job))
                for rank in range(self.world_size):
                    if not gen.send(rank, ("task", job.id, payload)):
                        job._on_outcome(rank, _Outcome("died", exitcode=gen.exit_code(rank)))
            except BaseException:  # an interrupt right here: nobody will hold this job
                job.cancel()
                raise
            return job

    def cancel(self) -> None:
        """Stop the running job, if any (as job.cancel() does)."""
        job = self._hub.running
        if job is not None and not job._settled:
            job.cancel()

    def run(
        self,
        fn: Callable,
        *args: Any,
        dashboard: telemetry.EventConsumer | None = None,
        **kwargs: Any,
    ) -> list:
        """Run fn(*args, **kwargs) on every rank and return the results, indexed by rank.

        A failure on any rank raises RankError; Ctrl-C / Jupyter's interrupt cancels the job on
        every rank and leaves the cluster usable.
        """
        return self.submit(fn, *args, dashboard=dashboard, **kwargs).wait()

    # -- lifecycle ------------------------------------------------------------------------
    def _replace_workers(self, reason: str, keep: Job | None = None) -> None:
        with self._lock:
            with self._hub.lock:
                old, self._hub.gen = self._hub.gen, None
            if old is not None:
                old.stop(graceful=False)
            for job in list(self._hub.jobs.values()):
                if job is not keep and job._gen is old:
                    job._abandon(f"the workers were replaced ({reason})")
            self._start_workers()

    def restart(self) -> None:
        """Replace every worker with a fresh one and a fresh process group (after a fault, or
        to start clean). Running jobs are cancelled; state held in workers is gone."""
        if self.closed:
            raise ClusterError("this LiveCluster is closed; start a new one")
        self._replace_workers("restart() was called")

    def close(self) -> None:
        """Stop every worker (idempotent). Running jobs are cancelled."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            for job in list(self._hub.jobs.values()):
                for rank in range(self.world_size):
                    job._gen.send(rank, ("cancel", job.id))
        self._finalizer()

    def __enter__(self) -> LiveCluster:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
