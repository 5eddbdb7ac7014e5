"""The equivalence harness: train k steps with a strategy on N ranks and in one process on the
concatenated global batch, from the same init; the parameters must agree to float32 round-off.

The model has parameter sizes that no small world size divides, a frozen parameter and a
parameter that the forward pass never uses, the cases strategies get wrong first.
"""

from __future__ import annotations

import torch
from torch import nn

import ddpzero_lab as dzl


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 7)  # 35 + 7 elements
        self.hidden = nn.Linear(7, 11)  # 77 + 11
        self.head = nn.Linear(11, 3)  # 33 + 3
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.unused = nn.Linear(4, 2)  # never called: its gradient stays None

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = torch.relu(self.hidden(h))
        return self.head(h) + self.frozen


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def global_batch(step: int, world_size: int, local_batch: int):
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(world_size * local_batch, 5, generator=g)
    y = torch.randn(world_size * local_batch, 3, generator=g)
    return x, y


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}
# the same optimizers as (class, keyword arguments), for ZeroOptimizer and torch's ZeRO
OPTIMIZER_CLASSES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
}


def train_single_process(
    optimizer: str,
    world_size: int,
    steps: int,
    local_batch: int,
    precision: str = "fp32",
    clip: float | None = None,
):
    """The reference: one process, the whole global batch, the same precision scheme;
    `clip`: gradients clipped to this 2-norm before each step (torch's clip)."""
    model = make_model()
    model, opt = dzl.parallelize(
        model, "local", optimizer=OPTIMIZERS[optimizer], precision=precision, track_memory=False
    )
    for step in range(steps):
        x, y = global_batch(step, world_size, local_batch)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return dzl.full_state_dict(model)


def train_on_rank(
    strategy: str,
    optimizer: str,
    steps: int,
    local_batch: int,
    clip: float | None = None,
    **options,
):
    """Runs inside a rank: the ordinary PyTorch loop over parallelize()'s objects; `clip`:
    gradients clipped with dzl.clip_grad_norm_ before each step."""
    rank, world_size = dzl.rank(), dzl.world_size()
    # A different init on each rank on purpose: the strategy must make them agree.
    model = make_model(seed=rank)
    model, opt = dzl.parallelize(model, strategy, optimizer=OPTIMIZERS[optimizer], **options)
    for step in range(steps):
        x, y = global_batch(step, world_size, local_batch)
        mine = slice(rank * local_batch, (rank + 1) * local_batch)
        loss = nn.functional.mse_loss(model(x[mine]), y[mine])
        loss.backward()
        if clip is not None:
            dzl.clip_grad_norm_(model, clip)
        opt.step()
        opt.zero_grad()
    # keyed as the plain module's state_dict, full tensors (ZeRO-3 gathers its shards)
    return dzl.full_state_dict(model)


def assert_same_parameters(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)
