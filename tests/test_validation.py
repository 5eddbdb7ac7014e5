"""Bad input is refused with a clear error before anything starts."""

from __future__ import annotations

import pytest
import torch

import ddpzero_lab as dzl


@pytest.mark.parametrize("world_size", [0, -1])
def test_world_size_below_one(world_size):
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        dzl.LiveCluster(world_size)


@pytest.mark.parametrize("world_size", [2.0, "2", None, True])
def test_world_size_not_an_int(world_size):
    with pytest.raises(TypeError, match="world_size must be an int"):
        dzl.LiveCluster(world_size)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        dzl.LiveCluster(2, backend="mpi")


@pytest.mark.skipif(torch.cuda.device_count() >= 64, reason="needs fewer GPUs than ranks")
def test_nccl_without_enough_gpus():
    with pytest.raises(ValueError, match="one GPU per rank"):
        dzl.LiveCluster(64, backend="nccl")


def test_fork_is_refused():
    with pytest.raises(ValueError, match="fork"):
        dzl.LiveCluster(2, start_method="fork")


def test_bad_timeout():
    with pytest.raises(ValueError, match="timeout"):
        dzl.LiveCluster(2, timeout=0)


def test_world_size_larger_than_memory_allows():
    with pytest.raises(ValueError, match="GB"):
        dzl.LiveCluster(100_000)


def test_world_size_cap_from_environment(monkeypatch):
    monkeypatch.setenv("DDPZERO_MAX_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="DDPZERO_MAX_WORLD_SIZE"):
        dzl.LiveCluster(5)


def test_fn_not_callable(cluster):
    with pytest.raises(TypeError, match="callable"):
        cluster.run(42)


def test_unpicklable_argument(cluster):
    import threading

    with pytest.raises(TypeError, match="picklable"):
        cluster.run(print, threading.Lock())


def test_dashboard_without_on_event(cluster):
    with pytest.raises(TypeError, match="on_event"):
        cluster.run(dzl.rank, dashboard=object())


def test_wait_timeout_must_be_a_number(cluster):
    job = cluster.submit(dzl.rank)
    with pytest.raises(ValueError, match="timeout"):
        job.wait(timeout=-1)
    assert job.wait() == [0, 1]
