"""Peak memory per strategy, activation checkpointing's saving and its cost in step time.

For each strategy (ddp, zero1, zero2, zero3) on the course's tiny GPT (4 blocks, 64 channels,
65 characters, AdamW, fp32) on a live cluster of `--world-size` gloo ranks, with and without
`activation_checkpointing=True` (each transformer block checkpointed):

  * the model state at rest (after the step) and the peak of the step, as the memory tracker
    counts them on a CPU (tensors alive, each storage once, sampled at every allocation point),
    beside `peak_memory_estimate_for`'s formula (activations: the bytes the tracker saw saved
    in forward);
  * activation bytes at their peak (the forward's end without checkpointing; the first
    recompute in backward with it);
  * step time (forward, backward, step, zero_grad): the median of `--steps` steps after a
    warm-up, the slowest rank, in each of `--repeats` fresh clusters; reported as min / median /
    max over the repeats, and the ratio with / without checkpointing (the recompute's cost).
    Timed with the tracker detached: the strategy is timed, not its instrumentation; the
    tracker's own cost is timed apart (`tracker` column: its step time / without it).

A cluster's step times on a shared 2-core machine are noisy (other processes, gloo's
threads), so the recompute's cost and the tracker's are also measured in one process, with
no communication: three models (plain, checkpointed, plain with the tracker attached) step in
turn, `--steps` steps each, the median per model; the ratios are reported as min / median /
max over `--repeats` repeats.

    python benchmarks/memory.py [--steps 10] [--repeats 3] [--world-size 2] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.memory import MemoryTracker, peak_memory_estimate_for

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


def _model(batch: int, block: int):
    from ddpzero_lab.workloads.models import tiny_gpt

    torch.manual_seed(0)
    model = tiny_gpt(65, block_size=block, n_layer=4)
    g = torch.Generator().manual_seed(dzl.rank() if dzl.world_size() > 1 else 0)
    x = torch.randint(0, 65, (batch, block), generator=g)
    y = torch.randint(0, 65, (batch, block), generator=g)
    return model, x, y


def _run(strategy: str, checkpointing: bool, steps: int, warmup: int, batch: int, block: int):
    model, x, y = _model(batch, block)
    model, opt = dzl.parallelize(
        model,
        strategy,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        activation_checkpointing=True if checkpointing else None,
        track_memory=False,
    )

    def step():
        logits = model(x)
        nn.functional.cross_entropy(logits.reshape(-1, 65), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()

    times = []
    for i in range(warmup + steps):
        torch.distributed.barrier()
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    tracked = []
    tracker = MemoryTracker(emit=False).attach(model, opt)
    for i in range(warmup + steps):
        torch.distributed.barrier()
        start = time.perf_counter()
        step()
        if i >= warmup:
            tracked.append(time.perf_counter() - start)
    peaks = dict(tracker.peaks)
    activations = max(tracker.activation_peaks.values())
    tracker.detach()
    return {
        "seconds": statistics.median(times),
        "tracked": statistics.median(tracked),
        "peak": max(p["total"] for p in peaks.values()),
        "at_rest": peaks["step"]["total"],
        "activations": activations,
        "saved": tracker.activations,
    }


def _interleaved(steps: int, warmup: int, batch: int, block: int) -> dict[str, float]:
    """Median step time of a plain, a checkpointed and a tracked model, stepped in turn."""
    runs = {}
    for name in ("plain", "checkpointed", "tracked"):
        model, x, y = _model(batch, block)
        model, opt = dzl.parallelize(
            model,
            "local",
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
            activation_checkpointing=True if name == "checkpointed" else None,
            track_memory=name == "tracked",
        )
        runs[name] = (model, opt, x, y)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, (model, opt, x, y) in runs.items():
            start = time.perf_counter()
            logits = model(x)
            nn.functional.cross_entropy(logits.reshape(-1, 65), y.reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=64)
    args = parser.parse_args()
    n = args.world_size
    results: dict[tuple[str, bool], list[dict]] = {}
    for _ in range(args.repeats):
        with dzl.LiveCluster(n, timeout=60.0) as cluster:
            for strategy in STRATEGIES:
                for checkpointing in (False, True):
                    per_rank = cluster.run(
                        _run,
                        strategy,
                        checkpointing,
                        args.steps,
                        args.warmup,
                        args.batch,
                        args.block,
                    )
                    slowest = max(per_rank, key=lambda r: r["seconds"])
                    merged = {**per_rank[0], "seconds": slowest["seconds"]}
                    merged["tracked"] = max(r["tracked"] for r in per_rank)
                    results.setdefault((strategy, checkpointing), []).append(merged)
    local = [
        _interleaved(args.steps, args.warmup, args.batch, args.block) for _ in range(args.repeats)
    ]
    model = _model(args.batch, args.block)[0]
    print(
        f"tiny GPT ({sum(p.numel() for p in model.parameters())} parameters), batch "
        f"{args.batch} x {args.block} per rank, AdamW fp32, N={n} gloo ranks, {args.repeats} "
        f"repeats; bytes on rank 0, step time min / median / max (s), slowest rank"
    )
    header = (
        f"{'strategy':<8} {'at rest':>9} {'peak':>9} {'formula':>9} {'peak ckpt':>9} "
        f"{'act':>9} {'act ckpt':>9} {'step s':>21} {'step s ckpt':>21} {'ckpt cost':>17} "
        f"{'tracker':>17}"
    )
    print(header)
    for strategy in STRATEGIES:
        plain, ckpt = results[(strategy, False)], results[(strategy, True)]
        formula = peak_memory_estimate_for(model, strategy, n, plain[0]["saved"])["peak"]
        ratios = [c["seconds"] / p["seconds"] for p, c in zip(plain, ckpt, strict=True)]
        tracker = [p["tracked"] / p["seconds"] for p in plain]
        print(
            f"{strategy:<8} {plain[0]['at_rest']:>9} {plain[0]['peak']:>9} {int(formula):>9} "
            f"{ckpt[0]['peak']:>9} {plain[0]['activations']:>9} {ckpt[0]['activations']:>9} "
            f"{_spread([p['seconds'] for p in plain]):>21} "
            f"{_spread([c['seconds'] for c in ckpt]):>21} {_spread(ratios, '{:.2f}'):>17} "
            f"{_spread(tracker, '{:.2f}'):>17}"
        )
    print(
        "one process, interleaved: step s plain "
        f"{_spread([r['plain'] for r in local])}, checkpointed "
        f"{_spread([r['checkpointed'] for r in local])}; checkpointed / plain "
        f"{_spread([r['checkpointed'] / r['plain'] for r in local], '{:.2f}')}; "
        f"tracked / plain {_spread([r['tracked'] / r['plain'] for r in local], '{:.2f}')}"
    )


if __name__ == "__main__":
    main()
