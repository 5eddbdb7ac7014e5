"""Lesson 11 (the tiny GPT with ZeRO-3, and torchrun on several nodes): what the notebook calls
in one line.

It owns the run's sizes, the GPT's description and its ZeRO-3 units, the loss figure, sampling
text, the TrainConfig spelled as command-line options, starting the rehearsal "nodes" (torchrun
processes on this machine's loopback interface, each in its own session so that a timeout ends it
and its ranks), and the self-check of the command-line exercise, which parses the learner's
command with torchrun's own argument parser.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

SEED = 0


@dataclasses.dataclass(frozen=True)
class Sizes:
    block: int  # characters per sample: the GPT's context
    global_batch: int
    steps: int
    eval_every: int
    eval_samples: int
    timeout_s: float  # for each torchrun node


def sizes(run) -> Sizes:
    return Sizes(64, 16, 60, 20, 256, 180.0) if run.small else Sizes(64, 32, 1500, 250, 2048, 900.0)


def gpt_config(s: Sizes):
    from ..workloads import TrainConfig

    return TrainConfig(
        strategy="zero3",
        model="gpt",
        dataset="text",
        block_size=s.block,
        batch_size=s.global_batch,
        lr=3e-3,
        steps=s.steps,
        eval_every=s.eval_every,
        eval_samples=s.eval_samples,
        seed=SEED,
        return_state=True,
        progress="none",
    )


def make_gpt(block: int):
    from ..workloads import load_dataset, tiny_gpt

    text = load_dataset("text", block_size=block)
    torch.manual_seed(SEED)  # as dzl.workloads.train seeds it
    return tiny_gpt(text.num_classes, block_size=block), text


def describe(block: int) -> int:
    """Print the text and the GPT's parameters per child; return the vocabulary size."""
    model, text = make_gpt(block)
    psi = sum(p.numel() for p in model.parameters())  # the tied weight counts once
    print(f"text: {len(text.train):,} windows of {block} characters, {text.num_classes} symbols")
    print(f"tiny GPT: Ψ = {psi:,}; lm_head.weight is tok_emb.weight: ", end="")
    print(model.lm_head.weight is model.tok_emb.weight)
    x, y = text.train[0]
    print(f"sample 0: {text.train.decode(x[:40])!r}\ntarget:   {text.train.decode(y[:40])!r}")
    return text.num_classes


def _units_on_rank(block: int):
    import ddpzero_lab as dzl

    model, _ = make_gpt(block)
    model, _ = dzl.parallelize(model, "zero3", optimizer=torch.optim.AdamW, track_memory=False)
    return [
        (unit.name or "(root)", [name for name, _ in flat.params], flat.layout.numel)
        for unit in model.strategy.engine.units
        for flat in unit.flats
    ]


def print_units(cluster, block: int) -> None:
    """ZeRO-3's default units for the GPT, as rank 0 built them."""
    for name, params, numel in cluster.run(_units_on_rank, block)[0]:
        shown = ", ".join(params[:3]) + (", ..." if len(params) > 3 else "")
        print(f"unit {name:<9} {numel:>7,} parameters: {shown}")


def plot_losses(result: dict, vocab: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.0), layout="constrained")
    ax = fig.subplots()
    losses = result["losses"]
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.6, linewidth=0.8, label="training loss")
    ax.plot(
        [e["step"] for e in result["eval"]],
        [e["loss"] for e in result["eval"]],
        marker="o",
        label="held-out loss",
    )
    ax.axhline(math.log(vocab), color="0.5", linestyle=":", label=f"ln {vocab}: a uniform guess")
    ax.set(xlabel="step", ylabel="cross-entropy [nats per character]", title="tiny GPT, ZeRO-3")
    ax.legend(fontsize="small")
    return fig


def sample(state: dict, block: int, prompt: str = "First Citizen:\n", chars: int = 200) -> str:
    """Text from the trained parameters, loaded into a plain tiny_gpt in this process."""
    model, text = make_gpt(block)
    model.load_state_dict(state)
    torch.manual_seed(1)  # the same sample every time
    ids = text.train.encode(prompt)[None]
    out = model.eval().generate(ids, max_new_tokens=chars, temperature=0.8)
    return text.train.decode(out[0])


# ---- torchrun ------------------------------------------------------------------------------


def cli_options(config) -> list[str]:
    """The TrainConfig as `python -m ddpzero_lab train` options."""
    pairs = {
        "--strategy": config.strategy,
        "--model": config.model,
        "--dataset": config.dataset,
        "--steps": config.steps,
        "--batch-size": config.batch_size,
        "--lr": config.lr,
        "--block-size": config.block_size,
        "--eval-every": config.eval_every,
        "--eval-samples": config.eval_samples,
        "--seed": config.seed,
        "--precision": config.precision,
    }
    return [str(item) for pair in pairs.items() for item in pair]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_command(candidate) -> str:
    """Parse candidate's commands with torchrun's own parser; raise AssertionError if wrong."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    seen = {}
    for nnodes, per_node in ((2, 1), (2, 4), (3, 2)):
        for node in range(nnodes):
            argv = candidate(node, nnodes, per_node, "node0:29500", ["--steps", "7"])
            assert isinstance(argv, list), f"return a list of strings, got {type(argv).__name__}"
            assert argv and Path(argv[0]).name == "torchrun", f"start with 'torchrun': {argv[:1]}"
            args = parser.parse_args([str(a) for a in argv[1:]])
            where = f"node {node} of {nnodes}, {per_node} per node"
            assert str(args.nnodes) == str(nnodes), f"{where}: --nnodes is {args.nnodes}"
            assert str(args.nproc_per_node) == str(per_node), f"{where}: --nproc-per-node"
            assert args.rdzv_backend == "c10d", f"{where}: --rdzv-backend is {args.rdzv_backend!r}"
            assert args.rdzv_endpoint == "node0:29500", f"{where}: --rdzv-endpoint"
            assert args.module and args.training_script == "ddpzero_lab", f"{where}: -m ddpzero_lab"
            assert args.training_script_args == ["train", "--steps", "7"], (
                f"{where}: after ddpzero_lab comes 'train' and the options, got "
                f"{args.training_script_args}"
            )
            seen.setdefault(nnodes, set()).add(args.rdzv_id)
    assert all(len(ids) == 1 and "none" not in ids for ids in seen.values()), (
        "every node of one job needs the same --rdzv-id (not the default 'none')"
    )
    return "torchrun's parser reads your commands as meant, for 2 and 3 nodes"


def launch(commands: list[list[str]], timeout_s: float) -> list[tuple[int, str]]:
    """Start one torchrun per command (a "node" on this machine) and wait for all of them."""
    from ..cluster.worker import loopback_interface

    torchrun = str(Path(sys.executable).parent / "torchrun")  # installed beside this Python
    repo = Path(__file__).resolve().parents[2]  # where `python -m ddpzero_lab` runs from
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(GLOO_SOCKET_IFNAME=loopback_interface(), OMP_NUM_THREADS="1")  # nodes on loopback
    procs = [
        subprocess.Popen(
            [torchrun, *command[1:]],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own session: a timeout ends torchrun and its ranks
        )
        for command in commands
    ]
    start = time.monotonic()
    print(f"{len(procs)} nodes started; waiting (at most {timeout_s:.0f} s) ...", flush=True)
    deadline, outcomes = start + timeout_s, []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n[stopped after {timeout_s:.0f} s]"
        outcomes.append((proc.returncode, out))
        print(f"node {len(outcomes) - 1}: exit code {proc.returncode} after ", end="")
        print(f"{time.monotonic() - start:.1f} s", flush=True)
    return outcomes


def same_bits(paths: list[Path], live_state: dict) -> str:
    """Assert that exactly one node saved parameters, equal bit for bit to the live run's."""
    written = [p for p in paths if p.exists()]
    assert len(written) == 1, f"expected one node (rank 0's) to save, found {len(written)}"
    launched = torch.load(written[0], weights_only=True)
    assert launched.keys() == live_state.keys(), "different tensors"
    differ = [k for k, v in live_state.items() if not torch.equal(launched[k], v)]
    assert not differ, f"not bit for bit: {differ[:3]}"
    return f"{len(launched)} tensors equal the live cluster's, bit for bit ({written[0].name})"
