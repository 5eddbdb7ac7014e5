"""The command line: `python -m ddpzero_lab {memory,doctor}`.

This module owns argument parsing and printing; the work is done by the package's modules.
"""

from __future__ import annotations

import argparse
import sys


def _memory(args: argparse.Namespace) -> int:
    from .memory import STAGE_NAMES, memory_table, zero_memory_estimate

    overrides = {
        key: value
        for key, value in (
            ("params_bytes", args.params_bytes),
            ("grads_bytes", args.grads_bytes),
            ("optimizer_bytes_per_param", args.optimizer_bytes),
        )
        if value is not None
    }
    try:
        zero_memory_estimate(args.params, 1, 0, preset=args.preset, **overrides)
        for n in args.world_size:
            zero_memory_estimate(args.params, n, 0, preset=args.preset, **overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    per = zero_memory_estimate(1, 1, 0, preset=args.preset, **overrides)
    print(
        f"Model states per rank, decimal GB, for {args.params:.4g} parameters "
        f"({per['params']:g} + {per['grads']:g} + {per['optimizer']:g} bytes per parameter: "
        "params + grads + optimizer state)"
    )
    print(f"stages: {', '.join(f'{s} = {name}' for s, name in STAGE_NAMES.items())}")
    print(memory_table(args.params, args.world_size, preset=args.preset, **overrides))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    import platform

    import torch

    print(f"python      {platform.python_version()} ({sys.executable})")
    print(f"torch       {torch.__version__}")
    try:
        import torchvision

        print(f"torchvision {torchvision.__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"torchvision not usable: {exc}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"GPUs        {gpus}")
    print(
        f"backends    gloo={torch.distributed.is_gloo_available()} "
        f"nccl={torch.distributed.is_nccl_available()}"
    )
    from .cluster import LiveCluster

    world_size = args.world_size
    with LiveCluster(world_size, timeout=30.0) as cluster:
        import time

        start = time.perf_counter()
        ranks = cluster.run(_rank_and_sum)
        print(
            f"cluster     {world_size} ranks ({cluster.backend}) all-reduce ok: "
            f"{ranks == [float(sum(range(world_size)))] * world_size} "
            f"({(time.perf_counter() - start) * 1e3:.0f} ms)"
        )
    return 0


def _rank_and_sum() -> float:
    import torch
    import torch.distributed as dist

    from . import rank

    t = torch.tensor([float(rank())])
    dist.all_reduce(t)
    return t.item()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddpzero_lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    memory = sub.add_parser("memory", help="model-state memory per rank (ZeRO paper, Table 1)")
    memory.add_argument("--params", type=float, required=True, help="number of parameters Ψ")
    memory.add_argument(
        "--world-size",
        type=int,
        nargs="+",
        default=[1, 4, 16, 64, 256, 1024],
        help="data-parallel degrees N_d",
    )
    memory.add_argument("--preset", choices=["mixed_adam", "fp32_adam"], default="mixed_adam")
    memory.add_argument("--params-bytes", type=float, default=None)
    memory.add_argument("--grads-bytes", type=float, default=None)
    memory.add_argument(
        "--optimizer-bytes",
        type=float,
        default=None,
        help="K, bytes of optimizer state per parameter",
    )
    memory.set_defaults(run=_memory)

    doctor = sub.add_parser("doctor", help="check torch, backends and a small live cluster")
    doctor.add_argument("--world-size", type=int, default=2)
    doctor.set_defaults(run=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
