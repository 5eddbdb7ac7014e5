"""The spawner: one generation of worker processes, started, watched and stopped.

A generation is `world_size` worker processes (forkserver or spawn, never fork), one duplex
pipe to each, a sender thread that writes to the pipes, and the directory that holds the
rendezvous file, the ranks' native stderr and their flight records. A restart makes a new
generation; nothing outlives its own. This module also owns what starting workers needs: the
start method's context, a forkserver that an interrupt cannot kill half-way, the memory a
world size needs, and the warning for sockets off loopback. Reading the pipes is the hub's
(hub.py); what a message means is messages.py's.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from . import flight, worker
from .errors import ClusterError, describe_exitcode, join_ranks
from .messages import Shutdown, ToWorker

# Resident memory of one idle worker with torch imported, measured on Linux x86_64 (CPU
# build: about 0.3 GB). Used only to refuse a world size the machine cannot hold.
WORKER_BYTES_ESTIMATE = 350 * 1024**2


class Generation:
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

    def send(self, rank: int, message: ToWorker) -> bool:
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
                self.send(rank, Shutdown())
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
        # An interrupt during proc.start() can leave a worker that the forkserver started but
        # that no list here knows: it may still create its stderr file in the directory while
        # rmtree runs (which then fails on a non-empty directory). Remove until gone; once the
        # directory is gone such a worker can create nothing there, and ends when its pipe does.
        deadline = time.monotonic() + 2.0
        while True:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            if not os.path.exists(self.store_dir) or time.monotonic() > deadline:
                break
            time.sleep(0.05)


def launch(
    gen: Generation,
    ctx,
    *,
    backend: str,
    timeout: float,
    threads_per_rank: int,
    start_timeout: float,
    attach: Callable[[Generation], None],
    extra_env: dict[str, str] | None = None,
) -> list[dict]:
    """Start gen's workers and wait until every rank has joined the process group.

    attach(gen) hands the generation to the hub before any worker can answer (the hub reads
    their "ready" messages). Returns each rank's info (pid, device, ...), indexed by rank;
    raises ClusterError, naming the rank, if one could not start."""
    store_path = os.path.join(gen.store_dir, "store")
    env = {**os.environ, **(extra_env or {})}
    for rank in range(gen.world_size):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=worker.main,
            args=(
                rank,
                gen.world_size,
                backend,
                store_path,
                timeout,
                threads_per_rank,
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
    attach(gen)
    deadline = time.monotonic() + start_timeout
    with gen.cond:
        while len(gen.ready) < gen.world_size and not gen.startup_errors and not gen.dead:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            gen.cond.wait(min(0.2, left))
        ready, errors, dead = dict(gen.ready), dict(gen.startup_errors), dict(gen.dead)
    if len(ready) < gen.world_size:
        gen_tail = gen.stderr_tail(min(dead)) if dead else ""  # read before stop() removes it
        if errors:
            rank, text = min(errors.items())
            raise ClusterError(f"rank {rank} could not join the process group ({backend}):\n{text}")
        if dead:
            rank, code = min(dead.items())
            raise ClusterError(
                f"rank {rank} died while starting ({describe_exitcode(code)}); check memory "
                "and that ddpzero_lab imports in a fresh Python process"
                + (f"\nits last words on stderr:\n{tail}" if (tail := gen_tail) else "")
            )
        missing = [r for r in range(gen.world_size) if r not in ready]
        raise ClusterError(
            f"ranks {join_ranks(missing)} did not start within {start_timeout:.0f} s; "
            "the machine may be overloaded: try a smaller world_size or a larger start_timeout"
        )
    return [ready[r] for r in range(gen.world_size)]


def check_memory(world_size: int) -> None:
    """Refuse a world size whose idle workers alone would not fit in the available memory."""
    try:
        import psutil

        available = psutil.virtual_memory().available
    except Exception:  # noqa: BLE001 - no way to tell: let the OS decide
        return
    need = world_size * WORKER_BYTES_ESTIMATE
    if need > available:
        raise ValueError(
            f"world_size={world_size} needs about {need / 1e9:.1f} GB for the workers alone "
            f"(~{WORKER_BYTES_ESTIMATE / 1e9:.2f} GB each) but {available / 1e9:.1f} GB "
            "is available; choose a smaller world_size"
        )


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


def has_forkserver() -> bool:
    return "forkserver" in mp.get_all_start_methods()


_forkserver_ctx = None


def start_context(start_method: str):
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


def warn_if_not_loopback(backend: str) -> None:
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
