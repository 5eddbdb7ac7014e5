"""Lesson 09 (case study: ResNet-18 under DDP and ZeRO-1/2/3): what the notebook calls in one line.

It owns the case's sizes (laptop: the offline 8x8 digits on the CPU; full: CIFAR-10 on GPUs), the
instrumented training loop the four strategies run, the figures, the one-line memory and traffic
checks (the formulas are taught in 04, 2Ψ/3Ψ in 03/05/07), the self-check of the sampler exercise,
and the H100 step times read from docs/gpu. The learner need not study any of it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

NAMES = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
STAGES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}
SEED = 0  # the model's init and the data order, the same on every rank
# SGD with momentum, the ResNet paper's optimizer: 4 bytes of state per parameter (the momentum).
# It is also what the course checks equivalence with (compare.py says why AdamW would hide a
# wrong gradient scale).
OPTIMIZER_BYTES = 4
EARLY_STEPS = 5  # the tolerance contract holds after at most 5 steps (compare.py)
H100_TABLE = Path(__file__).resolve().parents[2] / "docs" / "gpu" / "gpu_table_h100.txt"


@dataclass(frozen=True)
class Case:
    """Everything a rank needs to train the case; sent to every rank alike."""

    dataset: str
    global_batch: int
    steps: int
    eval_every: int
    eval_samples: int | None  # None: the whole held-out set
    lr: float
    device: str  # "cpu" or "cuda", from the notebook's settings
    data_dir: str | None = None


def load_case(run, data_dir: str | None = None):
    """(Case, DataSplit) for the run's mode. Full mode wants CIFAR-10 on a GPU; without a local
    copy it says how to get one and goes on with the digits, so Run All never stops."""
    from ..workloads import load_dataset

    if not run.small and run.device == "cuda":
        try:
            split = load_dataset("cifar10", data_dir=data_dir)
            steps_per_epoch = len(split.train) // 256
            case = Case("cifar10", 256, 5 * steps_per_epoch, steps_per_epoch, None, 0.05, "cuda")
            return Case(**{**case.__dict__, "data_dir": data_dir}), split
        except (FileNotFoundError, RuntimeError, OSError, ImportError) as exc:
            print(f"CIFAR-10 not found ({type(exc).__name__}); get it with `python -m ddpzero_lab")
            print("train --dataset cifar10 --download`. Going on with the digits.")
    split = load_dataset("digits")
    steps = 9 if run.small else 60
    return Case("digits", 32, steps, 3 if run.small else 10, 256, 0.01, run.device), split


def make_model(split):
    from ..workloads import resnet18_32

    torch.manual_seed(SEED)  # the same initial values on every rank and in every run
    return resnet18_32(split.num_classes, in_channels=split.input_shape[0])


def describe(model, split, dataset: str) -> int:
    """Print the data and the model's parameters per stage; return Ψ."""
    psi = sum(p.numel() for p in model.parameters())
    sizes = f"{len(split.train):,} training and {len(split.eval):,} held-out images"
    print(f"{dataset}: {sizes} of shape {tuple(split.input_shape)}, {split.num_classes} classes")
    print(f"ResNet-18: Ψ = {psi:,} parameters")
    for name, child in model.named_children():
        count = sum(p.numel() for p in child.parameters())
        if count:
            print(f"  {name:<7} {count:>11,} ({count / psi:5.1%})")
    return psi


def plot_global_batches(split, world_size: int, global_batch: int, shown: int = 3):
    """The first global batches of epoch 0, each sample coloured by the rank that reads it."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    from ..workloads import ShardedSampler

    order = ShardedSampler(
        split.train, world_size, 0, drop_last=True, seed=SEED, global_batch_size=global_batch
    ).epoch_order()
    width = min(global_batch, 32)
    fig = Figure(figsize=(11, 0.9 + 0.5 * shown), layout="constrained")
    ax = fig.subplots()
    for k in range(shown):
        for j in range(width):
            position = k * global_batch + j
            color = f"C{position % world_size}"  # rank r reads positions r, r + N, ...
            ax.add_patch(Rectangle((j, k), 1, 1, facecolor=color, alpha=0.4, edgecolor="white"))
            ax.text(j + 0.5, k + 0.5, str(order[position]), ha="center", va="center", fontsize=6)
    ax.set(xlim=(0, width), ylim=(shown, 0), xlabel="position in the global batch")
    ax.set_title(f"epoch 0: the first {shown} global batches of {global_batch}", fontsize=10)
    ax.set_yticks([k + 0.5 for k in range(shown)], [f"step {k}" for k in range(shown)])
    handles = [Patch(facecolor=f"C{r}", alpha=0.4, label=f"rank {r}") for r in range(world_size)]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


# ---- the sampler exercise's self-check -------------------------------------------------------


def _cases(train_size: int, global_batch: int, n: int):
    # (samples, global batch, drop_last, epoch): the training set and small sets with a remainder,
    # dropped and padded; global batch = N is one sample per rank, where torch's sampler applies
    return [
        (train_size, global_batch, True, 0),
        (train_size, global_batch, False, 1),
        (50, 4 * n, True, 3),
        (50, 4 * n, False, 3),
        (3 * n + 1, 2 * n, False, 0),
        (train_size, n, True, 2),
        (train_size + 1, n, False, 2),
        (7, n, False, 5),
    ]


def _rank_indices_on_rank(candidate, cases):
    from torch.utils.data import DistributedSampler

    import ddpzero_lab as dzl

    from ..workloads import ShardedSampler

    rank, n = dzl.rank(), dzl.world_size()
    out = []
    for samples, batch, drop_last, epoch in cases:
        mine = candidate(
            samples, n, rank, epoch=epoch, seed=SEED, global_batch_size=batch, drop_last=drop_last
        )
        ours = ShardedSampler(
            range(samples), n, rank, drop_last=drop_last, seed=SEED, global_batch_size=batch
        )
        ours.set_epoch(epoch)
        theirs = None
        if batch == n:  # DistributedSampler knows no global batch: one sample per rank and step
            sampler = DistributedSampler(
                range(samples), n, rank, shuffle=True, seed=SEED, drop_last=drop_last
            )
            sampler.set_epoch(epoch)
            theirs = list(sampler)
        out.append((list(mine), list(ours), theirs))
    return out


def check_rank_indices(cluster, candidate, train_size: int, global_batch: int) -> str:
    """Run candidate on every rank; raise AssertionError naming the first case it gets wrong."""
    n = cluster.world_size
    cases = _cases(train_size, global_batch, n)
    per_rank = cluster.run(_rank_indices_on_rank, candidate, cases)
    for rank, results in enumerate(per_rank):
        for case, (mine, ours, theirs) in zip(cases, results, strict=True):
            samples, batch, drop_last, epoch = case
            what = f"{samples} samples, global batch {batch}, drop_last={drop_last}, epoch {epoch}"
            where = f"rank {rank}, {what}"
            assert mine == ours, f"{where}: {mine[:8]}... but ShardedSampler {ours[:8]}..."
            assert theirs is None or mine == theirs, f"{where}: not DistributedSampler's"
    return f"{len(cases)} cases on {n} ranks equal ShardedSampler (and DistributedSampler's)"


# ---- the instrumented loop -----------------------------------------------------------------


def _rank_device(case: Case) -> torch.device:
    import ddpzero_lab as dzl

    here = dzl.device()  # the rank's own GPU under nccl, else the CPU
    if here.type == "cpu" and case.device == "cuda":
        return torch.device("cuda", 0)  # fewer GPUs than ranks: share GPU 0, gloo carries bytes
    return here


def train_case(strategy: str, case: Case) -> dict:
    """Train the case on this rank: the ordinary loop, with a stopwatch and counters around it."""
    import torch.distributed as dist
    import torch.nn.functional as F

    import ddpzero_lab as dzl

    from ..workloads import ShardedSampler, evaluate, load_dataset

    rank, n, device = dzl.rank(), dzl.world_size(), _rank_device(case)
    if device.type == "cuda":  # kernels that add in a fixed order, fp32 without TF32
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    data = load_dataset(case.dataset, data_dir=case.data_dir)
    sampler = ShardedSampler(
        data.train, n, rank, drop_last=True, seed=SEED, global_batch_size=case.global_batch
    )
    local = case.global_batch // n
    per_epoch = len(sampler) // local
    model, optimizer = dzl.parallelize(
        make_model(data).to(device),
        strategy,
        optimizer=lambda params: torch.optim.SGD(params, lr=case.lr, momentum=0.9),
    )
    names = {name for name, _ in make_model(data).named_parameters()}  # not BatchNorm's buffers
    model.train()
    out = {"losses": [], "evals": [], "times": [], "sent": {}}
    indices: list[int] = []
    for step in range(case.steps):
        if step % per_epoch == 0:  # a new epoch: a new shuffle
            sampler.set_epoch(step // per_epoch)
            indices = list(sampler)
        k = step % per_epoch
        x, y = data.train.__getitems__(indices[k * local : (k + 1) * local])
        x, y = x.to(device), y.to(device)
        dist.barrier()  # every rank starts the step together, so the times compare
        dzl.reset_traffic()
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        _sync(device)
        backward_done = time.perf_counter()
        if step == case.steps - 1:
            out["after_backward"] = dzl.model_state_bytes(model, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        _sync(device)
        out["times"].append((backward_done - start, time.perf_counter() - backward_done))
        if step > 0:  # the first step carries set-up traffic (the initial broadcast)
            for op, counted in dzl.traffic().items():
                out["sent"][op] = out["sent"].get(op, 0) + counted["sent"]
        if step == min(EARLY_STEPS, case.steps) - 1:  # after the counters: gathers are not counted
            out["early"] = {k: v.cpu() for k, v in dzl.full_state_dict(model).items() if k in names}
        dzl.emit("loss", step=step, loss=loss.item())
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # plain torch.distributed: not counted
        out["losses"].append(mean.item() / n)
        if (step + 1) % case.eval_every == 0 or step == case.steps - 1:
            if step == case.steps - 1:  # once: each rank with its own BatchNorm statistics
                out["own_buffers"] = _evaluate(evaluate, model, data, case, device)
            for buffer in getattr(model, "module", model).buffers():
                dist.broadcast(buffer, src=0)  # rank 0's BatchNorm statistics on every rank
            out["evals"].append(
                {"step": step + 1, **_evaluate(evaluate, model, data, case, device)}
            )
    out["after_step"] = dzl.model_state_bytes(model, optimizer)
    out["steps_counted"] = case.steps - 1
    out["state"] = {k: v.cpu() for k, v in dzl.full_state_dict(model).items()}  # collective
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA is asynchronous: wait before reading the clock
        torch.cuda.synchronize(device)


def _evaluate(evaluate, model, data, case: Case, device) -> dict:
    import ddpzero_lab as dzl

    return evaluate(
        model,
        data.eval,
        rank=dzl.rank(),
        world_size=dzl.world_size(),
        max_samples=case.eval_samples,
        batch_size=256,
        device=device,
    )


def train_all(cluster, case: Case, dashboard=None) -> dict:
    """The four strategies one after the other, from the same init and over the same batches."""
    from .progress import progress

    results = {}
    for strategy in NAMES:
        watch = dashboard if strategy == "zero3" and dashboard is not None else None
        watch = watch or progress(f"{NAMES[strategy]}, {case.steps} steps")
        results[strategy] = cluster.run(train_case, strategy, case, dashboard=watch)
        r = results[strategy][0]
        print(
            f"  {NAMES[strategy]:<7} loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, "
            f"held-out accuracy {r['evals'][-1]['accuracy']:.1%}"
        )
    return results


# ---- pictures and one-line checks ------------------------------------------------------------


def plot_curves(results: dict, case: Case):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for (strategy, ranks), marker in zip(results.items(), "os^x", strict=False):
        r = ranks[0]
        steps = range(1, len(r["losses"]) + 1)
        every = max(1, len(r["losses"]) // 25)
        loss_ax.plot(steps, r["losses"], marker=marker, fillstyle="none", markevery=every)
        acc_ax.plot(
            [e["step"] for e in r["evals"]],
            [e["accuracy"] for e in r["evals"]],
            marker=marker,
            fillstyle="none",
            label=NAMES[strategy],
        )
    loss_ax.set(xlabel="step", ylabel="loss of the global batch", title="training loss")
    acc_ax.set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1), title=case.dataset)
    acc_ax.legend(fontsize="small")
    return fig


def batchnorm_line(results: dict) -> str:
    """Final accuracy with each rank's own BatchNorm statistics, and with rank 0's."""
    items = results.items()
    own = ", ".join(f"{NAMES[s]} {r[0]['own_buffers']['accuracy']:.1%}" for s, r in items)
    shared = ", ".join(f"{NAMES[s]} {r[0]['evals'][-1]['accuracy']:.1%}" for s, r in items)
    return f"own statistics: {own}\nrank 0's:       {shared}"


def memory_check(results: dict, psi: int, world_size: int) -> bool:
    """One line per strategy: model-state bytes per rank against its stage's formula (04)."""
    from ..memory import zero_memory_estimate

    ok = True
    for strategy, ranks in results.items():
        held = [_held(r) for r in ranks]
        formula = zero_memory_estimate(
            psi,
            world_size,
            STAGES[strategy],
            preset="fp32_adam",
            optimizer_bytes_per_param=OPTIMIZER_BYTES,
        )["total"]
        # beyond the formula: padding to a multiple of N (a few elements), nothing more
        close = all(0 <= h - formula <= 1e-3 * formula for h in held)
        ok &= close and len(set(held)) == 1
        print(
            f"{NAMES[strategy]:<7} {held[0] / 1e6:7.2f} MB per rank; formula "
            f"{formula / 1e6:7.2f} MB ({held[0] / formula:.4f} x)"
        )
    return ok


def _held(r: dict) -> int:
    # gradients are largest after backward, optimizer state after the step
    return (
        r["after_backward"]["params"] + r["after_backward"]["grads"] + r["after_step"]["optimizer"]
    )


def traffic_ratios(results: dict, psi: int, world_size: int) -> dict:
    """Bytes each rank sent per step, in units of (N-1)/N x 4Ψ (one reduce-scatter's worth)."""
    unit = (world_size - 1) / world_size * 4 * psi
    return {
        s: max(sum(r["sent"].values()) / r["steps_counted"] for r in ranks) / unit
        for s, ranks in results.items()
    }


def step_times(results: dict) -> dict:
    """Median seconds per step of the slowest rank, after two warm-up steps."""
    out = {}
    for strategy, ranks in results.items():
        per_step = zip(*(r["times"] for r in ranks), strict=True)
        slowest = [max(sum(t) for t in step) for step in per_step]
        out[strategy] = statistics.median(slowest[2:] or slowest)
    return out


def h100_ratios() -> dict | None:
    """{strategy: step time / DDP's} from the project's H100 table (fp32 rows), or None."""
    if not H100_TABLE.exists():
        return None
    ms = {}
    for line in H100_TABLE.read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0] in NAMES and parts[1] == "fp32":
            ms[parts[0]] = float(parts[2])
    return {s: ms[s] / ms["ddp"] for s in ms} if "ddp" in ms else None


def plot_times(results: dict, backend: str):
    from matplotlib.figure import Figure

    here = step_times(results)
    h100 = h100_ratios() or {}
    fig = Figure(figsize=(8, 3.0), layout="constrained")
    ax = fig.subplots()
    x = range(len(here))
    ax.bar([i - 0.2 for i in x], [here[s] / here["ddp"] for s in here], 0.4, label="this cluster")
    if h100:
        ax.bar([i + 0.2 for i in x], [h100.get(s, 0) for s in here], 0.4, label="H100 (docs/gpu)")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xticks(list(x), [NAMES[s] for s in here])
    ax.set(ylabel="step time / DDP's", title=f"time per step ({backend} here)")
    ax.legend(fontsize="small")
    return fig
