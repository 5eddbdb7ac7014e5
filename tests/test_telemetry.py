"""Telemetry outside a cluster: emit() into the process-local log, event validation."""

from __future__ import annotations

import pytest
import torch

import ddpzero_lab as dzl
from ddpzero_lab import telemetry


def test_emit_outside_a_cluster_lands_in_the_local_log():
    telemetry.local_log.clear()
    dzl.emit("loss", step=3, loss=0.25)
    (event,) = telemetry.local_log.snapshot()
    assert (event.kind, event.rank, event["step"], event["loss"]) == ("loss", 0, 3, 0.25)
    assert event.to_dict()["kind"] == "loss"


def test_rank_context_outside_a_cluster():
    assert (dzl.rank(), dzl.world_size(), dzl.device()) == (0, 1, torch.device("cpu"))


@pytest.mark.parametrize("value", [torch.ones(2), object(), {1: 2}])
def test_fields_must_be_small_plain_values(value):
    with pytest.raises(TypeError):
        dzl.emit("log", value=value)


def test_reserved_fields_and_kind():
    with pytest.raises(ValueError, match="rank"):
        dzl.emit("log", rank=3)
    with pytest.raises(TypeError, match="kind"):
        dzl.emit("")


def test_nested_lists_and_dicts_are_allowed():
    telemetry.local_log.clear()
    dzl.emit("shard_map", params=[{"name": "w", "numel": 6, "owners": [[0, 3], [3, 6]]}])
    assert telemetry.local_log.of_kind("shard_map")[0]["params"][0]["numel"] == 6
