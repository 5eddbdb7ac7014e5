"""ZeRO stage 3: single-process equivalence (nested units, a submodule called twice, a weight
tied between units, frozen parameters, sizes no N divides), 3Ψ of traffic, parameters that
exist in full only while their unit runs, agreement with torch's FSDP2."""

from __future__ import annotations

import pytest
import torch
from equivalence import OPTIMIZERS, assert_same_parameters, train_on_rank, train_single_process
from torch import nn

import ddpzero_lab as dzl

STEPS, LOCAL_BATCH = 3, 4


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["no-prefetch", "prefetch"])
def test_equals_single_process_training(ncluster, optimizer, prefetch):
    # a frozen root parameter, a unit no rank ever calls, sizes no N divides
    want = train_single_process(optimizer, ncluster.world_size, STEPS, LOCAL_BATCH)
    results = ncluster.run(train_on_rank, "zero3", optimizer, STEPS, LOCAL_BATCH, prefetch=prefetch)
    for got in results:
        assert_same_parameters(got, want)


class Language(nn.Module):
    """Nested units, a block called twice, an output layer tied to the embedding, a frozen
    unit in the middle (its input needs a gradient: its weights are needed in backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(13, 6)
        self.block = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 6))
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(6, 13, bias=False)
        self.head.weight = self.embed.weight
        self.scale = nn.Parameter(torch.ones(6))  # the root's own

    def forward(self, tokens):
        h = self.embed(tokens)
        h = self.block(h)
        h = self.block(torch.tanh(h))  # the same unit again
        h = self.frozen(h) * self.scale
        return self.head(h)


UNITS = {"embed", "block", "block.0", "block.2", "frozen", "head"}  # block.0 nests in block


def _tokens(step, n, batch=4):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 13, (n * batch, 5), generator=g)
    return x, torch.randint(0, 13, (n * batch, 5), generator=g)


def _language_run(strategy, steps, precision="fp32", optimizer="adamw"):
    rank, n = (dzl.rank(), dzl.world_size()) if strategy != "single" else (0, 1)
    torch.manual_seed(0)
    model = Language()
    world = n if strategy != "single" else steps  # steps doubles as N for the reference
    opt_fn = OPTIMIZERS[optimizer]
    if strategy == "single":
        model, opt = dzl.parallelize(model, "local", optimizer=opt_fn, precision=precision)
        n, world = steps, steps
        steps = STEPS
    else:
        model, opt = dzl.parallelize(
            model, strategy, optimizer=opt_fn, precision=precision, units=lambda m, _: m in UNITS
        )
    losses = []
    for step in range(steps):
        x, y = _tokens(step, world)
        mine = slice(rank * 4, (rank + 1) * 4) if strategy != "single" else slice(None)
        logits = model(x[mine])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 13), y[mine].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return dzl.full_state_dict(model)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # AdamW alone hides a wrong scale
def test_nested_reused_tied_and_frozen_units_equal_single_process(ncluster, optimizer):
    want = _language_run("single", ncluster.world_size, optimizer=optimizer)
    for got in ncluster.run(_language_run, "zero3", STEPS, optimizer=optimizer):
        assert_same_parameters(got, want, atol=2e-6)
        assert got["head.weight"].data_ptr() != 0
        torch.testing.assert_close(got["head.weight"], got["embed.weight"], rtol=0, atol=0)


def _traffic_and_residency():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 9), nn.ReLU(), nn.Linear(9, 5))  # 99 + 50 elements
    model, opt = dzl.parallelize(model, "zero3", optimizer=OPTIMIZERS["sgd"])

    def held():
        return [p.untyped_storage().nbytes() for p in model.parameters()]

    sizes_at_rest = held()
    seen_in_forward = []
    model[2].register_forward_pre_hook(
        lambda m, a: seen_in_forward.append(
            (model[0].weight.untyped_storage().nbytes(), m.weight.untyped_storage().nbytes())
        )
    )
    x = torch.randn(4, 10)
    nn.functional.mse_loss(model(x), torch.zeros(4, 5)).backward()  # warm-up step
    opt.step()
    opt.zero_grad()
    dzl.reset_traffic()
    nn.functional.mse_loss(model(x), torch.zeros(4, 5)).backward()
    opt.step()
    opt.zero_grad()
    return sizes_at_rest, seen_in_forward, dzl.traffic(), held()


def test_traffic_is_three_psi_and_parameters_exist_only_while_needed(ncluster):
    n = ncluster.world_size
    padded = [-(-99 // n) * n, -(-50 // n) * n]  # each unit's flat buffer, padded to N
    for rest, seen, traffic, after in ncluster.run(_traffic_and_residency):
        assert rest == [0, 0, 0, 0] and after == [0, 0, 0, 0]  # bytes held: sharded at rest
        assert seen[-1] == (0, 4 * padded[1])  # in layer 2's forward: layer 0 freed, 2 whole
        gathered = sum(padded) * (n - 1) // n * 4
        assert traffic["all_gather"]["sent"] == 2 * gathered  # forward and backward
        assert traffic["reduce_scatter"]["sent"] == gathered
        assert traffic["all_gather"]["sent"] + traffic["reduce_scatter"]["sent"] == 3 * gathered


class _RootScaled(nn.Module):
    """Two child units and a parameter of the root itself (the root is a unit too)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) * self.scale


def _gathers_per_phase(prefetch):
    torch.manual_seed(0)
    model, opt = dzl.parallelize(
        _RootScaled(), "zero3", optimizer=OPTIMIZERS["sgd"], prefetch=prefetch, track_memory=False
    )
    x = torch.randn(4, 8)
    counts = []
    for _ in range(2):
        dzl.reset_traffic()
        y = model(x)
        forward = dzl.traffic()["all_gather"]["calls"]
        y.sum().backward()
        backward = dzl.traffic()["all_gather"]["calls"] - forward
        opt.step()
        opt.zero_grad()
        counts.append((forward, backward))
    return counts, len(model.strategy.engine.units)


@pytest.mark.parametrize("prefetch", [False, True], ids=["no-prefetch", "prefetch"])
def test_each_unit_is_gathered_once_for_forward_and_once_for_backward(ncluster, prefetch):
    for counts, units in ncluster.run(_gathers_per_phase, prefetch):
        assert units == 3  # a, b and the root's own parameter
        assert counts == [(units, units)] * 2


def _fsdp2_vs_zero3(steps, optimizer="adamw"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, n = dzl.rank(), dzl.world_size()

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    ours, ours_opt = dzl.parallelize(
        model(), "zero3", optimizer=OPTIMIZERS[optimizer], track_memory=False
    )
    theirs = model()
    mesh = init_device_mesh("cpu", (n,))
    for layer in (theirs[0], theirs[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(theirs, mesh=mesh)
    theirs_opt = OPTIMIZERS[optimizer](theirs.parameters())
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4 * n, 6, generator=g), torch.randn(4 * n, 3, generator=g)
        mine = slice(4 * rank, 4 * rank + 4)
        for m, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            nn.functional.mse_loss(m(x[mine]), y[mine]).backward()
            opt.step()
            opt.zero_grad()
    full_theirs = {k: v.full_tensor() for k, v in theirs.state_dict().items()}
    return dzl.full_state_dict(ours), full_theirs


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # AdamW alone hides a wrong scale
def test_agrees_with_fsdp2_fully_shard(ncluster, optimizer):
    for ours, theirs in ncluster.run(_fsdp2_vs_zero3, STEPS, optimizer):
        assert_same_parameters(ours, theirs, atol=1e-6)


def _bad_units():
    model = nn.Linear(3, 3)
    with pytest.raises(TypeError, match="units"):
        dzl.parallelize(model, "zero3", optimizer=OPTIMIZERS["sgd"], units=["0"])
    with pytest.raises(TypeError, match="zero3"):
        dzl.parallelize(nn.Linear(3, 3), "zero3", optimizer=OPTIMIZERS["sgd"], bucket_cap_mb=1)
    return True


def test_bad_options_are_refused(ncluster):
    assert all(ncluster.run(_bad_units))


def _prefetch_in_flight(prefetch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model, opt = dzl.parallelize(model, "zero3", optimizer=OPTIMIZERS["sgd"], prefetch=prefetch)
    engine = model.strategy.engine
    unit_of = {u.module: u for u in engine.units}
    early = []  # after layer 0's forward: is layer 2's gather already started or done?
    model[0].register_forward_hook(
        lambda m, a, o: early.append(
            bool(unit_of[model[2]].gather_works) or unit_of[model[2]].gathered
        )
    )
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    return [u.name for u in engine._order], early, dzl.full_state_dict(model)


def test_prefetch_starts_the_next_units_gather_early_and_changes_no_result(ncluster):
    with_prefetch = ncluster.run(_prefetch_in_flight, True)
    without = ncluster.run(_prefetch_in_flight, False)
    for (order, early, state), (_, late, plain) in zip(with_prefetch, without, strict=True):
        assert order == ["(root)", "0", "2", "4"]  # the first forward's order
        assert early == [False, True, True]  # the first forward records; then it prefetches
        assert late == [False, False, False]
        assert_same_parameters(state, plain, atol=0)


class Blocks(nn.Module):
    """Blocks in a ModuleList, called by the root one by one (the list itself never runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


class Peeks(Blocks):
    def forward(self, x):  # reads a unit's weight outside that unit's forward
        return x @ self.head.weight.t()


def _units_of_containers():
    torch.manual_seed(0)
    model, opt = dzl.parallelize(Blocks(), "zero3", optimizer=OPTIMIZERS["sgd"])
    names = sorted(u.name for u in model.strategy.engine.units)
    nn.functional.mse_loss(model(torch.randn(4, 6)), torch.zeros(4, 3)).backward()
    opt.step()
    # at rest a parameter is an empty tensor: reading it is safe and shows nothing
    assert [p.detach().clone().numel() for p in model.parameters()] == [0] * 6
    with pytest.raises(ValueError, match="ModuleList"):
        dzl.parallelize(
            Blocks(), "zero3", optimizer=OPTIMIZERS["sgd"], units=lambda n, m: n == "blocks"
        )
    peeking, _ = dzl.parallelize(Peeks(), "zero3", optimizer=OPTIMIZERS["sgd"])
    with pytest.raises(RuntimeError, match="used outside its unit") as info:
        peeking(torch.randn(4, 6))
    return names, str(info.value)


def test_module_lists_give_their_elements_as_units_and_misuse_is_explained(ncluster):
    for names, message in ncluster.run(_units_of_containers):
        assert names == ["(root)", "blocks.0", "blocks.1", "head"]
        assert "head (head.weight, head.bias)" in message and "vec (0)" in message


def _saved_for_backward(strategy):
    torch.manual_seed(0)
    layers = [m for _ in range(6) for m in (nn.Linear(64, 64), nn.Tanh())]
    model, _ = dzl.parallelize(
        nn.Sequential(*layers), strategy, optimizer=OPTIMIZERS["sgd"], track_memory=False
    )
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(torch.randn(4, 64))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    held = sum(storages.values())
    out.sum().backward()  # the saved views see the gathered values again
    return held, sum(p.grad is None for p in model.parameters())


def test_what_autograd_saves_holds_no_gathered_parameters(ncluster):
    weight = 64 * 64 * 4
    for held, _ in ncluster.run(_saved_for_backward, "zero3"):
        # activations only (6 inputs and 6 outputs of 4 x 64): no gathered weight survives
        # the end of its unit's forward through a view that autograd keeps
        assert held <= 12 * 4 * 64 * 4 < weight
    for held, _ in ncluster.run(_saved_for_backward, "ddp"):
        assert held >= 5 * weight  # DDP saves 5 weights (not the first: no input gradient)


def _activations(strategy):
    torch.manual_seed(0)
    layers = [m for _ in range(3) for m in (nn.Linear(32, 32), nn.Tanh())]
    model, opt = dzl.parallelize(
        nn.Sequential(*layers), strategy, optimizer=OPTIMIZERS["sgd"], track_memory=True
    )
    for _ in range(2):
        model(torch.randn(4, 32, requires_grad=True)).sum().backward()
        opt.step()
        opt.zero_grad()


def test_the_memory_tracker_counts_activations_not_gathered_parameters(ncluster):
    counted = {}
    for strategy in ("ddp", "zero3"):
        job = ncluster.submit(_activations, strategy)
        job.wait()
        counted[strategy] = sorted(
            e["activations"]
            for e in job.events
            if e.kind == "memory" and e["phase"] == "after_forward"
        )
    assert counted["zero3"] == counted["ddp"]  # the same activations on every rank, each step
    assert len(set(counted["zero3"])) == 1 and counted["zero3"][0] < 32 * 32 * 4
