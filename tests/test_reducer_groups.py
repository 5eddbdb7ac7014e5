"""Param groups in every strategy and in dzl.ZeroOptimizer, and overlap that an unused
parameter early in the launch order does not cancel (issue 15).

parallelize's optimizer factory is called with one tensor per trainable parameter, in
module.parameters() order (the module's own parameters for DDP; for ZeRO this rank's shard
of each), so a factory can choose groups by the parameters' names, as with torch.
"""

from __future__ import annotations

import time

import pytest
import torch
from equivalence import assert_same_parameters
from torch import nn

import ddpzero_lab as dzl

STEPS, LOCAL_BATCH = 3, 4
DECAY = {"lr": 0.01, "weight_decay": 0.1}  # the defaults: matrices
NO_DECAY = {"lr": 0.03, "weight_decay": 0.0}  # biases and norms: no decay, a second rate


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.hidden = nn.Linear(7, 11)
        self.head = nn.Linear(11, 3)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.norm(torch.tanh(self.embed(x))))))


def _make(seed: int) -> Normed:
    torch.manual_seed(seed)
    model = Normed()
    with torch.no_grad():  # a norm that is not the identity, so its gradients matter
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    return model


NAMES = [n for n, p in _make(0).named_parameters() if p.requires_grad]


def _decays(name: str) -> bool:
    return name.endswith("weight") and not name.startswith("norm")


def _groups(named) -> list[dict]:
    named = list(named)
    decay = [p for n, p in named if _decays(n)]
    rest = [p for n, p in named if not _decays(n)]
    assert decay and rest
    return [{"params": decay}, {"params": rest, **NO_DECAY}]


def _grouped_adamw(params) -> torch.optim.Optimizer:
    """The factory parallelize() gets: one tensor per parameter, in the module's order."""
    params = list(params)
    if len(params) != len(NAMES):
        raise AssertionError(
            f"the optimizer factory got {len(params)} tensors for the {len(NAMES)} parameters "
            f"{NAMES}: param groups cannot be chosen by name"
        )
    return torch.optim.AdamW(_groups(zip(NAMES, params, strict=True)), **DECAY)


def _batch(step: int, world_size: int):
    g = torch.Generator().manual_seed(900 + step)
    x = torch.randn(world_size * LOCAL_BATCH, 5, generator=g)
    return x, torch.randn(world_size * LOCAL_BATCH, 3, generator=g)


def _single_process(world_size: int) -> dict:
    model = _make(0)
    opt = torch.optim.AdamW(_groups(model.named_parameters()), **DECAY)
    for step in range(STEPS):
        x, y = _batch(step, world_size)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _groups_on_rank(strategy: str, options: dict):
    rank, n = dzl.rank(), dzl.world_size()
    if strategy in ("zero_optimizer", "torch_zero"):  # behind torch's DDP, as torch's ZeRO
        from torch.distributed.optim import ZeroRedundancyOptimizer

        model = nn.parallel.DistributedDataParallel(_make(0))
        groups = _groups(model.module.named_parameters())
        if strategy == "zero_optimizer":
            opt = dzl.ZeroOptimizer(groups, torch.optim.AdamW, **DECAY)
        else:
            opt = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **DECAY)
    else:
        model, opt = dzl.parallelize(
            _make(rank), strategy, optimizer=_grouped_adamw, track_memory=False, **options
        )
    lrs = sorted(g["lr"] for g in opt.param_groups)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for step in range(STEPS):
        x, y = _batch(step, n)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()
    if strategy in ("zero_optimizer", "torch_zero"):
        return {k: v.clone() for k, v in model.module.state_dict().items()}, lrs
    return dzl.full_state_dict(model), lrs


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"N{n}")
def ncluster(request):
    with dzl.LiveCluster(request.param, timeout=10.0, grace=1.0) as cluster:
        yield cluster


STRATEGIES = {
    "ddp": ("ddp", {}),
    "zero1": ("zero1", {}),
    "zero2": ("zero2", {}),
    "zero2-small-buckets": ("zero2", {"bucket_cap_mb": 1e-9}),
    "zero3": ("zero3", {}),
    "zero_optimizer": ("zero_optimizer", {}),
    "torch_zero": ("torch_zero", {}),  # torch's ZeroRedundancyOptimizer: the same groups
}


@pytest.mark.parametrize("config", list(STRATEGIES))
def test_adamw_with_two_param_groups_equals_one_process(ncluster, config):
    want = _single_process(ncluster.world_size)
    strategy, options = STRATEGIES[config]
    for got, lrs in ncluster.run(_groups_on_rank, strategy, options):
        assert lrs == [DECAY["lr"], NO_DECAY["lr"]]
        assert_same_parameters(got, want)


def test_the_groups_change_the_result():
    """Guards the test above: with one group (decay everywhere, one rate) the result is far
    from the grouped one, so an optimizer that dropped the groups could not pass."""
    want = _single_process(2)
    model = _make(0)
    opt = torch.optim.AdamW(model.parameters(), **DECAY)
    for step in range(STEPS):
        x, y = _batch(step, 2)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    gap = max((model.state_dict()[k] - want[k]).abs().max().item() for k in want)
    assert gap > 1e-2


class EndsUnused(nn.Module):
    """Layers that run, between two that never do: whichever end of the registration order a
    strategy launches from, the first bucket or unit it meets holds an unused parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.unused_first = nn.Linear(3, 3)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))  # four ZeRO-3 units
        self.unused_last = nn.Linear(3, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _overlap(strategy: str, options: dict):
    torch.manual_seed(0)
    model, opt = dzl.parallelize(
        EndsUnused(), strategy, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **options
    )
    marks = []  # when the gradient reaches layer 0's output: layers 1-3 are done by then

    def mark(grad):
        marks.append(time.time())

    def watch(module, args, out):
        out.register_hook(mark)

    model.layers[0].register_forward_hook(watch)
    for step in range(2):  # the second step: after any first-step set-up (bucket rebuild)
        x = torch.randn(8, 32)
        nn.functional.mse_loss(model(x), torch.zeros(8, 32)).backward()
        dzl.emit("backward_returned", step=step, at=time.time())
        opt.step()
        opt.zero_grad()
    return marks


@pytest.mark.parametrize(
    "strategy,options",
    [("zero2", {"bucket_cap_mb": 1e-9}), ("zero3", {})],
    ids=["zero2-one-param-per-bucket", "zero3"],
)
def test_an_unused_parameter_does_not_hold_back_the_reduce_scatters(ncluster, strategy, options):
    job = ncluster.submit(_overlap, strategy, options)
    marks = job.wait()
    for rank in range(ncluster.world_size):
        assert len(marks[rank]) == 2
        returned = [e for e in job.events if e.kind == "backward_returned" and e.rank == rank]
        assert [e["step"] for e in returned] == [0, 1]
        end_of_step1 = returned[1]["at"]
        reduce_scatters = [
            e["start"]
            for e in job.events
            if e.kind == "collective"
            and e.rank == rank
            and e["op"] == "reduce_scatter"
            and returned[0]["at"] < e["start"] < end_of_step1
        ]
        assert len(reduce_scatters) >= 4  # one per layer that ran, at least
        # overlap: some reduce-scatter starts during backward, before the backward pass has
        # even reached the first layer (not only in the end-of-backward callback)
        assert min(reduce_scatters) < marks[rank][1] < end_of_step1
