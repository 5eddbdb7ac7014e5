"""Unused parameters, one policy for every strategy (issue 15): a branch taken on some ranks
only (for ZeRO-3: a submodule of a unit), and a parameter that every rank skips for one step.

The reference is one process on the concatenated batch that takes the same branch decisions
block by block: the loss of rank r's block uses the gate only when r is even, and the process
minimises the mean of the per-block losses, whose gradient is the mean of the ranks'
gradients. A hang becomes a RankError within the cluster's (short) timeout.
"""

from __future__ import annotations

import pytest
import torch
from equivalence import OPTIMIZERS, assert_same_parameters
from torch import nn

import ddpzero_lab as dzl

STEPS, LOCAL_BATCH, SKIP_STEP = 3, 4, 1


class Block(nn.Module):
    """One ZeRO-3 unit (a child of the root) whose submodules the data may leave unused."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(7, 11)
        self.gate = nn.Linear(11, 11)  # used on some ranks only
        self.extra = nn.Linear(11, 11)  # skipped by every rank at SKIP_STEP

    def forward(self, h, use_gate: bool, use_extra: bool):
        h = torch.relu(self.inner(h))
        if use_gate:
            h = h + torch.tanh(self.gate(h))
        if use_extra:
            h = h + torch.tanh(self.extra(h))
        return h


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 7)
        self.block = Block()
        self.head = nn.Linear(11, 3)

    def forward(self, x, use_gate: bool = True, use_extra: bool = True):
        return self.head(self.block(torch.tanh(self.embed(x)), use_gate, use_extra))


def _make(seed: int) -> Branchy:
    torch.manual_seed(seed)
    return Branchy()


def _batch(step: int, world_size: int):
    g = torch.Generator().manual_seed(300 + step)
    x = torch.randn(world_size * LOCAL_BATCH, 5, generator=g)
    return x, torch.randn(world_size * LOCAL_BATCH, 3, generator=g)


def _choices(case: str, block: int, step: int) -> dict:
    """The branch decisions for rank `block`'s data at `step` (the reference takes the same)."""
    if case == "some-ranks":
        return {"use_gate": block % 2 == 0, "use_extra": True}  # N=2: rank 0; N=3: 0 and 2
    return {"use_gate": True, "use_extra": step != SKIP_STEP}  # every rank skips extra once


def _single_process(case: str, optimizer: str, world_size: int) -> dict:
    model = _make(0)
    opt = OPTIMIZERS[optimizer](model.parameters())
    skipped = []
    for step in range(STEPS):
        x, y = _batch(step, world_size)
        losses = []
        for block in range(world_size):
            mine = slice(block * LOCAL_BATCH, (block + 1) * LOCAL_BATCH)
            out = model(x[mine], **_choices(case, block, step))
            losses.append(nn.functional.mse_loss(out, y[mine]))
        torch.stack(losses).mean().backward()
        skipped.append(model.block.extra.weight.grad is None)
        opt.step()
        opt.zero_grad()
    assert skipped == [case == "every-rank" and s == SKIP_STEP for s in range(STEPS)]
    return {k: v.clone() for k, v in model.state_dict().items()}


def _on_rank(case: str, strategy: str, optimizer: str, options: dict) -> dict:
    rank, n = dzl.rank(), dzl.world_size()
    if strategy == "zero_optimizer":  # dzl.ZeroOptimizer behind torch's DDP, as torch's ZeRO
        model = nn.parallel.DistributedDataParallel(_make(0), find_unused_parameters=True)
        cls, kwargs = {
            "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
            "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
        }[optimizer]
        opt = dzl.ZeroOptimizer(model.parameters(), cls, **kwargs)
    else:  # a different init per rank: the strategy must broadcast rank 0's
        model, opt = dzl.parallelize(
            _make(rank), strategy, optimizer=OPTIMIZERS[optimizer], track_memory=False, **options
        )
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for step in range(STEPS):
        x, y = _batch(step, n)
        out = model(x[mine], **_choices(case, rank, step))
        nn.functional.mse_loss(out, y[mine]).backward()
        opt.step()
        opt.zero_grad()
    if strategy == "zero_optimizer":
        return {k: v.clone() for k, v in model.module.state_dict().items()}
    return dzl.full_state_dict(model)


STRATEGIES = {
    "ddp": ("ddp", {"find_unused_parameters": True}),
    # one parameter per bucket: the mask's all-reduce must come after every bucket's
    "ddp-small-buckets": (
        "ddp",
        {"find_unused_parameters": True, "bucket_cap_mb": 1e-9, "first_bucket_mb": 1e-9},
    ),
    "zero1": ("zero1", {}),
    "zero1-small-buckets": ("zero1", {"bucket_cap_mb": 1e-9}),
    "zero2": ("zero2", {}),
    "zero2-small-buckets": ("zero2", {"bucket_cap_mb": 1e-9}),
    "zero3": ("zero3", {}),  # units: embed, block (gate and extra inside it), head
}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"N{n}")
def ncluster(request):
    # a hang shows as a RankError after 10 s instead of the default's longer wait
    with dzl.LiveCluster(request.param, timeout=10.0, grace=1.0) as cluster:
        yield cluster


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("config", list(STRATEGIES))
def test_a_branch_taken_on_some_ranks_only(ncluster, config, optimizer):
    strategy, options = STRATEGIES[config]
    want = _single_process("some-ranks", optimizer, ncluster.world_size)
    for got in ncluster.run(_on_rank, "some-ranks", strategy, optimizer, options):
        assert_same_parameters(got, want)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("config", [*STRATEGIES, "zero_optimizer"])
def test_a_parameter_every_rank_skips_for_one_step_is_left_alone(ncluster, config, optimizer):
    # one process leaves block.extra and its momentum / Adam moments and step count alone at
    # SKIP_STEP (its grad is None); a flat shard that steps those elements anyway drifts
    strategy, options = STRATEGIES.get(config, (config, {}))
    want = _single_process("every-rank", optimizer, ncluster.world_size)
    for got in ncluster.run(_on_rank, "every-rank", strategy, optimizer, options):
        assert_same_parameters(got, want)
