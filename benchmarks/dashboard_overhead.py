"""What a live dashboard costs the training it watches.

The same DDP training job runs on one cluster with and without a Dashboard attached,
alternating, `--repeats` times each. Each rank times its own steps; the figure is the median
step time with the dashboard over the median without (1.00 = free), with the dashboard's own
drawing time and frame rate. One-off costs (the final picture drawn when the job ends) are not
step time and are reported apart.
The dashboard draws in the notebook's process, so on a machine with fewer cores than ranks + 1
it competes with the ranks for CPU; `max_duty` bounds how much of a core it takes.

    python benchmarks/dashboard_overhead.py [--steps 60] [--repeats 3] [--world-size 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

import ddpzero_lab as dzl


def train(steps: int) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    model, opt = dzl.parallelize(model, "ddp", optimizer=lambda p: torch.optim.AdamW(p))
    times = []
    for step in range(steps):
        start = time.perf_counter()
        x, y = torch.randn(64, 512), torch.randint(0, 10, (64,))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        dzl.emit("loss", step=step, loss=loss.item())
        times.append(time.perf_counter() - start)
    return statistics.mean(times[3:])  # the mean: slow steps while a frame is drawn count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--refresh-s", type=float, default=0.4)
    parser.add_argument("--max-duty", type=float, default=0.2)
    args = parser.parse_args()
    plain, watched, frames, drawing, events = [], [], [], [], []
    with dzl.LiveCluster(args.world_size, timeout=60.0) as cluster:
        cluster.run(train, 5)  # warm-up
        for _ in range(args.repeats):
            plain.append(max(cluster.run(train, args.steps)))  # the slowest rank
            dash = dzl.Dashboard(refresh_s=args.refresh_s, max_duty=args.max_duty)
            start = time.perf_counter()
            job = cluster.submit(train, args.steps, dashboard=dash)
            while not job.done():
                time.sleep(0.01)
            elapsed = time.perf_counter() - start
            frames_during, drawing_during = dash.frames, dash.render_seconds
            watched.append(max(job.wait()))  # wait() also draws the final picture
            frames.append(frames_during / elapsed)
            drawing.append(drawing_during / elapsed)
            events.append(dash.state.events_seen)
    base, with_dash = statistics.median(plain), statistics.median(watched)
    print(
        f"# {platform.node()} · {os.cpu_count()} CPUs · torch {torch.__version__} · "
        f"{args.world_size} ranks · {args.steps} steps x {args.repeats}"
    )
    print(f"step without dashboard  {base * 1e3:8.1f} ms")
    print(f"step with dashboard     {with_dash * 1e3:8.1f} ms   ratio {with_dash / base:.3f}")
    print(
        f"dashboard frames/s {statistics.median(frames):.2f} · drawing "
        f"{statistics.median(drawing):.0%} of one core · {statistics.median(events):.0f} "
        "events per run"
    )


if __name__ == "__main__":
    main()
