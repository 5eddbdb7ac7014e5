"""LiveCluster: persistent torch.distributed workers driven from a notebook or a script.

This module owns the cluster's public face: checking its arguments, submitting jobs one at a
time, restart, cancel and close. The parts it is made of each own one thing:

    messages.py   the typed messages between the parent and its workers
    spawn.py      starting and stopping one generation of workers (processes, pipes)
    hub.py        the parent's one consumer thread: reads the pipes, sees deaths, runs callbacks
    job.py        one function on every rank: outcomes, events, output, wait, cancel, settle
    recovery.py   the failure policy, a pure function: what was observed -> what to do
    report.py     where each rank stood, and the RankError / ClusterError a failed job raises
    worker.py     the rank's side: start-up, the task loop, cancellation, events

It knows no widgets: `dashboard=` is any object with the `telemetry.EventConsumer` interface.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

import cloudpickle

from .. import telemetry
from . import spawn
from .errors import ClusterError, code_files
from .hub import Hub
from .job import Job
from .messages import Cancel, Task
from .recovery import Outcome

__all__ = ["BACKENDS", "Job", "LiveCluster"]

BACKENDS = ("auto", "gloo", "nccl")
# Kept under its old name for code that imported it from here.
_WORKER_BYTES_ESTIMATE = spawn.WORKER_BYTES_ESTIMATE


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
    link: an emulated interconnect for every collective of the workers (comm/link.py): a
        name such as "nvlink4", "ib-100g:h100" (scaled to this machine's compute), or a
        dzl.Link; None (the default): real time. Per rank, a mapping from rank to link, with
        an optional "default" for the ranks not named, e.g. a parameter server on a slower
        link than its workers: {"default": "nvlink4:h100", 0: "eth-10g:h100"} (None as a
        value: that rank in real time). Every rank needs a link or a default.
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
        link=None,
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
            start_method = "forkserver" if spawn.has_forkserver() else "spawn"
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
        from ..comm import link as links

        if (
            link is not None
            and not isinstance(link, (str, Mapping))
            and not callable(getattr(link, "spec", None))
        ):
            raise TypeError(
                "link must be a name like 'nvlink4:h100', a dzl.Link, or a mapping "
                f"{{rank: link, 'default': link}}, got {link!r}"
            )
        self.link = link
        # what the workers find in DDPZERO_LINK (a Link travels as its spec; per-rank links
        # as one JSON object, each rank reading its own entry)
        self._link_spec = links.encode(link, world_size)
        self._check_memory(world_size)
        spawn.warn_if_not_loopback(self.backend)
        self._ctx = spawn.start_context(start_method)
        self._hub = Hub()
        self._generation = 0
        self._job_ids = itertools.count(1)
        self._lock = threading.RLock()
        self.closed = False
        self.info: list[dict] = []
        self._finalizer = weakref.finalize(self, Hub.shutdown, self._hub)
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
        spawn.check_memory(world_size)

    def _start_workers(self) -> None:
        self._generation += 1
        gen = spawn.Generation(self._generation, self.world_size)
        try:
            self.info = spawn.launch(
                gen,
                self._ctx,
                backend=self.backend,
                timeout=self.timeout,
                threads_per_rank=self.threads_per_rank,
                start_timeout=self.start_timeout,
                attach=self._hub.attach,
                extra_env={"DDPZERO_LINK": self._link_spec} if self._link_spec else None,
            )
        except BaseException:
            # An interrupt (the first start imports torch for seconds) or a failed start:
            # leave no worker and no temporary directory behind.
            gen.stop(graceful=False)
            with self._hub.lock:
                if self._hub.gen is gen:
                    self._hub.gen = None
            raise

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
                    if not gen.send(rank, Task(job.id, payload)):
                        job._on_outcome(rank, Outcome("died", exitcode=gen.exit_code(rank)))
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
                    job._gen.send(rank, Cancel(job.id))
        self._finalizer()

    def __enter__(self) -> LiveCluster:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
