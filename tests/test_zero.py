"""ZeRO stages 1 and 2: single-process equivalence, memory per rank against the formula,
traffic per step against 2Ψ, agreement with torch's ZeroRedundancyOptimizer, state round trip."""

from __future__ import annotations

import pytest
import torch
from equivalence import (
    OPTIMIZER_CLASSES,
    OPTIMIZERS,
    assert_same_parameters,
    global_batch,
    make_model,
    train_on_rank,
    train_single_process,
)
from torch import nn

import ddpzero_lab as dzl

STEPS, LOCAL_BATCH = 3, 4


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize(
    "strategy,options",
    [
        ("zero1", {}),
        ("zero2", {}),
        ("zero2", {"bucket_cap_mb": 1e-4}),
        ("zero2", {"bucket_cap_mb": 1e-4, "overlap": False}),
    ],
    ids=["zero1", "zero2", "zero2-small-buckets", "zero2-no-overlap"],
)
def test_equals_single_process_training(ncluster, strategy, options, optimizer):
    # the model has a frozen parameter, a layer no rank ever uses and sizes no N divides
    want = train_single_process(optimizer, ncluster.world_size, STEPS, LOCAL_BATCH)
    for got in ncluster.run(train_on_rank, strategy, optimizer, STEPS, LOCAL_BATCH, **options):
        assert_same_parameters(got, want)


class Tied(nn.Module):
    """An output layer that shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


def _tied_run(strategy, steps, optimizer="adamw"):
    rank, n = dzl.rank(), dzl.world_size()
    torch.manual_seed(rank)
    model = Tied()
    if strategy != "single":
        model, opt = dzl.parallelize(model, strategy, optimizer=OPTIMIZERS[optimizer])
    else:
        opt = OPTIMIZERS[optimizer](model.parameters())
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        tokens = torch.randint(0, 11, (n * 4, 5), generator=g)
        mine = tokens if strategy == "single" else tokens[rank * 4 : (rank + 1) * 4]
        logits = model(mine)
        nn.functional.cross_entropy(logits.reshape(-1, 11), mine.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
def test_dzl_clip_grad_norm_clips_to_the_global_norm_under_every_strategy(ncluster, strategy):
    # 0.05 is below every step's gradient norm here: each step is clipped
    want = train_single_process("sgd", ncluster.world_size, STEPS, LOCAL_BATCH, clip=0.05)
    unclipped = train_single_process("sgd", ncluster.world_size, STEPS, LOCAL_BATCH)
    assert any(not torch.allclose(want[k], unclipped[k], atol=1e-4) for k in want)
    options = {"find_unused_parameters": True} if strategy == "ddp" else {}
    for got in ncluster.run(
        train_on_rank, strategy, "sgd", STEPS, LOCAL_BATCH, clip=0.05, **options
    ):
        assert_same_parameters(got, want)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # AdamW alone hides a wrong scale
def test_tied_weights(ncluster, optimizer):
    # one process, on all ranks' tokens at once (world_size x 4 rows), from rank 0's init
    n = ncluster.world_size
    torch.manual_seed(0)
    model = Tied()
    assert model.out.weight is model.embed.weight
    opt = OPTIMIZERS[optimizer](model.parameters())
    g = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        tokens = torch.randint(0, 11, (n * 4, 5), generator=g)
        nn.functional.cross_entropy(model(tokens).reshape(-1, 11), tokens.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    want = model.state_dict()
    for strategy in ("zero1", "zero2"):
        for got in ncluster.run(_tied_run, strategy, STEPS, optimizer):
            assert_same_parameters(got, want)
            assert torch.equal(got["out.weight"], got["embed.weight"])  # still one tensor


def _memory_and_traffic(strategy):
    from ddpzero_lab.memory import model_state_bytes

    model = make_model(0)
    model, opt = dzl.parallelize(model, strategy, optimizer=OPTIMIZERS["adamw"], track_memory=False)
    x, y = global_batch(0, dzl.world_size(), LOCAL_BATCH)
    nn.functional.mse_loss(model(x), y).backward()
    after_backward = model_state_bytes(model, opt)
    dzl.reset_traffic()
    opt.step()
    traffic = dzl.traffic()  # stage 1 reduce-scatters inside step(), stage 2 in backward
    after_step = model_state_bytes(model, opt)
    padded = sum(b.layout.padded_numel for b in opt.buckets)
    # the parameters that get a gradient (not `unused`): the optimizer keeps state for each,
    # for this rank's piece of it only (from the layout, not from the optimizer)
    stepped = [
        (b, i)
        for b in opt.buckets
        for i, (name, _) in enumerate(b.params)
        if name != "unused" and not name.startswith("unused.")
    ]
    mine = sum(
        end - start
        for b, i in stepped
        for r, start, end in b.layout.owners(i, dzl.world_size())
        if r == dzl.rank()
    )
    return after_backward, after_step, traffic, padded, len(opt.buckets), (mine, len(stepped))


def test_memory_per_rank_is_the_formula_up_to_padding(ncluster):
    n = ncluster.world_size
    trainable = [p for p in make_model().parameters() if p.requires_grad]
    psi = sum(p.numel() for p in trainable)
    frozen = sum(p.numel() for p in make_model().parameters() if not p.requires_grad)
    for strategy in ("zero1", "zero2"):
        for after_backward, after_step, _, padded, buckets, (mine, stepped) in ncluster.run(
            _memory_and_traffic, strategy
        ):
            assert padded - psi < n * buckets  # padding: fewer than N elements per buffer
            shard = padded // n
            assert 0 < mine <= shard
            # Adam's two moments for this rank's piece of each parameter that gets a gradient
            # (one leaf per parameter piece: padding and the unused parameter hold no state),
            # and one step counter per such parameter
            assert after_step["optimizer"] == 2 * 4 * mine + 4 * stepped
            assert after_step["params"] == 4 * (padded + frozen)  # the flat buffers: full
            if strategy == "zero2":
                # the full gradients were released in backward: only the shard's remain,
                # and no full gradient buffer is left either (filed as scratch)
                assert after_backward["grads"] == 4 * shard
                assert after_backward["scratch"] == 0


def test_traffic_per_step_is_two_psi(ncluster):
    n = ncluster.world_size
    for strategy in ("zero1", "zero2"):
        for _, _, traffic, padded, *_ in ncluster.run(_memory_and_traffic, strategy):
            sent_ag = traffic["all_gather"]["sent"]
            assert sent_ag == (n - 1) * (padded // n) * 4
            if strategy == "zero1":
                assert traffic["reduce_scatter"]["sent"] == (n - 1) * (padded // n) * 4
                total = traffic["reduce_scatter"]["sent"] + sent_ag
                assert total == 2 * (n - 1) * padded * 4 // n  # 2Ψ·(N-1)/N, up to padding


def _against_torch_zero(steps, optimizer="adamw"):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    rank, n = dzl.rank(), dzl.world_size()
    ours, opt = dzl.parallelize(make_model(rank), "zero1", optimizer=OPTIMIZERS[optimizer])
    theirs = nn.parallel.DistributedDataParallel(make_model(0), find_unused_parameters=True)
    cls, kwargs = OPTIMIZER_CLASSES[optimizer]
    zero = ZeroRedundancyOptimizer(
        [p for p in theirs.parameters() if p.requires_grad], optimizer_class=cls, **kwargs
    )
    for step in range(steps):
        x, y = global_batch(step, n, LOCAL_BATCH)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for model, o in ((ours, opt), (theirs, zero)):
            nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
            o.step()
            o.zero_grad()
    return ours.state_dict(), theirs.module.state_dict()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # AdamW alone hides a wrong scale
def test_same_result_as_torch_zero_redundancy_optimizer(ncluster, optimizer):
    want = train_single_process(optimizer, ncluster.world_size, STEPS, LOCAL_BATCH)
    for ours, theirs in ncluster.run(_against_torch_zero, STEPS, optimizer):
        assert_same_parameters(ours, theirs)
        assert_same_parameters(ours, want)


def _round_trip(steps, optimizer="adamw"):
    rank, n = dzl.rank(), dzl.world_size()

    def run(model, opt, begin, end):
        for step in range(begin, end):
            x, y = global_batch(step, n, LOCAL_BATCH)
            mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
            opt.step()
            opt.zero_grad()

    straight, opt = dzl.parallelize(make_model(0), "zero2", optimizer=OPTIMIZERS[optimizer])
    run(straight, opt, 0, steps)
    first, opt1 = dzl.parallelize(make_model(0), "zero2", optimizer=OPTIMIZERS[optimizer])
    run(first, opt1, 0, steps // 2)
    saved_model = {k: v.clone() for k, v in first.state_dict().items()}
    saved_opt = opt1.state_dict()
    second, opt2 = dzl.parallelize(make_model(0), "zero2", optimizer=OPTIMIZERS[optimizer])
    second.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    run(second, opt2, steps // 2, steps)
    return straight.state_dict(), second.state_dict()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # SGD: momentum buffers round-trip
def test_sharded_state_dict_round_trip(ncluster, optimizer):
    want = train_single_process(optimizer, ncluster.world_size, 4, LOCAL_BATCH)
    for straight, resumed in ncluster.run(_round_trip, 4, optimizer):
        assert_same_parameters(resumed, straight)
        assert_same_parameters(resumed, want)


def _launches_against_backward_end(overlap: bool):
    """Per bucket, seconds from its reduce-scatter's launch to the end of backward (> 0:
    launched while backward still ran)."""
    model, opt = dzl.parallelize(
        make_model(), "zero2", optimizer=OPTIMIZERS["sgd"], bucket_cap_mb=1e-4, overlap=overlap
    )
    x, y = global_batch(0, dzl.world_size(), LOCAL_BATCH)
    nn.functional.mse_loss(model(x), y).backward()
    end = opt.reducer.backward_end
    return [end - bucket.launched_at for bucket in opt.reducer.buckets]


def test_zero2_overlap_switch_launches_during_or_after_backward(ncluster):
    # one parameter per bucket: with overlap all but the last bucket can leave during
    # backward; without it, every bucket leaves once backward has ended
    for during in ncluster.run(_launches_against_backward_end, True):
        assert len(during) > 2
        assert sum(ahead > 0 for ahead in during) >= len(during) - 2
    for after in ncluster.run(_launches_against_backward_end, False):
        assert all(ahead <= 0 for ahead in after)


def test_bad_options(ncluster):
    def run():
        try:
            dzl.parallelize(make_model(), "zero1", optimizer=OPTIMIZERS["sgd"], bucket_cap_mb=-1)
        except ValueError as exc:
            return str(exc)

    assert all("bucket_cap_mb" in text for text in ncluster.run(run))

    def overlap_for_stage_1():
        try:
            dzl.parallelize(make_model(), "zero1", optimizer=OPTIMIZERS["sgd"], overlap=False)
        except TypeError as exc:
            return str(exc)

    assert all("overlap" in text for text in ncluster.run(overlap_for_stage_1))


def _drop_in(steps, optimizer="adamw"):
    """dzl.ZeroOptimizer and torch's ZeroRedundancyOptimizer, each behind torch's DDP."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    rank, n = dzl.rank(), dzl.world_size()
    models = [
        nn.parallel.DistributedDataParallel(make_model(0), find_unused_parameters=True)
        for _ in range(2)
    ]
    trainable = [[p for p in m.parameters() if p.requires_grad] for m in models]
    cls, kwargs = OPTIMIZER_CLASSES[optimizer]
    ours = dzl.ZeroOptimizer(trainable[0], cls, **kwargs)
    theirs = ZeroRedundancyOptimizer(trainable[1], optimizer_class=cls, **kwargs)
    dzl.reset_traffic()
    for step in range(steps):
        x, y = global_batch(step, n, LOCAL_BATCH)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for model, opt in zip(models, (ours, theirs), strict=True):
            nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
            opt.step()
            opt.zero_grad()
    return models[0].module.state_dict(), models[1].module.state_dict(), dzl.traffic()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # AdamW alone hides a wrong scale
def test_zero_optimizer_is_a_drop_in_for_torchs(ncluster, optimizer):
    want = train_single_process(optimizer, ncluster.world_size, STEPS, LOCAL_BATCH)
    for ours, theirs, traffic in ncluster.run(_drop_in, STEPS, optimizer):
        assert_same_parameters(ours, theirs)
        assert_same_parameters(ours, want)
        # its own traffic: one all-gather of the parameters per step (DDP's all-reduce is
        # torch's, uncounted): with DDP, 2Ψ + Ψ = 3Ψ per step
        assert traffic["all_gather"]["calls"] == STEPS


def _clipped(strategy, steps, max_norm):
    rank, n = dzl.rank(), dzl.world_size()
    model, opt = dzl.parallelize(make_model(rank), strategy, optimizer=OPTIMIZERS["sgd"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    norms = []
    for step in range(steps):
        x, y = global_batch(step, n, LOCAL_BATCH)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        norms.append(opt.clip_grad_norm_(max_norm))
        opt.step()
        sched.step()
        opt.zero_grad()
    return model.state_dict(), norms, opt.param_groups[0]["lr"]


def test_clipping_to_a_global_norm_and_a_scheduler(ncluster):
    n, max_norm = ncluster.world_size, 0.05
    model = make_model(0)
    opt = OPTIMIZERS["sgd"]([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    want_norms = []
    for step in range(STEPS):
        x, y = global_batch(step, n, LOCAL_BATCH)
        nn.functional.mse_loss(model(x), y).backward()
        want_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        sched.step()
        opt.zero_grad()
    assert want_norms[0] > max_norm  # the clip really cuts
    for strategy in ("zero1", "zero2"):
        for state, norms, lr in ncluster.run(_clipped, strategy, STEPS, max_norm):
            assert_same_parameters(state, model.state_dict())
            assert norms == pytest.approx(want_norms, rel=1e-5)
            assert lr == pytest.approx(opt.param_groups[0]["lr"])


def _consolidated(steps):
    rank, n = dzl.rank(), dzl.world_size()
    model, opt = dzl.parallelize(make_model(0), "zero2", optimizer=OPTIMIZERS["adamw"])
    for step in range(steps):
        x, y = global_batch(step, n, LOCAL_BATCH)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()
    full = opt.consolidate_state_dict()
    return full, dzl.full_state_dict(model)


def test_consolidated_state_loads_at_another_world_size(ncluster, tmp_path):
    """Save the full optimizer state at N ranks, resume at 1 rank and at N, finish: the same as
    straight through in one process."""
    n = ncluster.world_size
    full, params = ncluster.run(_consolidated, 2)[0]
    # keyed per parameter, shaped as it; the parameter no rank uses has no state (as in one
    # process)
    shapes = {
        name: p.shape
        for name, p in make_model().named_parameters()
        if p.requires_grad and not name.startswith("unused.")
    }
    assert sorted(full["state"]) == sorted(shapes)
    for name, entry in full["state"].items():
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        assert entry["exp_avg"].shape == shapes[name]
    assert params.keys() == make_model().state_dict().keys()
    path = tmp_path / "state.pt"
    torch.save({"optimizer": full, "model": params}, path)

    def resume(path, steps_done, steps_total, world_size_before):
        rank, n_now = dzl.rank(), dzl.world_size()
        saved = torch.load(path, weights_only=False)
        model = make_model(0)
        model.load_state_dict(saved["model"])
        model, opt = dzl.parallelize(model, "zero2", optimizer=OPTIMIZERS["adamw"])
        opt.load_state_dict(saved["optimizer"])
        local = LOCAL_BATCH * world_size_before // n_now  # the same global batch
        for step in range(steps_done, steps_total):
            x, y = global_batch(step, world_size_before, LOCAL_BATCH)
            mine = slice(rank * local, (rank + 1) * local)
            nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
            opt.step()
            opt.zero_grad()
        return dzl.full_state_dict(model)

    want = train_single_process("adamw", n, 4, LOCAL_BATCH)
    with dzl.LiveCluster(1, timeout=20.0) as one:  # another world size: one rank
        for got in one.run(resume, str(path), 2, 4, n):
            assert_same_parameters(got, want, atol=1e-5)
    for got in ncluster.run(resume, str(path), 2, 4, n):
        assert_same_parameters(got, want, atol=1e-5)
