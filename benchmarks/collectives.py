"""The from-scratch ring all-reduce against torch.distributed's all_reduce, side by side.

For each world size (2, 4) and message size (1, 16, 64 MB of float32) both run on the same
cluster, interleaved call by call so that both see the same machine state; the figure is the
ratio of medians, ring / torch (1.0 = as fast; the teaching ring should stay within 2x at
16 MB and above).

    python benchmarks/collectives.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist

import ddpzero_lab as dzl
from ddpzero_lab import comm

MB = 1_000_000


def _time_both(nbytes: int, repeats: int) -> dict[str, float]:
    tensor = torch.ones(nbytes // 4)
    # warm-up: connections, allocator
    dist.all_reduce(tensor)
    comm.ring_all_reduce(tensor)
    times = {"torch": [], "ring": []}
    for _ in range(repeats):
        for name, fn in (("torch", dist.all_reduce), ("ring", comm.ring_all_reduce)):
            dist.barrier()
            start = time.perf_counter()
            fn(tensor)
            times[name].append(time.perf_counter() - start)
    # the slowest rank decides when a collective is done
    out = torch.tensor([statistics.median(times["torch"]), statistics.median(times["ring"])])
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return {"torch_s": out[0].item(), "ring_s": out[1].item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    rows = []
    for world_size in args.world_sizes:
        with dzl.LiveCluster(world_size, timeout=120.0) as cluster:
            for size in args.sizes_mb:
                figures = cluster.run(_time_both, size * MB, args.repeats)[0]
                rows.append({"world_size": world_size, "mb": size, **figures})

    print(f"# {platform.node()} · {os.cpu_count()} CPUs · torch {torch.__version__} · gloo")
    print(
        f"{'N':>3} {'MB':>5} {'dist.all_reduce':>16} {'ring_all_reduce':>16} {'ring / torch':>13}"
    )
    for row in rows:
        ratio = row["ring_s"] / row["torch_s"]
        print(
            f"{row['world_size']:>3} {row['mb']:>5} {row['torch_s'] * 1e3:>13.1f} ms "
            f"{row['ring_s'] * 1e3:>13.1f} ms {ratio:>12.2f}x"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
