"""ZeRO stages 1, 2 and 3 against torch's own: step time (with its spread) and model state per rank.

Three pairs, each measured side by side on the same cluster, in the same run:

  * stage 1: dzl.parallelize(module, "zero1") against torch's DistributedDataParallel with
    torch.distributed.optim.ZeroRedundancyOptimizer (the usual way to use it);
  * stage 2: dzl.parallelize(module, "zero2") against FSDP2, fully_shard(...,
    reshard_after_forward=False) on a one-dimensional CPU DeviceMesh, applied to each Linear
    and then to the root (the usual way; `--fsdp2-wrap root` for the root alone): parameters
    are gathered once for forward and kept through backward, gradients are reduce-scattered.
    Not the same memory: FSDP2 keeps the parameters sharded at rest (4Ψ/N), zero2 keeps them
    whole (4Ψ) and shards only gradients and optimizer state, as the ZeRO paper's stage 2;
  * stage 3: dzl.parallelize(module, "zero3") (its default units: each Linear) against FSDP2
    with reshard_after_forward=True, wrapped the same way: parameters are gathered for a
    layer's forward, freed, gathered again for its backward, as in ZeRO-3.

Same model (an MLP of about 4.2 M parameters, 17 MB of float32), same data, AdamW, gloo, world
sizes 2 and 4. Steps (forward, backward, step, zero_grad) are interleaved between the six
implementations, with a barrier before each and ours/theirs swapping places every step, so that
machine noise hits both sides of a pair alike. A repeat is a fresh cluster (new processes, new
models): its figure per implementation is the median of `--steps` steps after a warm-up, on the
slowest rank, and its ratio ours / theirs (1.00 = as fast). Each ratio is reported as
min / median / max over `--repeats` repeats. The memory tracker that parallelize attaches inside
a cluster is left off: the strategy is timed, not its instrumentation.

Model-state memory is counted after one more step, before zero_grad: parameters, gradients and
optimizer state this rank holds, each storage once and in full. Ours through
ddpzero_lab.memory.model_state_bytes; torch's by summing the tensors the same way (the module's
parameters and .grad, ZeroRedundancyOptimizer's .optim.state; for FSDP2 the local shards of its
DTensors). What a strategy keeps out of sight is not in these figures (DDP's gradient buckets,
FSDP2's unsharded parameters, which it frees after backward: they are printed separately, as
measured at the end of forward).

A step of ZeRO is a reduce-scatter and an all-gather where DDP does one all-reduce, so gloo's
collectives on a buffer of the model's size are timed alone too (interleaved, medians, slowest
rank): they bound what the ratios can be. Both torch.distributed's and ddpzero_lab.comm's: on
gloo, comm runs the reduce-scatter as a pairwise exchange (one all-to-all, then a local sum) and
the all-gather as one broadcast per rank, the same bytes per rank as gloo's own, in less time.

    python benchmarks/zero.py [--steps 20] [--repeats 3] [--world-sizes 2 4] [--quick]
                              [--fsdp2-wrap root]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import psutil
import torch
import torch.distributed as dist
from models import mlp  # benchmarks/models.py, beside this script
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab import comm
from ddpzero_lab.memory import model_state_bytes

MB = 1_000_000
PAIRS = (("zero1", "torch_zero"), ("zero2", "fsdp2"), ("zero3", "fsdp2_reshard"))
LABELS = {
    "zero1": "dzl zero1",
    "torch_zero": "DDP + ZeroRedundancyOptimizer",
    "zero2": "dzl zero2",
    "fsdp2": "FSDP2 fully_shard",
    "zero3": "dzl zero3",
    "fsdp2_reshard": "FSDP2 fully_shard (reshard)",
}
# torch renamed the tensor-form collectives; use whichever this version has
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _model() -> nn.Module:
    return mlp()


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


# --- counting torch's model state -----------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    # an FSDP2 parameter, gradient or optimizer state is a DTensor: this rank holds its shard
    return t.to_local() if hasattr(t, "to_local") else t


def _state_bytes(params: list[torch.Tensor], optimizer_state: dict) -> dict[str, int]:
    """{"params", "grads", "optimizer"} bytes, each storage once and in full (as dzl counts)."""
    groups = {
        "params": [_local(p) for p in params],
        "grads": [_local(p.grad) for p in params if p.grad is not None],
        "optimizer": [
            _local(v)
            for state in optimizer_state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor)
        ],
    }
    seen: set[int] = set()
    totals = {}
    for category, tensors in groups.items():
        totals[category] = 0
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            totals[category] += storage.nbytes()
    return totals


# --- the four implementations -----------------------------------------------------------------


class _Impl:
    """One implementation under test: a module, its optimizer, and how to count its state."""

    def __init__(self, model: nn.Module, optimizer, state: Callable[[], dict[str, int]]) -> None:
        self.model = model
        self.optimizer = optimizer
        self.state = state
        self.unsharded: _UnshardedBytes | None = None  # FSDP2 only


def _ours(stage: int) -> _Impl:
    model, optimizer = dzl.parallelize(
        _model(), f"zero{stage}", optimizer=_adamw, track_memory=False
    )
    return _Impl(model, optimizer, lambda: model_state_bytes(model, optimizer))


def _torch_zero() -> _Impl:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    module = _model()
    model = nn.parallel.DistributedDataParallel(module)
    optimizer = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3
    )
    params = list(module.parameters())
    return _Impl(model, optimizer, lambda: _state_bytes(params, optimizer.optim.state))


class _UnshardedBytes:
    """Bytes of the parameters FSDP2 has unsharded at the end of forward (a forward hook):
    with reshard_after_forward=False it keeps them until backward is done."""

    def __init__(self, module: nn.Module) -> None:
        self.bytes = 0
        module.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        seen = {
            p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
            for p in module.parameters()
            if not hasattr(p, "to_local")  # plain tensors: the unsharded ones
        }
        self.bytes = sum(seen.values())


def _fsdp2(per_layer: bool, reshard: bool = False) -> _Impl:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _model()
    for layer in model if per_layer else ():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    optimizer = _adamw(model.parameters())
    params = list(model.parameters())
    impl = _Impl(model, optimizer, lambda: _state_bytes(params, optimizer.state))
    impl.unsharded = _UnshardedBytes(model)
    return impl


def _agree(ok: bool) -> bool:
    """True only if every rank says so (a rank that skips alone would hang the others)."""
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return flag.item() == 0


# --- the measurements -------------------------------------------------------------------------


def _step(impl: _Impl, x: torch.Tensor, y: torch.Tensor, zero_grad: bool = True) -> None:
    loss = nn.functional.cross_entropy(impl.model(x), y)
    loss.backward()
    impl.optimizer.step()
    if zero_grad:
        impl.optimizer.zero_grad()


def _bench(steps: int, warmup: int, batch: int, fsdp2_per_layer: bool, flip: bool) -> dict:
    x = torch.randn(batch, 1024)
    y = torch.randint(0, 10, (batch,))
    builders = {
        "zero1": lambda: _ours(1),
        "torch_zero": _torch_zero,
        "zero2": lambda: _ours(2),
        "fsdp2": lambda: _fsdp2(fsdp2_per_layer),
        "zero3": lambda: _ours(3),
        "fsdp2_reshard": lambda: _fsdp2(fsdp2_per_layer, reshard=True),
    }
    impls: dict[str, _Impl] = {}
    skipped: dict[str, str] = {}
    for name, build in builders.items():
        # a failure to build or to take a first step skips that implementation on every rank
        try:
            impl = build()
            _step(impl, x, y)
            error = None
        except Exception as exc:  # noqa: BLE001 - reported in the table instead
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if _agree(error is None):
            impls[name] = impl
        else:
            skipped[name] = error or "failed on another rank"
    times: dict[str, list[float]] = {k: [] for k in impls}
    for step in range(warmup + steps):
        # each pair side by side, and who goes first alternates: neither always follows the other
        swap = (step % 2 == 1) != flip
        order = [name for pair in PAIRS for name in (pair[::-1] if swap else pair)]
        for name in order:
            if name not in impls:
                continue
            impl = impls[name]
            dist.barrier()
            start = time.perf_counter()
            _step(impl, x, y)
            elapsed = time.perf_counter() - start
            if step >= warmup:
                times[name].append(elapsed)
    # model state after a step, before zero_grad (gradients still held)
    memory: dict[str, dict[str, int]] = {}
    for name, impl in impls.items():
        dist.barrier()
        _step(impl, x, y, zero_grad=False)
        memory[name] = impl.state()
        if impl.unsharded is not None:
            memory[name]["unsharded_params"] = impl.unsharded.bytes
        impl.optimizer.zero_grad()
    medians = torch.tensor([statistics.median(times[k]) for k in impls], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return {
        "seconds": dict(zip(impls, medians.tolist(), strict=True)),
        "memory": memory,
        "skipped": skipped,
        "rss": psutil.Process().memory_info().rss,
        "params": sum(p.numel() for p in _model().parameters()),
    }


def _collectives(numel: int, repeats: int) -> dict[str, float]:
    """gloo alone on the model's size: all_reduce (DDP), reduce_scatter + all_gather (ZeRO),
    torch.distributed's and ddpzero_lab.comm's (which the strategies use)."""
    world_size = dist.get_world_size()
    full = torch.ones((numel + world_size - 1) // world_size * world_size)
    shard = torch.empty(full.numel() // world_size)
    ops = {
        "all_reduce": lambda: dist.all_reduce(full),
        "reduce_scatter": lambda: _reduce_scatter(shard, full),
        "all_gather": lambda: _all_gather(full, shard),
        # ddpzero_lab's: a pairwise exchange (one all-to-all) and one broadcast per rank
        "dzl_reduce_scatter": lambda: comm.reduce_scatter(shard, full),
        "dzl_all_gather": lambda: comm.all_gather(full, shard),
    }
    for fn in ops.values():  # warm-up: connections, allocator
        fn()
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(repeats):
        for name, fn in ops.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    out = torch.tensor([statistics.median(times[k]) for k in ops], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return dict(zip(ops, out.tolist(), strict=True))


# --- the report -------------------------------------------------------------------------------

TARGETS = {"zero1": 1.10, "zero2": 1.0, "zero3": 1.0}  # ours / theirs, median over repeats
NOTES = {"zero2": "FSDP2 shards parameters (4Ψ/N), zero2 does not (4Ψ)"}


def _model_state(memory: dict[str, int]) -> int:
    return memory["params"] + memory["grads"] + memory["optimizer"]


def _largest(per_rank: list[dict], name: str) -> dict[str, int] | None:
    """The rank holding the most model state for `name` (shards differ by padding)."""
    found = [r["memory"][name] for r in per_rank if name in r["memory"]]
    return max(found, key=_model_state) if found else None


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="fresh clusters per world size")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--collective-calls", type=int, default=10, help="calls per collective")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--fsdp2-wrap",
        choices=("layers", "root"),
        default="layers",
        help="fully_shard each Linear and then the root (default), or the root alone",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: 3 steps, 1 warm-up, 3 repeats"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats, args.collective_calls = 3, 1, 3, 3
    started = time.perf_counter()
    rows = []  # (world size, [per-rank results of each repeat], [collective times of each])
    for world_size in args.world_sizes:
        repeats, comms = [], []
        for repeat in range(args.repeats):
            with dzl.LiveCluster(world_size, timeout=120.0) as cluster:
                per_rank = cluster.run(
                    _bench,
                    args.steps,
                    args.warmup,
                    args.batch,
                    args.fsdp2_wrap == "layers",
                    repeat % 2 == 1,
                )
                numel = per_rank[0]["params"]
                comms.append(cluster.run(_collectives, numel, args.collective_calls)[0])
            repeats.append(per_rank)
        rows.append((world_size, repeats, comms))

    params = rows[0][1][0][0]["params"]
    print(
        f"# {platform.node()} · {os.cpu_count()} CPUs · torch {torch.__version__} · gloo · "
        f"{params / 1e6:.1f} M parameters = Ψ ({params * 4 / MB:.1f} MB fp32) · AdamW · "
        f"FSDP2 wrap: {args.fsdp2_wrap} · {args.repeats} repeats (fresh processes each), each "
        f"the median of {args.steps} interleaved steps on the slowest rank"
    )
    print("# times: median over repeats; ratio ours/theirs: min / median / max over repeats")
    print(
        f"{'N':>3}  {'ours vs theirs':<46} {'ours':>9} {'theirs':>9} "
        f"{'ours/theirs min / med / max':>28} {'target':>7}  {'state MB/rank ours':>18} "
        f"{'theirs':>7}  note"
    )
    verdicts = []
    for n, repeats, _ in rows:
        skipped = repeats[0][0]["skipped"]
        for ours, theirs in PAIRS:
            pair = f"{LABELS[ours]} vs {LABELS[theirs]}"
            missing = [k for k in (ours, theirs) if any(k in r[0]["skipped"] for r in repeats)]
            if missing:
                why = "; ".join(f"{LABELS[k]}: {skipped.get(k, 'in a repeat')}" for k in missing)
                print(f"{n:>3}  {pair:<46} skipped ({why})")
                verdicts.append(f"N={n} {ours}: skipped")
                continue
            t_ours = statistics.median(r[0]["seconds"][ours] for r in repeats)
            t_theirs = statistics.median(r[0]["seconds"][theirs] for r in repeats)
            ratios = [r[0]["seconds"][ours] / r[0]["seconds"][theirs] for r in repeats]
            mem_ours, mem_theirs = _largest(repeats[0], ours), _largest(repeats[0], theirs)
            target = TARGETS[ours]
            print(
                f"{n:>3}  {pair:<46} {t_ours * 1e3:>7.1f}ms {t_theirs * 1e3:>7.1f}ms "
                f"{_spread(ratios):>28} {'<=' + format(target, '.2f'):>7}  "
                f"{_model_state(mem_ours) / MB:>18.1f} {_model_state(mem_theirs) / MB:>7.1f}  "
                f"{NOTES.get(ours, '')}".rstrip()
            )
            median = statistics.median(ratios)
            holds = median <= target
            verdicts.append(
                f"N={n} {ours} / {LABELS[theirs]}: median {median:.3f} "
                f"{'<=' if holds else '>'} {target:.2f} ({'holds' if holds else 'MISSED'}); "
                f"per repeat {' '.join(f'{r:.3f}' for r in ratios)}"
            )

    print(
        "\n# model state per rank (largest rank, first repeat), bytes, after a step before "
        "zero_grad; in brackets bytes per parameter of the model (Ψ)"
    )
    print(
        f"{'N':>3}  {'implementation':<30} {'params':>20} {'grads':>20} {'optimizer':>20} "
        f"{'total MB':>9}"
    )
    for n, repeats, _ in rows:
        per_rank = repeats[0]
        for name in LABELS:
            memory = _largest(per_rank, name)
            if memory is None:
                continue
            cells = [
                f"{memory[k]:>11,} ({memory[k] / params:>4.2f}Ψ)"
                for k in ("params", "grads", "optimizer")
            ]
            extra = ""
            if "unsharded_params" in memory:
                extra = f"   + {memory['unsharded_params']:,} unsharded from forward"
                extra += " to end of backward"
            print(
                f"{n:>3}  {LABELS[name]:<30} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20} "
                f"{_model_state(memory) / MB:>9.1f}{extra}"
            )
        rss = max(r["rss"] for per_rank in repeats for r in per_rank) / MB
        print(f"{n:>3}  process RSS (all six in one process, largest rank): {rss:.0f} MB")

    print(
        f"\n# gloo alone on {params * 4 / MB:.1f} MB, median of {args.collective_calls} calls "
        "(slowest rank), median over repeats"
    )
    print(
        f"{'N':>3} {'all_reduce':>11} {'reduce_scatter':>15} {'all_gather':>11} "
        f"{'RS / AR':>8} {'(RS + AG) / AR':>15}   dzl: {'reduce_scatter':>15} {'all_gather':>11} "
        f"{'(RS + AG) / AR':>15}"
    )
    for n, _, comms in rows:
        ar, rs, ag, drs, dag = (
            statistics.median(c[k] for c in comms)
            for k in (
                "all_reduce",
                "reduce_scatter",
                "all_gather",
                "dzl_reduce_scatter",
                "dzl_all_gather",
            )
        )
        print(
            f"{n:>3} {ar * 1e3:>9.1f}ms {rs * 1e3:>13.1f}ms {ag * 1e3:>9.1f}ms "
            f"{rs / ar:>7.2f}x {(rs + ag) / ar:>14.2f}x        {drs * 1e3:>13.1f}ms "
            f"{dag * 1e3:>9.1f}ms {(drs + dag) / ar:>14.2f}x"
        )
    print(
        "  (dzl on gloo: reduce-scatter as one all-to-all then a local sum, all-gather as one "
        "broadcast per rank; the same bytes per rank as the ring, (N-1)/N·B each)"
    )

    print("\n# targets (median over repeats): zero1 <= 1.10, zero2 and zero3 / FSDP2 <= 1.00")
    for line in verdicts:
        print(f"  {line}")
    print(f"\n# whole run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
