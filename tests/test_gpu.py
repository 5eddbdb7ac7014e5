"""GPU path (pytest -m gpu; skipped without CUDA): DDP and ZeRO-3 on CUDA tensors equal a
single process on the same GPU, in fp32 and bf16-mixed, and memory events report CUDA memory.
With one GPU the ranks share it through gloo (the comm layer covers what gloo lacks for CUDA
tensors); with one GPU per rank the cluster picks nccl."""

from __future__ import annotations

import pytest
import torch
from equivalence import OPTIMIZERS, assert_same_parameters, global_batch, make_model
from torch import nn

import ddpzero_lab as dzl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU: run `pytest -m gpu` on one"
    ),
]
STEPS, LOCAL_BATCH = 3, 4


def _device() -> torch.device:
    here = dzl.device()  # its own GPU under nccl
    return here if here.type == "cuda" else torch.device("cuda", 0)  # else ranks share GPU 0


def _train(strategy, precision="fp32", world_size=None):
    rank, n = (dzl.rank(), dzl.world_size()) if strategy != "single" else (0, world_size)
    device = _device() if strategy != "single" else torch.device("cuda", 0)
    model = make_model(seed=0).to(device)
    options = {"find_unused_parameters": True} if strategy == "ddp" else {}
    model, opt = dzl.parallelize(
        model,
        "local" if strategy == "single" else strategy,
        optimizer=OPTIMIZERS["adamw"],
        precision=precision,
        **options,
    )
    for step in range(STEPS):
        x, y = (t.to(device) for t in global_batch(step, n, LOCAL_BATCH))
        mine = slice(None) if strategy == "single" else slice(rank * 4, rank * 4 + 4)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.cpu() for k, v in dzl.full_state_dict(model).items()}


@pytest.fixture(scope="module")
def gpu_cluster():
    with dzl.LiveCluster(2, timeout=60.0) as cluster:
        yield cluster


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_equals_a_single_process_on_the_gpu(gpu_cluster, strategy, precision):
    want = _train("single", precision, world_size=2)
    atol = 1e-5 if precision == "fp32" else 3e-3  # TF32 off by default; bf16 round-off
    for got in gpu_cluster.run(_train, strategy, precision):
        assert_same_parameters(got, want, atol=atol)


def _memory_fields():
    device = _device()
    model, opt = dzl.parallelize(
        make_model().to(device), "zero3", optimizer=OPTIMIZERS["sgd"], track_memory=True
    )
    x, y = (t.to(device) for t in global_batch(0, 1, 4))
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    return dzl.rank()


def test_memory_events_report_cuda_memory(gpu_cluster):
    job = gpu_cluster.submit(_memory_fields)
    job.wait()
    memory = [e for e in job.events if e.kind == "memory"]
    assert memory and all(e.get("cuda_allocated", 0) > 0 for e in memory)
    assert all(e["cuda_max_allocated"] >= e["cuda_allocated"] for e in memory)


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
def test_every_strategy_runs_on_nccl(strategy):
    """nccl moves only CUDA tensors: every collective a strategy issues must live on the GPU
    (one rank per GPU; a one-GPU machine runs a one-rank nccl group)."""
    n = torch.cuda.device_count()
    want = _train("single", "fp32", world_size=n)
    with dzl.LiveCluster(n, backend="nccl", timeout=60.0) as cluster:
        for got in cluster.run(_train, strategy, "fp32"):
            assert_same_parameters(got, want, atol=1e-5)
