"""ZeRO-3 used the way FSDP2 is: `dzl.fully_shard` on the units and the root (or `dzl.Zero3`),
then any torch optimizer over `model.parameters()` (this rank's shards). It must train as one
process on the global batch and as torch's own `fully_shard`; full gradients per parameter
equal one process's; an optimizer that would step nothing raises instead."""

from __future__ import annotations

import re

import pytest
import torch
from equivalence import OPTIMIZERS, global_batch, make_model
from torch import nn

import ddpzero_lab as dzl

STEPS, LOCAL_BATCH, ATOL = 3, 4, 1e-5
UNITS = ("embed", "hidden", "head", "unused")


def _grouped(optimizer: str, named):
    """Two param groups: no weight decay and a second learning rate for biases."""
    named = list(named)
    biases = [p for n, p in named if n.endswith("bias")]
    others = [p for n, p in named if not n.endswith("bias")]
    groups = [{"params": others}, {"params": biases, "weight_decay": 0.0, "lr": 0.03}]
    return OPTIMIZERS[optimizer](groups)


def _build_optimizer(optimizer: str, named, groups: bool):
    return _grouped(optimizer, named) if groups else OPTIMIZERS[optimizer](p for _, p in named)


def _single_process(optimizer: str, world_size: int, groups: bool = False):
    """The reference: one process, the global batch; the parameters and, per step, the grads."""
    model = make_model()
    opt = _build_optimizer(optimizer, model.named_parameters(), groups)
    grads = []
    for step in range(STEPS):
        x, y = global_batch(step, world_size, LOCAL_BATCH)
        nn.functional.mse_loss(model(x), y).backward()
        grads.append(
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        )
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}, grads


def _fsdp_style_on_rank(optimizer: str, wrap: str, groups: bool = False):
    rank, world_size = dzl.rank(), dzl.world_size()
    model = make_model(seed=rank)  # a different init per rank: sharding broadcasts rank 0's
    if wrap == "fully_shard":
        for name in UNITS:
            dzl.fully_shard(getattr(model, name))
        dzl.fully_shard(model)
    else:
        model = dzl.Zero3(model)  # units chosen for it: each child of the root with parameters
        assert sorted(u.name for u in model.units) == ["(root)", *sorted(UNITS)]
    shards = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _build_optimizer(optimizer, model.named_parameters(), groups)
    grads, shard_grads = [], []
    for step in range(STEPS):
        x, y = global_batch(step, world_size, LOCAL_BATCH)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        shard_grads.append(
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        )
        grads.append(dzl.full_grads(model))
        opt.step()
        opt.zero_grad()
    return dzl.full_state_dict(model), grads, shards, shard_grads


def _assert_close(got, want, name):
    assert (got is None) == (want is None), name
    if want is not None:
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=name)


def _check_pieces(pieces: list[torch.Tensor | None], full: torch.Tensor | None, name: str):
    """The ranks' shards, laid end to end, are the full tensor (flattened)."""
    if full is None:
        assert all(p is None for p in pieces), name
        return
    _assert_close(torch.cat(pieces), full.reshape(-1), name)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("wrap", ["fully_shard", "Zero3"])
def test_fsdp_style_loop_equals_single_process(ncluster, optimizer, wrap):
    n = ncluster.world_size
    want, want_grads = _single_process(optimizer, n)
    results = ncluster.run(_fsdp_style_on_rank, optimizer, wrap)
    init = {k: v.clone() for k, v in make_model().state_dict().items()}
    for got, grads, _, _ in results:
        assert got.keys() == want.keys()
        for name in want:
            _assert_close(got[name], want[name], name)
        for step in range(STEPS):  # full gradients per parameter: one process's
            assert grads[step].keys() == want_grads[step].keys()
            for name, g in want_grads[step].items():
                _assert_close(grads[step][name], g, f"step {step}: grad of {name}")
    # model.parameters() are this rank's shards: laid end to end they are the parameters,
    # and their .grad the reduced gradient
    for name, _ in make_model().named_parameters():
        _check_pieces([r[2][name] for r in results], init[name], name)
        for step in range(STEPS):
            pieces = [r[3][step][name] for r in results]
            _check_pieces(pieces, want_grads[step][name], f"step {step}: .grad of {name}")
    assert sum(r[2]["hidden.weight"].numel() for r in results) == 77
    assert any(r[2]["embed.bias"].numel() == 0 for r in results)  # some rank owns none of it


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_param_groups_equal_single_process(ncluster, optimizer):
    want, _ = _single_process(optimizer, ncluster.world_size, groups=True)
    for got, *_ in ncluster.run(_fsdp_style_on_rank, optimizer, "fully_shard", groups=True):
        for name in want:
            _assert_close(got[name], want[name], name)
    plain, _ = _single_process(optimizer, ncluster.world_size)  # the groups change the result
    assert (plain["embed.bias"] - want["embed.bias"]).abs().max() > 10 * ATOL


def _ours_and_fsdp2(optimizer: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, n = dzl.rank(), dzl.world_size()

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    ours, theirs = model(), model()
    mesh = init_device_mesh("cpu", (n,))
    for a, b in ((ours[0], theirs[0]), (ours[2], theirs[2])):
        dzl.fully_shard(a)
        fully_shard(b, mesh=mesh)
    dzl.fully_shard(ours)
    fully_shard(theirs, mesh=mesh)
    optimizers = [OPTIMIZERS[optimizer](m.parameters()) for m in (ours, theirs)]
    grads = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4 * n, 6, generator=g), torch.randn(4 * n, 3, generator=g)
        mine = slice(4 * rank, 4 * rank + 4)
        for m in (ours, theirs):
            nn.functional.mse_loss(m(x[mine]), y[mine]).backward()
        theirs_grads = {k: p.grad.full_tensor() for k, p in theirs.named_parameters()}
        grads.append((dzl.full_grads(ours), theirs_grads))
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    full_theirs = {k: v.full_tensor() for k, v in theirs.state_dict().items()}
    return dzl.full_state_dict(ours), full_theirs, grads


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_agrees_with_torch_fully_shard(ncluster, optimizer):
    for ours, theirs, grads in ncluster.run(_ours_and_fsdp2, optimizer):
        assert ours.keys() == theirs.keys()
        for name in theirs:
            _assert_close(ours[name], theirs[name], name)
        for step, (g_ours, g_theirs) in enumerate(grads):
            assert g_ours.keys() == g_theirs.keys()
            for name in g_theirs:
                _assert_close(g_ours[name], g_theirs[name], f"step {step}: grad of {name}")


def _optimizers_that_would_step_nothing():
    rank = dzl.rank()
    model, opt = dzl.parallelize(make_model(), "zero3", optimizer=OPTIMIZERS["sgd"])
    wrong = torch.optim.AdamW(model.parameters())  # 0-element placeholders at rest
    x, y = global_batch(0, dzl.world_size(), LOCAL_BATCH)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
    before = dzl.full_state_dict(model)
    with pytest.raises(RuntimeError, match="fully_shard") as parallelized:
        wrong.step()
    opt.step()  # the optimizer parallelize returned still trains
    after = dzl.full_state_dict(model)

    early = make_model()
    too_soon = torch.optim.SGD(early.parameters(), lr=0.1)  # built before sharding
    dzl.fully_shard(early)
    nn.functional.mse_loss(early(x[mine]), y[mine]).backward()
    with pytest.raises(RuntimeError, match="after the last fully_shard") as built_early:
        too_soon.step()
    return before, after, str(parallelized.value), str(built_early.value)


def test_an_optimizer_that_would_step_nothing_raises(ncluster):
    for before, after, message, early in ncluster.run(_optimizers_that_would_step_nothing):
        assert "parallelize" in message and "model.parameters()" in message
        assert "0-element" in early
        # the raise came before any change; the right optimizer then changed the weights
        moved = (after["hidden.weight"] - before["hidden.weight"]).abs().max()
        assert moved > 1e-4
        torch.testing.assert_close(after["frozen"], before["frozen"], rtol=0, atol=0)


def _language_fully_shard(optimizer: str, accumulate: bool):
    """Nested units (block.0 and block.2 inside block), a block called twice, a weight tied
    between two units, a frozen unit; fully_shard innermost first, then the root."""
    from test_zero3 import Language, _tokens

    rank, n = dzl.rank(), dzl.world_size()
    torch.manual_seed(0)
    model = Language()
    for sub in (model.block[0], model.block[2], model.block, model.embed, model.frozen):
        dzl.fully_shard(sub)
    # head.weight is embed.weight, sharded with embed already: head cannot be sharded apart
    with pytest.raises(ValueError, match="parameter weight is already sharded"):
        dzl.fully_shard(model.head)
    dzl.fully_shard(model)  # takes the tied weight: the root contains both its users
    opt = OPTIMIZERS[optimizer](model.parameters())
    for step in range(STEPS):
        x, y = _tokens(step, n)
        x, y = x[rank * 4 : rank * 4 + 4], y[rank * 4 : rank * 4 + 4]
        parts = [slice(0, 2), slice(2, 4)] if accumulate else [slice(0, 4)]
        for part in parts:  # gradient accumulation: .grad sums over the backward passes
            logits = model(x[part])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 13), y[part].reshape(-1))
            (loss / len(parts)).backward()
        grads = dzl.full_grads(model)
        opt.step()
        opt.zero_grad()
    units = sorted(u.name for u in model.strategy.engine.units)
    return dzl.full_state_dict(model), grads, units


def _language_single(optimizer: str, n: int):
    from test_zero3 import Language, _tokens

    torch.manual_seed(0)
    model = Language()
    opt = OPTIMIZERS[optimizer](model.parameters())
    for step in range(STEPS):
        x, y = _tokens(step, n)
        logits = model(x)
        nn.functional.cross_entropy(logits.reshape(-1, 13), y.reshape(-1)).backward()
        grads = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}, grads


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["one-pass", "accumulate"])
def test_nested_tied_reused_frozen_units_and_accumulation(ncluster, optimizer, accumulate):
    want, want_grads = _language_single(optimizer, ncluster.world_size)
    for got, grads, units in ncluster.run(_language_fully_shard, optimizer, accumulate):
        # block's parameters all lie in block.0 and block.2; embed's weight is tied to head's,
        # so the root holds it: neither is a unit with parameters of its own
        assert units == ["(root)", "block.0", "block.2", "frozen"]
        assert got.keys() == want.keys()
        for name in want:
            _assert_close(got[name], want[name], name)
        assert grads.keys() == want_grads.keys()
        for name, g in want_grads.items():
            _assert_close(grads[name], g, f"grad of {name}")


def _fully_shard_run(optimizer, steps, start=0, save=None, load=None, precision="fp32"):
    """Steps [start, start+steps) of the FSDP2-style loop; optionally load a checkpoint first
    and save one after."""
    rank, n = dzl.rank(), dzl.world_size()
    model = make_model()
    for name in UNITS:
        dzl.fully_shard(getattr(model, name), precision=precision)
    dzl.fully_shard(model, precision=precision)
    opt = OPTIMIZERS[optimizer](model.parameters())
    if load is not None:
        assert dzl.load_checkpoint(load, model, opt)["step"] == start
    for step in range(start, start + steps):
        x, y = global_batch(step, n, LOCAL_BATCH)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()
    if save is not None:
        dzl.save_checkpoint(save, model, opt, step=start + steps)
    return dzl.full_state_dict(model)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_checkpoint_resume_equals_an_uninterrupted_run(ncluster, tmp_path, optimizer):
    straight = ncluster.run(_fully_shard_run, optimizer, 4)
    ncluster.run(_fully_shard_run, optimizer, 2, save=tmp_path)
    resumed = ncluster.run(_fully_shard_run, optimizer, 2, start=2, load=tmp_path)
    for got, want in zip(resumed, straight, strict=True):
        for name in want:  # exactly: the shards and the optimizer state per shard came back
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def _parallelized_run(optimizer, precision):
    rank, n = dzl.rank(), dzl.world_size()
    model, opt = dzl.parallelize(
        make_model(),
        "zero3",
        optimizer=OPTIMIZERS[optimizer],
        precision=precision,
        units=lambda name, _: name in UNITS,
    )
    for step in range(STEPS):
        x, y = global_batch(step, n, LOCAL_BATCH)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()
    return dzl.full_state_dict(model)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_bf16_mixed_equals_parallelize_zero3(ncluster, optimizer):
    """bf16 compute with fp32 shards: an outside optimizer steps the fp32 shard, and the bf16
    copy the next all-gather sends follows it, as with the optimizer parallelize returns."""
    ours = ncluster.run(_fully_shard_run, optimizer, STEPS, precision="bf16-mixed")
    theirs = ncluster.run(_parallelized_run, optimizer, "bf16-mixed")
    fp32 = ncluster.run(_fully_shard_run, optimizer, STEPS)
    for got, want, full in zip(ours, theirs, fp32, strict=True):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
        assert (got["hidden.weight"] - full["hidden.weight"]).abs().max() > 1e-4  # bf16 ran


class _Skips(nn.Module):
    """Unit `b` runs on rank 0 only: a ZeRO-3 unit skipped entirely on one rank cannot work."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) if dzl.rank() == 0 else h


def _skip_a_unit_on_one_rank():
    torch.manual_seed(0)
    model = _Skips()
    dzl.fully_shard(model.a)
    dzl.fully_shard(model.b)
    dzl.fully_shard(model)
    model(torch.randn(2, 4)).sum().backward()


@pytest.mark.timeout(60)
def test_a_unit_skipped_on_one_rank_times_out_naming_the_unit(short_cluster):
    with pytest.raises(dzl.RankError) as info:
        short_cluster.run(_skip_a_unit_on_one_rank)
    report = info.value.report
    # rank 0 waits to gather b's parameters, which rank 1 never asks for (until its own
    # timeout, or until rank 1's timeout breaks the connection under it: "failed in")
    assert re.search(r"rank 0 (waited|failed) in all_gather #\d+ \(tag params:b\)", report), report


def _clipped(world_size: int | None = None, how: str = "engine"):
    """One backward, gradients clipped to norm 0.05: (total norm, full gradients); `how`:
    the Zero3 wrapper's own clip_grad_norm_ or dzl.clip_grad_norm_."""
    model = make_model()
    n = world_size or dzl.world_size()
    x, y = global_batch(0, n, LOCAL_BATCH)
    if world_size is None:  # a rank: the Zero3 wrapper clips to the norm over every shard
        model = dzl.Zero3(model)
        mine = slice(dzl.rank() * LOCAL_BATCH, (dzl.rank() + 1) * LOCAL_BATCH)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        if how == "engine":
            total = model.clip_grad_norm_(0.05)
        else:
            total = dzl.clip_grad_norm_(model, 0.05)
        return torch.tensor(total, dtype=torch.float32), dzl.full_grads(model)
    nn.functional.mse_loss(model(x), y).backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    return total, {n: None if p.grad is None else p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("how", ["engine", "dzl"])
def test_clip_grad_norm_uses_the_global_norm(ncluster, how):
    want_total, want = _clipped(ncluster.world_size)
    assert want_total > 0.05  # the clip acts
    for total, grads in ncluster.run(_clipped, None, how):
        torch.testing.assert_close(total, want_total, rtol=0, atol=ATOL)
        for name, g in want.items():
            _assert_close(grads[name], g, name)


def _per_unit_policies():
    """FSDP2's per-module mp_policy: the first layer's own fully_shard call says bf16 (reduced
    in fp32), the root's says fp32; the reference is one process with the same casts."""
    from ddpzero_lab import comm

    rank, n = dzl.rank(), dzl.world_size()
    bf16 = dzl.MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, modules=None
    )

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    ours = model()
    dzl.fully_shard(ours[0], mp_policy=bf16)
    dzl.fully_shard(ours)
    opt = OPTIMIZERS["sgd"](ours.parameters())
    # the reference: one process, the first layer alone in bf16 with fp32 masters
    ref, ref_opt = dzl.parallelize(
        model(),
        "local",
        optimizer=OPTIMIZERS["sgd"],
        precision=dzl.MixedPrecisionPolicy(
            param_dtype=torch.bfloat16,
            modules=lambda m: isinstance(m, nn.Linear) and m.in_features == 6,
        ),
        track_memory=False,
    )
    seen = {}
    # what each layer computes with, seen as its forward starts (after the unit's gather)
    ours[0].register_forward_pre_hook(
        lambda m, args: seen.update(weight0=m.weight.dtype, input0=args[0].dtype)
    )
    ours[2].register_forward_pre_hook(
        lambda m, args: seen.update(weight2=m.weight.dtype, input2=args[0].dtype)
    )
    wire = []  # (op, tag, dtype) of every gather and reduce-scatter
    real = comm.all_gather, comm.reduce_scatter

    def gather(output, input, **kwargs):
        wire.append(("all_gather", kwargs.get("tag"), output.dtype))
        return real[0](output, input, **kwargs)

    def scatter(output, input, **kwargs):
        wire.append(("reduce_scatter", kwargs.get("tag"), input.dtype))
        return real[1](output, input, **kwargs)

    comm.all_gather, comm.reduce_scatter = gather, scatter
    try:
        for step in range(STEPS):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(4 * n, 6, generator=g), torch.randn(4 * n, 3, generator=g)
            mine = slice(4 * rank, 4 * rank + 4)
            nn.functional.mse_loss(ours(x[mine]), y[mine]).backward()
            opt.step()
            opt.zero_grad()
            nn.functional.mse_loss(ref(x), y).backward()
            ref_opt.step()
            ref_opt.zero_grad()
    finally:
        comm.all_gather, comm.reduce_scatter = real
    return seen, sorted(set(wire)), dzl.full_state_dict(ours), dzl.full_state_dict(ref)


def test_each_fully_shard_call_keeps_its_own_mixed_precision_policy(ncluster):
    for seen, wire, ours, ref in ncluster.run(_per_unit_policies):
        assert seen == {
            "weight0": torch.bfloat16,
            "input0": torch.bfloat16,
            "weight2": torch.float32,
            "input2": torch.float32,
        }
        assert wire == [
            ("all_gather", "params:(root)", torch.float32),
            ("all_gather", "params:0", torch.bfloat16),
            ("reduce_scatter", "grads:(root)", torch.float32),
            ("reduce_scatter", "grads:0", torch.float32),  # bf16 gradients reduced in fp32
        ]
        for name, want in ref.items():
            torch.testing.assert_close(ours[name], want, atol=1e-2, rtol=1e-2, msg=name)


def _whole_model_root_around_a_unit_policy():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    dzl.fully_shard(model[0])  # fp32
    try:
        dzl.fully_shard(model, precision="bf16-mixed")
    except ValueError as exc:
        return str(exc)
    return None


def test_a_unit_policy_inside_an_edges_only_root_policy_is_refused(ncluster):
    for message in ncluster.run(_whole_model_root_around_a_unit_policy):
        assert message is not None and "per-module policy" in message
