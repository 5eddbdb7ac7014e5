"""A short training of each strategy on the GPUs present: step time, model state and CUDA
memory per rank, traffic per step; the dashboard picture of the ZeRO-3 run.

A second table gives, per strategy and rank, communication per step as CUDA events time it
(the `step` events' comm_s and exposed_comm_s) next to the host's launch-time figures
(host_comm_s, host_exposed_comm_s), and the CUDA peak (max_memory_allocated) next to the
model state at rest.

One GPU: the ranks share it through gloo. One GPU per rank: nccl. Run by scripts/gpu_check.sh.

    python scripts/gpu_table.py [--world-size 2] [--steps 10] [--out gpu_check]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab import telemetry

MB = 1e6
RUNS = [
    ("ddp", "fp32"),
    ("zero1", "fp32"),
    ("zero2", "fp32"),
    ("zero3", "fp32"),
    ("zero3", "bf16-mixed"),
]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(strategy: str, precision: str, steps: int, warmup: int, width: int, cpu: bool):
    here = dzl.device()
    device = here if here.type == "cuda" or cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10)).to(device)
    psi = sum(p.numel() for p in model.parameters())
    model, opt = dzl.parallelize(
        model, strategy, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4), precision=precision
    )
    g = torch.Generator(device=device).manual_seed(dzl.rank())
    times = []
    # the step events this rank emits, read on their way to the parent (which still gets them)
    step_events: list = []
    forward = telemetry.get_sink()

    def keep_steps(event) -> None:
        if event.kind == "step":
            step_events.append(event)
        forward(event)

    telemetry.set_sink(keep_steps)
    for step in range(warmup + steps):
        x = torch.randn(64, width, device=device, generator=g)
        y = torch.randint(0, 10, (64,), device=device, generator=g)
        if step == warmup:
            dzl.reset_traffic()
        _sync(device)
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        state = dzl.model_state_bytes(model, opt) if step == warmup + steps - 1 else None
        opt.zero_grad()
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        dzl.emit("loss", step=step, loss=loss.item())
    telemetry.set_sink(forward)
    sent = sum(v["sent"] for v in dzl.traffic().values())
    timed = [e for e in step_events if e.get("step", -1) >= warmup] or step_events[-1:]

    def per_step(name: str, fallback: str | None = None) -> float:
        values = [e.get(name, e.get(fallback) if fallback else None) for e in timed]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else float("nan")

    return {
        "rank": dzl.rank(),
        # on a GPU comm_s / exposed_comm_s are CUDA-event times and the host's launch-time
        # figures are kept as host_*; without CUDA events the step says nothing of timing
        "timing": timed[-1].get("timing", "host") if timed else "none",
        "comm_s": per_step("comm_s"),
        "exposed_s": per_step("exposed_comm_s"),
        "host_comm_s": per_step("host_comm_s", "comm_s"),
        "host_exposed_s": per_step("host_exposed_comm_s", "exposed_comm_s"),
        "psi": psi,
        "step_s": statistics.median(times),
        "state": state,
        "cuda_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "sent_per_step": sent / steps,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--out", default="gpu_check")
    parser.add_argument("--cpu", action="store_true", help="a dry run on the CPU")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with dzl.LiveCluster(args.world_size, timeout=300.0) as cluster:
        print(f"# backend {cluster.backend} · {args.world_size} ranks", flush=True)
        for strategy, precision in RUNS:
            dash = dzl.Dashboard() if strategy == "zero3" and precision == "fp32" else None
            per_rank = cluster.run(
                _train,
                strategy,
                precision,
                args.steps,
                args.warmup,
                args.width,
                args.cpu,
                dashboard=dash,
            )
            if dash is not None:
                dash.save(out / "dashboard_zero3.png")
            rows.append((strategy, precision, per_rank))
    first = rows[0][2][0]
    print(f"# {first['gpu']} · {first['psi'] / 1e6:.1f} M parameters · AdamW · batch 64/rank")
    print(
        f"{'strategy':<8} {'precision':<11} {'step ms':>8} {'state MB/rank':>14} "
        f"{'(P + G + O)':>24} {'CUDA peak MB':>13} {'sent MB/step':>13} {'sent / (B(N-1)/N)':>18}"
    )
    n = args.world_size
    for strategy, precision, per_rank in rows:
        r = max(per_rank, key=lambda v: v["step_s"])
        s = r["state"]
        element = 4 if precision == "fp32" else 2
        unit = r["psi"] * element * (n - 1) / n
        parts = f"{s['params'] / MB:.0f} + {s['grads'] / MB:.0f} + {s['optimizer'] / MB:.0f}"
        total = (s["params"] + s["grads"] + s["optimizer"]) / MB
        print(
            f"{strategy:<8} {precision:<11} {r['step_s'] * 1e3:>8.1f} {total:>14.0f} "
            f"{parts:>24} {r['cuda_peak'] / MB:>13.0f} {r['sent_per_step'] / MB:>13.1f} "
            f"{r['sent_per_step'] / unit:>18.2f}"
        )
    print()
    print("# communication per step (median over the timed steps): CUDA events against the host")
    print("# clock, which under NCCL sees launch times; CUDA peak against model state at rest")
    print(
        f"{'strategy':<8} {'precision':<11} {'rank':>4} {'timing':>10} {'comm ms':>8} "
        f"{'host':>8} {'exposed ms':>10} {'host':>8} {'state MB':>9} {'CUDA peak MB':>13}"
    )
    for strategy, precision, per_rank in rows:
        for r in per_rank:
            s = r["state"]
            state = (s["params"] + s["grads"] + s["optimizer"]) / MB
            print(
                f"{strategy:<8} {precision:<11} {r['rank']:>4} {r['timing']:>10} "
                f"{r['comm_s'] * 1e3:>8.2f} {r['host_comm_s'] * 1e3:>8.2f} "
                f"{r['exposed_s'] * 1e3:>10.2f} {r['host_exposed_s'] * 1e3:>8.2f} "
                f"{state:>9.1f} {r['cuda_peak'] / MB:>13.1f}"
            )


if __name__ == "__main__":
    main()
