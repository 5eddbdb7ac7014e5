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

    python benchmarks/dashboard_overhead.py [--steps 100] [--repeats 5] [--world-size 2]
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


def train(steps: int) -> tuple[float, float]:
    """(mean step time, this rank's CPU seconds) for `steps` DDP steps."""
    cpu = time.process_time()
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
    # the mean: slow steps while a frame is drawn count
    return statistics.mean(times[3:]), time.process_time() - cpu


def timed(cluster, steps: int, dash=None) -> tuple[float, ...]:
    """Run the job, waiting the same way with and without a dashboard; returns (the slowest
    rank's mean step time, the ranks' CPU seconds, this process's CPU seconds while the ranks
    ran, frames per second and the drawing's share of one core while they ran)."""
    job = cluster.submit(train, steps, dashboard=dash)
    # from here on: the set-up in on_submit, before the ranks start, is not step time
    cpu, start = time.process_time(), time.perf_counter()
    frames, drawing = (dash.frames, dash.render_seconds) if dash is not None else (0, 0.0)
    while not job.done():
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    parent_cpu = time.process_time() - cpu
    if dash is not None:  # frames drawn while the ranks ran, and their CPU seconds
        frames, drawing = dash.frames - frames, dash.render_seconds - drawing
    results = job.wait()  # with a dashboard, wait() also draws the final picture: not counted
    return (
        max(r[0] for r in results),
        sum(r[1] for r in results),
        parent_cpu,
        frames / elapsed,
        drawing / elapsed,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--refresh-s", type=float, default=None, help="default: Dashboard's")
    parser.add_argument("--max-duty", type=float, default=None, help="default: Dashboard's")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (min, median and max of the ratio)")
    options = {k: v for k, v in (("refresh_s", args.refresh_s), ("max_duty", args.max_duty)) if v}
    plain, watched, frames, drawing, events, cpu_ratios = [], [], [], [], [], []
    with dzl.LiveCluster(args.world_size, timeout=60.0) as cluster:
        cluster.run(train, 5)  # warm-up
        for _ in range(args.repeats):
            step, ranks_cpu, parent_cpu, *_ = timed(cluster, args.steps)
            plain.append(step)
            dash = dzl.Dashboard(**options)
            dash.widget  # noqa: B018 - as when displayed: frames also set the widgets' state
            step, ranks_cpu_w, parent_cpu_w, rate, duty = timed(cluster, args.steps, dash)
            watched.append(step)
            # the CPU the whole run took (ranks and notebook process), with over without: what
            # the dashboard would cost a machine with no idle time at all, whatever else runs
            cpu_ratios.append((ranks_cpu_w + parent_cpu_w) / (ranks_cpu + parent_cpu))
            frames.append(rate)
            drawing.append(duty)
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
        f"CPU of the run (ranks + notebook) with/without: median "
        f"{statistics.median(cpu_ratios):.3f} (min {min(cpu_ratios):.3f}, max "
        f"{max(cpu_ratios):.3f})"
    )
    print(
        f"dashboard frames/s {statistics.median(frames):.2f} · drawing "
        f"{statistics.median(drawing):.0%} of one core · {statistics.median(events):.0f} "
        "events per run"
    )


if __name__ == "__main__":
    main()
