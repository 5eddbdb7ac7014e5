"""The rank's side of a LiveCluster: start-up, the task loop, cancellation and events.

A worker is started once (forkserver or spawn, never fork) and then runs tasks sent by the
parent until it is told to stop or the parent disappears. It owns nothing the parent needs to
clean up: it dies with the parent (parent-death signal on Linux, and end-of-file on its pipe
everywhere).

The messages on the worker's pipe, both ways, are the typed records of messages.py.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import io
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any

import cloudpickle
import torch

from .. import telemetry
from . import context, flight
from .messages import (
    Cancel,
    EventMessage,
    Output,
    Ready,
    Result,
    Shutdown,
    StartupError,
    Task,
    ToParent,
    Where,
    WhereReply,
)

# SIGUSR1 carries "cancel the running job" from the worker's own reader thread to its main
# thread. A real signal (not a simulated one) so that it also breaks a sleep or a blocking read.
_CANCEL_SIGNAL = getattr(signal, "SIGUSR1", None)


class JobCancelled(BaseException):
    """Raised inside fn when the parent cancels the job. A BaseException, so that user code's
    `except Exception` does not swallow it."""


class _State:
    def __init__(self) -> None:
        self.current_job: int | None = None
        self.in_fn = False  # True only while the learner's fn runs: cancel interrupts only fn
        self.delivered: int | None = None  # the job a JobCancelled was raised for (once)
        self.cancelled: set[int] = set()
        self.lock = threading.Lock()


def _set_parent_death_signal() -> None:
    # Linux only: the kernel sends SIGKILL to this process when its parent (the forkserver,
    # which exits with the notebook kernel) dies. Elsewhere the pipe's end-of-file does it.
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass


def stderr_path(store_path: str, rank: int) -> str:
    """Where a rank's native stderr goes (next to the generation's rendezvous file)."""
    return os.path.join(os.path.dirname(store_path), f"rank{rank}.stderr")


def flight_path(store_path: str, rank: int) -> str:
    """Where a rank keeps its flight record (see flight.py), next to its stderr file."""
    return os.path.join(os.path.dirname(store_path), f"rank{rank}.flight")


def _redirect_native_stderr(path: str) -> None:
    # gloo and NCCL report fatal errors (a collective mismatch, say) on file descriptor 2 just
    # before they abort the process. In Jupyter that is the terminal that started the server,
    # where nobody looks; a file lets the parent quote those lines in the RankError.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        return
    os.dup2(fd, 2)
    os.close(fd)


def loopback_interface() -> str:
    """The name of the loopback interface gloo should bind to ('lo' on Linux, 'lo0' on macOS)."""
    import socket

    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        names = []
    for candidate in ("lo", "lo0"):
        if candidate in names:
            return candidate
    return "lo0" if sys.platform == "darwin" else "lo"


class _Channel:
    """The worker's end of its pipe; sends are serialised because events may come from
    several threads (autograd hooks, the reader thread)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.job: int | None = None

    def send(self, message: ToParent) -> None:
        # The cancel signal must not land half-way through a write: the parent would read a
        # torn message. Blocking it here only delays it to the end of the send.
        blocked = (
            _CANCEL_SIGNAL is not None and threading.current_thread() is threading.main_thread()
        )
        try:
            if blocked:
                # (pthread_sigmask may itself run a pending handler and raise: inside the try,
                # so that the signal is unblocked again whatever happens)
                signal.pthread_sigmask(signal.SIG_BLOCK, {_CANCEL_SIGNAL})
            with self.lock:
                self.conn.send(message)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {_CANCEL_SIGNAL})

    def send_event(self, event: telemetry.Event) -> None:
        # An event belongs to the job running when it was emitted.
        self.send(EventMessage(self.job, dataclasses.replace(event, job=self.job)))


class _RankStream(io.TextIOBase):
    """sys.stdout/sys.stderr inside a job: whole lines go to the parent, which prints them in
    the calling cell prefixed by the rank (a worker's own stdout is the terminal that started
    Jupyter, where the learner would never see it)."""

    def __init__(self, channel: _Channel, name: str, original) -> None:
        self.channel, self.name, self.original = channel, name, original
        self.buffer_text = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buffer_text += text
        if "\n" in self.buffer_text:
            complete, _, self.buffer_text = self.buffer_text.rpartition("\n")
            self._send(complete + "\n")
        return len(text)

    def flush(self) -> None:
        if self.buffer_text:
            text, self.buffer_text = self.buffer_text, ""
            self._send(text)

    def _send(self, text: str) -> None:
        try:
            self.channel.send(Output(self.channel.job, self.name, text))
        except (OSError, ValueError):
            self.original.write(text)


def _sequence_number() -> int | None:
    # The process group's count of collectives and point-to-point ops issued. The parent
    # compares it across ranks after a failed job: ranks that disagree can never meet in a
    # collective again, so the cluster must be replaced.
    import torch.distributed as dist

    try:
        return int(dist.distributed_c10d._get_default_group()._get_sequence_number_for_group())
    except Exception:
        return None


def main_thread_frames(limit: int = 12) -> list[tuple[str, int, str, str]]:
    """The main thread's innermost frames, read from another thread (the reader answers a
    "where" with them): [(file, line, function, source)], innermost last.

    The main thread may be blocked in C++ (a raw torch.distributed call, a sleep): with the
    GIL released there, this thread still runs and sees the Python frames that called it.
    """
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return []
    return [
        (fs.filename, fs.lineno or 0, fs.name, (fs.line or "").strip())
        for fs in traceback.extract_stack(frame, limit=limit)
    ]


def _describe_exception(exc: BaseException) -> dict[str, Any]:
    # Skip the first frame (this module's task loop): the learner's traceback starts in fn.
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:  # noqa: BLE001
        text = f"{type(exc).__name__} (its traceback could not be formatted)"
    try:
        pickled = cloudpickle.dumps(exc)
    except Exception:
        pickled = None
    try:
        message = str(exc)
    except Exception as inner:  # noqa: BLE001 - an exception whose __str__ fails
        message = f"<str() of the exception failed: {type(inner).__name__}: {inner}>"
    if isinstance(exc, SystemExit):
        message = f"fn called sys.exit({exc.code!r})"
    return {"type": type(exc).__name__, "message": message, "traceback": text, "exception": pickled}


def main(
    rank: int,
    world_size: int,
    backend: str,
    store_path: str,
    timeout_s: float,
    threads: int,
    conn,
    env: dict[str, str],
) -> None:
    """Entry point of a worker process."""
    # Jupyter's interrupt sends SIGINT to the kernel's whole process group, workers included.
    # Workers ignore it; the parent turns the interrupt into an orderly cancel.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal()
    _redirect_native_stderr(stderr_path(store_path, rank))
    # The parent starts workers as daemons (so multiprocessing ends them at exit as a last
    # resort); a daemon may not have children, but a rank may need DataLoader workers.
    multiprocessing.current_process().daemon = False
    # A forkserver child inherits the environment the forkserver started with, not the
    # parent's current one: take the parent's, as a spawned process would.
    os.environ.clear()
    os.environ.update(env)
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ.get("DDPZERO_SOCKET_IFNAME", loopback_interface())
    os.environ.setdefault("NCCL_SOCKET_IFNAME", os.environ["GLOO_SOCKET_IFNAME"])
    # Set once, before any parallel op: changing the thread count later slows every op.
    torch.set_num_threads(threads)

    channel = _Channel(conn)
    state = _State()
    if _CANCEL_SIGNAL is not None:

        def _on_cancel(signum, frame):
            # Only a cancel for the job whose fn runs right now interrupts, and only once; a
            # late one is dropped.
            job = state.current_job
            if job is not None and state.in_fn and job in state.cancelled:
                if state.delivered != job:
                    state.delivered = job
                    raise JobCancelled()

        signal.signal(_CANCEL_SIGNAL, _on_cancel)

    tasks: queue.SimpleQueue = queue.SimpleQueue()
    main_thread = threading.main_thread().ident

    def reader() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                # The parent is gone (kernel died or was killed): nobody can use us any more.
                os._exit(0)
            except Exception:  # noqa: BLE001
                # An unreadable message: the stream is out of step and nothing after it can be
                # trusted. End; the parent sees the death and replaces this worker.
                os._exit(70)
            if isinstance(message, Task):
                tasks.put(message)
            elif isinstance(message, Cancel):
                with state.lock:
                    state.cancelled.add(message.job_id)
                    running = state.current_job == message.job_id
                if running and _CANCEL_SIGNAL is not None:
                    signal.pthread_kill(main_thread, _CANCEL_SIGNAL)
            elif isinstance(message, Where):
                try:
                    channel.send(WhereReply(message.token, rank, main_thread_frames()))
                except (OSError, ValueError):
                    pass
            elif isinstance(message, Shutdown):
                tasks.put(None)
                return

    # Started before the rendezvous: if the parent dies while this rank waits for its peers,
    # the pipe's end-of-file still ends it (the forkserver, its parent, may live on).
    threading.Thread(target=reader, name="ddpzero-reader", daemon=True).start()
    try:
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(rank)
            dev = torch.device("cuda", rank)
        else:
            dev = torch.device("cpu")
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": dev} if backend == "nccl" else {}),
        )
        context.set_context(context.RankContext(rank, world_size, dev, backend))
        flight.install(flight_path(store_path, rank))
        if sys.platform.startswith("linux"):
            # DataLoader workers inside a rank: fork them, as under torchrun, so that a
            # Dataset defined in a notebook cell (known only by value) reaches them.
            multiprocessing.set_start_method("fork", force=True)
        telemetry.set_sink(channel.send_event)
    except BaseException:
        channel.send(StartupError(rank, traceback.format_exc()))
        os._exit(1)

    channel.send(
        Ready(
            rank,
            {
                "pid": os.getpid(),
                "device": str(dev),
                "backend": backend,
                "threads": torch.get_num_threads(),
                "time": time.time(),
            },
        )
    )

    while True:
        task = tasks.get()
        if task is None:
            break
        try:
            status, out = _run_task(task.job_id, task.payload, rank, channel, state)
        except BaseException as exc:  # noqa: BLE001 - a bug here must still answer the parent
            status, out = (
                "error",
                {
                    "type": type(exc).__name__,
                    "message": "the worker's task loop failed (a ddpzero_lab bug)",
                    "traceback": traceback.format_exc(),
                    "exception": None,
                },
            )
        channel.send(Result(task.job_id, rank, status, out, _sequence_number()))
    # Skip interpreter teardown: nothing to flush, and a peer may already be gone.
    os._exit(0)


def _run_task(
    job_id: int, payload: bytes, rank: int, channel: _Channel, state: _State
) -> tuple[str, Any]:
    with state.lock:
        if job_id in state.cancelled:
            return "cancelled", None
        # Set under the lock that the reader takes to decide whether a cancel must interrupt.
        state.current_job = job_id
    try:
        # Start the native-stderr file afresh: what a rank leaves there when it dies must be
        # from this job (writes append at the new end: the file is open with O_APPEND).
        os.ftruncate(2, 0)
    except OSError:
        pass
    status, out = "cancelled", None
    saved_streams = sys.stdout, sys.stderr
    channel.job = job_id
    recorder = flight.recorder
    if recorder is not None:
        recorder.job_started(job_id)
    sys.stdout = _RankStream(channel, "stdout", saved_streams[0])
    sys.stderr = _RankStream(channel, "stderr", saved_streams[1])
    try:
        try:
            fn, args, kwargs = cloudpickle.loads(payload)
            state.in_fn = True
            value = fn(*args, **kwargs)
            state.in_fn = False
            status, out = "ok", value
        except JobCancelled:
            state.in_fn = False
            status, out = "cancelled", None
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            state.in_fn = False
            status, out = "error", _describe_exception(exc)
        finally:
            state.in_fn = False
            state.current_job = None
    except JobCancelled:
        # The cancel signal landed between fn's return and the reset above: keep the outcome.
        state.current_job = None
    if recorder is not None:
        recorder.job_ended(status)
    # What the job set up for itself alone (injected faults) ends with it.
    context.run_job_end_hooks()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    sys.stdout, sys.stderr = saved_streams
    channel.job = None
    if status == "ok":
        try:
            out = cloudpickle.dumps(out)
        except Exception as exc:  # noqa: BLE001
            status = "error"
            out = {
                "type": "PicklingError",
                "message": (
                    f"the value fn returned on rank {rank} ({type(out).__name__}) cannot be "
                    f"pickled ({type(exc).__name__}: {exc}); return numbers, strings, CPU "
                    f"tensors or lists/dicts of them"
                ),
                "traceback": "",
                "exception": None,
            }
    return status, out
