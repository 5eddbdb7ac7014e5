"""Peak memory: the tracker's peak per phase against hand-counted bytes, the peak formula
against the measured peak of every strategy on two course models, activation checkpointing
(equivalence, activation bytes, ZeRO-3 gathers), and ZeRO's peak at most DDP's."""

from __future__ import annotations

import pytest
import torch
from equivalence import OPTIMIZERS, assert_same_parameters, train_on_rank, train_single_process
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.memory import (
    PEAK_CATEGORIES,
    MemoryTracker,
    peak_memory_estimate,
    peak_memory_estimate_for,
)
from ddpzero_lab.parallel.checkpointing import choose_blocks

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


def _two_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 33), nn.ReLU(), nn.Linear(33, 7))


def test_peak_per_phase_is_the_hand_counted_worst_moment():
    model = _two_layers()
    psi = 10 * 33 + 33 + 33 * 7 + 7
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no state: the optimizer holds nothing
    tracker = MemoryTracker(emit=False).attach(model, opt)
    batch = 64
    for _ in range(2):
        model(torch.randn(batch, 10)).sum().backward()
        opt.step()
        opt.zero_grad()
    x_bytes, relu_bytes = 4 * batch * 10, 4 * batch * 33  # what autograd saves: x, ReLU's out
    forward, backward, step = (tracker.peaks[p] for p in ("forward", "backward", "step"))
    assert set(forward) == {*PEAK_CATEGORIES, "total"}
    # forward ends with every activation held, no gradient (zero_grad set them to None)
    assert forward["activations"] == x_bytes + relu_bytes and forward["grads"] == 0
    assert forward["total"] == 4 * psi + x_bytes + relu_bytes
    # backward's worst moment: the second layer's gradients are in (33 x 7 + 7) while ReLU's
    # output and x are still held (ReLU's backward, then the first layer's, free them); once
    # they are gone the first layer's gradients (4 x 363 bytes) weigh less
    assert backward["grads"] == 4 * (33 * 7 + 7)
    assert backward["activations"] == x_bytes + relu_bytes
    assert backward["total"] == 4 * psi + 4 * (33 * 7 + 7) + x_bytes + relu_bytes
    # the step: parameters and gradients, nothing else alive
    assert step == {**dict.fromkeys(PEAK_CATEGORIES, 0), "params": 4 * psi, "grads": 4 * psi,
                    "total": 8 * psi}  # fmt: skip
    # the events carry them
    event = tracker.last["after_backward"]
    assert event["peak"] == backward["total"] and event["peak_grads"] == backward["grads"]
    assert event["activations"] == 0  # backward has freed them all


def test_adamw_state_is_counted_in_the_step_it_appears():
    model = _two_layers()
    psi = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = MemoryTracker(emit=False).attach(model, opt)
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    # exp_avg and exp_avg_sq (8 bytes per parameter) and a 4-byte step counter per tensor
    assert tracker.peaks["step"]["optimizer"] == 8 * psi + 4 * 4
    opt.zero_grad()
    model(torch.randn(4, 10)).sum().backward()
    assert tracker.peaks["forward"]["optimizer"] == 8 * psi + 4 * 4


class _Blocks(nn.Module):
    """Three residual-free blocks of Linear, Tanh, Linear: autograd saves each block's input
    and its Tanh output (the second Linear saves the same tensor)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
                for _ in range(3)
            )
        )

    def forward(self, x):
        return self.blocks(self.inp(x))


def _activations(checkpointing, batch=256, width=16):
    torch.manual_seed(0)
    model, opt = dzl.parallelize(
        _Blocks(width),
        "local",
        optimizer=OPTIMIZERS["sgd"],
        activation_checkpointing=checkpointing,
        track_memory=False,
    )
    tracker = MemoryTracker(emit=False).attach(model, opt)
    model(torch.randn(batch, 4)).sum().backward()
    opt.step()
    return tracker


def test_checkpointing_keeps_the_block_inputs_plus_one_block():
    batch, width = 256, 16  # activations outweigh the 7 kB of parameters and gradients
    act = 4 * batch * width  # one (batch x width) fp32 tensor
    plain = _activations(None)
    # x (batch x 4), then per block its input and its Tanh output
    assert plain.peaks["forward"]["activations"] == 4 * batch * 4 + 6 * act
    assert choose_blocks(_Blocks(), lambda n, m: n.startswith("blocks.")) == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
    ]
    ckpt = _activations(lambda name, module: name.startswith("blocks."))
    # forward: the three blocks' inputs only (the first one is the input layer's output)
    assert ckpt.peaks["forward"]["activations"] == 4 * batch * 4 + 3 * act
    # backward: the inputs still held plus one block recomputed (its Tanh output)
    assert ckpt.peaks["backward"]["activations"] == 4 * batch * 4 + 3 * act + act
    assert ckpt.peaks["backward"]["activations"] < plain.peaks["backward"]["activations"]
    assert ckpt.activation_peaks == {
        "forward": ckpt.peaks["forward"]["activations"],
        "backward": ckpt.peaks["backward"]["activations"],
        "step": 0,
    }


def _same_gradients_with_checkpointing():
    torch.manual_seed(0)
    want = _Blocks()
    got = _Blocks()
    got.load_state_dict(want.state_dict())
    dzl.parallelize(got, "local", optimizer=OPTIMIZERS["sgd"], activation_checkpointing=True)
    x = torch.randn(5, 4)
    want(x).square().sum().backward()
    got(x).square().sum().backward()
    return [(a.grad, b.grad) for a, b in zip(want.parameters(), got.parameters(), strict=True)]


def test_checkpointing_leaves_gradients_and_state_dict_keys_unchanged():
    for a, b in _same_gradients_with_checkpointing():
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model = _Blocks()
    keys = list(model.state_dict())
    dzl.parallelize(model, "local", optimizer=OPTIMIZERS["sgd"], activation_checkpointing=True)
    assert list(model.state_dict()) == keys
    with pytest.raises(TypeError, match="activation_checkpointing"):
        dzl.parallelize(_Blocks(), "local", optimizer=OPTIMIZERS["sgd"], activation_checkpointing=3)


@pytest.fixture(scope="module")
def pair():
    with dzl.LiveCluster(world_size=2, timeout=30.0) as cluster:
        yield cluster


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_checkpointed_training_equals_one_process(pair, strategy, optimizer):
    want = train_single_process(optimizer, 2, 3, 4)
    options = {"find_unused_parameters": True} if strategy == "ddp" else {}  # Net.unused
    results = pair.run(
        train_on_rank, strategy, optimizer, 3, 4, activation_checkpointing=True, **options
    )
    for got in results:
        assert_same_parameters(got, want)


_UNITS = {
    # each checkpointed block is a unit: its backward's gather serves the recompute
    "block": lambda name, m: name.startswith("blocks.") and name.count(".") == 1,
    # units inside a checkpointed block: the recompute runs their hooks again
    "nested": lambda name, m: name.startswith("blocks.") and isinstance(m, nn.Linear),
}


def _gathers(checkpointing, units):
    torch.manual_seed(0)
    model = _Blocks()
    model, opt = dzl.parallelize(
        model,
        "zero3",
        optimizer=OPTIMIZERS["adamw"],
        units=_UNITS[units],
        activation_checkpointing=checkpointing,
    )
    engine = dzl.strategy_of(model).engine
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(4, 4, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return engine.gathers, len(engine.units), dzl.full_state_dict(model)


@pytest.mark.parametrize("units", sorted(_UNITS))
def test_zero3_recomputes_a_gathered_unit_with_no_extra_gather_or_reduce(pair, units):
    plain = pair.run(_gathers, None, units)
    blocks = lambda name, m: name.startswith("blocks.") and name.count(".") == 1  # noqa: E731
    ckpt = pair.run(_gathers, blocks, units)
    for (g0, units, want), (g1, _, got) in zip(plain, ckpt, strict=True):
        # each unit once for forward, once for backward (the recompute finds it gathered)
        assert g0 == g1 == 2 * 2 * units
        assert_same_parameters(got, want)


def _model(name: str):
    from ddpzero_lab.workloads.models import mlp, tiny_gpt

    torch.manual_seed(0)
    if name == "mlp":
        model = mlp(64, 10, (256, 256, 256))
        x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        return model, x, lambda out: nn.functional.cross_entropy(out, y)
    model = tiny_gpt(65, block_size=32, n_layer=4)
    x = torch.randint(0, 65, (2, 32))
    return model, x, lambda out: out.square().mean()


def _measured_peak(name, strategy):
    model, x, loss_fn = _model(name)
    model, opt = dzl.parallelize(
        model, strategy, optimizer=lambda p: torch.optim.AdamW(p), track_memory=False
    )
    tracker = MemoryTracker(emit=False).attach(model, opt)
    for _ in range(3):  # AdamW's state exists from the first step on: the second is steady
        loss_fn(model(x)).backward()
        opt.step()
        opt.zero_grad()
    return {phase: peak["total"] for phase, peak in tracker.peaks.items()}, tracker.activations


@pytest.fixture(scope="module")
def measured(pair):
    return {
        (name, strategy): pair.run(_measured_peak, name, strategy)
        for name in ("mlp", "gpt")
        for strategy in STRATEGIES
    }


@pytest.mark.parametrize("name", ["mlp", "gpt"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_peak_formula_within_five_percent_of_the_measured_peak(measured, name, strategy):
    for peaks, activations in measured[(name, strategy)]:
        formula = peak_memory_estimate_for(_model(name)[0], strategy, 2, activations)
        assert max(peaks.values()) == pytest.approx(formula["peak"], rel=0.05)
        # and phase by phase where the formula is exact: the step is the model state at rest
        assert peaks["step"] == pytest.approx(formula["at_rest"], rel=0.001)


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_every_zero_stage_peaks_at_most_at_ddps(measured, name):
    ddp = [max(p.values()) for p, _ in measured[(name, "ddp")]]
    for stage in ("zero1", "zero2", "zero3"):
        for rank, (peaks, _) in enumerate(measured[(name, stage)]):
            assert max(peaks.values()) <= ddp[rank], (stage, peaks, ddp[rank])


def test_peak_formula_terms():
    psi, n, a = 1000, 4, 500
    ddp = peak_memory_estimate(psi, n, "ddp", a)
    assert ddp["at_rest"] == 16 * psi
    assert ddp["peak"] == 4 * psi + 8 * psi + 4 * psi + max(a, 4 * psi)  # buckets + fresh .grad
    z1 = peak_memory_estimate(psi, n, "zero1", a)
    assert z1["peak"] == 4 * psi + 8 * psi / n + 4 * psi + a
    # ZeRO-2, two buckets: the second fills while the first is in flight (+ its slice)
    z2 = peak_memory_estimate(psi, n, "zero2", a, bucket_bytes=[2000, 2000])
    assert z2["backward"] == 4 * psi + 8 * psi / n + a + 2000 + 2000 * (1 + 1 / n)
    with_receive = peak_memory_estimate(
        psi, n, "zero2", a, bucket_bytes=[2000, 2000], reduce_scatter_receive=True
    )
    assert with_receive["backward"] - z2["backward"] == 2000
    # ZeRO-3: one unit gathered in forward; two with prefetch
    z3 = peak_memory_estimate(psi, n, "zero3", 0, unit_params=[600, 400])
    assert z3["forward"] == 16 * psi / n - 4 * psi / n + 4 * 600
    z3p = peak_memory_estimate(psi, n, "zero3", 0, unit_params=[600, 400], prefetch=True)
    assert z3p["forward"] == z3["forward"] + 4 * 400
    # a large unit between two small ones: its reduce-scatter is launched (its full
    # gradients and the slice it receives, beside the last unit's slice) before it is freed
    big = peak_memory_estimate(psi, 2, "zero3", 0, unit_params=[100, 800, 100])
    assert big["backward"] == 12 * psi / 2 + 4 * 800 + 4 * 800 * 1.5 + 4 * 100 / 2
    with pytest.raises(ValueError, match="strategy"):
        peak_memory_estimate(psi, n, "zero4")


def test_calculator_shows_the_peak_beside_the_model_state():
    from ddpzero_lab.viz.calculator import compute

    est = compute(7.5e9, 64, 32, largest_layer_params=1.8e8, activation_bytes=1e9)
    for stage in range(4):
        assert est.peaks[stage]["at_rest"] == pytest.approx(est.stages[stage]["total"])
        assert est.peaks[stage]["peak"] > est.stages[stage]["total"]
    # P_os+g+p in backward: parameter and optimizer shards (14 bytes x 7.5e9 / 64), the
    # activations, a 180 M-parameter layer gathered (2 bytes each) and its gradients filling
    # (2 bytes each) while the layer before's reduce-scatter is in flight (its gradients and
    # the slice it receives)
    z3 = peak_memory_estimate(
        7.5e9, 64, "zero3", 1e9, unit_params=[1.8e8, 1.8e8], root_params=0,
        params_bytes=2, grads_bytes=2, optimizer_bytes_per_param=12,
    )  # fmt: skip
    assert est.peaks[3]["peak"] == pytest.approx(z3["peak"])
    want = 14 * 7.5e9 / 64 + 1e9 + 0.36e9 + 0.36e9 + 0.36e9 * (1 + 1 / 64)
    assert est.peaks[3]["peak"] == pytest.approx(want)


def _gpt_activations(n_layer, checkpointing):
    from ddpzero_lab.workloads.models import tiny_gpt

    torch.manual_seed(0)
    model, opt = dzl.parallelize(
        tiny_gpt(65, block_size=64, n_layer=n_layer),
        "local",
        optimizer=OPTIMIZERS["sgd"],
        activation_checkpointing=(lambda n, m: n.startswith("blocks.")) if checkpointing else None,
        track_memory=False,
    )
    tracker = MemoryTracker(emit=False).attach(model, opt)
    model(torch.randint(0, 65, (8, 64))).square().mean().backward()
    opt.step()
    return tracker.activation_peaks


def test_checkpointed_tiny_gpt_holds_block_inputs_plus_one_block():
    one, two = _gpt_activations(1, False)["forward"], _gpt_activations(2, False)["forward"]
    block = two - one  # what one transformer block saves, its input included
    outside = one - block  # embeddings (token ids, positions), final norm and output layer
    block_input = 4 * 8 * 64 * 64  # (batch, time, channels) fp32
    # the final LayerNorm saves its input, mean and rstd; the output layer saves its input
    head = 2 * block_input + 2 * 4 * 8 * 64
    ckpt = _gpt_activations(3, True)
    assert ckpt["forward"] == outside + 3 * block_input
    # the first recompute (the last block) happens once the head's backward has run
    assert ckpt["backward"] == outside + 3 * block_input - head + (block - block_input)
    assert ckpt["backward"] < (outside + 3 * block) / 2
