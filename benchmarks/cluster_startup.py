"""Cluster start-up and dispatch: ddpzero_lab's LiveCluster against torch.multiprocessing.spawn.

What a learner would do without a live cluster is start fresh processes for every experiment:
`torch.multiprocessing.spawn` of N ranks that join a process group, run one function and exit.
This script measures, in one run on one machine:

  * cold start of a LiveCluster at world sizes 2 and 4, each in a fresh interpreter (this
    includes starting the forkserver, which imports torch once); then, in this process, a
    second cluster (the forkserver already warm) and a restart();
  * warm dispatch: the median wall time of `cluster.run(empty)` over 50 calls;
  * torch.multiprocessing.spawn of the same empty function (process group included),

and prints each LiveCluster figure as a ratio against the spawn baseline.

    python benchmarks/cluster_startup.py [--calls 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

import ddpzero_lab as dzl


def empty():
    return None


def _spawned_rank(rank: int, world_size: int, store_path: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, world_size),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )
    empty()
    dist.destroy_process_group()


def torch_spawn_seconds(world_size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        torch_mp.spawn(
            _spawned_rank, args=(world_size, os.path.join(tmp, "store")), nprocs=world_size
        )
        return time.perf_counter() - start


_COLD = """
import time
import ddpzero_lab as dzl
start = time.perf_counter()
cluster = dzl.LiveCluster({world_size})
print(time.perf_counter() - start)
cluster.close()
"""


def cold_start_seconds(world_size: int) -> float:
    """LiveCluster(world_size) in a fresh interpreter (the package already imported)."""
    out = subprocess.run(
        [sys.executable, "-c", _COLD.format(world_size=world_size)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    figures: dict[str, float] = {}
    dzl.LiveCluster(1).close()  # start this process's forkserver, so "warm start" is warm
    for world_size in (2, 4):
        figures[f"cold_start_s_n{world_size}"] = cold_start_seconds(world_size)
        start = time.perf_counter()
        cluster = dzl.LiveCluster(world_size)
        figures[f"warm_start_s_n{world_size}"] = time.perf_counter() - start
        cluster.run(empty)  # first call pays one-off pickling set-up
        latencies = []
        for _ in range(args.calls):
            start = time.perf_counter()
            cluster.run(empty)
            latencies.append(time.perf_counter() - start)
        figures[f"warm_dispatch_ms_n{world_size}"] = statistics.median(latencies) * 1e3
        start = time.perf_counter()
        cluster.restart()
        figures[f"restart_s_n{world_size}"] = time.perf_counter() - start
        cluster.close()
        figures[f"torch_spawn_s_n{world_size}"] = statistics.median(
            torch_spawn_seconds(world_size) for _ in range(3)
        )

    print(f"# {platform.node()} · {os.cpu_count()} CPUs · torch {torch.__version__}")
    header = (
        "world size",
        "cold start",
        "warm start",
        "restart",
        "run(empty)",
        "torch spawn",
        "spawn / run()",
        "cold / spawn",
    )
    print("  ".join(f"{h:>13}" for h in header))
    for n in (2, 4):
        cold, warm = figures[f"cold_start_s_n{n}"], figures[f"warm_start_s_n{n}"]
        restart, spawn = figures[f"restart_s_n{n}"], figures[f"torch_spawn_s_n{n}"]
        run_ms = figures[f"warm_dispatch_ms_n{n}"]
        row = (
            f"{n}",
            f"{cold:.2f} s",
            f"{warm:.2f} s",
            f"{restart:.2f} s",
            f"{run_ms:.2f} ms",
            f"{spawn:.2f} s",
            f"{spawn * 1e3 / run_ms:.0f}x",
            f"{cold / spawn:.2f}x",
        )
        print("  ".join(f"{c:>13}" for c in row))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
