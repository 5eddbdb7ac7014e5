"""Sharded checkpoints: a resumed run equals an uninterrupted one exactly (same world size and
strategy), a checkpoint loads at another world size and into another strategy, a save killed
half-way is never taken for a good one and leaves the previous checkpoint intact, bad
checkpoints are refused with a clear error, and the CLI writes a plain state_dict."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from equivalence import (
    OPTIMIZERS,
    assert_same_parameters,
    global_batch,
    make_model,
    train_single_process,
)
from torch import nn

import ddpzero_lab as dzl

LOCAL_BATCH = 4


@pytest.fixture(scope="module")
def clusters():
    with dzl.LiveCluster(2, timeout=30.0) as two, dzl.LiveCluster(3, timeout=30.0) as three:
        yield {2: two, 3: three}


def _train(
    strategy,
    steps,
    start=0,
    save=None,
    load=None,
    precision="fp32",
    crash=False,
    optimizer="adamw",
):
    """Steps [start, start+steps) of one run on the global batches; optionally load a
    checkpoint first and save one after."""
    rank, n = dzl.rank(), dzl.world_size()
    model = make_model(seed=0)
    options = {"find_unused_parameters": True} if strategy == "ddp" else {}
    model, opt = dzl.parallelize(
        model, strategy, optimizer=OPTIMIZERS[optimizer], precision=precision, **options
    )
    if load is not None:
        info = dzl.load_checkpoint(load, model, opt)
        assert info["step"] == start
    for step in range(start, start + steps):
        x, y = global_batch(step, 6, 2)  # 12 samples: any of 1, 2, 3 ranks splits them
        per = 12 // n
        mine = slice(rank * per, (rank + 1) * per)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()
    if save is not None:
        if crash:
            _save_with_a_full_disk_on_rank_1(save, model, opt, step=start + steps)
        else:
            dzl.save_checkpoint(save, model, opt, step=start + steps)
    return dzl.full_state_dict(model)


def _save_with_a_full_disk_on_rank_1(path, model, opt, step):
    """save_checkpoint with rank 1's shard write failing. The patch lives in the workers of a
    cluster shared by the whole module: it is undone however the save ends, so that no later
    test saves through it (whether or not this failure makes the cluster restart)."""
    import ddpzero_lab.checkpoint as ckpt

    real = ckpt._write_shard

    def dying(pieces, shard_path):
        if dzl.rank() == 1:
            raise OSError("disk full (injected)")
        real(pieces, shard_path)

    ckpt._write_shard = dying
    try:
        dzl.save_checkpoint(path, model, opt, step=step)
    finally:
        ckpt._write_shard = real


def _writer_name():
    import ddpzero_lab.checkpoint as ckpt

    return ckpt._write_shard.__name__


@pytest.mark.parametrize(
    "strategy,precision",
    [
        ("ddp", "fp32"),
        ("zero1", "fp32"),
        ("zero2", "bf16-mixed"),
        ("zero3", "fp32"),
        ("zero3", "bf16-mixed"),
    ],
)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # AdamW alone hides a wrong scale
def test_resume_equals_an_uninterrupted_run(clusters, tmp_path, strategy, precision, optimizer):
    cluster = clusters[2]
    kw = {"precision": precision, "optimizer": optimizer}
    straight = cluster.run(_train, strategy, 4, **kw)[0]
    if precision == "fp32":  # and the run itself is one process's (12 samples a step)
        assert_same_parameters(straight, train_single_process(optimizer, 6, 4, 2))
    cluster.run(_train, strategy, 2, save=tmp_path, **kw)
    resumed = cluster.run(_train, strategy, 2, start=2, load=tmp_path, **kw)
    for got in resumed:
        assert_same_parameters(got, straight, atol=0)  # exactly: nothing was lost


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # AdamW alone hides a wrong scale
def test_reshard_on_load_to_another_world_size_and_strategy(clusters, tmp_path, optimizer):
    straight = clusters[2].run(_train, "zero1", 4, optimizer=optimizer)[0]
    assert_same_parameters(straight, train_single_process(optimizer, 6, 4, 2))
    saved = clusters[2].run(_train, "zero3", 2, save=tmp_path, optimizer=optimizer)[0]
    # loaded by 3 ranks into another strategy: the same parameters, then the same training
    for got in clusters[3].run(_train, "zero1", 0, start=2, load=tmp_path, optimizer=optimizer):
        assert_same_parameters(got, saved, atol=0)
    for got in clusters[3].run(_train, "zero2", 2, start=2, load=tmp_path, optimizer=optimizer):
        assert_same_parameters(got, straight, atol=1e-6)  # another N sums in another order
    # and into a plain module outside any cluster
    model = make_model(seed=5)
    dzl.load_checkpoint(tmp_path, model)
    assert_same_parameters(model.state_dict(), saved, atol=0)


def test_a_save_killed_half_way_is_rejected_and_the_previous_one_survives(clusters, tmp_path):
    cluster = clusters[2]
    good = cluster.run(_train, "zero2", 2, save=tmp_path)[0]
    with pytest.raises(dzl.RankError, match="disk full"):
        cluster.run(_train, "zero2", 1, start=2, save=tmp_path, crash=True)
    assert cluster.run(_writer_name) == ["_write_shard", "_write_shard"]  # nothing left patched
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]
    assert partial, "the dead save left its partial directory"
    with pytest.raises(dzl.CheckpointError, match="not a complete checkpoint"):
        dzl.load_checkpoint(partial[0], make_model())
    model = make_model(seed=5)
    assert dzl.load_checkpoint(tmp_path, model)["step"] == 2  # latest is still the good one
    assert_same_parameters(model.state_dict(), good, atol=0)


def test_bad_checkpoints_are_refused_and_nothing_changes(clusters, tmp_path):
    clusters[2].run(_train, "zero2", 1, save=tmp_path)
    final = tmp_path / (tmp_path / "latest").read_text()
    shard = final / "rank-00001.pt"
    model = make_model(seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(dzl.CheckpointError, match="truncated or corrupt"):
        dzl.load_checkpoint(tmp_path, model)
    shard.write_bytes(data)
    other = nn.Linear(5, 7)
    with pytest.raises(dzl.CheckpointError, match="another model"):
        dzl.load_checkpoint(tmp_path, other)
    wrong = make_model()
    wrong.hidden = nn.Linear(7, 12)
    wrong.head = nn.Linear(12, 3)
    with pytest.raises(dzl.CheckpointError, match="another model"):
        dzl.load_checkpoint(tmp_path, wrong)
    with pytest.raises(dzl.CheckpointError, match="no checkpoint"):
        dzl.load_checkpoint(tmp_path / "nowhere", model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_consolidates_to_a_plain_state_dict(clusters, tmp_path):
    saved = clusters[2].run(_train, "zero3", 1, save=tmp_path / "ckpt")[0]
    out = tmp_path / "model.pt"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpzero_lab",
            "checkpoint",
            "consolidate",
            str(tmp_path / "ckpt"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    state = torch.load(out, weights_only=True)
    model = make_model(seed=3)
    model.load_state_dict(state)
    assert_same_parameters(model.state_dict(), saved, atol=0)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpzero_lab",
            "checkpoint",
            "consolidate",
            str(tmp_path / "no"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "no checkpoint" in bad.stderr


def _run_with_checkpoints(directory, total, kill_at=None, resume=False):
    """Train `total` steps of zero2, a checkpoint every 2 steps; rank 1 may die after step
    `kill_at` (an injected fault); `resume` starts from the latest checkpoint."""
    if kill_at is not None:
        dzl.faults.kill(rank=1, at_step=kill_at)
    model, opt = dzl.parallelize(make_model(seed=0), "zero2", optimizer=OPTIMIZERS["adamw"])
    start = dzl.load_checkpoint(directory, model, opt)["step"] if resume else 0
    for step in range(start, total):
        x, y = global_batch(step, 6, 2)
        mine = slice(dzl.rank() * 6, dzl.rank() * 6 + 6)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % 2 == 0:
            dzl.save_checkpoint(directory, model, opt, step=step + 1)
    return start, dzl.full_state_dict(model)


def test_a_rank_killed_mid_training_then_resume_equals_an_uninterrupted_run(clusters, tmp_path):
    cluster = clusters[2]
    _, straight = cluster.run(_run_with_checkpoints, tmp_path / "straight", 8)[0]
    with pytest.raises(dzl.RankError, match="rank 1") as info:
        cluster.run(_run_with_checkpoints, tmp_path / "crash", 8, kill_at=4)
    assert "SIGKILL" in str(info.value)
    # the cluster replaced its workers; the latest checkpoint is the one before the crash
    for start, resumed in cluster.run(_run_with_checkpoints, tmp_path / "crash", 8, resume=True):
        assert start == 4
        assert_same_parameters(resumed, straight, atol=0)
