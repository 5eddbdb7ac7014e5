"""Instrumented collectives: torch.distributed's ops, counted and reported.

This module owns the per-rank traffic counters (`traffic()`, `reset_traffic()`) and the
wrappers `broadcast`, `all_reduce`, `reduce_scatter` (tensor form), `all_gather` (tensor
form), `send`, `recv`, `barrier`. Each has torch.distributed's signature plus an optional
`tag` (a bucket or parameter name for the dashboards), runs the real collective, and

  * adds to this rank's counters under its op: calls, payload bytes, bytes sent and received
    (by the model in `cost_model.py`: ring or chain, see there), wall seconds;
  * emits a `collective` telemetry event: op, bytes, sent, recv, start, end, seq, tag, and
    `fallback` when the backend lacked the op for this dtype and a substitute ran;
  * numbers the op: `seq` counts this rank's ops on the op's process group, from 1, in call
    order, point-to-point included (as torch's own per-group sequence number does), so the
    k-th op of one rank is meant to meet the k-th op of the others;
  * keeps the flight record (`flight.py`): which op the rank waits in, since when,
    and the last one it left, so that the cluster can say who waits where when a job hangs.

An async call (`async_op=True`) returns a handle whose `wait()` completes the measurement:
the op is counted, and its seconds run from the call to when the op completed.

On a GPU the host's clock cannot time an op: NCCL returns as soon as the op is queued on its
stream, so host times are launch times. An op on CUDA tensors is timed with CUDA events
instead: one on the caller's stream just before the op is issued (`launched`: the op cannot
start before the work queued ahead of it), one on a stream that waits for the op (`ended`),
and one where the caller's stream starts to wait for it (`waited`). Its calls and bytes are
counted when it completes as on the CPU; its `seconds` and its `collective` event (with
`timing="cuda_event"`, and the launch times as `host_start`/`host_end`) wait until its events
are converted to the host clock, once per step (when a `step` event is emitted, whose `comm_s`
and `exposed_comm_s` they then replace: see `_amend_step`), or when `traffic()` or
`flush_gpu_timing()` is called; reading an op's events waits for that op to end on the GPU.
CPU and gloo ops are timed by the host as before. The counters hold
the *model's* bytes of the op asked for, also when a fallback ran (the event says which), so
that lesson figures compare with the formulas; `ring.py` measures real bytes of its own rings.

On gloo (CPU), `reduce_scatter` runs as a pairwise exchange (one all-to-all, then each rank
reduces the N chunks it received) and `all_gather` as one broadcast per rank: the same bytes per
rank as the ring, and faster than gloo's own ops, which ZeRO's step time depends on.

It does not know about buckets, shards or models: callers pass a tag. `set_fault_hook` lets
`ddpzero_lab.faults` skip or delay an op on purpose; unset (the default) it costs one test.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from .. import telemetry
from . import flight, link
from .cost_model import bytes_source, traffic_model

_FIELDS = ("calls", "bytes", "sent", "recv", "seconds")
_lock = threading.Lock()
_counters: dict[str, dict[str, float]] = {}
# The same, per process group ("world" or the group's ranks, e.g. "0,2"): a mesh's groups.
_by_group: dict[str, dict[str, dict[str, float]]] = {}
# Per process group: (a counter of its ops, its ranks as the flight record names them).
_sequences: dict[Any, tuple[Any, str]] = {}
# Set by ddpzero_lab.faults while a fault on ops is armed: hook(op, tag, async_op, issue).
_fault_hook: Callable | None = None
# (op, dtype, backend) combinations the backend refused; the fallback runs at once next time.
_unsupported: set[tuple[str, torch.dtype, str]] = set()


def _labelled(counters: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    return {op: {**values, "source": bytes_source(op)} for op, values in counters.items()}


def traffic() -> dict[str, dict[str, Any]]:
    """This rank's counters: {op: {"calls", "bytes", "sent", "recv", "seconds", "source"}}
    (a copy). "source" says what the byte figures are: "model" or "payload" (bytes_source).

    On a GPU, ops still waiting for their CUDA events to be read are read first (a sync)."""
    if _gpu_pending:
        flush_gpu_timing()
    with _lock:
        return _labelled(_counters)


def traffic_by_group() -> dict[str, dict[str, dict[str, Any]]]:
    """This rank's counters per process group: {"world" or the group's ranks ("0,2"): {op:
    {"calls", "bytes", "sent", "recv", "seconds", "source"}}} (a copy): a mesh's data- and
    tensor-parallel traffic apart."""
    if _gpu_pending:
        flush_gpu_timing()
    with _lock:
        return {g: _labelled(ops) for g, ops in _by_group.items()}


def reset_traffic() -> None:
    """Zero this rank's counters."""
    if _gpu_pending:
        flush_gpu_timing()
    with _lock:
        _counters.clear()
        _by_group.clear()


def next_seq(group=None) -> tuple[int, str]:
    """Number the next op on `group` (None: the default group): (seq from 1, group label).

    The label is "" for the default group and its ranks ("0,2") for any other, so that a
    flight record says which group's count a number belongs to.
    """
    key = dist.group.WORLD if group is None else group
    entry = _sequences.get(key)
    if entry is None:
        label = ""
        if key is not dist.group.WORLD:
            label = ",".join(map(str, dist.get_process_group_ranks(key)))
        entry = _sequences.setdefault(key, (itertools.count(1), label))
    return next(entry[0]), entry[1]  # next() on a count is atomic under the GIL


def set_fault_hook(hook: Callable | None) -> None:
    """Route every op through hook(op, tag, async_op, issue) (None: straight through).

    issue() runs the op as usual and returns what the wrapper returns; the hook may call it
    now, later, or never. For ddpzero_lab.faults only.
    """
    global _fault_hook
    _fault_hook = hook


def _status_of(exc: BaseException) -> int:
    text = str(exc).lower()
    return flight.TIMED_OUT if "timed out" in text or "timeout" in text else flight.FAILED


def record(
    op: str,
    nbytes: int,
    sent: int,
    recv: int,
    start: float,
    end: float,
    tag: str | None = None,
    seq: int | None = None,
    **extra: Any,
) -> None:
    """Count one completed op and emit its `collective` event (also used by ring.py).

    `seq` is the op's number from `next_seq`; an op that comes without one (ring.py's,
    built from send/recv on the default group) is numbered there when it completes.
    """
    if seq is None:
        seq = next_seq()[0]
    _count(op, nbytes, sent, recv, end - start, group=extra.get("group", ""))
    _emit_collective(op, nbytes, sent, recv, start, end, tag, seq, **extra)


def _emit_collective(op, nbytes, sent, recv, start, end, tag, seq, **extra) -> None:
    """The `collective` event of one op (host-timed here, CUDA-timed by flush_gpu_timing)."""
    telemetry.emit(
        "collective",
        op=op,
        bytes=nbytes,
        sent=sent,
        recv=recv,
        start=start,
        end=end,
        seq=seq,
        tag=tag,
        **extra,
    )


def _count(
    op: str, nbytes: int, sent: int, recv: int, seconds: float, calls: int = 1, group: str = ""
) -> None:
    with _lock:
        for table in (_counters, _by_group.setdefault(group or "world", {})):
            entry = table.setdefault(op, dict.fromkeys(_FIELDS, 0))
            entry["calls"] += calls
            entry["bytes"] += nbytes
            entry["sent"] += sent
            entry["recv"] += recv
            entry["seconds"] += seconds


# --- CUDA-event timing ----------------------------------------------------------------------


def _timed_on_gpu(tensor: torch.Tensor) -> bool:
    """Whether an op on `tensor` is timed with CUDA events (a seam for the CPU tests)."""
    return tensor.is_cuda


def _record_event(device):
    """A new CUDA event recorded on `device`'s current stream (a seam: the CPU tests hand out
    fake events here). In a completion callback of a CUDA future the current stream is one
    that waits for the op (torch runs such callbacks on streams made to wait for the work)."""
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


class GpuTimes:
    """The CUDA events of one op (see the module docstring): `launched`, `waited`, `ended`."""

    __slots__ = ("device", "launched", "waited", "ended")

    def __init__(self, device=None) -> None:
        self.device = device
        self.launched = _record_event(device)
        self.waited = None
        self.ended = None

    def mark_waited(self) -> None:
        if self.waited is None:
            self.waited = _record_event(self.device)

    def mark_ended(self) -> None:
        """Record `ended` on the current stream: after a blocking op or a handle's wait() the
        caller's, which then waits for the op; in the handle's completion callback, a stream
        that waits for the op. Either way it fires when the op has completed."""
        if self.ended is None:
            self.ended = _record_event(self.device)


class GpuClock:
    """Host seconds of CUDA events: an anchor event whose host time is known (it was recorded,
    then waited for, so that it fired when the host read its clock), and the GPU's elapsed
    time from any event to it."""

    def __init__(self, anchor, host_time: float) -> None:
        self.anchor = anchor
        self.host_time = host_time

    @classmethod
    def now(cls, device=None) -> GpuClock:
        anchor = _record_event(device)
        anchor.synchronize()
        return cls(anchor, time.time())

    def to_host(self, event) -> float:
        # elapsed_time is in ms, from `event` to the anchor: positive for an earlier event
        return self.host_time - event.elapsed_time(self.anchor) / 1e3


# One anchor per device (events time only their own device's), made again after
# _CLOCK_REFRESH_S: making one waits for the device's current stream to drain, which a step
# should not pay for each time; between anchors the GPU's and the host's clocks drift apart by
# parts per million, microseconds over the refresh period.
_clocks: dict[Any, GpuClock] = {}
_CLOCK_REFRESH_S = 10.0


def _clock_for(device) -> GpuClock:
    clock = _clocks.get(device)
    if clock is None or time.time() - clock.host_time > _CLOCK_REFRESH_S:
        clock = _clocks[device] = GpuClock.now(device)
    return clock


def _union_seconds(intervals) -> float:
    """The length of the union of (start, end) intervals."""
    total, cursor = 0.0, float("-inf")
    for start, end in sorted(intervals):
        start = max(start, cursor)
        if end > start:
            total += end - start
            cursor = end
    return total


def gpu_step_figures(window) -> tuple[float, float]:
    """(comm_s, exposed_comm_s) of a step from its ops' host-clock (start, end, waited) times.

    comm_s is the union of the ops' intervals. An op is exposed from the moment the caller's
    stream begins to wait for it (`waited`: at once for a blocking op) until it ends: the
    compute stream stands still then. exposed_comm_s is the union of those stretches.
    """
    comm_s = _union_seconds((start, end) for start, end, _ in window)
    exposed = _union_seconds((max(start, waited), end) for start, end, waited in window)
    return comm_s, exposed


# Ops on CUDA tensors that completed, counted but not yet timed: (op, nbytes, sent, recv, tag,
# seq, extra, GpuTimes, host start, host end). Read out once per step: a long job keeps few.
_gpu_pending: list[tuple] = []
# Host-clock (start, end, waited) of the GPU ops read out since the last step event.
_gpu_window: list[tuple[float, float, float]] = []
_GPU_PENDING_CAP = 4096  # read out early past this many (a loop with no step events)


def _record_gpu(op, nbytes, sent, recv, tag, seq, extra, gpu: GpuTimes, start, end) -> None:
    _count(op, nbytes, sent, recv, 0.0, group=extra.get("group", ""))
    with _lock:
        _gpu_pending.append((op, nbytes, sent, recv, tag, seq, extra, gpu, start, end))
        full = len(_gpu_pending) >= _GPU_PENDING_CAP
    if full:
        flush_gpu_timing()


def flush_gpu_timing() -> int:
    """Convert the CUDA events of the ops that completed to host seconds, add them to the
    counters and emit their `collective` events; returns how many ops it read. On a CPU there
    is nothing to do. Waits for those ops to end on the GPU (they have: they were waited for)."""
    with _lock:
        pending = _gpu_pending[:]
        _gpu_pending.clear()
    if not pending:
        return 0
    for op, nbytes, sent, recv, tag, seq, extra, gpu, host_start, host_end in pending:
        clock = _clock_for(gpu.device)
        gpu.ended.synchronize()  # waits for this op only, not for the compute queued after it
        start, end = clock.to_host(gpu.launched), clock.to_host(gpu.ended)
        waited = clock.to_host(gpu.waited) if gpu.waited is not None else start
        _count(op, 0, 0, 0, end - start, calls=0, group=extra.get("group", ""))
        with _lock:
            _gpu_window.append((start, end, waited))
        _emit_collective(
            op,
            nbytes,
            sent,
            recv,
            start,
            end,
            tag,
            seq,
            timing="cuda_event",
            host_start=host_start,
            host_end=host_end,
            **extra,
        )
    return len(pending)


def _amend_step(fields: dict[str, Any]) -> dict[str, Any]:
    """A `step` event on a GPU: its ops' CUDA-event times replace the host's launch times in
    comm_s and exposed_comm_s (kept as host_comm_s and host_exposed_comm_s); `launch_times`
    names the fields that remain host launch times. On a CPU, no op is pending and the event
    is left as it is."""
    if not _gpu_pending and not _gpu_window:
        return fields
    flush_gpu_timing()
    with _lock:
        window = _gpu_window[:]
        _gpu_window.clear()
    if not window:
        return fields
    comm_s, exposed = gpu_step_figures(window)
    amended = dict(fields)
    if "comm_s" in fields:
        amended["host_comm_s"] = fields["comm_s"]
    if "exposed_comm_s" in fields:
        amended["host_exposed_comm_s"] = fields["exposed_comm_s"]
    amended.update(comm_s=comm_s, exposed_comm_s=exposed, timing="cuda_event")
    # the compute figures are still the host's: on a GPU, the times it queued the work
    amended["launch_times"] = [
        name for name in ("compute_s", "forward_start", "backward_end") if name in fields
    ]
    return amended


telemetry.set_amender("step", _amend_step)


class TimedWork:
    """The handle of an async op: `wait()` waits for the op, then counts it.

    The op's `end` is when it really completed (a callback on the backend's future marks
    it), not when somebody got round to waiting: a timeline then shows how much of the
    communication backward hid. On a GPU that callback runs when the op is queued, so there
    the end is a CUDA event recorded in it, on a stream that waits for the op (`GpuTimes`).
    """

    def __init__(
        self,
        work,
        on_done,
        flight_entry: tuple | None = None,
        gpu=None,
        not_before: float | None = None,
    ) -> None:
        self._work = work
        self._on_done = on_done
        self._counted = False
        self._not_before = not_before  # an emulated link's completion time (link.py)
        # (op, seq, tag, group, peer): what the flight record says this rank waits in
        self._flight_entry = flight_entry
        self._gpu = gpu
        self.completed_at: float | None = None
        if work is not None:
            try:
                work.get_future().add_done_callback(self._mark)
            except (AttributeError, RuntimeError):
                pass  # no future for this op on this backend: wait() marks the end

    def _mark(self, _future) -> None:
        self.completed_at = time.time()
        if self._gpu is not None:
            self._gpu.mark_ended()

    def wait(self, timeout=None) -> bool:
        if self._work is not None:
            if self._gpu is not None:
                self._gpu.mark_waited()  # the caller's stream stands still from here
            rec = flight.recorder if self._flight_entry is not None else None
            if rec is not None:
                rec.entered(*self._flight_entry)
            started = time.time()
            try:
                if timeout is None:
                    self._work.wait()
                else:
                    self._work.wait(timeout)
            except BaseException as exc:
                if rec is not None:
                    rec.left(*self._flight_entry, started, _status_of(exc))
                raise
            if rec is not None:
                rec.left(*self._flight_entry, started)
        if self._gpu is not None:
            # no future callback ran: after wait() the caller's stream waits for the op
            self._gpu.mark_waited()
            self._gpu.mark_ended()
        real_end = self.completed_at or time.time()
        if self._not_before is not None:
            link.sleep_until(self._not_before)  # the emulated link is still busy with it
        if not self._counted:
            self._counted = True
            self._on_done(real_end)
        return True

    def is_completed(self) -> bool:
        if self._not_before is not None and time.time() < self._not_before:
            return False
        return self._work is None or self._work.is_completed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


# --- argument checks: clear errors before anything is sent ------------------------------


def _group_info(group) -> tuple[int, int, str]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "no process group: call this inside a LiveCluster job (cluster.run(fn)) or after "
            "torch.distributed.init_process_group"
        )
    return dist.get_world_size(group), dist.get_rank(group), dist.get_backend(group)


def backend_device(group=None) -> torch.device:
    """The device a tensor handed to a collective of `group` (None: the default group) must
    live on: this rank's GPU under nccl (which moves only CUDA tensors), else the CPU.

    Every tensor made only to be communicated (a flag, a mask, a counter, a probe's message)
    is made here, not on a hard-coded device: tests/test_device_placement.py runs each path
    that issues a collective with a pretend-NCCL check that refuses tensors made elsewhere.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        index = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(index) if index else torch.cuda.current_device())
    return torch.device("cpu")


def _check_tensor(name: str, tensor: Any) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (it is a strided view): pass t.contiguous() and copy "
            "the result back"
        )


def _check_pair(output: torch.Tensor, input: torch.Tensor, factor_out: int, op: str) -> None:
    _check_tensor("output", output)
    _check_tensor("input", input)
    if output.dtype != input.dtype:
        raise TypeError(f"{op}: output dtype {output.dtype} must equal input dtype {input.dtype}")
    if output.device != input.device:
        raise ValueError(f"{op}: output is on {output.device} but input on {input.device}")
    if factor_out > 0 and output.numel() != factor_out * input.numel():
        raise ValueError(
            f"{op}: output must have world_size x input elements "
            f"({factor_out} x {input.numel()} = {factor_out * input.numel()}), "
            f"got {output.numel()}"
        )
    if factor_out < 0 and input.numel() != -factor_out * output.numel():
        raise ValueError(
            f"{op}: input must have world_size x output elements "
            f"({-factor_out} x {output.numel()} = {-factor_out * output.numel()}), "
            f"got {input.numel()}"
        )


def _check_peer(name: str, peer: Any, group=None, not_itself: bool = False) -> int:
    """`peer` is a global rank, as torch.distributed takes it, of a member of `group`;
    returns its rank within the group."""
    if group is None:
        members = list(range(dist.get_world_size()))
        allowed = f"a rank in 0..{len(members) - 1}"
    else:
        members = dist.get_process_group_ranks(group)
        allowed = f"one of the group's ranks {members}"
    if isinstance(peer, bool) or not isinstance(peer, int) or peer not in members:
        raise ValueError(f"{name} must be {allowed}, got {peer!r}")
    if not_itself and peer == dist.get_rank():
        raise ValueError(f"{name}={peer} is this rank itself: a rank cannot message itself")
    return members.index(peer)


# --- the machinery shared by every wrapper ----------------------------------------------


def _unsupported_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(m in text for m in ("not supported", "unsupported", "does not support"))


def _launch(
    op: str,
    tensor: torch.Tensor,
    numel: int,
    group,
    async_op: bool,
    tag: str | None,
    native,
    fallbacks,
    src: int = 0,
    peer: int | None = None,
):
    """Run `native` (or the first fallback that works), then count the op.

    native() and each fallback() take async_op and return a Work or None. `fallbacks` is a
    list of (name, fn) tried in order when the backend says the op is unsupported. `peer` is
    the other rank of a send or recv (for the flight record).
    """
    issue = partial(_issue, op, tensor, numel, group, async_op, tag, native, fallbacks, src, peer)
    if _fault_hook is not None:
        return _fault_hook(op, tag, async_op, issue)
    return issue()


def _issue(op, tensor, numel, group, async_op, tag, native, fallbacks, src, peer):
    world_size, rank, backend = _group_info(group)
    sent, recv = traffic_model(op, numel, tensor.element_size(), world_size, rank, src)
    nbytes = numel * tensor.element_size()
    # Numbered when issued, not when completed: the k-th op of every rank must be the same
    # op, and that is the order the ranks issue them in.
    seq, group_label = next_seq(group)
    entry = (op, seq, tag, group_label, peer)
    # A blocking op blocks inside native(); an async one only in its handle's wait().
    rec = flight.recorder if not async_op else None
    gpu = GpuTimes(tensor.device) if _timed_on_gpu(tensor) else None
    start = time.time()
    emulator = link.current()
    # an emulated link (link.py): the op is done no earlier than the link would finish it
    not_before = None
    if emulator is not None and world_size > 1:
        not_before = emulator.complete_at(op, nbytes, world_size, start)
    if rec is not None:
        rec.entered(*entry)
    try:
        if not_before is not None and op == "send" and not async_op:
            # a message reaches its receiver once the sender's link has carried it: hand it
            # over then, so the receiver's recv cannot end before the link delivered it
            link.sleep_until(not_before)
        work, used = _run_native(op, tensor, backend, async_op, native, fallbacks)
        if work is not None and not async_op:
            work.wait()
        real_end = time.time()
        if not_before is not None and not async_op:
            link.sleep_until(not_before)
    except BaseException as exc:
        if rec is not None:
            rec.left(*entry, start, _status_of(exc))
        raise
    if rec is not None:
        rec.left(*entry, start)

    extra = {"fallback": used} if used else {}
    if group_label:
        extra["group"] = group_label  # counted per group too (traffic_by_group)

    def done(end: float) -> None:
        if gpu is not None:
            _record_gpu(op, nbytes, sent, recv, tag, seq, extra, gpu, start, end)
        elif not_before is None:
            record(op, nbytes, sent, recv, start, end, tag, seq, **extra)
        else:  # the emulated link's time counts; the real end is kept beside it
            emulated = max(end, not_before)
            desc = emulator.link.describe()  # what a picture of these times must say
            record(
                op, nbytes, sent, recv, start, emulated, tag, seq, real_end=end, link=desc, **extra
            )

    if async_op and work is not None:
        return TimedWork(work, done, entry, gpu, not_before)
    if gpu is not None:
        # a blocking op (or a synchronous fallback): the caller's stream waits from the launch,
        # and an event recorded on it now fires when the op has ended
        gpu.waited = gpu.launched
        gpu.mark_ended()
    if async_op:
        return TimedWork(None, done, entry, gpu, not_before)
    done(real_end)
    return None


def _run_native(op, tensor, backend, async_op, native, fallbacks):
    """(work or None, the fallback's name or None)."""
    key = (op, tensor.dtype, backend)
    if key not in _unsupported:
        try:
            return native(async_op), None
        except RuntimeError as exc:
            if not fallbacks or not _unsupported_error(exc):
                raise
            _unsupported.add(key)
    # The substitutes are run synchronously: they are for correctness, not speed.
    last: BaseException | None = None
    for name, fallback in fallbacks:
        try:
            fallback()
            return None, name
        except RuntimeError as exc:
            last = exc
    raise RuntimeError(f"{op} is not supported by {backend} for {tensor.dtype}") from last


def _blocking(fn, *args, **kwargs) -> None:
    """Run a blocking point-to-point call; it returns no handle (recv returns the source)."""
    fn(*args, **kwargs)


def _via_float32(tensor: torch.Tensor, run) -> None:
    """Run a collective on a float32 copy and write the result back (dtype fallback)."""
    wide = tensor.float()
    run(wide)
    tensor.copy_(wide)


# --- the wrappers ---------------------------------------------------------------------------


def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False, tag=None):
    """torch.distributed.all_reduce, counted (ring model: 2(N-1)/N·B each way)."""
    _check_tensor("tensor", tensor)
    return _launch(
        "all_reduce",
        tensor,
        tensor.numel(),
        group,
        async_op,
        tag,
        lambda a: dist.all_reduce(tensor, op=op, group=group, async_op=a),
        [("float32", lambda: _via_float32(tensor, lambda t: dist.all_reduce(t, op, group)))],
    )


def broadcast(tensor, src, group=None, async_op=False, tag=None):
    """torch.distributed.broadcast, counted (chain model: B per hop)."""
    _check_tensor("tensor", tensor)
    _group_info(group)
    root = _check_peer("src", src, group)  # its rank in the group: the chain's start
    return _launch(
        "broadcast",
        tensor,
        tensor.numel(),
        group,
        async_op,
        tag,
        lambda a: dist.broadcast(tensor, src, group=group, async_op=a),
        [("float32", lambda: _via_float32(tensor, lambda t: dist.broadcast(t, src, group)))],
        src=root,
    )


_torch_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
# How each rank combines the N chunks it received in a pairwise reduce-scatter.
_CHUNK_REDUCE = {
    dist.ReduceOp.SUM: torch.sum,
    dist.ReduceOp.PRODUCT: torch.prod,
    dist.ReduceOp.MAX: torch.amax,
    dist.ReduceOp.MIN: torch.amin,
}


class _JoinedWork:
    """Several async ops seen as one, then local work that needs their results: `wait()`
    waits for all of them and runs `then` once."""

    def __init__(self, works: list, then: Callable[[], None] | None = None) -> None:
        self._works = works
        self._then = then

    def wait(self, timeout=None) -> bool:
        for work in self._works:
            if timeout is None:
                work.wait()
            else:
                work.wait(timeout)
        if self._then is not None:
            then, self._then = self._then, None
            then()
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self._works)

    def get_future(self):
        return self._works[-1].get_future()  # gloo completes one group's ops in order


def _reduce_scatter_native(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """The backend's reduce-scatter; on gloo, a pairwise exchange (`_pairwise_reduce_scatter`)."""
    if dist.get_backend(group) == "gloo" and op in _CHUNK_REDUCE:
        return _pairwise_reduce_scatter(output, input, op, group, async_op)
    return _torch_reduce_scatter(output, input, op=op, group=group, async_op=async_op)


def _pairwise_reduce_scatter(output, input, op, group, async_op):
    """Reduce-scatter as one all-to-all, then a local reduction of the N chunks received.

    Chunk j of every rank's input goes straight to rank j: each rank sends (N-1)/N·B, the same
    bytes as the ring's N-1 steps, in one exchange. gloo's own reduce-scatter is 1.4x (N=2) to
    2.2x (N=4) slower than this on a CPU, and slower than its all-reduce, which moves twice the
    bytes (benchmarks/zero.py, "gloo alone"). The cost: a receive buffer the size of the
    input, for the duration of the op.
    """
    n = dist.get_world_size(group)
    received = torch.empty_like(input).view(-1)
    work = dist.all_to_all_single(received, input.reshape(-1), group=group, async_op=async_op)

    def reduce_chunks() -> None:
        chunks, out = received.view(n, -1), output.view(-1)
        if op == dist.ReduceOp.SUM and n > 1:  # elementwise adds: ~1.7x faster than a sum(dim)
            torch.add(chunks[0], chunks[1], out=out)
            for chunk in chunks[2:]:
                out.add_(chunk)
        else:
            _CHUNK_REDUCE[op](chunks, 0, out=out)

    if async_op:
        return _JoinedWork([work], reduce_chunks)
    reduce_chunks()
    return None


_torch_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather_native(output, input, group=None, async_op=False):
    """The backend's all-gather; on gloo, one broadcast per rank (`_all_gather_by_broadcasts`)."""
    if dist.get_backend(group) == "gloo":
        return _all_gather_by_broadcasts(output, input, group, async_op)
    return _torch_all_gather(output, input, group=group, async_op=async_op)


def _all_gather_by_broadcasts(output, input, group, async_op):
    """All-gather as N broadcasts issued together, rank r the root of chunk r.

    gloo's broadcast goes from the root to each other rank, so each rank sends its chunk N-1
    times: (N-1)/N·B, the ring's bytes. gloo's own all-gather takes 1.4x (N=4) to 1.8x (N=2)
    as long on a CPU (benchmarks/zero.py, "gloo alone").
    """
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = output.view(-1).tensor_split(n)
    mine = input.reshape(-1)
    if chunks[rank].data_ptr() != mine.data_ptr():
        chunks[rank].copy_(mine)
    works = [
        dist.broadcast(
            chunk,
            r if group is None else dist.get_global_rank(group, r),
            group=group,
            async_op=True,
        )
        for r, chunk in enumerate(chunks)
    ]
    joined = _JoinedWork(works)
    if async_op:
        return joined
    joined.wait()
    return None


def reduce_scatter(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False, tag=None):
    """Tensor-form reduce-scatter (torch's reduce_scatter_tensor), counted: (N-1)/N·B.

    input holds world_size equal chunks; rank r receives the reduction of chunk r.
    """
    world_size, rank, _ = _group_info(group)
    _check_pair(output, input, -world_size, "reduce_scatter")

    def via_all_reduce() -> None:
        full = input.clone()
        dist.all_reduce(full, op=op, group=group)
        output.copy_(full.view(-1).tensor_split(world_size)[rank].view_as(output))

    def via_float32() -> None:
        wide_out = output.float()
        _torch_reduce_scatter(wide_out, input.float(), op=op, group=group)
        output.copy_(wide_out)

    return _launch(
        "reduce_scatter",
        input,
        input.numel(),
        group,
        async_op,
        tag,
        lambda a: _reduce_scatter_native(output, input, op=op, group=group, async_op=a),
        [("all_reduce", via_all_reduce), ("float32", via_float32)],
    )


def all_gather(output, input, group=None, async_op=False, tag=None):
    """Tensor-form all-gather (torch's all_gather_into_tensor), counted: (N-1)/N·B.

    output receives world_size chunks, chunk r being rank r's input.
    """
    world_size, _, _ = _group_info(group)
    _check_pair(output, input, world_size, "all_gather")

    def via_list() -> None:
        parts = list(output.view(-1).tensor_split(world_size))
        dist.all_gather(parts, input.reshape(-1), group=group)

    def via_float32() -> None:
        wide_out = output.float()
        _torch_all_gather(wide_out, input.float(), group=group)
        output.copy_(wide_out)

    return _launch(
        "all_gather",
        output,
        output.numel(),
        group,
        async_op,
        tag,
        lambda a: _all_gather_native(output, input, group=group, async_op=a),
        [("all_gather_list", via_list), ("float32", via_float32)],
    )


def _point_to_point(op: str, peer_name: str, call, tensor, peer, group, tag, async_op):
    """send, recv, isend and irecv: the same checks and counting, a different torch call."""
    _check_tensor("tensor", tensor)
    _group_info(group)
    _check_peer(peer_name, peer, group, not_itself=True)
    return _launch(
        op,
        tensor,
        tensor.numel(),
        group,
        async_op,
        tag,
        lambda a: call(tensor, peer, group=group),
        [],
        peer=peer,
    )


def send(tensor, dst, group=None, tag=None):
    """torch.distributed.send, counted (B sent)."""
    _point_to_point("send", "dst", partial(_blocking, dist.send), tensor, dst, group, tag, False)


def recv(tensor, src, group=None, tag=None):
    """torch.distributed.recv from a given rank, counted (B received)."""
    _point_to_point("recv", "src", partial(_blocking, dist.recv), tensor, src, group, tag, False)
    return src


def isend(tensor, dst, group=None, tag=None):
    """torch.distributed.isend, counted when the handle's wait() returns."""
    return _point_to_point("send", "dst", dist.isend, tensor, dst, group, tag, True)


def irecv(tensor, src, group=None, tag=None):
    """torch.distributed.irecv from a given rank, counted when the handle's wait() returns."""
    return _point_to_point("recv", "src", dist.irecv, tensor, src, group, tag, True)


def barrier(group=None, async_op=False, tag=None):
    """torch.distributed.barrier, counted (no payload)."""
    marker = torch.empty(0)
    return _launch(
        "barrier",
        marker,
        0,
        group,
        async_op,
        tag,
        lambda a: dist.barrier(group=group, async_op=a),
        [],
    )
