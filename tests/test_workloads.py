"""Workloads: the sharded sampler, the data sets, the models, and the training loop on a live
cluster (each model trains under local, ddp, zero1 and zero2; accumulation; resume)."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from torch.utils.data import DistributedSampler

import ddpzero_lab as dzl
from ddpzero_lab import telemetry
from ddpzero_lab.workloads import (
    CharDataset,
    ShardedSampler,
    SyntheticImages,
    TrainConfig,
    load_dataset,
    mlp,
    resnet18_32,
    run,
    tiny_gpt,
    train,
)
from ddpzero_lab.workloads import data as data_module


@pytest.fixture(scope="module")
def cluster():
    # its own cluster: a generous collective timeout, because a rank's first job imports
    # torch._dynamo (torch.optim does, seconds on a busy 2-core machine)
    with dzl.LiveCluster(world_size=2, timeout=60.0) as c:
        yield c


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


# --- sharding -----------------------------------------------------------------------------


@pytest.mark.parametrize("length", [10, 11, 3, 64])
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_matches_torch_distributed_sampler(length, world_size, drop_last, shuffle):
    dataset = _Sized(length)
    for rank in range(world_size):
        ours = ShardedSampler(
            dataset, world_size, rank, drop_last=drop_last, shuffle=shuffle, seed=7
        )
        theirs = DistributedSampler(
            dataset, world_size, rank, shuffle=shuffle, seed=7, drop_last=drop_last
        )
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
            assert len(ours) == len(theirs)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_gets_a_disjoint_part_of_every_global_batch(world_size, drop_last):
    length, global_batch = 50, 12
    local = global_batch // world_size
    samplers = [
        ShardedSampler(
            _Sized(length), world_size, r, drop_last=drop_last, seed=1, global_batch_size=12
        )
        for r in range(world_size)
    ]
    for s in samplers:
        s.set_epoch(2)
    order = samplers[0].epoch_order()
    per_rank = [list(s) for s in samplers]
    batches = (length // global_batch) if drop_last else math.ceil(length / global_batch)
    assert all(len(p) == batches * local for p in per_rank)
    seen = []
    for k in range(batches):
        parts = [p[k * local : (k + 1) * local] for p in per_rank]
        union = [i for part in parts for i in part]
        # disjoint and exactly the k-th global batch of the epoch's order
        assert sorted(union) == sorted(order[k * global_batch : (k + 1) * global_batch])
        assert len(set(union)) == global_batch or not drop_last
        seen += union
    if drop_last:
        # every sample at most once; only the incomplete last global batch is dropped
        assert len(set(seen)) == len(seen) == batches * global_batch
    else:
        # every sample at least once; the padding repeats the start of the order
        assert set(seen) == set(range(length))
        pad = batches * global_batch - length
        assert order[length:] == order[:pad]


def test_shuffle_is_reproducible_per_seed_and_epoch():
    def order(seed, epoch, rank=0):
        s = ShardedSampler(_Sized(100), 2, rank, drop_last=True, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert set(order(0, 0)).isdisjoint(order(0, 0, rank=1))


def test_sampler_errors_say_what_to_do():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedSampler(_Sized(10), 2, 0, drop_last=True, global_batch_size=16)
    with pytest.raises(TypeError):
        ShardedSampler(_Sized(10), 2, 0)  # drop_last has no default: pad or drop, say which
    with pytest.raises(TypeError, match="drop_last"):
        ShardedSampler(_Sized(10), 2, 0, drop_last=None)
    with pytest.raises(ValueError, match="multiple of num_replicas"):
        ShardedSampler(_Sized(10), 4, 0, drop_last=True, global_batch_size=6)
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(_Sized(10), 2, 2, drop_last=True)


# --- data ---------------------------------------------------------------------------------


def test_digits_are_scikit_learns_real_images():
    from sklearn.datasets import load_digits

    split = load_dataset("digits")
    assert split.input_shape == (1, 8, 8) and split.num_classes == 10
    images = torch.cat([split.train.inputs, split.eval.inputs]).view(-1, 64)
    labels = torch.cat([split.train.targets, split.eval.targets])
    reference = load_digits()
    assert len(labels) == len(reference.target) == 1797
    # the same images (in another order), scaled to [0, 1]
    ours = sorted(zip(labels.tolist(), (images * 16).round().int().tolist(), strict=True))
    theirs = sorted(
        zip(reference.target.tolist(), reference.data.astype(int).tolist(), strict=True)
    )
    assert ours == theirs
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0


def test_synthetic_images_have_cifar_shapes_and_are_deterministic():
    split = load_dataset("synthetic", num_samples=64)
    x, y = split.train.__getitems__([0, 1, 13])
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 1, 3]
    again = SyntheticImages(64 + 512)
    assert torch.equal(x[2], again[13][0])  # any index, alone, gives the same sample
    held_x, _ = split.eval.__getitems__([0])
    assert not torch.equal(held_x[0], again[0][0])  # the eval set's noise is its own


def test_text_is_a_shipped_public_domain_text_as_characters():
    readme = " ".join((data_module.TEXTS_DIR / "README.md").read_text().split())
    assert "public domain" in readme and "Shakespeare" in readme
    split = load_dataset("text", block_size=16)
    assert split.input_shape == (16,) and split.num_classes == len(split.vocab)
    assert 20_000 < len(split.train) < 40_000
    x, y = split.train[5]
    assert torch.equal(x[1:], y[:-1])  # y is x shifted by one character
    batch_x, batch_y = split.train.__getitems__([5, 6])
    assert torch.equal(batch_x[0], x) and torch.equal(batch_y[1][:-1], y[1:])
    text = data_module.DEFAULT_TEXT.read_text()
    assert split.train.decode(x) == text[5:21]
    with pytest.raises(ValueError, match="block_size"):
        CharDataset("abc", block_size=8)


def test_cifar10_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_dataset("cifar10", data_dir=tmp_path)


# --- models -------------------------------------------------------------------------------


def test_tiny_gpt_is_small_causal_and_ties_its_output_layer():
    torch.manual_seed(0)
    model = tiny_gpt(vocab_size=60, block_size=32)
    assert model.lm_head.weight is model.tok_emb.weight
    unique = sum(p.numel() for p in model.parameters())  # parameters() counts a tied one once
    assert 100_000 <= unique <= 500_000
    ids = torch.randint(0, 60, (2, 32))
    changed = ids.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 60
    # position t sees positions <= t only
    assert torch.allclose(model(ids)[:, :20], model(changed)[:, :20], atol=1e-6)
    assert not torch.allclose(model(ids)[:, 20:], model(changed)[:, 20:])
    assert model.generate(ids[:, :4], 5).shape == (2, 9)


def test_resnet18_32_keeps_32x32_through_the_stem():
    model = resnet18_32(num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert resnet18_32(10, in_channels=1).eval()(torch.randn(1, 1, 8, 8)).shape == (1, 10)


def test_mlp_flattens_images():
    assert mlp(64, 10, hidden=(32,))(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    with pytest.raises(ValueError):
        mlp(0)


# --- the training loop, in this process -----------------------------------------------------


def test_config_is_checked_before_anything_runs():
    for bad in (
        {"strategy": "zero4"},
        {"model": "gpt", "dataset": "digits"},
        {"precision": "fp16"},
        {"steps": 0},
        {"lr": -1.0},
        {"resume": True},
    ):
        with pytest.raises(ValueError):
            train(TrainConfig(**bad))
    with pytest.raises(ValueError, match="multiple of world_size"):
        train(TrainConfig(strategy="local", batch_size=10, grad_accum=3))


def test_training_in_a_plain_process_emits_harmlessly():
    # No cluster, no process group: rank 0 of 1; emit() lands in the process-local log.
    before = len(telemetry.local_log.of_kind("loss"))
    result = train(
        TrainConfig(strategy="local", model="gpt", dataset="text", steps=6, batch_size=8)
    )
    assert result["losses"][-1] < result["losses"][0] - 0.3
    assert len(telemetry.local_log.of_kind("loss")) == before + 6
    assert result["rank"] == 0 and result["world_size"] == 1
    assert 0.0 <= result["accuracy"] <= 1.0


def _fake_checkpoints(monkeypatch):
    """A stand-in for dzl.save_checkpoint / load_checkpoint for unsharded optimizers (strategy
    local), to test the loop's own part of resuming: where the data continues."""

    def save(path, model, optimizer, step):
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
            f"{path}/state.pt",
        )

    def load(path, model, optimizer):
        state = torch.load(f"{path}/state.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return {"step": state["step"]}

    monkeypatch.setattr(dzl, "save_checkpoint", save, raising=False)
    monkeypatch.setattr(dzl, "load_checkpoint", load, raising=False)


def test_resume_reads_the_data_the_first_run_would_have_read(tmp_path, monkeypatch):
    _fake_checkpoints(monkeypatch)
    # 1,498 digits / 128 = 11 steps per epoch: the resumed run crosses an epoch boundary
    config = TrainConfig(
        strategy="local", steps=14, batch_size=128, eval_samples=0, return_state=True
    )
    straight = train(config)
    first = train(dataclasses.replace(config, steps=9, checkpoint_dir=str(tmp_path)))
    resumed = train(dataclasses.replace(config, checkpoint_dir=str(tmp_path), resume=True))
    assert resumed["start_step"] == 9 and len(resumed["losses"]) == 5
    assert first["losses"] + resumed["losses"] == straight["losses"]
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name


def test_checkpoint_dir_without_the_checkpoint_api_says_so(tmp_path, monkeypatch):
    monkeypatch.delattr(dzl, "save_checkpoint", raising=False)
    with pytest.raises(NotImplementedError, match="save_checkpoint"):
        train(TrainConfig(strategy="local", steps=1, checkpoint_dir=str(tmp_path)))


# --- the training loop on a live cluster ----------------------------------------------------

STRATEGIES = ("local", "ddp", "zero1", "zero2")
MODEL_CASES = {
    # model, dataset, global batch, lr, steps: tiny, so that 4 strategies take seconds
    "mlp": dict(model="mlp", dataset="digits", batch_size=32, lr=1e-2, steps=6),
    "resnet18": dict(model="resnet18", dataset="digits", batch_size=16, lr=1e-3, steps=4),
    "gpt": dict(model="gpt", dataset="text", batch_size=8, lr=3e-3, steps=6, block_size=32),
}


def _train_each(config: TrainConfig, strategies) -> dict:
    """Inside a rank: train under each strategy; keep the losses and the final parameters."""
    out = {}
    for strategy in strategies:
        result = train(dataclasses.replace(config, strategy=strategy))
        out[strategy] = (result["losses"], result.get("state_dict"), result["params_sha256"])
    return out


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_each_model_trains_under_each_strategy(cluster, case):
    config = TrainConfig(eval_samples=64, return_state=True, **MODEL_CASES[case])
    # the other strategies too, on the small models (ZeRO-3 gathers TinyGPT unit by unit)
    more = [s for s in ("param_server", "zero3") if case != "resnet18"]
    ranks = cluster.run(_train_each, config, [*STRATEGIES, *more])
    results = ranks[0]
    for strategy, (losses, _, sha) in results.items():
        assert losses[-1] < losses[0] - 0.2, (strategy, losses)
        assert ranks[1][strategy][2] == sha  # every rank ends with the same parameters
    # the data-parallel strategies agree with each other to float32 round-off
    reference = results["ddp"][1]
    for strategy in ("zero1", "zero2", *more):
        for name, tensor in results[strategy][1].items():
            torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6)
    if case != "resnet18":
        # ... and with one process on the global batch. Not ResNet: its BatchNorm normalises
        # over each rank's own batch, as torch's DDP does without SyncBatchNorm. (Adam
        # divides by the root of a gradient's square: where that is tiny, float32 round-off in
        # the gradient shows in the update, hence a looser bound than between ddp and zero.)
        for name, tensor in results["local"][1].items():
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=2e-5, msg=name)


def _parallelize_has(keyword: str) -> bool:
    return keyword in inspect.signature(dzl.parallelize).parameters


def test_accumulated_micro_batches_equal_one_global_batch(cluster):
    config = TrainConfig(
        model="mlp", dataset="digits", steps=4, batch_size=32, eval_samples=64, return_state=True
    )
    strategies = ["ddp", "zero1", "zero2", "zero3", "param_server"]
    want = cluster.run(_train_each, config, ["local"])[0]["local"]
    got = cluster.run(_train_each, dataclasses.replace(config, grad_accum=2), strategies)[0]
    assert sorted(got) == sorted(strategies)
    for strategy, (losses, state, _) in got.items():
        torch.testing.assert_close(losses, want[0], rtol=1e-5, atol=1e-6, msg=strategy)
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, want[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_evaluation_is_shared_out_and_summed_exactly(cluster):
    config = TrainConfig(model="mlp", dataset="digits", steps=3, batch_size=32, eval_samples=None)
    # 299 held-out digits over 2 ranks in batches of 64: uneven shares, a padded last batch
    config = dataclasses.replace(config, eval_batch_size=64, eval_every=2)
    alone = train(dataclasses.replace(config, strategy="local"))
    ranks = run(dataclasses.replace(config, strategy="ddp", world_size=2), cluster)
    for result in ranks:
        assert [e["step"] for e in result["eval"]] == [2, 3]
        for mine, want in zip(result["eval"], alone["eval"], strict=True):
            assert mine["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
            assert mine["loss"] == pytest.approx(want["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="cluster has 2 ranks"):
        run(dataclasses.replace(config, world_size=3), cluster)


@pytest.mark.skipif(not _parallelize_has("precision"), reason="parallelize has no precision=")
def test_bf16_mixed_trains(cluster):
    config = TrainConfig(
        strategy="ddp", model="gpt", dataset="text", steps=6, batch_size=8, block_size=32,
        precision="bf16-mixed", eval_samples=32,
    )  # fmt: skip
    losses = cluster.run(train, config)[0]["losses"]
    assert losses[-1] < losses[0] - 0.2


def test_fp16_mixed_trains_with_loss_scaling(cluster):
    # the loop scales the loss (dzl.GradScaler): the first steps overflow at 2**16 and are
    # skipped on both ranks, then the scale has fallen far enough to train
    config = TrainConfig(
        strategy="zero2", model="gpt", dataset="text", steps=10, batch_size=8, block_size=32,
        precision="fp16-mixed", eval_samples=32,
    )  # fmt: skip
    losses = cluster.run(train, config)[0]["losses"]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.2


def test_resume_with_the_checkpoint_api(cluster, tmp_path):
    if not hasattr(dzl, "save_checkpoint") or not hasattr(dzl, "load_checkpoint"):
        pytest.skip(
            "dzl.save_checkpoint / dzl.load_checkpoint do not exist yet; this test runs once "
            "they do"
        )
    config = TrainConfig(
        strategy="zero2", model="mlp", dataset="digits", steps=6, batch_size=32,
        eval_samples=0, return_state=True,
    )  # fmt: skip
    straight = cluster.run(train, config)[0]
    where = str(tmp_path)
    cluster.run(train, dataclasses.replace(config, steps=3, checkpoint_dir=where))
    resumed = cluster.run(train, dataclasses.replace(config, checkpoint_dir=where, resume=True))
    assert resumed[0]["start_step"] == 3
    assert resumed[0]["losses"] == pytest.approx(straight["losses"][3:], rel=1e-6)
    for name, tensor in straight["state_dict"].items():
        torch.testing.assert_close(resumed[0]["state_dict"][name], tensor, rtol=1e-6, atol=1e-7)
