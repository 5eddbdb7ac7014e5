"""dzl.DDP: the same parameters as single-process training and as torch's own DDP, for every
mode and bucket size; no_sync; unused parameters; compression; telemetry; bad input."""

from __future__ import annotations

import pytest
import torch
from equivalence import OPTIMIZERS, Net, assert_same_parameters
from torch import nn

import ddpzero_lab as dzl

STEPS, LOCAL_BATCH = 3, 4


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)  # 135 + 5 elements
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


MODELS = {"mlp": _mlp, "conv": ConvNet, "net": Net}  # net: frozen + unused + odd sizes
INPUTS = {"mlp": (5,), "conv": (3, 8, 8), "net": (5,)}


def _make(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]()


def _batch(name: str, step: int, world_size: int, local_batch: int):
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(world_size * local_batch, *INPUTS[name], generator=g)
    return x, torch.randn(world_size * local_batch, 3, generator=g)


def _single_process(name: str, optimizer: str, world_size: int, steps: int = STEPS):
    model = _make(name, 0)
    opt = OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad])
    for step in range(steps):
        x, y = _batch(name, step, world_size, LOCAL_BATCH)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def _train_both(name: str, optimizer: str, steps: int, options: dict):
    """Inside a rank: our DDP and torch's DDP side by side on the same data."""
    rank, world_size = dzl.rank(), dzl.world_size()
    unused = name == "net"
    ours = dzl.DDP(_make(name, seed=rank), find_unused_parameters=unused, **options)
    theirs = nn.parallel.DistributedDataParallel(_make(name, 0), find_unused_parameters=unused)
    opts = [
        OPTIMIZERS[optimizer]([p for p in m.parameters() if p.requires_grad])
        for m in (ours, theirs)
    ]
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for step in range(steps):
        x, y = _batch(name, step, world_size, LOCAL_BATCH)
        for model, opt in zip((ours, theirs), opts, strict=True):
            nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
            opt.step()
            opt.zero_grad()
    return ours.module.state_dict(), theirs.module.state_dict(), ours.bucket_params


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"N{n}")
def ncluster(request):
    with dzl.LiveCluster(request.param, timeout=20.0) as cluster:
        yield cluster


CONFIGS = {
    "default": {},
    "no-overlap": {"overlap": False},
    "one-param-per-bucket": {"bucket_cap_mb": 1e-9, "first_bucket_mb": 1e-9},
    "one-bucket": {"bucket_cap_mb": 1000, "first_bucket_mb": 1000},
    "naive": {"mode": "naive"},
}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("name", ["mlp", "conv", "net"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_equals_single_process_and_torch_ddp(ncluster, config, name, optimizer):
    if config == "naive" and name == "net":
        pytest.skip("naive mode needs a gradient for every parameter (net has an unused one)")
    want = _single_process(name, optimizer, ncluster.world_size)
    for ours, theirs, buckets in ncluster.run(_train_both, name, optimizer, STEPS, CONFIGS[config]):
        assert_same_parameters(ours, want)
        assert_same_parameters(ours, theirs)
        if config == "one-param-per-bucket":
            assert all(len(b) == 1 for b in buckets)
        if config == "one-bucket":
            assert len(buckets) == 1


def _accumulate(micro_batches: int):
    rank, world_size = dzl.rank(), dzl.world_size()
    model = dzl.DDP(_make("mlp", rank))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch("mlp", 0, world_size, LOCAL_BATCH * micro_batches)
    mine_x = x[rank * LOCAL_BATCH * micro_batches : (rank + 1) * LOCAL_BATCH * micro_batches]
    mine_y = y[rank * LOCAL_BATCH * micro_batches : (rank + 1) * LOCAL_BATCH * micro_batches]
    dzl.reset_traffic()
    for k in range(micro_batches):
        part = slice(k * LOCAL_BATCH, (k + 1) * LOCAL_BATCH)
        loss = nn.functional.mse_loss(model(mine_x[part]), mine_y[part]) / micro_batches
        if k < micro_batches - 1:
            with model.no_sync():
                loss.backward()
        else:
            loss.backward()
    traffic = dzl.traffic()["all_reduce"]["calls"]
    opt.step()
    return model.module.state_dict(), traffic


def test_no_sync_accumulation_equals_one_large_batch_step(ncluster):
    n, micro = ncluster.world_size, 3
    model = _make("mlp", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch("mlp", 0, n, LOCAL_BATCH * micro)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    for state, calls in ncluster.run(_accumulate, micro):
        assert_same_parameters(state, model.state_dict())
        assert calls == 1  # one bucket, reduced once: no_sync passes sent nothing


def _compressed_traffic(compression):
    model = dzl.DDP(_make("mlp", 0), compression=compression, bucket_cap_mb=1000)
    x, y = _batch("mlp", 0, dzl.world_size(), LOCAL_BATCH)
    dzl.reset_traffic()
    nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return dzl.traffic()["all_reduce"]["bytes"], grads


def test_compression_halves_the_bytes_and_stays_close(ncluster):
    full_bytes, full = ncluster.run(_compressed_traffic, None)[0]
    for compression in ("bf16", "fp16"):
        half_bytes, grads = ncluster.run(_compressed_traffic, compression)[0]
        assert half_bytes * 2 == full_bytes
        for a, b in zip(grads, full, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


def _events_and_order():
    model = dzl.DDP(
        _make("net", 0), find_unused_parameters=True, bucket_cap_mb=1e-9, first_bucket_mb=1e-9
    )
    before = model.bucket_params
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        x, y = _batch("net", step, dzl.world_size(), LOCAL_BATCH)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return before, model.bucket_params


def test_step_and_bucket_events_and_rebuild_in_arrival_order(ncluster):
    job = ncluster.submit(_events_and_order)
    before, after = job.wait()[0]
    steps = [e for e in job.events if e.kind == "step" and e.rank == 0]
    assert [e["step"] for e in steps] == [0, 1]
    for e in steps:
        assert e["compute_s"] > 0 and 0 <= e["exposed_comm_s"] and e["comm_s"] > 0
    buckets = [
        e
        for e in job.events
        if e.kind == "collective"
        and e.rank == 0
        and e["op"] == "all_reduce"
        and str(e["tag"]).startswith("bucket")
    ]
    assert len(buckets) == 2 * len(before)
    assert all(e["end"] >= e["start"] for e in buckets)
    # first step: reverse registration order; then the order gradients arrived, in which the
    # unused layer (no gradient at all) comes last
    assert before[0] == ["unused.bias"] and after[-1][0].startswith("unused")
    assert sorted(sum(before, [])) == sorted(sum(after, []))


def test_unused_parameters_without_the_option_is_a_clear_error(ncluster):
    def run():
        model = dzl.DDP(_make("net", 0))
        x, y = _batch("net", 0, dzl.world_size(), LOCAL_BATCH)
        nn.functional.mse_loss(model(x), y).backward()

    with pytest.raises(dzl.RankError, match="find_unused_parameters=True"):
        ncluster.run(run)


def test_models_that_differ_between_ranks_are_refused_naming_the_parameter(ncluster):
    def run():
        width = 16 if dzl.rank() == 0 else 17
        dzl.DDP(nn.Sequential(nn.Linear(5, width), nn.Linear(width, 3)))

    with pytest.raises(dzl.RankError) as info:
        ncluster.run(run)
    text = str(info.value)
    assert "differs between ranks" in text and "0.weight" in text


def test_bad_options(ncluster):
    def run():
        errors = []
        for kwargs in ({"bucket_cap_mb": 0}, {"mode": "fast"}, {"compression": "int8"}):
            try:
                dzl.DDP(_mlp(), **kwargs)
            except ValueError as exc:
                errors.append(str(exc))
        return errors

    for errors in ncluster.run(run):
        assert len(errors) == 3


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # AdamW alone hides a wrong scale
def test_parallelize_ddp_trains_like_one_process(ncluster, optimizer):
    from equivalence import make_model, train_on_rank, train_single_process

    want = train_single_process(optimizer, ncluster.world_size, STEPS, LOCAL_BATCH)
    init = make_model(0).state_dict()
    for got in ncluster.run(
        train_on_rank, "ddp", optimizer, STEPS, LOCAL_BATCH, find_unused_parameters=True
    ):
        assert_same_parameters(got, want)
        assert not torch.equal(got["hidden.weight"], init["hidden.weight"])  # it trained


def _wrap_twice():
    model = nn.Linear(3, 3)
    ddp = dzl.DDP(model)
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    again = [
        lambda: dzl.DDP(model),
        lambda: dzl.DDP(ddp),
        lambda: dzl.parallelize(model, "ddp", optimizer=sgd),
        lambda: dzl.parallelize(ddp, "zero2", optimizer=sgd),
        lambda: dzl.parallelize(model, "zero3", optimizer=sgd),
    ]
    for wrap in again:
        with pytest.raises(ValueError, match="already wrapped by 'ddp'"):
            wrap()
    # the refused calls left no second set of hooks: one all-reduce per bucket, the mean
    dzl.reset_traffic()
    ddp(torch.full((1, 3), float(dzl.rank()))).sum().backward()
    return dzl.traffic()["all_reduce"]["calls"], model.weight.grad.clone()


def test_wrapping_a_wrapped_module_is_refused(cluster):
    n = cluster.world_size
    for calls, grad in cluster.run(_wrap_twice):
        assert calls == 1  # one bucket, all-reduced once
        torch.testing.assert_close(grad, torch.full((3, 3), (n - 1) / 2))
