"""fp16 with dynamic loss scaling (dzl.GradScaler) and mixed precision as a policy
(dzl.MixedPrecisionPolicy), N = 2:

* every strategy trained in fp16 with loss scaling equals one process using the same casts and
  torch's own `torch.amp.GradScaler` (fp16 round-off), skipped steps and scales included;
* a step with an inf gradient on one rank only, in one element (which after a reduce-scatter
  may land in another rank's shard), is skipped on every rank and the scale falls on every
  rank;
* a per-module policy keeps a LayerNorm in fp32 while the Linear layers compute in fp16.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from equivalence import OPTIMIZERS, assert_same_parameters, global_batch, make_model
from torch import nn
from torch.overrides import TorchFunctionMode

import ddpzero_lab as dzl

# 5 steps: the scale falls at the first, grows at the third and fifth; a sixth step at 2**17
# overflows in a rank's half-batch gradient but not in the whole batch's (fp16's range, so
# torch's DDP would skip it too): no longer the same steps skipped
STEPS, LOCAL_BATCH, WORLD = 5, 4, 2
STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
# init_scale 2**16 overflows at first (the reference skips too), growth_interval=2 grows it back
SCALER = {"init_scale": 2.0**16, "growth_interval": 2}
MAX_NORM = 1.0  # clipping after unscale_ sees the unscaled gradients
TOLERANCE = 1e-2  # fp16 round-off: halves of the batch summed by a collective, not one matmul


def _options(strategy: str) -> dict:
    return {"find_unused_parameters": True} if strategy == "ddp" else {}  # Net.unused


def torch_reference(steps: int = STEPS):
    """One process, the global batch, the "fp16-mixed" casts written out by hand (fp16
    parameters, inputs cast to fp16 and the output back to fp32, fp32 master weights) and
    torch's own GradScaler on the masters."""
    model = make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [nn.Parameter(p.detach().clone()) for p in params]
    model.half()
    opt = OPTIMIZERS["sgd"](masters)
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    scales, norms = [], []
    for step in range(steps):
        x, y = global_batch(step, WORLD, LOCAL_BATCH)
        loss = F.mse_loss(model(x.half()).float(), y)
        scaler.scale(loss).backward()
        for p, m in zip(params, masters, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
        scaler.unscale_(opt)
        norms.append(float(torch.nn.utils.clip_grad_norm_(masters, MAX_NORM)))
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            for p, m in zip(params, masters, strict=True):
                p.copy_(m)
        opt.zero_grad()
        model.zero_grad(set_to_none=True)
        scales.append(scaler.get_scale())
    # frozen parameters: their fp32 values from before the cast, as dzl.full_state_dict gives
    state = make_model().state_dict()
    names = [n for n, p in make_model().named_parameters() if p.requires_grad]
    state.update({n: m.detach().clone() for n, m in zip(names, masters, strict=True)})
    return state, scales, norms


def train_fp16(strategy: str, steps: int = STEPS, **options):
    """The torch-like loop with dzl.GradScaler; inside a rank, or in one process ("local")."""
    distributed = strategy != "local"
    rank = dzl.rank() if distributed else 0
    model = make_model(seed=rank)
    model, opt = dzl.parallelize(
        model,
        strategy,
        optimizer=OPTIMIZERS["sgd"],
        precision="fp16-mixed",
        track_memory=False,
        **options,
    )
    scaler = dzl.GradScaler(**SCALER)
    scales, norms = [], []
    for step in range(steps):
        x, y = global_batch(step, WORLD, LOCAL_BATCH)
        if distributed:
            mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            x, y = x[mine], y[mine]
        loss = F.mse_loss(model(x), y)
        assert loss.dtype == torch.float32  # the output is cast back at the model's edge
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norms.append(opt.clip_grad_norm_(MAX_NORM))  # the global norm of unscaled gradients
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    return dzl.full_state_dict(model), scales, norms


def _assert_same_norms(got: list[float], want: list[float]) -> None:
    for g, w in zip(got, want, strict=True):
        if math.isfinite(w):  # a skipped step's norm is inf (or nan) in both
            assert g == pytest.approx(w, rel=TOLERANCE)
        else:
            assert not math.isfinite(g)


def test_grad_scaler_in_one_process_is_torchs():
    want, want_scales, want_norms = torch_reference()
    got, scales, norms = train_fp16("local")
    assert scales == want_scales
    _assert_same_norms(norms, want_norms)
    # the run really skipped (the scale fell) and grew back
    assert min(scales) < SCALER["init_scale"] and scales[-1] > min(scales)
    assert_same_parameters(got, want, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp16_with_loss_scaling_equals_one_process_with_torchs_grad_scaler(cluster, strategy):
    want, want_scales, want_norms = torch_reference()
    results = cluster.run(train_fp16, strategy, **_options(strategy))
    for got, scales, norms in results:
        assert scales == want_scales  # the same steps skipped, the same growth
        _assert_same_norms(norms, want_norms)
        assert_same_parameters(got, want, atol=TOLERANCE)
    # fp16 round-off, not more: every strategy lands on the same values
    assert_same_parameters(results[0][0], results[1][0], atol=0)


# -- an overflow on one rank only --------------------------------------------------------------


def _inject_inf(param: nn.Parameter, index: int, when: dict):
    """A gradient hook putting +inf into one element of `param`'s gradient while
    when["on"] is set."""

    def hook(grad):
        if not when["on"]:
            return grad
        grad = grad.clone()
        grad.view(-1)[index] = float("inf")
        return grad

    return param.register_hook(hook)


def train_with_overflow_on_rank_1(strategy: str, where: str, **options):
    rank = dzl.rank()
    model = make_model(seed=rank)
    when = {"on": False}
    if rank == 1:  # one element of one gradient, on rank 1 only
        param, index = (model.embed.weight, 0) if where == "first" else (model.head.bias, -1)
        _inject_inf(param, index, when)
    model, opt = dzl.parallelize(
        model,
        strategy,
        optimizer=OPTIMIZERS["sgd"],
        precision="fp16-mixed",
        track_memory=False,
        **options,
    )
    scaler = dzl.GradScaler(init_scale=2.0**8, growth_interval=2)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    record = {}
    for step in range(3):
        x, y = global_batch(step, WORLD, LOCAL_BATCH)
        when["on"] = step == 1
        before = dzl.full_state_dict(model)
        scale = scaler.get_scale()
        scaler.scale(F.mse_loss(model(x[mine]), y[mine])).backward()
        # whether this rank's own gradients (its shards, for ZeRO) hold the inf
        record[f"local_inf{step}"] = any(
            not bool(torch.isfinite(g).all()) for g in opt.scaler_grads()
        )
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        after = dzl.full_state_dict(model)
        record[f"changed{step}"] = any(not torch.equal(before[k], after[k]) for k in before)
        record[f"scales{step}"] = (scale, scaler.get_scale())
    record["final"] = dzl.full_state_dict(model)
    return record


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_inf_gradient_on_one_rank_skips_the_step_on_every_rank(cluster, strategy):
    clean_on_some_rank = False
    for where in ("first", "last"):
        results = cluster.run(train_with_overflow_on_rank_1, strategy, where, **_options(strategy))
        for rank, r in enumerate(results):
            assert r["changed0"] and r["changed2"], (where, rank)  # clean steps train
            assert not r["changed1"], (where, rank)  # the overflow step is skipped everywhere
            assert r["scales0"] == (2.0**8, 2.0**8), (where, rank)
            assert r["scales1"] == (2.0**8, 2.0**7), (where, rank)  # backoff 0.5 on every rank
            assert r["scales2"] == (2.0**7, 2.0**7), (where, rank)  # growth starts again
            clean_on_some_rank |= not r["local_inf1"]
        assert_same_parameters(results[0]["final"], results[1]["final"], atol=0)
    if strategy != "ddp":
        # the inf landed in one rank's shard only: that rank's own gradients were clean, and
        # it skipped all the same (the found_inf all-reduce)
        assert clean_on_some_rank
    else:  # DDP's all-reduce hands the inf to every rank
        assert not clean_on_some_rank


# -- a per-module policy -----------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.down = nn.Linear(8, 3)

    def forward(self, x):
        return self.down(torch.relu(self.norm(self.up(x))))


class SeenDtypes(TorchFunctionMode):
    """Records (op, input dtype, weight dtype) of every linear and layer_norm call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, torch.dtype, torch.dtype]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            self.seen.add(("linear", args[0].dtype, args[1].dtype))
        elif func is F.layer_norm:
            weight = args[2] if len(args) > 2 else kwargs["weight"]
            self.seen.add(("layer_norm", args[0].dtype, weight.dtype))
        return func(*args, **kwargs)


def train_with_policy(strategy: str, steps: int = 3):
    distributed = strategy != "local"
    rank = dzl.rank() if distributed else 0
    torch.manual_seed(rank)
    model = Block()
    policy = dzl.MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    model, opt = dzl.parallelize(
        model,
        strategy,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        precision=policy,
        track_memory=False,
    )
    scaler = dzl.GradScaler(init_scale=2.0**8)
    mode = SeenDtypes()
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = (
            torch.randn(2 * LOCAL_BATCH, 6, generator=g),
            torch.randn(2 * LOCAL_BATCH, 3, generator=g),
        )
        if distributed:
            mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            x, y = x[mine], y[mine]
        with mode:
            out = model(x)
        assert out.dtype == torch.float32
        scaler.scale(F.mse_loss(out, y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return mode.seen, dzl.full_state_dict(model)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_per_module_policy_keeps_layer_norm_in_fp32(cluster, strategy):
    _, want = train_with_policy("local")
    for seen, got in cluster.run(train_with_policy, strategy):
        assert seen == {
            ("linear", torch.float16, torch.float16),  # Linear computes in fp16
            ("layer_norm", torch.float32, torch.float32),  # the norm stays fp32
        }
        assert all(v.dtype == torch.float32 for v in got.values())  # the fp32 masters
        assert_same_parameters(got, want, atol=TOLERANCE)


def test_policy_arguments_are_checked():
    with pytest.raises(ValueError, match="param_dtype"):
        dzl.MixedPrecisionPolicy(param_dtype=torch.float32)
    with pytest.raises(ValueError, match="reduce_dtype"):
        dzl.MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="modules"):
        dzl.MixedPrecisionPolicy(modules=("Linear",))
    with pytest.raises(ValueError, match="precision"):
        dzl.parallelize(nn.Linear(2, 2), "local", optimizer=torch.optim.SGD, precision="fp8")
    policy = dzl.MixedPrecisionPolicy(torch.float16, modules=lambda m: isinstance(m, nn.Linear))
    assert policy.covers(nn.Linear(2, 2)) and not policy.covers(nn.LayerNorm(2))


def _gradient_bytes_on_the_wire(strategy: str, reduce_dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))
    policy = dzl.MixedPrecisionPolicy(torch.float16, reduce_dtype=reduce_dtype, modules=None)
    model, opt = dzl.parallelize(
        model,
        strategy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        precision=policy,
        track_memory=False,
    )
    dzl.reset_traffic()
    F.mse_loss(model(torch.randn(4, 32)), torch.zeros(4, 32)).backward()
    opt.step()  # ZeRO-1 reduces here
    return dzl.traffic()["all_reduce" if strategy == "ddp" else "reduce_scatter"]["bytes"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reduce_dtype_is_the_dtype_on_the_wire(cluster, strategy):
    fp16 = cluster.run(_gradient_bytes_on_the_wire, strategy, None)
    fp32 = cluster.run(_gradient_bytes_on_the_wire, strategy, torch.float32)
    for low, full in zip(fp16, fp32, strict=True):
        assert full == 2 * low > 0


def _fp16_steps(model, opt, scaler, steps, scales):
    rank = dzl.rank()
    for step in steps:
        x, y = global_batch(step, WORLD, LOCAL_BATCH)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        scaler.scale(F.mse_loss(model(x[mine]), y[mine])).backward()
        scaler.unscale_(opt)
        opt.clip_grad_norm_(MAX_NORM)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())


def resume_fp16(strategy: str, path: str, **options):
    """Two steps, a checkpoint with the scaler, then a new model, optimizer and scaler loaded
    from it for the remaining steps: (full state, scales, what loading without scaler state
    says)."""

    def build():
        model, opt = dzl.parallelize(
            make_model(seed=dzl.rank()),
            strategy,
            optimizer=OPTIMIZERS["sgd"],
            precision="fp16-mixed",
            track_memory=False,
            **options,
        )
        return model, opt, dzl.GradScaler(**SCALER)

    scales = []
    model, opt, scaler = build()
    _fp16_steps(model, opt, scaler, range(2), scales)
    dzl.save_checkpoint(f"{path}/with", model, opt, step=2, scaler=scaler)
    dzl.save_checkpoint(f"{path}/without", model, opt, step=2)
    model, opt, fresh = build()
    try:
        dzl.load_checkpoint(f"{path}/without", model, opt, scaler=fresh)
        refused = None
    except dzl.CheckpointError as exc:
        refused = str(exc)
    dzl.load_checkpoint(f"{path}/with", model, opt, scaler=fresh)
    _fp16_steps(model, opt, fresh, range(2, STEPS), scales)
    return dzl.full_state_dict(model), scales, refused


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_a_checkpoint_keeps_the_loss_scale_and_its_growth_schedule(cluster, strategy, tmp_path):
    # uninterrupted, the scale grows at the third step: only if the growth tracker survives
    want, want_scales, _ = cluster.run(train_fp16, strategy, **_options(strategy))[0]
    for got, scales, refused in cluster.run(
        resume_fp16, strategy, str(tmp_path), **_options(strategy)
    ):
        assert scales == want_scales
        assert refused is not None and "no loss-scaler state" in refused
        assert_same_parameters(got, want, atol=1e-6)  # fp32 masters and state, saved whole
