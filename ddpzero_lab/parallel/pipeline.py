"""Pipeline parallelism from scratch: stages joined by send/recv, micro-batches, GPipe and 1F1B.

The model is cut into p consecutive stages, one per rank of `group` (stage s on the group's
rank s). A batch is cut into m micro-batches; a stage runs a micro-batch's forward, sends the
activations to the next stage, and later receives the gradient of those activations back and
runs that micro-batch's backward. Gradients of the m micro-batches add up in `.grad` (each
micro-batch's loss is divided by m), so one optimizer step equals one step of the whole model
on the whole batch in one process.

Schedules (`schedule=`):
  "gpipe"  all m forwards, then all m backwards (Huang et al., "GPipe", 2019): a stage holds
           the activations of all m micro-batches at once;
  "1f1b"   p - s - 1 forwards to fill the pipe, then one forward and one backward in turn,
           then the remaining backwards (PipeDream-Flush, Narayanan et al., 2021): stage s
           holds at most p - s micro-batches' activations.
Both leave every stage idle for the same bubble at the start and the end of a step:
(p - 1) / (m + p - 1) of the step when a forward and a backward take the same time on every
stage. `PipelineStage.step` returns the step's timeline (compute and idle per micro-batch) and
the most micro-batches held at once, which the tests hold against these numbers; each step
also sends a `pipeline` event (its spans and its waits for messages) that the dashboard's
pipeline panel draws.

Messages go through comm/ (counted, tagged "pp:act" and "pp:grad"); the activations' shape is
sent once per step ("pp:shape") so that a stage needs to know only its own module.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import comm, telemetry
from .layout import emit_coordinates

SCHEDULES = ("gpipe", "1f1b")
_MAX_DIMS = 8


class PipelineStage:
    """Stage `rank in group` of a pipeline: `module` is this stage's part of the model.

    step(inputs, targets): the first stage gives the batch's inputs, the last its targets
    and `loss_fn`; returns {"loss" (last stage: the batch's mean loss), "timeline",
    "max_in_flight"}. Then step the optimizer of this stage's parameters as usual.
    """

    def __init__(
        self,
        module: nn.Module,
        group=None,
        micro_batches: int = 4,
        schedule: str = "1f1b",
        loss_fn: Callable | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if (
            isinstance(micro_batches, bool)
            or not isinstance(micro_batches, int)
            or micro_batches < 1
        ):
            raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
        self.module = module
        self.group = group
        self.stage = dist.get_rank(group)
        self.stages = dist.get_world_size(group)
        self.micro_batches = micro_batches
        self.schedule = schedule
        self.loss_fn = loss_fn
        self.dtype = dtype  # of the activations and their gradients between stages
        if self.is_last and loss_fn is None:
            raise ValueError("the last stage needs loss_fn=, e.g. nn.functional.mse_loss")
        self.steps = 0  # steps run: numbers the `pipeline` events
        emit_coordinates(pp=(self.stages, self.stage, group))

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def _peer(self, stage: int) -> int:
        return stage if self.group is None else dist.get_global_rank(self.group, stage)

    # -- the order of work ----------------------------------------------------------------
    def order(self) -> list[tuple[str, int]]:
        """This stage's ("F" | "B", micro-batch) in the order it runs them."""
        m = self.micro_batches
        if self.schedule == "gpipe":
            return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
        warmup = min(self.stages - self.stage - 1, m)
        work = [("F", i) for i in range(warmup)]
        forward, backward = warmup, 0
        while backward < m:
            if forward < m:
                work.append(("F", forward))
                forward += 1
            work.append(("B", backward))
            backward += 1
        return work

    # -- one step -------------------------------------------------------------------------
    def step(self, inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None):
        m = self.micro_batches
        chunks = list(inputs.chunk(m)) if self.is_first else [None] * m
        goals = list(targets.chunk(m)) if self.is_last else [None] * m
        if (self.is_first and len(chunks) != m) or (self.is_last and len(goals) != m):
            raise ValueError(f"the batch must have at least {m} rows (one per micro-batch)")
        held: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}  # i -> (input, output)
        sending = []  # sends in flight (isend: a stage never blocks its neighbour's send)
        timeline, losses, most = [], [], 0
        waits = []  # (tag, micro-batch, begin, end): blocked in a recv, for the dashboard
        shape = None
        wall_start, start = time.time(), time.perf_counter()
        for kind, i in self.order():
            if kind == "F":
                x = chunks[i]
                if not self.is_first:
                    begin = time.perf_counter()
                    if shape is None:  # the first activation comes after its shape
                        shape = self._receive_shape()
                    x = self._receive(shape, "pp:act", -1).requires_grad_(True)
                    waits.append(("pp:act", i, begin - start, time.perf_counter() - start))
                begin = time.perf_counter()
                y = self.module(x)
                if self.is_last:
                    y = self.loss_fn(y, goals[i]) / m
                    losses.append(y.detach())
                timeline.append(("F", i, begin - start, time.perf_counter() - start))
                if not self.is_last:
                    if i == 0:
                        sending.append(self._send_shape(y.shape))
                    sending.append(self._send(y.detach().contiguous(), "pp:act", +1))
                held[i] = (x, y)
                most = max(most, len(held))
            else:
                x, y = held.pop(i)
                grad = None
                if not self.is_last:
                    begin = time.perf_counter()
                    grad = self._receive(y.shape, "pp:grad", +1)
                    waits.append(("pp:grad", i, begin - start, time.perf_counter() - start))
                begin = time.perf_counter()
                torch.autograd.backward(y, grad)
                timeline.append(("B", i, begin - start, time.perf_counter() - start))
                if not self.is_first:
                    sending.append(self._send(x.grad.contiguous(), "pp:grad", -1))
        for handle in sending:
            handle.wait()
        seconds = time.perf_counter() - start
        self._emit_step(wall_start, seconds, timeline, waits)
        return {
            "loss": torch.stack(losses).sum() if losses else None,
            "timeline": timeline,
            "max_in_flight": most,
            "seconds": seconds,
            "waits": waits,
        }

    def _emit_step(self, wall_start: float, seconds: float, timeline, waits) -> None:
        """The step's spans for the dashboard's pipeline panel: 2m compute spans and at most
        2m waits, a few hundred bytes for the usual m (the event is bounded by m)."""
        emulator = comm.link.current()
        telemetry.emit(
            "pipeline",
            step=self.steps,
            schedule=self.schedule,
            stage=self.stage,
            stages=self.stages,
            micro_batches=self.micro_batches,
            start=wall_start,
            seconds=seconds,
            spans=[list(span) for span in timeline],
            waits=[list(wait) for wait in waits],
            link=None if emulator is None else emulator.link.describe(),
        )
        self.steps += 1

    def _send(self, tensor: torch.Tensor, tag: str, direction: int):
        return comm.isend(tensor, self._peer(self.stage + direction), group=self.group, tag=tag)

    def _receive(self, shape, tag: str, direction: int, dtype=None) -> torch.Tensor:
        buffer = torch.empty(
            shape, dtype=dtype or self.dtype, device=comm.backend_device(self.group)
        )
        comm.recv(buffer, self._peer(self.stage + direction), group=self.group, tag=tag)
        return buffer

    def _send_shape(self, shape: torch.Size):
        if len(shape) > _MAX_DIMS:
            raise ValueError(f"activations of more than {_MAX_DIMS} dimensions")
        header = torch.zeros(
            _MAX_DIMS + 1, dtype=torch.int64, device=comm.backend_device(self.group)
        )
        header[0] = len(shape)
        header[1 : 1 + len(shape)] = torch.tensor(shape)
        return self._send(header, "pp:shape", +1)

    def _receive_shape(self) -> torch.Size:
        header = self._receive((_MAX_DIMS + 1,), "pp:shape", -1, dtype=torch.int64)
        return torch.Size(header[1 : 1 + int(header[0])].tolist())


def bubble_fraction(timeline: list[tuple[str, int, float, float]], seconds: float) -> float:
    """The part of a step this stage spent idle: 1 - (time computing) / (the step)."""
    busy = sum(end - begin for _, _, begin, end in timeline)
    return 1.0 - busy / seconds if seconds > 0 else 0.0


def ideal_bubble(stages: int, micro_batches: int) -> float:
    """(p - 1) / (m + p - 1): the bubble of GPipe and 1F1B with equal stage times."""
    return (stages - 1) / (micro_batches + stages - 1)
