"""The parameter server: same result as one process, and the server's traffic grows with N."""

from __future__ import annotations

import pytest
import torch
from equivalence import (
    assert_same_parameters,
    make_model,
    train_on_rank,
    train_single_process,
)

import ddpzero_lab as dzl
from ddpzero_lab.parallel.param_server import message_bytes

STEPS, LOCAL_BATCH = 4, 3


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_param_server_equals_single_process_training(world_size, optimizer):
    want = train_single_process(optimizer, world_size, STEPS, LOCAL_BATCH)
    with dzl.LiveCluster(world_size, timeout=10.0) as cluster:
        results = cluster.run(train_on_rank, "param_server", optimizer, STEPS, LOCAL_BATCH)
    for got in results:
        assert_same_parameters(got, want)
    # the unused layer was never stepped: still rank 0's init (weight decay would move it)
    torch.testing.assert_close(results[1]["unused.weight"], make_model(0).unused.weight)


def _one_step_traffic():
    model = make_model(seed=0)
    model, opt = dzl.parallelize(
        model, "param_server", optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )
    dzl.reset_traffic()
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    c = dzl.traffic()
    sent = sum(c[op]["sent"] for op in c)
    recv = sum(c[op]["recv"] for op in c)
    return sent, recv


def test_server_traffic_grows_with_world_size_while_workers_stay_flat():
    b = message_bytes(make_model())
    pull = b - 4 * len([p for p in make_model().parameters() if p.requires_grad])
    for world_size in (2, 4):
        with dzl.LiveCluster(world_size, timeout=10.0) as cluster:
            per_rank = cluster.run(_one_step_traffic)
        assert per_rank[0] == ((world_size - 1) * pull, (world_size - 1) * b)
        for worker in per_rank[1:]:
            assert worker == (b, pull)


def test_parallelize_checks_its_arguments():
    model = make_model()
    with pytest.raises(TypeError, match="optimizer="):
        dzl.parallelize(model, "local")
    with pytest.raises(TypeError, match="callable"):
        dzl.parallelize(model, "local", optimizer=torch.optim.SGD(model.parameters(), lr=1))
    with pytest.raises(ValueError, match="strategy must be one of"):
        dzl.parallelize(model, "fsdp", optimizer=lambda p: torch.optim.SGD(p, lr=1))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dzl.parallelize("model", "local", optimizer=lambda p: torch.optim.SGD(p, lr=1))
    with pytest.raises(RuntimeError, match="process group"):
        dzl.parallelize(model, "zero3", optimizer=lambda p: torch.optim.SGD(p, lr=1))
    with pytest.raises(ValueError, match="precision must be one of"):
        dzl.parallelize(model, "local", optimizer=lambda p: p, precision="fp16")
    with pytest.raises(ValueError, match="fp32 only"):
        dzl.parallelize(model, "param_server", optimizer=lambda p: p, precision="bf16-mixed")
    with pytest.raises(TypeError, match="only group="):
        dzl.parallelize(
            model, "param_server", optimizer=lambda p: torch.optim.SGD(p, lr=1), bucket_cap_mb=1
        )


def test_local_strategy_is_the_module_and_its_optimizer():
    model = make_model()
    same, opt = dzl.parallelize(model, "local", optimizer=lambda p: torch.optim.SGD(p, lr=1))
    assert same is model
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert opt.param_groups[0]["params"] == trainable
