"""What a live dashboard costs the training it watches.

The same DDP training job runs on one cluster without and then with a Dashboard attached (its
widget built, as when it is shown in a notebook), `--repeats` times. Each rank times its own
steps; each repeat gives one ratio, the step time with the dashboard over the step time without
it just before (1.00 = free), and the report gives their min, median and max, with the
dashboard's own drawing time and frame rate. The target is a median of at most 1.05. One-off
costs (the fitted last frame and the still picture made when the job ends) are not step time.
The dashboard draws in the notebook's process, so on a machine with fewer cores than ranks + 1
it competes with the ranks for CPU; it draws at the lowest priority, and `max_duty` bounds how
much of a core it takes.

    python benchmarks/dashboard_overhead.py [--steps 60] [--repeats 5] [--world-size 2]
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--refresh-s", type=float, default=None, help="default: Dashboard's")
    parser.add_argument("--max-duty", type=float, default=None, help="default: Dashboard's")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (min, median and max of the ratio)")
    options = {k: v for k, v in (("refresh_s", args.refresh_s), ("max_duty", args.max_duty)) if v}
    plain, watched, frames, drawing, events = [], [], [], [], []
    with dzl.LiveCluster(args.world_size, timeout=60.0) as cluster:
        cluster.run(train, 5)  # warm-up
        for _ in range(args.repeats):
            plain.append(max(cluster.run(train, args.steps)))  # the slowest rank
            dash = dzl.Dashboard(**options)
            dash.widget  # noqa: B018 - as when displayed: frames also set the widgets' state
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
            dash.close()
    ratios = [w / p for w, p in zip(watched, plain, strict=True)]
    base, with_dash = statistics.median(plain), statistics.median(watched)
    print(
        f"# {platform.node()} · {os.cpu_count()} CPUs · torch {torch.__version__} · "
        f"{args.world_size} ranks · {args.steps} steps x {args.repeats} · load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(f"step without dashboard  {base * 1e3:8.1f} ms (median)")
    print(f"step with dashboard     {with_dash * 1e3:8.1f} ms (median)")
    print(
        f"ratio with/without      min {min(ratios):.3f} · median {statistics.median(ratios):.3f}"
        f" · max {max(ratios):.3f}   (per repeat: {', '.join(f'{r:.3f}' for r in ratios)})"
    )
    print(
        f"dashboard frames/s {statistics.median(frames):.2f} · drawing "
        f"{statistics.median(drawing):.0%} of one core · {statistics.median(events):.0f} "
        "events per run"
    )


if __name__ == "__main__":
    main()
