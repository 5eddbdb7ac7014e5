"""The flight recorder's rank side: where this rank stands in its collectives, in shared memory.

In the spirit of NCCL's flight recorder and gloo's `monitored_barrier`: when a job hangs, the
question is which rank waits in which collective, and where the others are. The rank that
waits cannot answer (its main thread is blocked inside gloo or NCCL, in C++), and a dead rank
cannot answer at all. So each rank keeps a small fixed-size record in a file mapped into its
memory (mmap): it writes the op it enters *before* entering it and the op it left *after*
leaving it. The parent reads the file whenever it likes; the page cache makes the rank's
writes visible at once, and the record outlives the rank.

This module owns the record's layout, the rank's writer (`install`, `recorder`) and the reader
(`read_record`). It lives below comm/ so that a rank which only trains (torchrun, the CLI)
imports nothing of the LiveCluster; the parent's wording (`place`, `describe`) is in
`ddpzero_lab.cluster.flight`, which re-exports everything here. It does not number the ops:
comm/ does (a sequence number per process group, in call order) and tells the writer.

Writes are cheap (a few `struct.pack_into` into shared memory, no system call), so the record
is kept for every op. A seqlock (a write counter, odd while a write is under way) lets the
reader notice a torn read and try again.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass

_MAGIC = b"DZFR"
# magic, write counter (odd while writing), state, pid, job id, updated, job started
_HEADER = struct.Struct("<4sIiiqdd")
# op, tag, group, seq, job, peer, status, start, end
_SLOT = struct.Struct("<24s48s24sqqiidd")
_CURRENT_AT = _HEADER.size
_LAST_AT = _CURRENT_AT + _SLOT.size
_SIZE = _LAST_AT + _SLOT.size

# What the rank is doing (the header's state).
IDLE, RUNNING, WAITING, RETURNED, RAISED, CANCELLED = range(6)
_STATE_NAMES = ("idle", "running", "waiting", "returned", "raised", "cancelled")
# How an op ended (a slot's status).
OK, FAILED, TIMED_OUT = range(3)
NO_PEER = -1


@dataclass(frozen=True)
class OpRecord:
    """One op as the rank recorded it: `seq` counts the ops of its process group, from 1."""

    op: str
    seq: int
    tag: str
    group: str  # "" for the default group, else its ranks ("0,2")
    job: int
    peer: int  # the other rank of a send or recv, else -1
    status: int  # OK, FAILED or TIMED_OUT (for the last op)
    start: float
    end: float

    def label(self) -> str:
        """'all_reduce #12 (tag grads0)', 'recv #5 from rank 0', ..."""
        text = f"{self.op} #{self.seq}"
        if self.group:
            text += f" of group [{self.group}]"
        if self.peer != NO_PEER:
            text += f" {'to' if self.op == 'send' else 'from'} rank {self.peer}"
        if self.tag:
            text += f" (tag {self.tag})"
        return text


@dataclass(frozen=True)
class RankRecord:
    """A rank's record as read by the parent."""

    state: int
    pid: int
    job: int
    updated: float  # when the rank last wrote: entering or leaving an op, starting a job
    job_started: float
    current: OpRecord | None  # the op it waits in (state WAITING), else None
    last: OpRecord | None  # the last op it left, or None if it has left none
    torn: bool = False  # the rank was writing while we read (it died mid-write?)

    @property
    def state_name(self) -> str:
        return _STATE_NAMES[self.state] if 0 <= self.state < len(_STATE_NAMES) else "?"


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _unpack_slot(data: bytes, offset: int) -> OpRecord | None:
    op, tag, group, seq, job, peer, status, start, end = _SLOT.unpack_from(data, offset)
    if seq <= 0:
        return None
    return OpRecord(_text(op), seq, _text(tag), _text(group), job, peer, status, start, end)


def read_record(path: str) -> RankRecord | None:
    """Read a rank's record from its file; None if there is none (not started, no mmap)."""
    data = b""
    for _ in range(50):
        try:
            with open(path, "rb") as fh:
                first = fh.read(_SIZE)
                fh.seek(0)
                data = fh.read(_SIZE)
        except OSError:
            return None
        if len(data) < _SIZE or data[:4] != _MAGIC:
            return None
        writes = _HEADER.unpack_from(data)[1]
        if first == data and writes % 2 == 0:
            break
        time.sleep(0.001)
    else:
        writes = 1  # still torn after 50 tries: the writer died half-way; say so
    _, _, state, pid, job, updated, job_started = _HEADER.unpack_from(data)
    current = _unpack_slot(data, _CURRENT_AT) if state == WAITING else None
    return RankRecord(
        state,
        pid,
        job,
        updated,
        job_started,
        current,
        _unpack_slot(data, _LAST_AT),
        torn=writes % 2 == 1,
    )


class FlightRecorder:
    """The rank's writer. One per process; `recorder` holds it once `install` ran."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self.path = path
        # Async ops are waited for on other threads too (autograd's, under CUDA): one writer
        # at a time keeps the seqlock's counter honest.
        self._lock = threading.Lock()
        self._writes = 0
        self._state = IDLE
        self._job = -1
        self._job_started = 0.0
        self._map[:4] = _MAGIC
        self._write_header(time.time())

    def _write_header(self, now: float) -> None:
        _HEADER.pack_into(
            self._map,
            0,
            _MAGIC,
            self._writes,
            self._state,
            os.getpid(),
            self._job,
            now,
            self._job_started,
        )

    def _begin(self) -> None:
        self._writes += 1  # odd: a reader that sees it tries again
        struct.pack_into("<I", self._map, 4, self._writes)

    def _end(self, now: float) -> None:
        self._writes += 1
        self._write_header(now)

    def _write_slot(self, offset, op, seq, tag, group, peer, status, start, end) -> None:
        _SLOT.pack_into(
            self._map,
            offset,
            op.encode(),
            (tag or "").encode(),
            group.encode(),
            seq,
            self._job,
            NO_PEER if peer is None else peer,
            status,
            start,
            end,
        )

    # -- called by comm/ around every op ---------------------------------------------------
    def entered(self, op: str, seq: int, tag: str | None, group: str, peer: int | None) -> None:
        """The rank is about to block in op #seq (a blocking call, or wait() on a handle)."""
        now = time.time()
        with self._lock:
            self._begin()
            self._write_slot(_CURRENT_AT, op, seq, tag, group, peer, OK, now, 0.0)
            self._state = WAITING
            self._end(now)

    def left(
        self,
        op: str,
        seq: int,
        tag: str | None,
        group: str,
        peer: int | None,
        start: float,
        status: int = OK,
    ) -> None:
        """The rank has left op #seq (completed, or raised: status FAILED / TIMED_OUT)."""
        now = time.time()
        with self._lock:
            self._begin()
            self._write_slot(_LAST_AT, op, seq, tag, group, peer, status, start, now)
            if self._state == WAITING:
                self._state = RUNNING
            self._end(now)

    # -- called by the worker around every job ---------------------------------------------
    def job_started(self, job: int) -> None:
        now = time.time()
        with self._lock:
            self._begin()
            self._job, self._job_started, self._state = job, now, RUNNING
            self._end(now)

    def job_ended(self, status: str) -> None:
        """status: the worker's result status, "ok" | "error" | "cancelled"."""
        with self._lock:
            self._begin()
            self._state = {"ok": RETURNED, "error": RAISED}.get(status, CANCELLED)
            self._end(time.time())


recorder: FlightRecorder | None = None


def install(path: str) -> FlightRecorder | None:
    """Start recording into `path` (the worker does this once, at start-up)."""
    global recorder
    try:
        recorder = FlightRecorder(path)
    except (OSError, ValueError):
        recorder = None  # no shared memory here: the cluster's errors just say less
    return recorder
