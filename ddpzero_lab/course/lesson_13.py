"""Lesson 13 (misconceptions, tested live): the workload, the jobs that record what each claim
needs, and the tables and pictures that the notebook calls in one line.

The notebook keeps the claims, the checks and the learner's AdamW step. What runs here is
instrumentation: it trains with one strategy and records traffic, memory, gradients and shard
layouts, or prints and draws them.
"""

from __future__ import annotations

import torch
from torch import nn

import ddpzero_lab as dzl

# Ψ is odd (no world size divides it) and one tensor holds most of it: claim 5 needs both.
IN_FEATURES, HIDDEN, OUT_FEATURES = 24, 200, 7
LOCAL_BATCH = 16  # rows per rank and step
SGD = {"lr": 0.1, "momentum": 0.9}  # the claims that are not about Adam use SGD with momentum


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, OUT_FEATURES),
    )


NUM_PARAMS = sum(p.numel() for p in make_model().parameters())
B = 4 * NUM_PARAMS  # one float32 copy of the parameters, in bytes


def make_sgd(params):
    return torch.optim.SGD(params, **SGD)


def local_batch(step: int):
    """Inside a rank: its block of rows of step `step`'s global batch (made from the step
    alone, so every strategy sees the same data)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(dzl.world_size() * LOCAL_BATCH, IN_FEATURES, generator=g)
    y = torch.sin(2 * x[:, :OUT_FEATURES])
    mine = slice(dzl.rank() * LOCAL_BATCH, (dzl.rank() + 1) * LOCAL_BATCH)
    return x[mine].to(dzl.device()), y[mine].to(dzl.device())


def _stepped(optimizer) -> int:
    # elements of the tensors that this rank's own torch optimizer steps (strategies wrap one)
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is None:
        return 0
    return sum(p.numel() for group in inner.param_groups for p in group["params"])


def run_strategy(strategy: str, steps: int = 4, warmup: int = 2) -> dict:
    """On every rank: train `steps` SGD steps with `strategy` and return the traffic of the
    steps after `warmup` (no set-up broadcasts), the model-state bytes held, the elements its
    own optimizer steps, and the full parameters at the end."""
    model = make_model(seed=dzl.rank())  # a different init per rank: strategies copy rank 0's
    model, optimizer = dzl.parallelize(model, strategy, optimizer=make_sgd, track_memory=False)
    for step in range(steps):
        if step == warmup:
            dzl.reset_traffic()
        x, y = local_batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        memory = dzl.model_state_bytes(model, optimizer)  # before zero_grad: gradients held
        optimizer.zero_grad()
    traffic = dzl.traffic()  # read before full_state_dict, whose gathers it would count
    return {
        "traffic": traffic,
        "steps": steps - warmup,
        "memory": memory,
        "stepped": _stepped(optimizer),
        "state": {k: v.cpu() for k, v in dzl.full_state_dict(model).items()},
    }


def per_step(result: dict, field: str = "sent") -> float:
    """Bytes per step that one rank's counters saw, over all ops."""
    return sum(c[field] for c in result["traffic"].values()) / result["steps"]


def held(result: dict) -> int:
    """Model-state bytes a rank held: parameters, gradients and optimizer state."""
    return sum(result["memory"][k] for k in ("params", "grads", "optimizer"))


# -- claim 1 ------------------------------------------------------------------------------


def show_server_table(runs: dict) -> None:
    """Ops, bytes sent and received per step (in B), and optimizer bytes, per rank."""
    print(f"per step, in units of B = 4Ψ = {B:,} bytes")
    print(
        f"{'strategy':<13}{'rank':<6}{'ops (calls/step)':<30}{'sent':>7}{'recv':>7}{'optim. B':>10}"
    )
    for strategy in ("ddp", "param_server"):
        for rank, r in enumerate(runs[strategy]):
            ops = ", ".join(
                f"{op} ({c['calls'] / r['steps']:g})" for op, c in sorted(r["traffic"].items())
            )
            print(
                f"{strategy:<13}{rank:<6}{ops:<30}{per_step(r) / B:>7.3f}"
                f"{per_step(r, 'recv') / B:>7.3f}{r['memory']['optimizer'] / B:>10.2f}"
            )


def plot_server(runs: dict):
    """Bytes sent and received per rank: DDP's peers alike, the server at one end of all."""
    from matplotlib.figure import Figure

    world_size = len(runs["ddp"])
    ring = 2 * (world_size - 1) / world_size  # the ring all-reduce: 2(N-1)/N B each way
    fig = Figure(figsize=(9, 3), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    titles = ("DDP: one all-reduce among peers", "parameter server: all through rank 0")
    for ax, strategy, title in zip(axes, ("ddp", "param_server"), titles, strict=True):
        ranks = range(world_size)
        rows = runs[strategy]
        ax.bar([r - 0.2 for r in ranks], [per_step(rows[r]) / B for r in ranks], 0.4, label="sent")
        recv = [per_step(rows[r], "recv") / B for r in ranks]
        ax.bar([r + 0.2 for r in ranks], recv, 0.4, label="received")
        ax.axhline(ring, color="black", linestyle="--", linewidth=0.8, label="2(N-1)/N, the ring")
        ax.set(title=title, xlabel="rank", xticks=list(ranks))
        ax.title.set_fontsize(10)
    axes[0].set_ylabel("bytes per step / B")
    axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# -- claim 3 ------------------------------------------------------------------------------


def traffic_line(runs: dict) -> dict[str, tuple[float, float, float]]:
    """Print, and return, each ZeRO stage's bytes sent, optimizer state and model states held
    per rank, as multiples of DDP's (rank 0). Lessons 03, 05 and 07 derive the 2Ψ and 3Ψ."""
    ddp = runs["ddp"][0]
    ratios = {}
    for strategy in ("zero1", "zero2", "zero3"):
        r = runs[strategy][0]
        ratios[strategy] = (
            per_step(r) / per_step(ddp),
            r["memory"]["optimizer"] / ddp["memory"]["optimizer"],
            held(r) / held(ddp),
        )
    print("per rank, as a multiple of DDP's: bytes sent, optimizer state, all model states")
    for strategy, (sent, optimizer, total) in ratios.items():
        print(f"  {strategy}: {sent:.3f}x, {optimizer:.2f}x, {total:.2f}x")
    return ratios


# -- claim 4 ------------------------------------------------------------------------------


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).cpu() for t in tensors])


def record_steps(make_optimizer, steps: int) -> dict:
    """On every rank: train with DDP and record, before each step, this rank's *own* gradient
    (from a plain copy of the model, outside DDP), and DDP's flat parameters after each step."""
    model, optimizer = dzl.parallelize(
        make_model(), "ddp", optimizer=make_optimizer, track_memory=False
    )
    thetas, grads = [_flat(model.module.parameters())], []
    for step in range(steps):
        x, y = local_batch(step)
        replica = make_model().to(dzl.device())  # this rank's model, outside DDP
        replica.load_state_dict(model.module.state_dict())
        nn.functional.mse_loss(replica(x), y).backward()
        grads.append(_flat(p.grad for p in replica.parameters()))
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        thetas.append(_flat(model.module.parameters()))
    return {"thetas": thetas, "grads": grads}


def torch_adamw_step(theta, grad, options: dict) -> torch.Tensor:
    """One step of torch.optim.AdamW on a flat tensor, from fresh state: a reference."""
    p = nn.Parameter(theta.clone())
    optimizer = torch.optim.AdamW([p], **options)
    p.grad = grad.clone()
    optimizer.step()
    return p.detach()


def plot_update_rule(theta0, sgd_theta1, mean_sgd, adam_theta0, adam_theta1, mean_adam, lrs):
    """Δθ of DDP's first step against −η·mean(g): a line for SGD, ±η for AdamW."""
    from matplotlib.figure import Figure

    sgd_lr, adam_lr = lrs
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    ax_sgd, ax_adam = fig.subplots(1, 2)
    ax_sgd.plot(-sgd_lr * mean_sgd, sgd_theta1 - theta0, ".", markersize=2)
    ax_sgd.set(xlabel="−η·mean(g)", ylabel="Δθ, DDP's first step", title="SGD: a straight line")
    ax_sgd.locator_params(axis="x", nbins=4)  # keep the tick labels apart
    ax_adam.plot(
        -adam_lr * mean_adam, adam_theta1 - adam_theta0, ".", markersize=2, color="tab:red"
    )
    for level in (adam_lr, -adam_lr):
        ax_adam.axhline(level, color="black", linestyle=":", linewidth=0.8)
    ax_adam.set_xscale("symlog", linthresh=1e-9)  # show the tiny gradients near zero too
    ax_adam.set_xticks([-1e-5, -1e-7, -1e-9, 0, 1e-9, 1e-7, 1e-5])
    ax_adam.set(
        xlabel="−η·mean(g) (symmetric log scale)",
        ylabel="Δθ, DDP's first step",
        title="AdamW: ±η (dotted) unless |g| is as small as ε",
    )
    return fig


# -- claim 5 ------------------------------------------------------------------------------


def shard_layouts() -> dict:
    """On every rank: ZeRO-1's flat buffer and this rank's slice of it, and the whole tensors
    that torch's ZeroRedundancyOptimizer gives this rank for the same model."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    _, optimizer = dzl.parallelize(make_model(), "zero1", optimizer=make_sgd, track_memory=False)
    buckets = [([n for n, _ in b.params], b.layout, b.lo, b.hi) for b in optimizer.buckets]
    plain = make_model().to(dzl.device())
    names = {id(p): name for name, p in plain.named_parameters()}
    torch_zero = ZeroRedundancyOptimizer(
        plain.parameters(), optimizer_class=torch.optim.SGD, lr=0.1
    )
    mine = [names[id(p)] for group in torch_zero.optim.param_groups for p in group["params"]]
    return {"buckets": buckets, "stepped": _stepped(optimizer), "torch": mine}


def show_layouts(layouts: list) -> None:
    """Print the flat buffer, each rank's slice (which tensors it cuts through), and torch's
    whole-tensor partition, with each rank's share of the elements."""
    ((names, layout, _, _),) = layouts[0]["buckets"]
    sizes = dict(zip(names, layout.sizes(), strict=True))
    print(f"one flat buffer: {names}; {layout.numel:,} elements, padded to {layout.padded_numel:,}")
    for rank, r in enumerate(layouts):
        ((_, _, lo, hi),) = r["buckets"]
        inside = [
            f"{name}[{max(lo, off) - off}:{min(hi, off + size) - off}]"
            for name, off, size in zip(names, layout.offsets, layout.sizes(), strict=True)
            if off < hi and off + size > lo
        ]
        print(f"rank {rank}: elements [{lo:,}, {hi:,}): " + ", ".join(inside))
    print("torch's ZeroRedundancyOptimizer, whole tensors per rank:")
    for rank, r in enumerate(layouts):
        share = sum(sizes[name] for name in r["torch"]) / layout.numel
        print(f"rank {rank}: {r['torch']} = {share:.1%} of the elements")


def shares(layouts: list) -> tuple[list[float], list[float]]:
    """Each rank's share of the elements stepped: ZeRO's flat slices, and torch's tensors."""
    ((names, layout, _, _),) = layouts[0]["buckets"]
    sizes = dict(zip(names, layout.sizes(), strict=True))
    flat = [r["stepped"] / layout.numel for r in layouts]
    whole = [sum(sizes[n] for n in r["torch"]) / layout.numel for r in layouts]
    return flat, whole


def plot_layouts(layouts: list):
    """The flat buffer with its tensors and each rank's slice; each rank's share of the work."""
    import matplotlib
    from matplotlib.figure import Figure

    ((names, layout, _, _),) = layouts[0]["buckets"]
    world_size = len(layouts)
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax_flat, ax_share = fig.subplots(1, 2, width_ratios=(3, 2))
    colors = matplotlib.colormaps["Set2"].colors  # the ranks keep the C0, C1, ... colours
    for name, offset, size, color in zip(
        names, layout.offsets, layout.sizes(), colors, strict=False
    ):
        ax_flat.barh(1, size, left=offset, color=color, edgecolor="white", label=name)
    for rank in range(world_size):
        lo, hi = layout.shard_range(rank, world_size)
        ax_flat.barh(0, hi - lo, left=lo, color=f"C{rank}", alpha=0.45, edgecolor="black")
        ax_flat.text((lo + hi) / 2, 0, f"rank {rank}", ha="center", va="center", fontsize=8)
    ax_flat.set(
        yticks=[0, 1],
        yticklabels=["owner", "parameter"],
        xlabel="position in the flat buffer",
        title="equal slices that cut through tensors",
    )
    ax_flat.legend(fontsize="x-small", ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    flat, whole = shares(layouts)
    ranks = range(world_size)
    ax_share.bar([r - 0.2 for r in ranks], flat, 0.4, label="ddpzero_lab: flat slices")
    ax_share.bar([r + 0.2 for r in ranks], whole, 0.4, label="torch: whole tensors")
    ax_share.axhline(1 / world_size, color="black", linestyle="--", linewidth=0.8, label="1/N")
    ax_share.set(xticks=list(ranks), xlabel="rank", ylabel="share of the elements stepped")
    ax_share.legend(fontsize="small")
    return fig


def owners_cover_once(layout, world_size: int) -> bool:
    """True if every element of every tensor has exactly one owner."""
    for index, size in enumerate(layout.sizes()):
        ranges = sorted((start, end) for _, start, end in layout.owners(index, world_size))
        gaps = any(a[1] != b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        if not ranges or ranges[0][0] != 0 or ranges[-1][1] != size or gaps:
            return False
    return True


# -- claim 6 ------------------------------------------------------------------------------


def peak_and_rest(strategy: str, steps: int = 3) -> dict:
    """On every rank: train `steps` SGD steps with `strategy` under a memory tracker and
    return the last step's model state at rest (the optimizer step's peak: the state and
    nothing else) and the peak of each phase, split by category."""
    from ddpzero_lab.memory import MemoryTracker

    model, optimizer = dzl.parallelize(
        make_model(), strategy, optimizer=make_sgd, track_memory=False
    )
    tracker = MemoryTracker(emit=False).attach(model, optimizer)
    for step in range(steps):
        x, y = local_batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    tracker.detach()
    return {"rest": tracker.peaks["step"]["total"], "phases": dict(tracker.peaks)}


def peak_table(peaks: dict, world_size: int) -> dict[str, tuple[float, float, float]]:
    """Print, and return, each ZeRO stage's at-rest state, its stage formula and its peak, as
    multiples of DDP's (rank 0); and where ZeRO-3's peak comes from."""
    from ddpzero_lab.memory import zero_memory_estimate

    def factor(stage: int) -> float:  # SGD with momentum: 4 + 4 + 4 bytes per parameter
        def total(s):
            return zero_memory_estimate(NUM_PARAMS, world_size, s, 4, 4, 4)["total"]

        return total(stage) / total(0)

    def top(result: dict) -> int:
        return max(p["total"] for p in result["phases"].values())

    ddp = peaks["ddp"][0]
    ratios = {}
    print("per rank, as a multiple of DDP's: at rest (formula), peak")
    for stage, strategy in ((1, "zero1"), (2, "zero2"), (3, "zero3")):
        r = peaks[strategy][0]
        ratios[strategy] = (r["rest"] / ddp["rest"], factor(stage), top(r) / top(ddp))
        rest, formula, peak = ratios[strategy]
        print(f"  {strategy}: at rest {rest:.2f}x ({formula:.2f}x), peak {peak:.2f}x")
    worst = max(peaks["zero3"][0]["phases"].values(), key=lambda p: p["total"])
    split = ", ".join(f"{k} {v / B:.2f}" for k, v in worst.items() if v and k != "total")
    print(f"ZeRO-3's peak, in units of B: {split}")
    return ratios
