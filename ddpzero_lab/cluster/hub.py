"""The hub: the parent's one consumer thread and the state it shares with callers' threads.

The consumer thread reads every worker's pipe, notices dead workers through their process
sentinels, and runs dashboard callbacks (they live on this thread, and only here). It hands
each message (messages.py) to the job it belongs to, or to the cluster's own event log; it
never prints and decides nothing about failures (recovery.py, job.py).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import telemetry
from .errors import describe_exitcode
from .messages import EventMessage, Output, Ready, Result, StartupError, WhereReply
from .recovery import Outcome
from .spawn import Generation

if TYPE_CHECKING:
    from .job import Job


class Hub:
    """State shared between callers' threads and the single consumer thread.

    It holds no reference to the LiveCluster, so a cluster that a notebook drops (by
    re-running `cluster = LiveCluster(...)`) is collected, and its finalizer ends the workers.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.gen: Generation | None = None
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

    def attach(self, gen: Generation) -> None:
        """Start reading a new generation's pipes (before its workers can answer)."""
        with self.lock:
            self.gen = gen
        self.wake()

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


def _consume(hub: Hub) -> None:
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


def _drain_wakeups(hub: Hub) -> None:
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


def _read_one(hub: Hub, gen: Generation, rank: int) -> None:
    try:
        message = gen.conns[rank].recv()
    except (EOFError, OSError, ValueError):
        gen.eof.add(rank)
        return
    except Exception:  # noqa: BLE001 - an unreadable message: drop it, keep reading
        return
    if isinstance(message, EventMessage):
        job = hub.jobs.get(message.job_id) if message.job_id is not None else None
        if job is not None and job._gen is gen:
            job._on_event(message.event)
        else:
            hub.log.append(message.event)
    elif isinstance(message, Output):
        job = hub.jobs.get(message.job_id)
        if job is not None and job._gen is gen:
            job._on_output(rank, message.stream, message.text)
    elif isinstance(message, Result):
        job = hub.jobs.get(message.job_id)
        if job is not None and job._gen is gen:
            job._on_outcome(message.rank, Outcome(message.status, message.payload, message.seq))
    elif isinstance(message, WhereReply):
        with gen.cond:
            if message.token in gen.frames:
                gen.frames[message.token][message.rank] = message.frames
                gen.cond.notify_all()
    elif isinstance(message, (Ready, StartupError)):
        with gen.cond:
            if isinstance(message, Ready):
                gen.ready[rank] = message.info
            else:
                gen.startup_errors[rank] = message.traceback
            gen.cond.notify_all()


def _on_death(hub: Hub, gen: Generation, rank: int, exitcode: int | None) -> None:
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
            job._on_outcome(rank, Outcome("died", exitcode=exitcode, stderr=last_words))
