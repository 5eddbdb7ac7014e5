"""Two-dimensional parallelism on 4 ranks, a 2 x 2 mesh: a tensor-parallel MLP split over each
row and trained with DDP or ZeRO 1-3 over each column equals the full MLP trained in one
process on the whole batch; each group's traffic is its own formula.

One cluster of 4 ranks for the module.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.comm import traffic_by_group
from ddpzero_lab.parallel.tensor import TensorParallelMLP

D, HIDDEN, LOCAL_BATCH, STEPS = 6, 10, 4, 3
ATOL = 1e-5


@pytest.fixture(scope="module")
def cluster():
    with dzl.LiveCluster(world_size=4, timeout=30.0) as c:
        yield c


def _full():
    torch.manual_seed(0)
    return nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)


def _batch(step, replicas):
    g = torch.Generator().manual_seed(200 + step)
    n = replicas * LOCAL_BATCH
    return torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)


def _one_process(replicas):
    up, down = _full()
    params = [*up.parameters(), *down.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, y = _batch(step, replicas)
        nn.functional.mse_loss(down(nn.functional.gelu(up(x))), y).backward()
        opt.step()
        opt.zero_grad()
    return up, down


def _two_d(strategy: str):
    grid = dzl.mesh(dp=2, tp=2)
    model = TensorParallelMLP(D, HIDDEN, group=grid.tp).load_full(*_full())
    model, opt = dzl.parallelize(
        model,
        strategy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        group=grid.dp,
        track_memory=False,
        **({"find_unused_parameters": True} if strategy == "ddp" else {}),
    )
    dzl.reset_traffic()
    for step in range(STEPS):
        x, y = _batch(step, grid.dp_size)
        mine = slice(grid.dp_index * LOCAL_BATCH, (grid.dp_index + 1) * LOCAL_BATCH)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()
    inner = model.strategy.module if hasattr(model, "strategy") else model
    state = dzl.full_state_dict(model)  # this rank's slices, whole over its column
    return grid.coordinates, inner.up.rows, inner.down.columns, state, traffic_by_group()


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
def test_tensor_parallel_rows_and_data_parallel_columns_train_as_one_process(cluster, strategy):
    up, down = _one_process(2)
    seen = set()
    for coordinates, rows, columns, state, by_group in cluster.run(_two_d, strategy):
        seen.add(coordinates)
        want = {
            "up.weight": up.weight[rows],
            "up.bias": up.bias[rows],
            "down.weight": down.weight[:, columns],
            "down.bias": down.bias,
        }
        for name, value in want.items():
            torch.testing.assert_close(state[name], value.detach(), rtol=0, atol=ATOL, msg=name)
        # the row (tensor-parallel) group: one all-reduce of the activations per step
        row = ",".join(str(coordinates[0] * 2 + t) for t in range(2))
        column = ",".join(str(d * 2 + coordinates[1]) for d in range(2))
        assert by_group[row]["all_reduce"]["calls"] == STEPS
        assert by_group[row]["all_reduce"]["bytes"] == STEPS * LOCAL_BATCH * D * 4
        # the column (data-parallel) group carries the gradients' reduction
        grads = by_group[column]
        op = "all_reduce" if strategy == "ddp" else "reduce_scatter"
        assert grads[op]["calls"] >= STEPS
        assert "all_reduce" not in by_group.get("world", {})  # nothing outside the two groups
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}


def _bad_mesh():
    try:
        dzl.mesh(dp=3, tp=2)
    except ValueError as exc:
        return str(exc)
    return None


def test_a_mesh_that_does_not_cover_the_ranks_is_refused(cluster):
    for message in cluster.run(_bad_mesh):
        assert message is not None and "world size" in message


def _hybrid(strategy: str):
    """HSDP: ZeRO within each row of the mesh, the rows replicas of each other, every rank
    on its own quarter of the batch."""
    grid = dzl.mesh(dp=2, tp=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D))
    model, opt = dzl.parallelize(
        model,
        strategy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        group=grid.tp,  # the shard group: a row
        replicate_group=grid.dp,  # the replicas: a column
        track_memory=False,
    )
    dzl.reset_traffic()
    rank = dzl.rank()
    for step in range(STEPS):
        x, y = _batch(step, 4)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()
    try:
        dzl.save_checkpoint(f"/tmp/ddpzero-hsdp-{rank}", model, opt)
        refused = None
    except dzl.CheckpointError as exc:
        refused = str(exc)
    return dzl.full_state_dict(model), traffic_by_group(), refused


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_hybrid_sharding_equals_one_process(cluster, strategy):
    up, down = _one_process(4)
    want = {
        "0.weight": up.weight,
        "0.bias": up.bias,
        "2.weight": down.weight,
        "2.bias": down.bias,
    }
    for state, by_group, refused in cluster.run(_hybrid, strategy):
        assert refused is not None and "hybrid sharding" in refused
        for name, value in want.items():
            torch.testing.assert_close(state[name], value.detach(), rtol=0, atol=ATOL, msg=name)
        # the shards' gradients reduce-scattered within a row, then averaged down a column
        rows = [g for g, ops in by_group.items() if "reduce_scatter" in ops]
        columns = [g for g, ops in by_group.items() if g not in rows and "all_reduce" in ops]
        assert len(rows) == 1 and len(columns) == 1
