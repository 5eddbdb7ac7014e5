"""dzl.DDP against torch.nn.parallel.DistributedDataParallel: step time, side by side, with spread.

Same model (an MLP of about 4.2 M parameters, 17 MB of float32 gradients, so communication
matters), same data, same optimizer, gloo, world sizes 2 and 4. Both implementations run in the
same processes in every repeat, and their steps are interleaved (with a barrier before each, and
the order flipped every step), so that machine noise hits both alike. A repeat is a fresh
cluster (new processes, new models): its figure per implementation is the median of `--steps`
steps after a warm-up, on the slowest rank, and its ratio is dzl / torch (1.00 = as fast). The
ratio is reported as min / median / max over `--repeats` repeats: one run's ratio alone does
not reproduce on a shared 2-core machine.

Exposed communication (the part backward did not hide) is estimated the same way for both:
(step time - step time of the same model without any communication) / step time. dzl.DDP
also measures it directly (its `step` events); that figure is printed beside.

    python benchmarks/ddp.py [--steps 20] [--repeats 5] [--world-sizes 2 4] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
from models import mlp  # benchmarks/models.py, beside this script
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab import telemetry

TARGET = 1.05  # dzl.DDP / torch DDP, median over repeats
NAMES = ("local", "dzl", "torch")


def _model() -> nn.Module:
    return mlp()


def _bench(steps: int, warmup: int, batch: int, flip: bool) -> dict[str, float]:
    x = torch.randn(batch, 1024)
    y = torch.randint(0, 10, (batch,))
    models = {
        "local": _model(),
        "dzl": dzl.DDP(_model()),
        "torch": nn.parallel.DistributedDataParallel(_model()),
    }
    optims = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    exposed: list[float] = []
    for step in range(warmup + steps):
        # interleaved, and who goes first alternates: neither always follows the other
        order = ["local", "dzl", "torch"] if (step % 2 == 0) != flip else ["local", "torch", "dzl"]
        for name in order:
            model = models[name]
            dist.barrier()
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optims[name].step()
            optims[name].zero_grad()
            elapsed = time.perf_counter() - start
            if step >= warmup:
                times[name].append(elapsed)
            if name == "dzl" and step >= warmup:
                last = telemetry.local_log.of_kind("step")
                if last:
                    exposed.append(last[-1]["exposed_comm_s"])
    medians = torch.tensor([statistics.median(times[k]) for k in NAMES], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    figures = dict(zip((f"{k}_s" for k in NAMES), medians.tolist(), strict=True))
    figures["dzl_exposed_measured_s"] = statistics.median(exposed) if exposed else float("nan")
    figures["params"] = sum(p.numel() for p in models["local"].parameters())
    return figures


def _local_log_sink():
    # step events of dzl.DDP are read back in-process: keep them in the local log
    telemetry.set_sink(telemetry.local_log.append)


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="fresh clusters per world size")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: 3 steps, 1 warm-up, 3 repeats"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 3
    started = time.perf_counter()
    rows = []
    for world_size in args.world_sizes:
        repeats = []
        for repeat in range(args.repeats):
            with dzl.LiveCluster(world_size, timeout=120.0) as cluster:
                cluster.run(_local_log_sink)
                flip = repeat % 2 == 1
                figures = cluster.run(_bench, args.steps, args.warmup, args.batch, flip)[0]
            repeats.append(figures)
        rows.append((world_size, repeats))

    print(
        f"# {platform.node()} · {os.cpu_count()} CPUs · torch {torch.__version__} · gloo · "
        f"{rows[0][1][0]['params'] / 1e6:.1f} M parameters · SGD · {args.repeats} repeats "
        f"(fresh processes each), each the median of {args.steps} interleaved steps on the "
        "slowest rank"
    )
    print(
        "# times: median over repeats; ratio dzl/torch: min / median / max over repeats; "
        "exposed comm: (step - no-comm step) / step"
    )
    print(
        f"{'N':>3} {'no comm':>9} {'dzl.DDP':>9} {'torch DDP':>10} "
        f"{'dzl/torch min / med / max':>26} {'exposed dzl':>12} {'exposed torch':>14} "
        f"{'dzl measured':>13}"
    )
    verdicts = []
    for n, repeats in rows:
        med = {k: statistics.median(r[k] for r in repeats) for k in repeats[0]}
        ratios = [r["dzl_s"] / r["torch_s"] for r in repeats]
        exp_dzl = max(med["dzl_s"] - med["local_s"], 0) / med["dzl_s"]
        exp_torch = max(med["torch_s"] - med["local_s"], 0) / med["torch_s"]
        print(
            f"{n:>3} {med['local_s'] * 1e3:>7.1f}ms {med['dzl_s'] * 1e3:>7.1f}ms "
            f"{med['torch_s'] * 1e3:>8.1f}ms {_spread(ratios):>26} "
            f"{exp_dzl:>11.0%} {exp_torch:>13.0%} "
            f"{med['dzl_exposed_measured_s'] / med['dzl_s']:>12.0%}"
        )
        holds = statistics.median(ratios) <= TARGET
        verdicts.append(
            f"N={n}: median {statistics.median(ratios):.3f} "
            f"{'<=' if holds else '>'} {TARGET} ({'holds' if holds else 'MISSED'}); "
            f"per repeat {' '.join(f'{r:.3f}' for r in ratios)}"
        )
    print("\n# target dzl.DDP / torch DDP <= 1.05 (median over repeats)")
    for line in verdicts:
        print(f"  {line}")
    print(f"\n# whole run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
