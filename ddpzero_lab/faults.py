"""Faults on purpose, for lessons and tests: a rank that dies, lags, runs slower, or skips or
reorders a collective.

Call these inside a rank, usually first thing in the job's fn, every rank alike; a fault acts
only on the rank(s) it names and the call does nothing on the others:

    def train():
        faults.delay(rank=1, seconds=0.2)      # rank 1 is a straggler: +0.2 s every step
        model, optimizer = dzl.parallelize(...)
        ...

    cluster.run(train)

| call                                        | on rank r                                      |
|---------------------------------------------|------------------------------------------------|
| kill(rank=r, at_step=k)                     | dies (SIGKILL) right after step k              |
| delay(rank=r, seconds=s)                    | sleeps s seconds after every step (a straggler)|
| slow(rank=r, factor=f)                      | sleeps (f-1) x its own compute time every step |
|                                             | (a machine f times slower)                     |
| skip_collective(rank=r, op="all_reduce", nth=n) | does not issue its n-th all_reduce         |
| reorder(rank=r, nth=n, op=None)             | issues its n-th op after the op that follows it|

Steps are the `step` telemetry events the strategies emit, one per optimizer step (DDP at the
end of backward, ZeRO at the end of step()), numbered from 0; a hand-written loop can emit its
own: `dzl.emit("step", step=k, compute_s=...)`. Ops are those issued through ddpzero_lab.comm
(every strategy's), counted from the moment the fault is set; raw torch.distributed calls are
not seen.

Each call returns a `Fault`: `fault.remove()` ends it early, and it is a context manager. A
fault lasts at most until the end of the job that set it, so a cluster is never left with a
fault that a later job did not ask for. Faults cost nothing when none is set: the telemetry
sink and comm/'s hook are only replaced while one is.

What the learner then sees, in the RankError of the job: which rank waits in which collective
(op, sequence number, tag) and where the others are (see cluster/flight.py), followed by the
faults that fired (they also arrive as `fault` events on job.events).
"""

from __future__ import annotations

import os
import signal as _signal
import threading
import time
from numbers import Real

from . import telemetry
from .cluster import context
from .comm import collectives

__all__ = [
    "Fault",
    "OPS",
    "active",
    "clear",
    "delay",
    "kill",
    "reorder",
    "skip_collective",
    "slow",
]

OPS = ("all_reduce", "broadcast", "reduce_scatter", "all_gather", "send", "recv", "barrier")

_lock = threading.RLock()
_step_faults: list[_StepFault] = []
_op_faults: list[_OpFault] = []
_held: list[_HeldOp] = []  # ops a reorder holds back until the next op has been issued
_saved_sink = None  # the telemetry sink in place before the first step fault


class Fault:
    """One fault, set on this rank (or a no-op on ranks it does not name)."""

    kind = "fault"

    def __init__(self, ranks: tuple[int, ...], description: str) -> None:
        self.ranks = ranks
        self.description = description
        self.armed = context.rank() in ranks

    def remove(self) -> None:
        """End this fault now (idempotent)."""
        with _lock:
            self.armed = False
            _disarm(self)

    def __enter__(self) -> Fault:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "armed" if self.armed else "off"
        return f"<Fault {self.description} ({state} on rank {context.rank()})>"


def _announce(kind: str, text: str) -> None:
    # A `fault` event: on job.events, and listed in the RankError of a job that fails.
    telemetry.emit("fault", fault=kind, text=text)


# --- faults keyed on step events -------------------------------------------------------------


class _StepFault(Fault):
    def __init__(self, ranks, description, at_step) -> None:
        super().__init__(ranks, description)
        self.at_step = at_step

    def due(self, step) -> bool:
        return self.at_step is None or step == self.at_step

    def on_step(self, event: telemetry.Event) -> None:
        raise NotImplementedError

    def when(self) -> str:
        return "every step" if self.at_step is None else f"step {self.at_step}"


class _Kill(_StepFault):
    kind = "kill"

    def __init__(self, ranks, at_step, sig) -> None:
        super().__init__(ranks, f"kill(rank={_show(ranks)}, at_step={at_step})", at_step)
        self.sig = sig

    def on_step(self, event) -> None:
        name = _signal.Signals(self.sig).name
        text = f"rank {event.rank} killed itself with {name} after step {event['step']}"
        _announce(self.kind, text)
        # Last words on the native stderr: the cluster quotes them under the dead rank.
        try:
            os.write(2, f"ddpzero_lab.faults.kill: {text} (an injected fault)\n".encode())
        except OSError:
            pass
        os.kill(os.getpid(), self.sig)
        time.sleep(5)  # a catchable signal may take a moment; never go on as if alive
        os._exit(128 + self.sig)


class _Delay(_StepFault):
    kind = "delay"

    def __init__(self, ranks, seconds, at_step) -> None:
        super().__init__(ranks, f"delay(rank={_show(ranks)}, seconds={seconds:g})", at_step)
        self.seconds = seconds
        if self.armed:
            _announce(self.kind, f"rank {context.rank()} sleeps {seconds:g} s after {self.when()}")

    def on_step(self, event) -> None:
        time.sleep(self.seconds)


class _Slow(_StepFault):
    kind = "slow"

    def __init__(self, ranks, factor, at_step) -> None:
        super().__init__(ranks, f"slow(rank={_show(ranks)}, factor={factor:g})", at_step)
        self.factor = factor
        if self.armed:
            _announce(
                self.kind,
                f"rank {context.rank()} runs {factor:g}x slower: it sleeps {factor - 1:g}x its "
                f"compute time after {self.when()}",
            )

    def on_step(self, event) -> None:
        compute_s = event.get("compute_s") or 0.0
        time.sleep(max(0.0, (self.factor - 1.0) * float(compute_s)))


def _on_event(event: telemetry.Event) -> None:
    """The telemetry sink while a step fault is set: deliver first, then act."""
    _saved_sink(event)
    if event.kind != "step":
        return
    for fault in list(_step_faults):
        if fault.armed and fault.due(event.get("step")):
            fault.on_step(event)


# --- faults keyed on comm/'s ops ---------------------------------------------------------------


class _OpFault(Fault):
    def __init__(self, ranks, description, op, nth, tag) -> None:
        super().__init__(ranks, description)
        self.op, self.nth, self.tag = op, nth, tag
        self.seen = 0

    def matches(self, op: str, tag) -> bool:
        return (self.op is None or op == self.op) and (self.tag is None or tag == self.tag)

    def what(self, op: str, tag) -> str:
        """'its 3rd all_reduce (tag bucket0)', 'its 2nd op, a broadcast (tag bucket_order)'"""
        tagged = f" (tag {tag})" if tag else ""
        if self.op is None:
            article = "an" if op[0] in "aeiou" else "a"
            return f"its {_ordinal(self.nth)} op, {article} {op}{tagged},"
        return f"its {_ordinal(self.nth)} {op}{tagged}"

    def fire(self, op, tag, async_op, issue):
        raise NotImplementedError


class _Skip(_OpFault):
    kind = "skip_collective"

    def fire(self, op, tag, async_op, issue):
        _announce(self.kind, f"rank {context.rank()} skipped {self.what(op, tag)}")
        return _DoneWork() if async_op else None


class _Reorder(_OpFault):
    kind = "reorder"

    def fire(self, op, tag, async_op, issue):
        _announce(
            self.kind,
            f"rank {context.rank()} held back {self.what(op, tag)} and issued it after the "
            "op that followed it",
        )
        held = _HeldOp(issue, async_op)
        _held.append(held)
        # A blocking op returns at once, its tensors not yet reduced: what a caller that
        # issues its collectives in another order than its peers would see.
        return held if async_op else None


class _DoneWork:
    """The handle of an op that was skipped: already complete, nothing to wait for."""

    def __init__(self) -> None:
        self.completed_at = time.time()

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class _HeldOp:
    """An async op a reorder holds back: issued after the next op, or at wait() if no op
    comes first. It stands in for the op's handle."""

    def __init__(self, issue, async_op) -> None:
        self._issue = issue
        self._async = async_op
        self._work = None
        self.issued = False

    def release(self) -> None:
        if not self.issued:
            self.issued = True
            self._work = self._issue()

    def wait(self, timeout=None) -> bool:
        self.release()
        return self._work.wait(timeout) if self._work is not None else True

    def is_completed(self) -> bool:
        return self.issued and (self._work is None or self._work.is_completed())

    @property
    def completed_at(self):
        return getattr(self._work, "completed_at", None)


def _on_op(op, tag, async_op, issue):
    """comm/'s hook while an op fault is set or an op is held back."""
    with _lock:
        for fault in list(_op_faults):
            if fault.armed and fault.matches(op, tag):
                fault.seen += 1
                if fault.seen == fault.nth:
                    fault.armed = False  # each of these fires once
                    _op_faults.remove(fault)
                    result = fault.fire(op, tag, async_op, issue)
                    _update_hooks()
                    return result
        held = list(_held)
        _held.clear()
    result = issue()
    for op_held in held:  # after the op that followed them: the swap
        op_held.release()
    _update_hooks()
    return result


# --- arming and disarming --------------------------------------------------------------------


def _arm(fault: Fault) -> Fault:
    if not fault.armed:
        return fault  # another rank's fault: nothing to do here
    with _lock:
        (_step_faults if isinstance(fault, _StepFault) else _op_faults).append(fault)
        _update_hooks()
    return fault


def _disarm(fault: Fault) -> None:
    for registry in (_step_faults, _op_faults):
        if fault in registry:
            registry.remove(fault)
    _update_hooks()


def _update_hooks() -> None:
    """Install the sink and the comm hook while a fault needs them, and only then."""
    global _saved_sink
    with _lock:
        if _step_faults and _saved_sink is None:
            _saved_sink = telemetry._sink  # wrapped, not replaced: events still reach the parent
            telemetry.set_sink(_on_event)
        elif not _step_faults and _saved_sink is not None:
            if telemetry._sink is _on_event:
                telemetry.set_sink(_saved_sink)
            _saved_sink = None
        collectives.set_fault_hook(_on_op if (_op_faults or _held) else None)


def active() -> list[Fault]:
    """The faults set on this rank now."""
    with _lock:
        return [*_step_faults, *_op_faults]


def clear() -> None:
    """End every fault on this rank (the cluster does it after each job). Ops a reorder still
    holds back are dropped: the rank never issues them."""
    with _lock:
        for fault in [*_step_faults, *_op_faults]:
            fault.armed = False
        _step_faults.clear()
        _op_faults.clear()
        _held.clear()
        _update_hooks()


context.at_job_end(clear)


# --- the public calls ------------------------------------------------------------------------


def _show(ranks: tuple[int, ...]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else str(list(ranks))


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _ranks(rank) -> tuple[int, ...]:
    ranks = (rank,) if isinstance(rank, int) and not isinstance(rank, bool) else rank
    try:
        ranks = tuple(ranks)
    except TypeError:
        raise TypeError(f"rank must be an int or a list of ints, got {rank!r}") from None
    world = context.world_size()
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"rank must be an int or a list of ints, got {rank!r}")
        if not 0 <= r < world:
            raise ValueError(f"rank must be a rank in 0..{world - 1}, got {r!r}")
    if not ranks:
        raise ValueError("rank must name at least one rank")
    return ranks


def _step(at_step, allow_none: bool):
    if at_step is None and allow_none:
        return None
    if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 0:
        raise ValueError(f"at_step must be a step number >= 0, got {at_step!r}")
    return at_step


def _number(name: str, value, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    return float(value)


def _op_args(op, nth, tag, allow_any: bool):
    if op is None and not allow_any:
        raise ValueError(f"op must be one of {OPS}")
    if op is not None and op not in OPS:
        raise ValueError(f"op must be one of {OPS}{' or None' if allow_any else ''}, got {op!r}")
    if isinstance(nth, bool) or not isinstance(nth, int) or nth < 1:
        raise ValueError(f"nth must be an int >= 1 (1: the first one), got {nth!r}")
    if tag is not None and not isinstance(tag, str):
        raise TypeError(f"tag must be a str or None, got {tag!r}")


def kill(rank, at_step: int, signal: int = _signal.SIGKILL) -> Fault:
    """Rank `rank` dies right after step `at_step` (0: the first), by `signal` (SIGKILL, as
    when a machine is lost or the OOM killer strikes)."""
    ranks = _ranks(rank)
    at_step = _step(at_step, allow_none=False)
    try:
        sig = _signal.Signals(signal)
    except ValueError:
        raise ValueError(f"signal must be a signal number, got {signal!r}") from None
    return _arm(_Kill(ranks, at_step, int(sig)))


def delay(rank, seconds: float, at_step: int | None = None) -> Fault:
    """Rank `rank` sleeps `seconds` after every step (or only after step `at_step`): a
    straggler. The other ranks wait for it in the next step's collectives."""
    ranks = _ranks(rank)
    seconds = _number("seconds", seconds, 0)
    return _arm(_Delay(ranks, seconds, _step(at_step, allow_none=True)))


def slow(rank, factor: float, at_step: int | None = None) -> Fault:
    """Rank `rank` runs `factor` times slower than it does: after every step (or only step
    `at_step`) it sleeps (factor - 1) x that step's compute time (the step event's
    `compute_s`), like a weaker machine in the job."""
    ranks = _ranks(rank)
    factor = _number("factor", factor, 1)
    return _arm(_Slow(ranks, factor, _step(at_step, allow_none=True)))


def skip_collective(rank, op: str = "all_reduce", nth: int = 1, tag: str | None = None) -> Fault:
    """Rank `rank` does not issue its `nth` `op` (counted from now; only ops tagged `tag` if
    given), as if its code had skipped it. Its peers wait in that op until the timeout, or
    pair their next one with the wrong op."""
    ranks = _ranks(rank)
    _op_args(op, nth, tag, allow_any=False)
    return _arm(
        _Skip(ranks, f"skip_collective(rank={_show(ranks)}, op={op!r}, nth={nth})", op, nth, tag)
    )


def reorder(rank, nth: int = 1, op: str | None = None, tag: str | None = None) -> Fault:
    """Rank `rank` issues its `nth` op (of kind `op`, tagged `tag`, if given; counted from now)
    after the op that follows it: the two are swapped, so this rank's k-th op meets another
    op on its peers. A blocking op returns at once, unreduced, and runs after the next op."""
    ranks = _ranks(rank)
    _op_args(op, nth, tag, allow_any=True)
    text = f"reorder(rank={_show(ranks)}, nth={nth}, op={op!r})"
    return _arm(_Reorder(ranks, text, op, nth, tag))
