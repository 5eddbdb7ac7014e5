"""The command line: `python -m ddpzero_lab {train,memory,doctor}`.

This module owns argument parsing and printing; the work is done by the package's modules.
`train` spawns its own LiveCluster when started plainly, and joins the process group torchrun
set up (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment) when started by torchrun.
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
    if not _report_fit(world_size, gpus):
        return 1
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


def _report_fit(world_size: int, gpus: int) -> bool:
    """Print whether `world_size` ranks fit this machine; False if memory cannot hold them."""
    import os

    from .cluster.spawn import WORKER_BYTES_ESTIMATE

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    need = world_size * WORKER_BYTES_ESTIMATE
    try:
        import psutil

        available = psutil.virtual_memory().available
    except Exception:  # noqa: BLE001 - no way to tell
        available = None
    if available is None:
        memory, fits = f"about {need / 1e9:.1f} GB needed (free memory unknown)", True
    else:
        fits = need <= available
        verdict = "fits" if fits else "does NOT fit: choose a smaller --world-size"
        memory = f"about {need / 1e9:.1f} GB of {available / 1e9:.1f} GB free, {verdict}"
    if cores and world_size > cores:
        cpu = f"{world_size} ranks share {cores} cores (slower steps, same results)"
    else:
        cpu = f"{cores} cores, one or more per rank"
    device = "nccl, one GPU per rank" if gpus >= world_size else "gloo on the CPU"
    print(f"fit         {world_size} ranks: memory {memory}; {cpu}; {device}")
    return fits


def _rank_and_sum() -> float:
    import torch
    import torch.distributed as dist

    from . import rank
    from .comm import backend_device

    t = torch.tensor([float(rank())], device=backend_device())  # nccl: a CUDA tensor
    dist.all_reduce(t)
    return t.item()


# --- train ---------------------------------------------------------------------------------

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """True when torchrun (or any env:// launcher) started this process as one rank."""
    import os

    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _train_config(args: argparse.Namespace):
    from .workloads import TrainConfig

    dataset = args.dataset or ("text" if args.model == "gpt" else "digits")
    return TrainConfig(
        strategy=args.strategy,
        model=args.model,
        dataset=dataset,
        world_size=args.world_size,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        precision=args.precision,
        grad_accum=args.grad_accum,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        seed=args.seed,
        drop_last=not args.pad_last,
        data_dir=args.data_dir,
        download=args.download,
        block_size=args.block_size,
        num_samples=args.num_samples,
        return_state=args.save_params is not None,
    )


def _train(args: argparse.Namespace) -> int:
    import os

    from .workloads import local_batch_size

    torchrun = under_torchrun()
    if torchrun:
        launched = int(os.environ["WORLD_SIZE"])
        if args.world_size is not None and args.world_size != launched:
            print(
                f"error: --world-size {args.world_size} but torchrun started {launched} ranks; "
                "leave --world-size out under torchrun",
                file=sys.stderr,
            )
            return 2
        args.world_size = launched
    elif args.world_size is None:
        args.world_size = 1 if args.strategy == "local" else 2
    try:
        config = _train_config(args)
        config.validate()
        local_batch_size(config, config.world_size)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _train_torchrun(args, config) if torchrun else _train_spawned(args, config)


def _train_spawned(args: argparse.Namespace, config) -> int:
    import os
    import time

    from .cluster import ClusterError, LiveCluster, RankError
    from .workloads import train

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads_per_rank or max(1, (cores or 1) // config.world_size)
    started = time.perf_counter()
    try:
        with LiveCluster(
            config.world_size,
            backend=args.backend,
            timeout=args.timeout,
            threads_per_rank=threads,
        ) as cluster:
            job = cluster.submit(train, config)
            _follow(job, config)
            results = job.wait()
            backend = cluster.backend
    except RankError as exc:
        if args.traceback:
            print(str(exc), file=sys.stderr)
        for rank in exc.ranks or sorted(exc.failures):
            print(f"error: rank {rank}: {exc.failures[rank].summary()}", file=sys.stderr)
        return 1
    except (ClusterError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _report(results, config, backend, time.perf_counter() - started, args)
    return 0


def _follow(job, config) -> None:
    """A progress bar in the parent, fed by rank 0's loss events, when stdout is a terminal."""
    if not sys.stdout.isatty():
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return
    import time

    def show(bar) -> None:
        losses = [e for e in job.events if e.kind == "loss" and e.rank == 0]
        if losses:
            bar.n = losses[-1]["step"] + 1
            bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}", refresh=False)
            bar.refresh()

    with tqdm(total=config.steps, desc=f"{config.strategy} {config.model}") as bar:
        while not job.done():
            show(bar)
            time.sleep(0.2)
        show(bar)  # the last steps, which may have come with the end of the job


def _train_torchrun(args: argparse.Namespace, config) -> int:
    """One rank of torchrun's process group. Ends the process itself (see the end)."""
    import datetime
    import os
    import time

    import torch
    import torch.distributed as dist

    from .workloads import train

    # One GPU per process where there are GPUs (nccl), else the CPU (gloo); the rendezvous is
    # torchrun's (env://: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).
    if args.backend == "nccl" and not torch.cuda.is_available():
        print("error: --backend nccl needs CUDA GPUs; none are visible", file=sys.stderr)
        return 2
    if torch.cuda.is_available() and args.backend in ("auto", "nccl"):
        backend, local_rank = "nccl", int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        extra = {"device_id": torch.device("cuda", local_rank)}
    else:
        backend, extra = "gloo", {}
    dist.init_process_group(
        backend,
        init_method="env://",
        timeout=datetime.timedelta(seconds=args.timeout),
        **extra,
    )
    rank = dist.get_rank()
    started = time.perf_counter()
    code = 0
    try:
        result = train(config)
        # nobody tears the group down while a peer may still be inside a collective
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            _report([result], config, backend, time.perf_counter() - started, args)
    except Exception as exc:  # noqa: BLE001 - one line per rank; torchrun reports the exit code
        print(f"error: rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        if args.traceback:
            import traceback

            traceback.print_exc()
        code = 1
    # Skip the interpreter's teardown, as LiveCluster workers do: with gloo's threads still
    # about, it sometimes aborts (SIGABRT, "terminate called without an active exception")
    # after the work is done, which torchrun would report as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report(results: list[dict], config, backend: str, wall_s: float, args) -> None:
    """Print a short summary of rank 0's result; write --json and --save-params files."""
    import json
    import statistics

    result = results[0]
    losses = result["losses"]
    local = config.batch_size // (1 if config.strategy == "local" else config.world_size)
    print(
        f"train: {config.strategy}, {config.model} ({result['num_params']:,} parameters) on "
        f"{config.dataset}, {config.world_size} rank(s) ({backend}), global batch "
        f"{config.batch_size} ({local} per rank"
        + (f", {config.grad_accum} micro-batches" if config.grad_accum > 1 else "")
        + f"), {config.precision}"
    )
    if losses:
        first = result["start_step"] + 1
        print(f"loss    {losses[0]:.4f} (step {first}) -> {losses[-1]:.4f} (step {config.steps})")
        print(
            f"time    {statistics.median(result['step_times']) * 1e3:.1f} ms/step (median), "
            f"{wall_s:.1f} s in all"
        )
    else:
        print(f"loss    no steps run: the checkpoint is at step {result['start_step']} already")
    for entry in result["eval"]:
        accuracy, loss = entry["accuracy"], entry["loss"]
        print(f"eval    step {entry['step']}: accuracy {accuracy:.4f}, loss {loss:.4f}")
    sums = {r["params_sha256"] for r in results}
    agree = "" if len(sums) == 1 else f" (ranks DISAGREE: {len(sums)} different digests)"
    print(
        f"params  checksum {result['checksum']:.8f}, sha256 {result['params_sha256'][:16]}{agree}"
    )
    if args.json:
        summary = {k: v for k, v in result.items() if k != "state_dict"}
        summary["wall_s"] = wall_s
        summary["backend"] = backend
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    if args.save_params:
        import torch

        torch.save(result["state_dict"], args.save_params)


def _add_train_parser(sub) -> None:
    from .workloads import DATASETS, MODELS, STRATEGIES

    train = sub.add_parser(
        "train",
        help="train a model with a strategy on a live cluster, or under torchrun",
        usage="python -m ddpzero_lab train [--strategy S] [--model M] [--dataset D] "
        "[--world-size N] [--steps K] [options]",
        description=(
            "Train a model with one strategy. Started plainly, it starts a LiveCluster of "
            "--world-size ranks; started by torchrun (e.g. `torchrun --nproc-per-node 4 -m "
            "ddpzero_lab train ...`) each process is one rank of torchrun's process group "
            "(nccl with one GPU per process where there are GPUs, else gloo). The defaults "
            "train a small MLP on scikit-learn's 8x8 digits, offline, in seconds."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--strategy", choices=STRATEGIES, default="ddp")
    train.add_argument("--model", choices=MODELS, default="mlp")
    train.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="default: text for gpt, digits otherwise (synthetic: CIFAR-10's shapes, for "
        "speed; cifar10: a local copy, or --download)",
    )
    train.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks to start (default 2, 1 for local); under torchrun, its WORLD_SIZE",
    )
    train.add_argument("--steps", type=int, default=20, help="optimizer steps")
    train.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="global batch: samples per optimizer step over all ranks and micro-batches",
    )
    train.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    train.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    train.add_argument("--precision", choices=["fp32", "bf16-mixed", "fp16-mixed"], default="fp32")
    train.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches accumulated per step"
    )
    train.add_argument(
        "--eval-every", type=int, default=0, help="evaluate every k steps (0: at the end only)"
    )
    train.add_argument(
        "--eval-samples", type=int, default=512, help="held-out samples per evaluation (0: none)"
    )
    train.add_argument("--checkpoint-dir", default=None, help="save checkpoints here")
    train.add_argument(
        "--checkpoint-every", type=int, default=0, help="save every k steps (0: at the end only)"
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir"
    )
    train.add_argument("--seed", type=int, default=0, help="model init and data order")
    train.add_argument(
        "--pad-last",
        action="store_true",
        help="pad an epoch's incomplete last global batch with repeated samples (default: drop it)",
    )
    train.add_argument("--data-dir", default=None, help="where CIFAR-10 is (default $DDPZERO_DATA)")
    train.add_argument(
        "--download", action="store_true", help="download CIFAR-10 if it is not in --data-dir"
    )
    train.add_argument("--block-size", type=int, default=64, help="text: characters per sample")
    train.add_argument("--num-samples", type=int, default=2048, help="synthetic: training samples")
    train.add_argument(
        "--backend", choices=["auto", "gloo", "nccl"], default="auto", help="process group backend"
    )
    train.add_argument(
        "--threads-per-rank",
        type=int,
        default=None,
        help="torch threads per spawned rank (default: cores / world size)",
    )
    train.add_argument(
        "--timeout", type=float, default=60.0, help="seconds a collective may wait before failing"
    )
    train.add_argument("--json", default=None, metavar="FILE", help="write rank 0's results here")
    train.add_argument(
        "--save-params",
        default=None,
        metavar="FILE",
        help="torch.save the full final state_dict here (rank 0)",
    )
    train.add_argument(
        "--traceback", action="store_true", help="show the ranks' full tracebacks on failure"
    )
    train.set_defaults(run=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddpzero_lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)

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

    checkpoint = sub.add_parser("checkpoint", help="work with sharded checkpoints")
    actions = checkpoint.add_subparsers(dest="action", required=True)
    consolidate = actions.add_parser(
        "consolidate",
        help="write a checkpoint's parameters and buffers as one plain state_dict file",
        description="Assemble a sharded checkpoint (any world size, any strategy) into a plain "
        "state_dict saved with torch.save, loadable with model.load_state_dict(torch.load(OUT, "
        "weights_only=True)).",
    )
    consolidate.add_argument("directory", help="a checkpoint directory, or its parent (latest)")
    consolidate.add_argument("out", help="the .pt file to write")
    consolidate.set_defaults(run=_consolidate)
    return parser


def _consolidate(args) -> int:
    from .checkpoint import CheckpointError, consolidate_checkpoint

    try:
        out = consolidate_checkpoint(args.directory, args.out)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
