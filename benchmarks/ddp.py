"""dzl.DDP against torch.nn.parallel.DistributedDataParallel: step time, side by side.

Same model (an MLP of about 4.2 M parameters, 17 MB of float32 gradients, so communication
matters), same data, same optimizer, gloo, world sizes 2 and 4. Steps alternate between the
two implementations so that both see the same machine state; the figure is the median of
`--steps` steps after a warm-up, and the ratio dzl / torch (1.00 = as fast).

Exposed communication (the part backward did not hide) is estimated the same way for both:
(step time - step time of the same model without any communication) / step time. dzl.DDP
also measures it directly (its `step` events); that figure is printed beside.

    python benchmarks/ddp.py [--steps 20] [--world-sizes 2 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab import telemetry


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(1024, 10))


def _bench(steps: int, warmup: int, batch: int) -> dict[str, float]:
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
        for name, model in models.items():
            dist.barrier()
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optims[name].step()
            optims[name].zero_grad()
            elapsed = time.perf_counter() - start
            if step >= warmup:
                times[name].append(elapsed)
        if step >= warmup:
            last = telemetry.local_log.of_kind("step")
            if last:
                exposed.append(last[-1]["exposed_comm_s"])
    medians = torch.tensor([statistics.median(times[k]) for k in ("local", "dzl", "torch")])
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return {
        "local_s": medians[0].item(),
        "dzl_s": medians[1].item(),
        "torch_s": medians[2].item(),
        "dzl_exposed_measured_s": statistics.median(exposed) if exposed else float("nan"),
        "params": sum(p.numel() for p in models["local"].parameters()),
    }


def _local_log_sink():
    # step events of dzl.DDP are read back in-process: keep them in the local log
    telemetry.set_sink(telemetry.local_log.append)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    rows = []
    for world_size in args.world_sizes:
        with dzl.LiveCluster(world_size, timeout=120.0) as cluster:
            cluster.run(_local_log_sink)
            figures = cluster.run(_bench, args.steps, args.warmup, args.batch)[0]
        rows.append((world_size, figures))
    print(
        f"# {platform.node()} · {os.cpu_count()} CPUs · torch {torch.__version__} · gloo · "
        f"{rows[0][1]['params'] / 1e6:.1f} M parameters · median of {args.steps} steps"
    )
    print(
        f"{'N':>3} {'no comm':>9} {'dzl.DDP':>9} {'torch DDP':>10} {'dzl/torch':>10} "
        f"{'exposed dzl':>12} {'exposed torch':>14} {'dzl measured':>13}"
    )
    for n, f in rows:
        exp_dzl = max(f["dzl_s"] - f["local_s"], 0) / f["dzl_s"]
        exp_torch = max(f["torch_s"] - f["local_s"], 0) / f["torch_s"]
        print(
            f"{n:>3} {f['local_s'] * 1e3:>7.1f}ms {f['dzl_s'] * 1e3:>7.1f}ms "
            f"{f['torch_s'] * 1e3:>8.1f}ms {f['dzl_s'] / f['torch_s']:>9.3f}x "
            f"{exp_dzl:>11.0%} {exp_torch:>13.0%} "
            f"{f['dzl_exposed_measured_s'] / f['dzl_s']:>12.0%}"
        )


if __name__ == "__main__":
    main()
