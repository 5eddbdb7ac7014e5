"""Emulated links and the projection, against measurement on the live cluster.

1. Fidelity: each collective through comm/ under an emulated link, timed on every rank (the
   slowest counts), against the link's α-β time, for payloads from 4 KB to 64 MB at N = 2 and
   4: the ratio measured / model, min / median / max over `--repeats` calls (1.00 = exact;
   the emulator may only add, so the ratio is >= 1 where the real transfer is shorter).
2. Projection error: one step of an MLP (4.2 M parameters, AdamW, batch 64 per rank) under
   each strategy on an emulated link, the median of `--steps` steps (slowest rank), against
   `ddpzero_lab.projection.project_one` fed with `profile_step` measured in the same job; on a
   50 MB/s link (communication-bound) and a 1 GB/s one (compute-bound: there the strategies'
   own work, hooks and copies the profile does not see, shows as error).

    python benchmarks/emulation.py [--repeats 5] [--steps 6] [--world-sizes 2 3 4]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.distributed as dist
from models import mlp  # benchmarks/models.py, beside this script
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab import comm
from ddpzero_lab.comm.link import Link
from ddpzero_lab.projection import profile_step, project_one, slowest_rank, time_steps

LINK = Link(latency=1e-4, bandwidth=1e9, name="1 GB/s, 100 µs")
# the projection on two links: one where communication dominates the step, one where compute
# does (the profile sees plain compute, not the strategies' own hooks and copies)
PROJECTION_LINKS = (
    Link(latency=1e-4, bandwidth=5e7, name="50 MB/s"),
    Link(latency=1e-4, bandwidth=1e9, name="1 GB/s"),
)
SIZES = [4 * 1024, 256 * 1024, 4 * 1024 * 1024, 64 * 1024 * 1024]
OPS = ("all_reduce", "reduce_scatter", "all_gather")


def _fidelity(repeats: int) -> dict:
    n = dzl.world_size()
    dzl.set_link(LINK)
    out = {}
    try:
        for nbytes in SIZES:
            numel = nbytes // 4 // n * n
            x, shard, full = torch.ones(numel), torch.empty(numel // n), torch.empty(numel)
            run = {
                "all_reduce": lambda x=x: comm.all_reduce(x),
                "reduce_scatter": lambda x=x, shard=shard: comm.reduce_scatter(shard, x),
                "all_gather": lambda full=full, shard=shard: comm.all_gather(full, shard),
            }
            for op, fn in run.items():
                ratios = []
                for _ in range(repeats):
                    dist.barrier()
                    start = time.perf_counter()
                    fn()
                    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                    dist.all_reduce(took, op=dist.ReduceOp.MAX)  # (not counted, not emulated)
                    ratios.append(took.item() / LINK.seconds(op, numel * 4, n))
                out[(op, nbytes)] = ratios
    finally:
        dzl.set_link(None)
    return out


def _model() -> nn.Module:
    return mlp()


def _batch():
    return torch.randn(64, 1024), torch.randn(64, 10)


def _step_error(strategy: str, steps: int, link: Link) -> tuple[float, float]:
    profile = profile_step(_model(), _batch, steps=steps)
    model, opt = dzl.parallelize(
        _model(), strategy, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), track_memory=False
    )
    seconds = time_steps(model, opt, lambda step: _batch(), link, steps)
    projected = project_one(profile, strategy, dzl.world_size(), link).step_s
    return slowest_rank(statistics.median(seconds)), projected


def _spread(values) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 3, 4])
    args = parser.parse_args()
    print(f"# {platform.node()} · torch {torch.__version__} · gloo · link {LINK.describe()}")
    print("\n# 1. fidelity: measured / α-β model, min / median / max")
    print(f"{'N':>3} {'op':<15}" + "".join(f"{s // 1024:>20,} KB" for s in SIZES))
    for n in (w for w in args.world_sizes if w in (2, 4)):
        with dzl.LiveCluster(n, timeout=120.0) as cluster:
            ratios = cluster.run(_fidelity, args.repeats)[0]
        for op in OPS:
            cells = "".join(f"{_spread(ratios[(op, s)]):>23}" for s in SIZES)
            print(f"{n:>3} {op:<15}{cells}")
    print("\n# 2. projection against the emulated live cluster (step time, slowest rank)")
    print(f"{'link':<9} {'N':>3} {'strategy':<9} {'measured':>10} {'projected':>10} {'error':>8}")
    for link in PROJECTION_LINKS:
        for n in args.world_sizes:
            with dzl.LiveCluster(n, timeout=300.0) as cluster:
                for strategy in ("ddp", "zero1", "zero2", "zero3"):
                    measured, projected = cluster.run(_step_error, strategy, args.steps, link)[0]
                    print(
                        f"{link.name:<9} {n:>3} {strategy:<9} {measured * 1e3:>8.1f}ms "
                        f"{projected * 1e3:>8.1f}ms {projected / measured - 1:>+7.1%}"
                    )


if __name__ == "__main__":
    main()
