"""Lesson 10 (gradient accumulation and sharded checkpoints): what the notebook calls in one line.

It owns the tiny GPT's set-up for the lesson, the self-check of the accumulation exercise (your
function, DDP with one backward, DDP without no_sync, and one process on the whole global batch,
all on the ranks), the traffic table that check leaves behind, and the checkpoint runs: one
uninterrupted, one stopped half-way, and resumes on other strategies and world sizes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

SEED = 0  # the model's init and the data order, the same on every rank
LR = 0.1  # SGD with momentum 0.9: the course checks equivalence with SGD (compare.py says why)
last_check: list | None = None  # what the latest self-check measured, per rank, for the table


@dataclasses.dataclass(frozen=True)
class Sizes:
    block: int  # characters per sample
    global_batch: int  # samples per optimizer step, over all ranks
    micro: int  # micro-batches per rank and step
    steps: int  # steps of each run


def sizes(run) -> Sizes:
    return Sizes(32, 16, 4, 4) if run.small else Sizes(64, 64, 4, 8)


def make_gpt(block: int):
    from ..workloads import load_dataset, tiny_gpt

    vocab = load_dataset("text", block_size=block).num_classes
    torch.manual_seed(SEED)  # as dzl.workloads.train seeds it: the same init on every rank
    return tiny_gpt(vocab, block_size=block)


def lm_loss(logits, targets):
    """Cross-entropy over every position of every sample."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def _batch(data, step, global_batch, replicas, replica):
    from ..workloads import ShardedSampler

    sampler = ShardedSampler(
        data.train, replicas, replica, drop_last=True, seed=SEED, global_batch_size=global_batch
    )
    local = global_batch // replicas
    epoch, within = divmod(step, len(sampler) // local)
    sampler.set_epoch(epoch)
    return data.train.__getitems__(list(sampler)[within * local : (within + 1) * local])


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def _accumulation_on_rank(candidate, s: Sizes) -> dict:
    import ddpzero_lab as dzl

    from ..workloads import load_dataset

    data, rank, n = load_dataset("text", block_size=s.block), dzl.rank(), dzl.world_size()
    out = {}
    for mode in ("yours", "one backward", "without no_sync"):
        model, optimizer = dzl.parallelize(make_gpt(s.block), "ddp", optimizer=_sgd)
        losses = []
        for step in range(s.steps):
            if step == 1:
                dzl.reset_traffic()  # the first step carries DDP's set-up
            x, y = _batch(data, step, s.global_batch, n, rank)
            micro = list(zip(x.chunk(s.micro), y.chunk(s.micro), strict=True))
            if mode == "yours":
                losses.append(candidate(model, optimizer, micro, lm_loss))
                continue
            for mx, my in micro if mode == "without no_sync" else [(x, y)]:
                (lm_loss(model(mx), my) * len(mx) / len(x)).backward()  # all-reduces each time
            optimizer.step()
            optimizer.zero_grad()
        counted = dzl.traffic().get("all_reduce", {"calls": 0, "sent": 0})
        per_step = max(s.steps - 1, 1)
        out[mode] = {
            "state": {k: v.cpu() for k, v in dzl.full_state_dict(model).items()},
            "losses": losses,
            "calls": counted["calls"] / per_step,
            "sent": counted["sent"] / per_step,
        }
    plain, losses = make_gpt(s.block), []  # one process on the whole global batch, on every rank
    optimizer = _sgd(plain.parameters())
    for step in range(s.steps):
        x, y = _batch(data, step, s.global_batch, 1, 0)
        loss = lm_loss(plain(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    out["plain"] = {"state": plain.state_dict(), "losses": losses}
    return out


def check_accumulation(cluster, candidate, s: Sizes) -> str:
    """Run candidate on every rank; raise AssertionError if it does not train like one process
    on the global batch, or communicates more than once per step."""
    from .compare import assert_same
    from .progress import progress

    global last_check
    last_check = None
    per_rank = cluster.run(
        _accumulation_on_rank, candidate, s, dashboard=progress("accumulation check")
    )
    last_check = per_rank
    plain = per_rank[0]["plain"]
    report = assert_same([r["yours"]["state"] for r in per_rank], plain["state"], "parameters")
    columns = zip(*(r["yours"]["losses"] for r in per_rank), strict=True)
    mean = [sum(v) / len(per_rank) for v in columns]  # the global batch's loss per step
    assert_same({"loss": torch.tensor(mean)}, {"loss": torch.tensor(plain["losses"])}, "losses")
    for rank, r in enumerate(per_rank):
        yours, once = r["yours"]["calls"], r["one backward"]["calls"]
        assert yours == once, (
            f"rank {rank}: {yours:g} all-reduces per step, DDP without accumulation needs "
            f"{once:g}: is every backward but the last inside model.no_sync()?"
        )
    return report + " vs one process; all-reduces per step as without accumulation"


def traffic_table(cluster, fn, s: Sizes) -> None:
    """All-reduce calls and bytes per step (rank 0), from the latest self-check; measured again
    with fn (the function the lesson goes on with) if the self-check stopped before measuring."""
    per_rank = last_check
    if per_rank is None:  # the learner's function failed: measure with the package's version
        per_rank = cluster.run(_accumulation_on_rank, fn, s)
    r = per_rank[0]
    for mode in ("yours", "one backward", "without no_sync"):
        calls, sent = r[mode]["calls"], r[mode]["sent"]
        print(f"{mode:<16} {calls:4g} all-reduces, {sent:>10,.0f} bytes per step")


# ---- checkpoints ---------------------------------------------------------------------------


def checkpoint_config(s: Sizes):
    from ..workloads import TrainConfig

    return TrainConfig(
        strategy="zero3",
        model="gpt",
        dataset="text",
        block_size=s.block,
        batch_size=s.global_batch,
        optimizer="sgd",
        lr=LR,
        steps=2 * s.steps,
        eval_samples=0,
        seed=SEED,
        return_state=True,
        progress="none",
    )


def describe_checkpoint(directory: Path, tensor: str = "tok_emb.weight") -> None:
    """Print the manifest's summary and which element ranges of one tensor each file holds."""
    saved = directory / (directory / "latest").read_text()
    manifest = json.loads((saved / "manifest.json").read_text())
    print(
        f"step {manifest['step']}, written by {manifest['world_size']} ranks, "
        f"{len(manifest['params'])} parameters, optimizer {manifest['optimizer']}"
    )
    for name, meta in manifest["files"].items():
        pieces = torch.load(saved / name, weights_only=True)
        ranges = [(start, end) for start, end, _ in pieces.get(f"param/{tensor}", [])]
        print(f"  {name}: {meta['bytes']:>9,} bytes; its pieces of {tensor}: {ranges}")


def resume(cluster, config, source: Path, strategy: str, here: bool = False) -> dict:
    """Resume from a copy of `source` with `strategy`, on the cluster or here (one rank)."""
    from ..workloads import train

    where = source.parent / f"resume-{strategy}"
    shutil.rmtree(where, ignore_errors=True)
    shutil.copytree(source, where)  # each resumed run saves at its end: a copy each
    config = dataclasses.replace(config, strategy=strategy, checkpoint_dir=str(where), resume=True)
    return train(config) if here else cluster.run(train, config)[0]
