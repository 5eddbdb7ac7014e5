"""Tensor and pipeline parallelism against torch's own, side by side: step-time ratios.

  * tensor parallelism: ddpzero_lab's TensorParallelMLP (Megatron's column- then row-parallel
    split) against torch.distributed.tensor.parallel's ColwiseParallel / RowwiseParallel on
    the same MLP (d 1024, hidden 4096, batch 64 x 32 tokens), forward + backward + SGD step;
  * pipeline parallelism: ddpzero_lab's PipelineStage against torch.distributed.pipelining's
    PipelineStage, ScheduleGPipe and Schedule1F1B on the same 8-layer MLP cut into one stage
    per rank, 8 micro-batches.
Ours and theirs alternate step by step after a warm-up, with a barrier before each; a repeat
is a fresh cluster; its figure is the median step of the slowest rank; each ratio (ours /
theirs, 1.00 = as fast) is reported as min / median / max over the repeats. gloo, CPU.

    python benchmarks/parallelism.py [--steps 10] [--repeats 3] [--world-sizes 2 4]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.parallel.pipeline import PipelineStage
from ddpzero_lab.parallel.tensor import TensorParallelMLP

D, HIDDEN, TOKENS = 1024, 4096, 64 * 32
WIDTH, LAYERS, BATCH, MICRO = 1024, 8, 256, 8


def _timed(pairs: dict, steps: int) -> dict[str, float]:
    """Alternate the named step functions, `steps` timed steps each after one warm-up; the
    median per name on the slowest rank."""
    times = {name: [] for name in pairs}
    for step in range(steps + 1):
        order = list(pairs) if step % 2 == 0 else list(reversed(pairs))
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            pairs[name]()
            if step:
                times[name].append(time.perf_counter() - start)
    out = torch.tensor([statistics.median(times[n]) for n in pairs], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return dict(zip(pairs, out.tolist(), strict=True))


def _tensor_parallel(steps: int) -> dict[str, float]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    up, down = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)
    ours = TensorParallelMLP(D, HIDDEN).load_full(up, down)
    theirs = nn.Sequential(up, nn.GELU(), down)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    parallelize_module(theirs, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    x = torch.randn(TOKENS, D)
    opts = {
        "ours": torch.optim.SGD(ours.parameters(), lr=1e-3),
        "theirs": torch.optim.SGD(theirs.parameters(), lr=1e-3),
    }

    def step(model, name):
        def run():
            model(x).float().pow(2).mean().backward()
            opts[name].step()
            opts[name].zero_grad()

        return run

    return _timed({"ours": step(ours, "ours"), "theirs": step(theirs, "theirs")}, steps)


def _pipeline(steps: int) -> dict[str, float]:
    from torch.distributed.pipelining import PipelineStage as TorchStage
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    rank, stages = dist.get_rank(), dist.get_world_size()

    def layers():
        torch.manual_seed(0)
        full = nn.Sequential(
            *(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(LAYERS))
        )
        per = LAYERS // stages
        return full[rank * per : (rank + 1) * per]

    x, y = torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    pairs = {}
    for schedule, kind in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        ours_mod, theirs_mod = layers(), layers()
        ours = PipelineStage(ours_mod, micro_batches=MICRO, schedule=schedule,
                             loss_fn=nn.functional.mse_loss)  # fmt: skip
        theirs = kind(TorchStage(theirs_mod, rank, stages, torch.device("cpu")), MICRO,
                      loss_fn=nn.functional.mse_loss)  # fmt: skip

        def ours_step(stage=ours, module=ours_mod):
            stage.step(x if stage.is_first else None, y if stage.is_last else None)
            module.zero_grad()

        def theirs_step(schedule=theirs, module=theirs_mod):
            if rank == 0:
                schedule.step(x)
            elif rank == stages - 1:
                schedule.step(target=y)
            else:
                schedule.step()
            module.zero_grad()

        pairs[f"ours {schedule}"], pairs[f"theirs {schedule}"] = ours_step, theirs_step
    return _timed(pairs, steps)


def _spread(values) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    print(f"# {platform.node()} · {torch.__version__} · gloo · {args.repeats} repeats")
    print(f"{'N':>3}  {'pair':<44} {'ours/theirs min / median / max':>32}  target")
    for n in args.world_sizes:
        ratios: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            with dzl.LiveCluster(n, timeout=300.0) as cluster:
                tp = cluster.run(_tensor_parallel, args.steps)[0]
                pp = cluster.run(_pipeline, args.steps)[0]
            ratios.setdefault("TensorParallelMLP / ColwiseParallel+RowwiseParallel", []).append(
                tp["ours"] / tp["theirs"]
            )
            for schedule in ("gpipe", "1f1b"):
                ratios.setdefault(f"PipelineStage {schedule} / torch's schedule", []).append(
                    pp[f"ours {schedule}"] / pp[f"theirs {schedule}"]
                )
        for name, values in ratios.items():
            print(f"{n:>3}  {name:<44} {_spread(values):>32}  <=1.10")


if __name__ == "__main__":
    main()
