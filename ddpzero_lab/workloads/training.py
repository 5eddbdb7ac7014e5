"""The one training loop, shared by notebooks, the command line and torchrun.

`train(config)` runs inside a rank (a LiveCluster job, or a process torchrun started): it
builds the model from the seed (the same on every rank), hands it to `dzl.parallelize`, reads
this rank's part of every global batch, accumulates gradients over micro-batches, evaluates,
saves and resumes checkpoints, and returns what happened. `run(config)` is the notebook's side:
it starts a LiveCluster (or takes one) and runs `train` on every rank.

The loop is the ordinary PyTorch one on purpose (forward, loss, backward, step, zero_grad):
the strategies change what happens inside those calls, not the loop. Not owned here: the
strategies (parallel/), the models (models.py), the data (data.py, sampler.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import data as data_module
from .models import mlp, resnet18_32, tiny_gpt
from .sampler import ShardedSampler

STRATEGIES = ("local", "ddp", "zero1", "zero2", "zero3", "param_server")
MODELS = ("mlp", "resnet18", "gpt")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """Everything one training run needs; the same object goes to every rank.

    batch_size is the *global* batch: each optimizer step averages the gradient over
    batch_size samples, split evenly over world_size ranks and grad_accum micro-batches
    (batch_size must be a multiple of world_size * grad_accum). Strategy "local" is
    single-process training: every rank then trains on the whole global batch alone (the
    reference the other strategies must match).
    """

    strategy: str = "ddp"
    model: str = "mlp"
    dataset: str = "digits"
    world_size: int | None = None  # None: whatever the process group has
    steps: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    precision: str = "fp32"
    grad_accum: int = 1
    eval_every: int = 0  # evaluate every k steps; 0: only after the last step
    eval_samples: int | None = 512  # evaluate on this many held-out samples (None: all, 0: none)
    eval_batch_size: int = 256
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # save every k steps; 0: only after the last step
    resume: bool = False
    seed: int = 0
    drop_last: bool = True  # the incomplete last global batch of an epoch: drop, or pad
    data_dir: str | None = None  # where CIFAR-10 is (default $DDPZERO_DATA or ~/.cache/...)
    download: bool = False
    block_size: int = 64  # text: characters per sample
    num_samples: int = 2048  # synthetic: training samples
    hidden: tuple[int, ...] = (128, 128)  # mlp: hidden widths
    progress: str = "auto"  # "auto": a tqdm bar on rank 0 when stdout is a terminal; "none"
    return_state: bool = False  # rank 0's result also carries the full final state_dict

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""
        for name, allowed in (
            ("strategy", STRATEGIES),
            ("model", MODELS),
            ("dataset", data_module.DATASETS),
            ("precision", PRECISIONS),
            ("optimizer", OPTIMIZERS),
            ("progress", ("auto", "none")),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name, low in (
            ("steps", 1),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("eval_every", 0),
            ("eval_batch_size", 1),
            ("checkpoint_every", 0),
            ("block_size", 1),
            ("num_samples", 1),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.world_size is not None and (
            isinstance(self.world_size, bool)
            or not isinstance(self.world_size, int)
            or self.world_size < 1
        ):
            raise ValueError(f"world_size must be None or an int >= 1, got {self.world_size!r}")
        if self.eval_samples is not None and (
            not isinstance(self.eval_samples, int) or self.eval_samples < 0
        ):
            raise ValueError(f"eval_samples must be None or an int >= 0, got {self.eval_samples!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if (self.model == "gpt") != (self.dataset == "text"):
            raise ValueError(
                f"model {self.model!r} and dataset {self.dataset!r} do not fit together: the "
                "gpt model trains on the 'text' data set, the image models on the others"
            )
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=True needs checkpoint_dir, the folder to resume from")


def local_batch_size(config: TrainConfig, world_size: int) -> int:
    """The samples one rank puts through one forward pass (a micro-batch) under `config` on
    `world_size` ranks; ValueError if the global batch does not split evenly."""
    # "local" is one process on the whole global batch: every rank does exactly that
    replicas = 1 if config.strategy == "local" else world_size
    if config.batch_size % (replicas * config.grad_accum):
        raise ValueError(
            f"batch_size ({config.batch_size}) must be a multiple of world_size * grad_accum "
            f"({replicas} * {config.grad_accum}): each rank's micro-batches are equal"
        )
    return config.batch_size // (replicas * config.grad_accum)


def build_model(config: TrainConfig, split: data_module.DataSplit) -> nn.Module:
    """The model `config.model` sized for `split` (call after seeding: it draws the init)."""
    if config.model == "mlp":
        return mlp(math.prod(split.input_shape), split.num_classes, hidden=config.hidden)
    if config.model == "resnet18":
        return resnet18_32(split.num_classes, in_channels=split.input_shape[0])
    return tiny_gpt(split.num_classes, block_size=config.block_size)


def _optimizer_factory(config: TrainConfig):
    lr, weight_decay = float(config.lr), float(config.weight_decay)
    if config.optimizer == "sgd":
        return lambda params: torch.optim.SGD(
            params, lr=lr, momentum=0.9, weight_decay=weight_decay
        )
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _loss(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # (batch, classes) for images, (batch, time, vocab) for text: one cross-entropy for both
    return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), reduction=reduction)


def _fetch(dataset, indices: list[int], device: torch.device):
    if hasattr(dataset, "__getitems__"):
        inputs, targets = dataset.__getitems__(indices)
    else:
        inputs, targets = torch.utils.data.default_collate([dataset[i] for i in indices])
    non_blocking = device.type == "cuda"
    return inputs.to(device, non_blocking=non_blocking), targets.to(
        device, non_blocking=non_blocking
    )


class _Batches:
    """This rank's micro-batches, addressed by (step, micro-batch): epoch e's order comes from
    the sampler with set_epoch(e), so a resumed run reads exactly what the first run would
    have read next."""

    def __init__(self, sampler: ShardedSampler, local_batch: int, grad_accum: int) -> None:
        self.sampler, self.local_batch, self.grad_accum = sampler, local_batch, grad_accum
        self.steps_per_epoch = len(sampler) // (local_batch * grad_accum)
        self._epoch: int | None = None
        self._indices: list[int] = []

    def indices(self, step: int, micro: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._indices, self._epoch = list(self.sampler), epoch
        start = (within * self.grad_accum + micro) * self.local_batch
        return self._indices[start : start + self.local_batch]


def state_digest(state: dict[str, torch.Tensor], names=None) -> tuple[float, str]:
    """(a float64 checksum, a sha256 of the bytes) of a state_dict's floating-point tensors
    (only those in `names`, when given), in key order: the float to read, the digest to tell
    bit-identical runs apart."""
    total = 0.0
    sha = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        if not tensor.is_floating_point() or (names is not None and name not in names):
            continue
        total += float(tensor.double().sum())
        sha.update(name.encode())
        sha.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return total, sha.hexdigest()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    *,
    rank: int,
    world_size: int,
    max_samples: int | None,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Mean loss and accuracy over the first `max_samples` held-out samples, shared out over
    the ranks. Every rank runs the same number of forward passes (a sharded model's forward is
    a collective), padding its last batch with a sample it does not count."""
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    per_rank = math.ceil(count / world_size)
    positions = [rank + i * world_size for i in range(per_rank)]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, targets
    was_training = model.training
    model.eval()
    try:
        for start in range(0, per_rank, batch_size):
            chunk = positions[start : start + batch_size]
            valid = torch.tensor([p < count for p in chunk], device=device)
            inputs, targets = _fetch(dataset, [p if p < count else 0 for p in chunk], device)
            logits = model(inputs).float()
            losses = _loss(logits, targets, reduction="none").view(len(chunk), -1)
            hits = (logits.argmax(-1) == targets).view(len(chunk), -1)
            totals[0] += losses[valid].sum().double()
            totals[1] += hits[valid].sum().double()
            totals[2] += float(valid.sum()) * losses.shape[1]
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(totals)
    loss_sum, correct, seen = totals.tolist()
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1)}


def _checkpoint_functions(config: TrainConfig):
    import ddpzero_lab as dzl

    save = getattr(dzl, "save_checkpoint", None)
    load = getattr(dzl, "load_checkpoint", None)
    if config.checkpoint_dir and (save is None or load is None):
        raise NotImplementedError(
            "checkpoint_dir needs dzl.save_checkpoint and dzl.load_checkpoint, which this "
            "version of ddpzero_lab does not have yet; leave checkpoint_dir unset"
        )
    return save, load


def _progress_bar(config: TrainConfig, rank: int, start: int):
    if config.progress != "auto" or rank != 0 or not sys.stdout.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=config.steps, initial=start, desc=f"{config.strategy} {config.model}")


def train(config: TrainConfig) -> dict[str, Any]:
    """Train as `config` says, on this rank; call on every rank alike (inside a LiveCluster
    job: `cluster.run(train, config)`, or in each process torchrun started).

    Returns a dict: losses (the global batch's mean loss per step run here), eval (one
    {step, loss, accuracy} per evaluation), accuracy (the last evaluation's), step_times
    (seconds), checksum and params_sha256 (of the full final parameters, not buffers: equal on
    every rank),
    start_step (> 0 after a resume), num_params, rank, world_size; with return_state, rank 0's
    dict also has state_dict (full tensors on the CPU).
    """
    import ddpzero_lab as dzl

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    rank, world_size, device = dzl.rank(), dzl.world_size(), dzl.device()
    if config.world_size is not None and config.world_size != world_size:
        raise ValueError(
            f"config.world_size is {config.world_size} but this job runs on {world_size} ranks; "
            "set world_size to match the cluster (or None)"
        )
    save_checkpoint, load_checkpoint = _checkpoint_functions(config)
    replicas, replica = (1, 0) if config.strategy == "local" else (world_size, rank)
    local_batch = local_batch_size(config, world_size)

    split = _load_data(config, rank)
    sampler = ShardedSampler(
        split.train,
        replicas,
        replica,
        drop_last=config.drop_last,
        shuffle=True,
        seed=config.seed,
        global_batch_size=config.batch_size,
    )
    batches = _Batches(sampler, local_batch, config.grad_accum)

    torch.manual_seed(config.seed)  # the same initial values on every rank
    module = build_model(config, split).to(device)
    num_params = sum(p.numel() for p in module.parameters())  # a tied tensor counts once
    # the names a state_dict uses for parameters, tied ones under each name (before a strategy
    # may replace the parameters with shards)
    param_names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    options = {} if config.precision == "fp32" else {"precision": config.precision}
    model, optimizer = dzl.parallelize(
        module, config.strategy, optimizer=_optimizer_factory(config), **options
    )
    model.train()

    start_step = 0
    if config.resume:
        start_step = int(load_checkpoint(config.checkpoint_dir, model, optimizer)["step"])
        if start_step > config.steps:
            raise ValueError(
                f"the checkpoint in {config.checkpoint_dir} is at step {start_step}, past "
                f"steps={config.steps}; ask for more steps"
            )

    # fp16 needs dynamic loss scaling (a step with an inf/NaN gradient is skipped on every
    # rank); bf16 and fp32 do not: then the scaler only calls optimizer.step()
    scaler = dzl.GradScaler(enabled=config.precision == "fp16-mixed")
    sync_free = getattr(model, "no_sync", None) or getattr(optimizer, "no_sync", None)
    reduce_loss = world_size > 1 and config.strategy != "local"
    losses, step_times, evals = [], [], []
    bar = _progress_bar(config, rank, start_step)
    for step in range(start_step, config.steps):
        started = time.perf_counter()
        local_loss = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            inputs, targets = _fetch(split.train, batches.indices(step, micro), device)
            last = micro == config.grad_accum - 1
            # DDP communicates on the last micro-batch only (torch's no_sync pattern)
            skip_sync = sync_free() if sync_free is not None and not last else None
            with skip_sync or contextlib.nullcontext():
                loss = _loss(model(inputs), targets)
                # mean over the micro-batches: the gradient of the global batch's mean loss
                scaler.scale(loss / config.grad_accum).backward()
            local_loss += loss.detach() / config.grad_accum
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        dzl.emit("loss", step=step, loss=float(local_loss))
        if reduce_loss:
            dist.all_reduce(local_loss)
            local_loss /= world_size
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - started)
        losses.append(float(local_loss))
        done = step + 1
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            evals.append({"step": done, **_evaluate(model, split, config, rank, world_size)})
        if config.checkpoint_dir and (
            done == config.steps
            or (config.checkpoint_every and done % config.checkpoint_every == 0)
        ):
            save_checkpoint(config.checkpoint_dir, model, optimizer, step=done)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    if config.eval_samples != 0:
        evals.append({"step": config.steps, **_evaluate(model, split, config, rank, world_size)})

    state = {k: v.cpu() for k, v in dzl.full_state_dict(model).items()}
    # parameters only: buffers such as BatchNorm's running statistics are each rank's own
    # (DDP copies rank 0's before each forward, the last forward then updates them locally)
    checksum, sha = state_digest(state, param_names)
    result = {
        "losses": losses,
        "eval": evals,
        "accuracy": evals[-1]["accuracy"] if evals else None,
        "step_times": step_times,
        "checksum": checksum,
        "params_sha256": sha,
        "start_step": start_step,
        "num_params": num_params,
        "rank": rank,
        "world_size": world_size,
        "config": dataclasses.asdict(config),
    }
    if config.return_state and rank == 0:
        result["state_dict"] = state
    return result


def _evaluate(model, split, config: TrainConfig, rank: int, world_size: int) -> dict:
    import ddpzero_lab as dzl

    local = config.strategy == "local"
    return evaluate(
        model,
        split.eval,
        rank=0 if local else rank,
        world_size=1 if local else world_size,
        max_samples=config.eval_samples,
        batch_size=config.eval_batch_size,
        device=dzl.device(),
    )


def _load_data(config: TrainConfig, rank: int) -> data_module.DataSplit:
    def load():
        return data_module.load(
            config.dataset,
            data_dir=config.data_dir,
            download=config.download,
            block_size=config.block_size,
            num_samples=config.num_samples,
            seed=config.seed,
        )

    if not config.download or not (dist.is_available() and dist.is_initialized()):
        return load()
    # One download, not one per rank: rank 0 fetches first, the others then find its copy
    # (torchvision checks the archive and skips the download); a machine that shares no disk
    # with rank 0 downloads its own copy at that point.
    if rank == 0:
        load()
    dist.barrier()
    return load()


def run(config: TrainConfig, cluster=None, *, dashboard=None) -> list[dict[str, Any]]:
    """Run `train(config)` on every rank of `cluster` (a LiveCluster), or of a new one of
    config.world_size ranks (2 if unset) that is closed afterwards. Returns the per-rank
    results, indexed by rank."""
    import ddpzero_lab as dzl

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    if cluster is not None:
        if config.world_size is not None and config.world_size != cluster.world_size:
            raise ValueError(
                f"config.world_size is {config.world_size} but the cluster has "
                f"{cluster.world_size} ranks"
            )
        return cluster.run(train, config, dashboard=dashboard)
    with dzl.LiveCluster(config.world_size or 2) as own:
        return own.run(train, config, dashboard=dashboard)
