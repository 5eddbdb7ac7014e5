"""From this laptop to a thousand GPUs: a step's time and memory, projected.

`profile_step` measures one training step of a model on this machine, unit by unit (forward,
backward, the optimizer's step). `project` replays that step for a strategy on N ranks joined
by a `Link` (comm/link.py), as the strategies in parallel/ schedule it:

  ddp    buckets of gradients (1 MB first, then 25 MB, in reverse parameter order) all-reduced
         as soon as backward has produced them, the optimizer on every parameter;
  zero1  one reduce-scatter of all gradients after backward, the optimizer on 1/N of them,
         one all-gather of the parameters;
  zero2  25 MB buckets reduce-scattered during backward, the optimizer on 1/N, all-gathers;
  zero3  each unit all-gathered before its forward (the next one already in flight with
         prefetch) and again before its backward, its gradients reduce-scattered after it,
         the optimizer on 1/N.
One op at a time on each rank's link (the emulator does the same); an op starts when its data
is ready and the link is free, and compute waits for the gathers it needs. What the step
spends beyond compute and the optimizer is exposed communication.

Times are in this machine's seconds: with a link scaled to an accelerator
(`Link.preset("nvlink4", "h100")`), divide by `link.scale` for the accelerator's seconds. The
compute of a unit is taken as it was measured here (its backward split among units in
proportion to their forward), the same on every rank (weak scaling: a fixed batch per rank).
Memory per rank is the ZeRO paper's model-state formula (memory.zero_memory_estimate).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .comm.link import Link
from .memory import zero_memory_estimate
from .parallel.zero3 import default_units

MB = 1024 * 1024
STAGES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}


@dataclass
class UnitProfile:
    name: str
    numel: list[int]  # its trainable parameters' element counts, in parameter order
    forward_s: float
    backward_s: float


@dataclass
class StepProfile:
    """One step measured on this machine: units in forward order, the optimizer's step."""

    units: list[UnitProfile]
    optimizer_s: float
    element_size: int = 4

    @property
    def num_params(self) -> int:
        return sum(sum(u.numel) for u in self.units)

    @property
    def compute_s(self) -> float:
        return sum(u.forward_s + u.backward_s for u in self.units)


@dataclass
class Projection:
    """One strategy at one world size: seconds per step and bytes per rank."""

    strategy: str
    world_size: int
    compute_s: float
    optimizer_s: float
    comm_s: dict[str, float] = field(default_factory=dict)  # seconds on the link, per op
    step_s: float = 0.0
    memory_bytes: float = 0.0

    @property
    def exposed_comm_s(self) -> float:
        return max(self.step_s - self.compute_s - self.optimizer_s, 0.0)


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """ZeRO-3's default units that hold trainable parameters (the root's children, a
    ModuleList's or ModuleDict's elements one by one: a transformer's blocks), in module
    order, and the root for the rest."""
    chosen = default_units(model)
    units = [
        (name, module)
        for name, module in model.named_modules()
        if name in chosen and any(p.requires_grad for p in module.parameters())
    ]
    inside = {id(p) for _, child in units for p in child.parameters()}
    if any(p.requires_grad and id(p) not in inside for p in model.parameters()):
        units.append(("", model))
    return units


def profile_step(
    model: nn.Module,
    batch: Callable[[], tuple],
    loss: Callable = nn.functional.mse_loss,
    optimizer: Callable = lambda params: torch.optim.AdamW(params, lr=1e-3),
    steps: int = 5,
) -> StepProfile:
    """Measure `model` on this machine, unit by unit (medians of `steps` steps after one
    warm-up); `batch()` returns (inputs, targets) for one rank. A unit's backward is taken
    as the whole backward split in proportion to the units' forward times."""
    units = _units(model)
    children = {id(p) for _, m in units if m is not model for p in m.parameters()}
    opt = optimizer([p for p in model.parameters() if p.requires_grad])
    marks: dict[str, list[float]] = {}

    def started(name):
        return lambda module, args: marks.__setitem__(name, [time.perf_counter()])

    def ended(name):
        return lambda module, args, output: marks[name].append(time.perf_counter())

    handles = []
    for name, module in units:
        if module is not model:
            handles.append(module.register_forward_pre_hook(started(name)))
            handles.append(module.register_forward_hook(ended(name)))
    forward, per_unit, backward, stepping = [], [], [], []
    try:
        for step in range(steps + 1):
            x, y = batch()
            marks.clear()
            start = time.perf_counter()
            out = model(x)
            mid = time.perf_counter()
            loss(out, y).backward()
            end = time.perf_counter()
            opt.step()
            opt.zero_grad()
            if step == 0:
                continue  # warm-up
            forward.append(mid - start)
            per_unit.append({n: t[1] - t[0] for n, t in marks.items() if len(t) == 2})
            backward.append(end - mid)
            stepping.append(time.perf_counter() - end)
    finally:
        for handle in handles:
            handle.remove()

    def median(values: Sequence[float]) -> float:
        return sorted(values)[len(values) // 2]

    measured = {name: median([times.get(name, 0.0) for times in per_unit]) for name, _ in units}
    if "" in measured:  # the root's own work: what its children do not account for
        measured[""] = max(median(forward) - sum(measured.values()), 0.0)
    share = sum(measured.values()) or 1.0
    profiles = []
    for name, module in units:
        own = (
            module.parameters()
            if module is not model
            else (p for p in model.parameters() if id(p) not in children)
        )
        numel = [p.numel() for p in own if p.requires_grad]
        forward_s = measured[name]
        profiles.append(UnitProfile(name, numel, forward_s, median(backward) * forward_s / share))
    element = next(p.element_size() for p in model.parameters())
    return StepProfile(profiles, median(stepping), element)


def time_steps(
    model: nn.Module,
    optimizer,
    batch: Callable[[int], tuple],
    link: str | Link | None = None,
    steps: int = 3,
    loss: Callable = nn.functional.mse_loss,
) -> list[float]:
    """Inside a rank: the seconds of `steps` training steps of an already parallelized `model`
    (one warm-up step first, left out), with every collective through comm/ under `link`
    (None: as the rank is, real time unless a link is set). `batch(step)` returns (inputs,
    targets) for this rank. Each step starts
    on every rank together, after a plain torch barrier (neither counted nor emulated), so a
    rank's time is its own step's, not its wait for the others: what `project` predicts."""
    import torch.distributed as dist

    from .comm.link import emulate

    seconds = []
    with emulate(link):
        for step in range(steps + 1):
            x, y = batch(step)
            dist.barrier()
            start = time.perf_counter()
            loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            seconds.append(time.perf_counter() - start)
    return seconds[1:]


def slowest_rank(seconds: float) -> float:
    """Inside a rank: the largest of every rank's `seconds` (a step ends when its slowest rank
    ends), on every rank; a plain torch all-reduce, neither counted nor emulated."""
    import torch.distributed as dist

    took = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return took.item()


class _Link:
    """One rank's link in the replay: ops in issue order, one at a time."""

    def __init__(self, link: Link, world_size: int) -> None:
        self.link, self.n = link, world_size
        self.free_at = 0.0
        self.busy: dict[str, float] = {}

    def send(self, op: str, nbytes: float, ready: float) -> float:
        seconds = self.link.seconds(op, nbytes, self.n) if self.n > 1 else 0.0
        begin = max(ready, self.free_at)
        self.free_at = begin + seconds
        self.busy[op] = self.busy.get(op, 0.0) + seconds
        return self.free_at


def _buckets(sizes: list[int], first_mb: float | None, cap_mb: float | None) -> list[list[int]]:
    """Indices of `sizes` (bytes, in launch order) grouped as the strategies group them."""
    groups, current, total = [], [], 0
    cap = (first_mb if first_mb is not None else cap_mb) or float("inf")
    for i, size in enumerate(sizes):
        if current and cap_mb is not None and total + size > cap * MB:
            groups.append(current)
            current, total, cap = [], 0, cap_mb
        current.append(i)
        total += size
    if current:
        groups.append(current)
    return groups


def _padded(numel: int, n: int) -> int:
    return -(-numel // n) * n


PRECISIONS = {"fp32": 4, "bf16-mixed": 2, "fp16-mixed": 2}  # bytes per element on the wire


def project_one(
    profile: StepProfile,
    strategy: str,
    world_size: int,
    link: Link,
    prefetch: bool = False,
    precision: str | None = None,
) -> Projection:
    """The replay of one step of `profile` under `strategy` on `world_size` ranks.
    `precision` ("fp32", "bf16-mixed", "fp16-mixed"; None: as profiled) sets the bytes each
    element takes on the wire and the memory formula (mixed: the paper's 2 + 2 + 12 bytes);
    the compute stays as measured."""
    if strategy not in STAGES:
        raise ValueError(f"strategy must be one of {sorted(STAGES)}, got {strategy!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    n = world_size
    e = profile.element_size if precision is None else PRECISIONS[precision]
    wire = _Link(link, n)
    units = profile.units
    optimizer_s = profile.optimizer_s / (n if strategy != "ddp" else 1)
    tensors = sum(len(u.numel) for u in units)

    def flat_bytes(numel: int) -> int:  # a flat buffer, padded to a multiple of N
        return _padded(numel, n) * e

    # ZeRO-3 gathers the root's own parameters first, in forward and in backward (zero3.py)
    order = sorted(units, key=lambda u: u.name != "")
    t = 0.0
    done = 0.0  # when the last gradient collective is over
    if strategy == "zero3":
        gathered = {0: wire.send("all_gather", flat_bytes(sum(order[0].numel)), 0.0)}
        for i, unit in enumerate(order):
            nxt = i + 1 < len(order)
            if prefetch and nxt:  # the next unit's gather is in flight while this one runs
                gathered[i + 1] = wire.send("all_gather", flat_bytes(sum(order[i + 1].numel)), t)
            t = max(t, gathered[i]) + unit.forward_s
            if not prefetch and nxt:
                gathered[i + 1] = wire.send("all_gather", flat_bytes(sum(order[i + 1].numel)), t)
        backward = ([order[0]] if order[0].name == "" else []) + [
            u for u in reversed(order) if u.name != ""
        ]
        gathered = {0: wire.send("all_gather", flat_bytes(sum(backward[0].numel)), t)}
        for i, unit in enumerate(backward):
            nxt = i + 1 < len(backward)
            if prefetch and nxt:
                gathered[i + 1] = wire.send("all_gather", flat_bytes(sum(backward[i + 1].numel)), t)
            t = max(t, gathered[i]) + unit.backward_s
            # its post-backward hook requests the unit's reduce-scatter, before the next
            # unit's pre-backward hook gathers that unit
            done = max(done, wire.send("reduce_scatter", flat_bytes(sum(unit.numel)), t))
            if not prefetch and nxt:
                gathered[i + 1] = wire.send("all_gather", flat_bytes(sum(backward[i + 1].numel)), t)
        done = max(done, wire.send("all_reduce", 4 * tensors, t))  # the unused-parameter mask
        end = max(t, done) + optimizer_s  # nothing is gathered after the step
    else:
        t = sum(u.forward_s for u in units)
        ready = []  # (bytes, when ready) per parameter, in reverse parameter order
        for unit in reversed(units):
            t += unit.backward_s  # a unit's gradients are ready as its backward ends
            ready.extend((numel * e, t) for numel in reversed(unit.numel))
        if strategy == "zero1":  # one flat buffer, reduced in step()
            done = wire.send("reduce_scatter", flat_bytes(profile.num_params), t)
            done = max(done, wire.send("all_reduce", 4 * tensors, t))
            end = max(t, done) + optimizer_s
            end = wire.send("all_gather", flat_bytes(profile.num_params), end)
        else:
            ddp = strategy == "ddp"
            buckets = _buckets([b for b, _ in ready], 1 if ddp else None, 25)
            for group in buckets:
                nbytes = sum(ready[i][0] for i in group)
                when = max(ready[i][1] for i in group)
                if ddp:
                    done = max(done, wire.send("all_reduce", nbytes, when))
                else:
                    done = max(done, wire.send("reduce_scatter", flat_bytes(nbytes // e), when))
            if not ddp:
                done = max(done, wire.send("all_reduce", 4 * tensors, t))
            end = max(t, done) + optimizer_s
            if not ddp:
                for group in buckets:
                    nbytes = sum(ready[i][0] for i in group)
                    end = wire.send("all_gather", flat_bytes(nbytes // e), end)
    state = zero_memory_estimate(
        profile.num_params, n, STAGES[strategy], preset="fp32_adam" if e == 4 else "mixed_adam"
    )
    return Projection(
        strategy,
        n,
        profile.compute_s,
        optimizer_s,
        dict(wire.busy),
        end,
        state["total"],
    )


def project(
    profile: StepProfile,
    strategy: str,
    world_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    link: str | Link = "nvlink4",
    prefetch: bool = False,
    precision: str | None = None,
) -> list[Projection]:
    """`project_one` for each world size: how the step and the memory per rank change as N
    grows (weak scaling: the same batch per rank). Scaling efficiency at N is
    rows[0].step_s / rows[i].step_s when world_sizes starts at 1. `precision`: as in
    project_one."""
    link = Link.parse(link)
    return [project_one(profile, strategy, n, link, prefetch, precision) for n in world_sizes]
