"""Memory accounting: the ZeRO paper's model (Table 1), bytes counted from real tensors, the
tracker's events, the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab import telemetry
from ddpzero_lab.memory import (
    PAPER_TABLE_1,
    MemoryTracker,
    format_gb,
    model_state_bytes,
    optimizer_state_breakdown,
    zero_memory_estimate,
)


def _cells():
    for psi, rows in PAPER_TABLE_1.items():
        for n, printed in rows.items():
            for stage, value in zip((1, 2, 3), printed, strict=True):
                yield psi, n, stage, value


@pytest.mark.parametrize("psi,n,stage,printed", list(_cells()))
def test_table_1_every_cell_as_printed(psi, n, stage, printed):
    gb = zero_memory_estimate(psi, n, stage)["total"] / 1e9
    assert format_gb(gb) == str(printed)
    # and numerically within one unit of the last printed digit
    text = str(printed)
    unit = 10 ** -(len(text.split(".")[1]) if "." in text else 0)
    assert abs(gb - printed) < unit


def test_stage_formulas_and_breakdown():
    psi, n = 1e9, 8
    assert zero_memory_estimate(psi, n, 0) == {
        "params": 2e9,
        "grads": 2e9,
        "optimizer": 12e9,
        "total": 16e9,
    }
    s1, s2, s3 = (zero_memory_estimate(psi, n, s) for s in (1, 2, 3))
    assert (s1["params"], s1["grads"], s1["optimizer"]) == (2e9, 2e9, 1.5e9)
    assert (s2["params"], s2["grads"], s2["optimizer"]) == (2e9, 0.25e9, 1.5e9)
    assert s3["total"] == pytest.approx(16e9 / 8)


def test_fp32_adam_preset_and_overrides():
    est = zero_memory_estimate(1000, 4, 0, preset="fp32_adam")
    assert (est["params"], est["grads"], est["optimizer"]) == (4000, 4000, 8000)
    est = zero_memory_estimate(1000, 4, 1, preset="fp32_adam", optimizer_bytes_per_param=4)
    assert est["optimizer"] == 1000


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_params": -1, "world_size": 1, "stage": 0}, "num_params"),
        ({"num_params": float("nan"), "world_size": 1, "stage": 0}, "num_params"),
        ({"num_params": 10, "world_size": 2, "stage": 1, "grads_bytes": float("inf")}, "grads"),
        ({"num_params": 10, "world_size": 0, "stage": 0}, "world_size"),
        ({"num_params": 10, "world_size": 2.5, "stage": 0}, "world_size"),
        ({"num_params": 10, "world_size": 2, "stage": 4}, "stage"),
        ({"num_params": 10, "world_size": 2, "stage": 1, "params_bytes": -2}, "params_bytes"),
        ({"num_params": 10, "world_size": 2, "stage": 1, "preset": "sgd"}, "preset"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zero_memory_estimate(**kwargs)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 33), nn.ReLU(), nn.Linear(33, 7))


def test_fp32_adam_is_16_bytes_per_parameter_plus_the_step_counters():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    psi = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    before = model_state_bytes(model, opt)
    assert before == {"params": 4 * psi, "grads": 0, "optimizer": 0, "buffers": 0, "scratch": 0}
    model(torch.randn(5, 10)).sum().backward()
    opt.step()
    after = model_state_bytes(model, opt)
    assert after["params"] == 4 * psi and after["grads"] == 4 * psi
    # exp_avg and exp_avg_sq: 8 bytes per parameter; plus one float32 step counter per tensor
    breakdown = optimizer_state_breakdown(opt)
    assert breakdown == {"step": 4 * tensors, "exp_avg": 4 * psi, "exp_avg_sq": 4 * psi}
    assert after["optimizer"] == 8 * psi + 4 * tensors
    total = after["params"] + after["grads"] + after["optimizer"]
    assert total == 16 * psi + 4 * tensors


def test_each_storage_counted_once_and_in_full():
    flat = torch.zeros(103)  # one flat buffer, 3 elements of padding
    weight = nn.Parameter(flat[:60].view(6, 10))
    bias = nn.Parameter(flat[60:100])
    model = nn.Module()
    model.weight, model.bias = weight, bias
    model.register_buffer("running_mean", torch.zeros(5))
    assert weight.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()
    counted = model_state_bytes(model)
    assert counted["params"] == 103 * 4  # the whole buffer, padding included, once
    assert counted["buffers"] == 5 * 4

    class WithScratch(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 2)
            self.bucket = torch.zeros(50)

        def memory_tensors(self):
            return {"scratch": [self.bucket], "params": [self.layer.weight]}

    scratch = model_state_bytes(WithScratch())
    assert scratch["scratch"] == 200 and scratch["params"] == 6 * 4  # weight not counted twice


def test_tracker_events_follow_the_step_and_activations_grow_with_batch():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = MemoryTracker().attach(model, opt)
    telemetry.local_log.clear()
    activations = []
    for batch in (4, 8, 16):
        model(torch.randn(batch, 10)).sum().backward()
        opt.step()
        opt.zero_grad()
        activations.append(tracker.last["after_forward"]["activations"])
    events = telemetry.local_log.of_kind("memory")
    assert [e["phase"] for e in events] == ["after_forward", "after_backward", "after_step"] * 3
    assert [e["step"] for e in events] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    psi = sum(p.numel() for p in model.parameters())
    grads_at = {"after_forward": 0, "after_backward": 4 * psi, "after_step": 4 * psi}
    for e in events:
        assert e["params"] == 4 * psi and e["rss"] > 0
        assert e["grads"] == grads_at[e["phase"]]  # zero_grad() comes after the step
        # saved for backward: the input (batch x 10) and the ReLU's output (batch x 33), fp32
        batch = (4, 8, 16)[e["step"]]
        assert e["activations"] == (0 if e["phase"] != "after_forward" else 4 * batch * 43)
    # saved for backward: the input, the first layer's output (before and after ReLU share
    # nothing), so bytes grow in proportion to the batch
    assert activations[0] > 0 and activations[1] == 2 * activations[0]
    assert activations[2] == 4 * activations[0]
    tracker.detach()
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    assert len(telemetry.local_log.of_kind("memory")) == 9  # detached: no more events


def test_cli_prints_table_1():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpzero_lab",
            "memory",
            "--params",
            "7.5e9",
            "--world-size",
            "1",
            "4",
            "16",
            "64",
            "256",
            "1024",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = {
        int(line.split()[0]): line.split()[1:]
        for line in out.stdout.splitlines()
        if line.strip() and line.split()[0].isdigit()
    }
    for n, printed in PAPER_TABLE_1[7.5e9].items():
        assert rows[n] == ["120", *map(str, printed)]
    bad = subprocess.run(
        [sys.executable, "-m", "ddpzero_lab", "memory", "--params", "-5"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert bad.returncode == 2 and "num_params" in bad.stderr


def _train_two_steps():
    model = _mlp()
    model, opt = dzl.parallelize(model, "param_server", optimizer=lambda p: torch.optim.Adam(p))
    for _ in range(2):
        model(torch.randn(4, 10)).sum().backward()
        opt.step()
        opt.zero_grad()


def test_parallelize_emits_memory_events_inside_a_cluster():
    with dzl.LiveCluster(2, timeout=10.0) as cluster:
        job = cluster.submit(_train_two_steps)
        job.wait()
    memory = [e for e in job.events if e.kind == "memory"]
    assert len(memory) == 2 * 2 * 3  # ranks x steps x phases
    psi = sum(p.numel() for p in _mlp().parameters())
    after_step = {e.rank: e for e in memory if e["phase"] == "after_step" and e["step"] == 1}
    # the parameter server keeps Adam's state on rank 0 only: 8 bytes per parameter + steps
    assert after_step[0]["optimizer"] == 8 * psi + 4 * 4
    assert after_step[1]["optimizer"] == 0
