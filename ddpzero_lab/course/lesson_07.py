"""Lesson 07's helpers (ZeRO-3: parameters sharded, gathered just in time).

This module owns what notebook 07 calls in one line and the learner need not study: the
tables of units and shards, the self-check of `gather_run_free`, the measurement of what
autograd saves for backward, the per-event trace of one step with its picture, and the
one-line memory check (the formulas themselves are taught in notebook 04). Functions whose
name ends in `_on_rank` run inside a rank (pass them to `cluster.run`); the others run in the
notebook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import ddpzero_lab as dzl

from .compare import assert_same

MB = 1e6  # decimal megabytes, as the paper counts


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _engine(model):
    return model.strategy.engine  # the ZeRO-3 engine parallelize(..., "zero3") built


def storage_bytes(tensors) -> int:
    """Bytes the storages under these tensors hold now, each storage once (a freed one: 0).

    Residency is counted in bytes of storage, not in elements: a view of a freed storage
    keeps its shape and holds nothing, and a view of a live one holds all of it."""
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(nbytes for ptr, nbytes in held.items() if ptr)


# -- units and shards ------------------------------------------------------------------------
def units_of(model) -> list[dict]:
    """Each unit of a ZeRO-3 model: its parameters, sizes and this rank's slice."""
    return [
        {
            "unit": unit.name,
            "params": [name for name, _ in flat.params],
            "numel": flat.layout.numel,
            "padded": flat.layout.padded_numel,
            "slice": (flat.lo, flat.hi),
        }
        for unit in _engine(model).units
        for flat in unit.flats
    ]


def show_units(per_rank: list[list[dict]]) -> None:
    """Print the units and each rank's slice of them."""
    print(f"{'unit':<6}{'parameters':<18}{'elements':>9}{'padded':>9}   slice of each rank")
    for k, u in enumerate(per_rank[0]):
        slices = "  ".join(f"r{r}:[{units[k]['slice'][0]:,}, {units[k]['slice'][1]:,})"
                           for r, units in enumerate(per_rank))  # fmt: skip
        names = ", ".join(n.split(".")[-1] for n in u["params"])
        print(f"{u['unit']:<6}{names:<18}{u['numel']:>9,}{u['padded']:>9,}   {slices}")


def held_by_unit(model) -> dict[str, int]:
    """{unit: bytes its full flat buffer holds now}: the unit's size when gathered, else 0."""
    return {
        unit.name: sum(f.full.untyped_storage().nbytes() for f in unit.flats)
        for unit in _engine(model).units
        if unit.flats
    }


def shard_of(model, unit_index: int = 1) -> dict:
    """What this rank keeps of one unit at rest, and what the module's parameters hold."""
    unit = [u for u in _engine(model).units if u.flats][unit_index]
    flat = unit.flats[0]
    return {
        "unit": unit.name,
        "slice": (flat.lo, flat.hi),
        "master shard": f"{tuple(flat.master.shape)} {flat.master.dtype}",
        "first values": [round(v, 6) for v in flat.master[:3].tolist()],
        "module parameters": f"{len(list(model.parameters()))} tensors, shapes "
        f"{sorted({tuple(p.shape) for p in model.parameters()})}",
        "bytes the parameters hold": storage_bytes(model.parameters()),
    }


def gradient_shard_of(model, unit_index: int = 1) -> dict:
    """After backward: this rank's reduced gradient slice of one unit, and the module's .grad."""
    unit = [u for u in _engine(model).units if u.flats][unit_index]
    flat = unit.flats[0]
    return {
        "unit": unit.name,
        "gradient shard": tuple(flat.grad_shard.shape),
        "its norm": round(flat.grad_shard.float().norm().item(), 5),
        "module .grad": {n: p.grad for n, p in model.named_parameters()},
        "full gradient buffers left": sum(f.grad_full is not None for f in _engine(model).flats()),
    }


# -- the exercise's self-check ---------------------------------------------------------------
def _saved_after(forward, x) -> int:
    """Bytes that autograd's saved tensors still hold once forward(x) has returned."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x)
    return storage_bytes(saved)


def _gather_run_free_on_rank(candidate, make_model, local_batch) -> dict:
    x, _ = local_batch(0)  # a different block of rows on every rank
    model, _ = dzl.parallelize(make_model(), "zero3", optimizer=_sgd, track_memory=False)
    units = {u.name: u.flats[0] for u in _engine(model).units if u.flats}
    # a pre-hook registered after the package's runs once the package has gathered the unit
    package_seen, mine_seen, hooks = [], [], []
    for name in units:
        hooks.append(
            model.get_submodule(name).register_forward_pre_hook(
                lambda m, a: package_seen.append(storage_bytes(model.parameters()))
            )
        )
    with torch.no_grad():
        package_out = model(x)
    bare = make_model(seed=1)  # another init: only the shards may count
    for p in bare.parameters():
        p.data = torch.empty(0, device=p.device)  # no memory, as at rest
    for name in units:
        hooks.append(
            bare.get_submodule(name).register_forward_pre_hook(
                lambda m, a: mine_seen.append(storage_bytes(bare.parameters()))
            )
        )

    def mine(h):
        for name, child in bare.named_children():
            if name in units:
                h = candidate(units[name].local.detach(), units[name].layout, child, h)
            else:
                h = child(h)  # a ReLU: no parameters
        return h

    dzl.reset_traffic()
    with torch.no_grad():
        h = mine(x)
    counted = dzl.traffic().get("all_gather", {"calls": 0, "sent": 0})
    for hook in hooks:
        hook.remove()  # the lists above are of the first pass only
    # with autograd on, the saved weight views must hold nothing either (a .data swap fails)
    package_saved, mine_saved = _saved_after(model, x), _saved_after(mine, x)
    n = dzl.world_size()
    return {
        "mine": h.cpu(),
        "package": package_out.cpu(),
        "mine_seen": mine_seen,
        "package_seen": package_seen,
        "mine_after": storage_bytes(bare.parameters()),
        "mine_saved": mine_saved,
        "package_saved": package_saved,
        "calls": counted["calls"],
        "sent": counted["sent"],
        "units": len(units),
        "expected_sent": sum((n - 1) * f.layout.padded_numel // n * 4 for f in units.values()),
    }


def check_gather_run_free(cluster, candidate, make_model, local_batch) -> str:
    """Run candidate unit by unit on every rank; raise AssertionError unless its output, the
    bytes held while each unit runs and after it, and its all-gathers match the package's."""
    results = cluster.run(_gather_run_free_on_rank, candidate, make_model, local_batch)
    report = ""
    for rank, r in enumerate(results):
        report = assert_same({"out": r["mine"]}, {"out": r["package"]}, f"rank {rank}'s output")
        if r["mine_seen"] != r["package_seen"]:
            raise AssertionError(
                f"rank {rank}: bytes the parameters held as each unit started: yours "
                f"{r['mine_seen']}, the package's {r['package_seen']} (one unit's buffer each)"
            )
        if r["mine_after"]:
            raise AssertionError(
                f"rank {rank}: after the pass the parameters still hold {r['mine_after']:,} "
                "bytes; free the buffer's storage (step 4)"
            )
        if r["mine_saved"] != r["package_saved"]:
            raise AssertionError(
                f"rank {rank}: after forward, autograd's saved tensors hold "
                f"{r['mine_saved']:,} bytes, the package's {r['package_saved']:,}: free the "
                "gathered buffer's storage (step 4), so its saved views hold nothing"
            )
        if r["calls"] != r["units"] or r["sent"] != r["expected_sent"]:
            raise AssertionError(
                f"rank {rank}: {r['calls']} all-gathers sending {r['sent']:,} bytes; want one "
                f"per unit ({r['units']}) sending {r['expected_sent']:,} with dzl.comm.all_gather"
            )
    return f"{report}; each unit held only while it ran, 0 bytes after"


# -- what autograd keeps ---------------------------------------------------------------------
def _free_by_swapping(shard, layout, module, x):
    """gather-run-free, but freeing by giving each parameter an empty tensor (.data swap)."""
    full = torch.empty(layout.padded_numel, dtype=shard.dtype, device=shard.device)
    dzl.comm.all_gather(full, shard, tag="swapping_gather")
    params = list(module.parameters())
    for p, view in zip(params, layout.views(full), strict=True):
        p.data = view
    out = module(x)
    for p in params:
        p.data = torch.empty(0, dtype=shard.dtype, device=shard.device)
    return out


WAYS = ("replicated (as DDP)", "ZeRO-3 freeing by .data swap", "ZeRO-3, the package")


def _saved_on_rank(way: str, make_model, local_batch) -> dict:
    x, _ = local_batch(0)
    x.requires_grad_(True)  # as every unit's input but the first: every layer saves its weight
    package, _ = dzl.parallelize(make_model(), "zero3", optimizer=_sgd, track_memory=False)
    if way == WAYS[0]:
        model = forward = make_model()
    elif way == WAYS[2]:
        model = forward = package
    else:
        units = {u.name: u.flats[0] for u in _engine(package).units if u.flats}
        model = make_model(seed=1)
        for p in model.parameters():
            p.data = torch.empty(0, device=p.device)

        def forward(h):
            for name, child in model.named_children():
                if name in units:
                    h = _free_by_swapping(units[name].local.detach(), units[name].layout, child, h)
                else:
                    h = child(h)
            return h

    saved = []  # (tensor, whether it shared a parameter's storage when autograd saved it)

    def pack(t):
        live = {p.untyped_storage().data_ptr() for p in model.parameters() if p.numel()}
        saved.append((t, t.untyped_storage().data_ptr() in live))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(x)
    result = {
        "weight views saved": sum(view for _, view in saved),
        "bytes they hold": storage_bytes(t for t, view in saved if view),
        "activations": storage_bytes(t for t, view in saved if not view),
        "parameter elements": sum(p.numel() for p in model.parameters()),
        "grad_x": None,
    }
    if way != WAYS[1]:  # with .data swapped, dL/dW would not fit the empty parameters
        out.sum().backward()  # the package gathers each unit again, into the shared storage
        result["grad_x"] = x.grad.cpu()
    return result


def show_saved(cluster, make_model, local_batch) -> dict:
    """Measure what autograd's saved tensors hold after forward, three ways; print rank 0's
    table and check it on every rank (raises AssertionError)."""
    kept = {way: cluster.run(_saved_on_rank, way, make_model, local_batch) for way in WAYS}
    columns = ("weight views saved", "bytes they hold", "activations", "parameter elements")
    print("after forward, rank 0 (bytes of storage, each storage once)")
    print(f"{'':<31}" + "".join(f"{c:>20}" for c in columns))
    for way, per_rank in kept.items():
        print(f"{way:<31}" + "".join(f"{per_rank[0][c]:>20,}" for c in columns))
    for rank in range(len(kept[WAYS[0]])):
        plain, swap, package = (kept[w][rank] for w in WAYS)
        assert package["bytes they hold"] == 0, "the package's saved views should hold 0 bytes"
        assert swap["bytes they hold"] > 0 and swap["parameter elements"] == 0
        assert package["activations"] == plain["activations"] == swap["activations"]
        assert_same({"dL/dx": package["grad_x"]}, {"dL/dx": plain["grad_x"]}, "dL/dx")
    return kept


# -- one step, event by event ----------------------------------------------------------------
def trace_step_on_rank(make_model, local_batch, optimizer, steps=2, prefetch=False) -> dict:
    """Train `steps` steps of ZeRO-3; return the bytes held at every event of the last one."""
    model, opt = dzl.parallelize(
        make_model(), "zero3", optimizer=optimizer, prefetch=prefetch, track_memory=False
    )
    samples = []  # (phase, unit, event, params, grads + scratch)

    def sample(phase, unit="", event=""):
        held = dzl.model_state_bytes(model, opt)
        samples.append((phase, unit, event, held["params"], held["grads"] + held["scratch"]))

    units = [u for u in _engine(model).units if u.flats]
    # registered after the package's hooks: each sample sees what the package has just done
    for u in units:
        u.module.register_forward_pre_hook(lambda m, a, n=u.name: sample("forward", n, "starts"))
        u.module.register_forward_hook(lambda m, a, o, n=u.name: sample("forward", n, "ends"))
        for _, p in u.flats[0].params:
            p.register_post_accumulate_grad_hook(lambda p, n=u.name: sample("backward", n, "grad"))
    for step in range(steps):
        x, y = local_batch(step)
        dist.barrier()
        samples.clear()
        sample("start")
        nn.functional.mse_loss(model(x), y).backward()
        sample("backward", event="returned")
        opt.step()
        sample("step", event="done")
        opt.zero_grad()
    padded = {u.name: u.flats[0].layout.padded_numel for u in units}
    return {"samples": list(samples), "padded": padded, "world_size": dzl.world_size()}


def _label(s) -> str:
    phase, unit, event = s[:3]
    names = {"starts": f"{unit} forward", "ends": f"{unit} freed", "grad": f"{unit} gradient"}
    return names.get(event, "backward returned" if event == "returned" else phase)


def draw_trace(traces: list[dict], title: str = "", second: list[dict] | None = None):
    """One panel per rank: parameter and gradient bytes at every event of one step.
    `second`: another run's traces drawn dashed on top (notebook 08: with prefetch)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 1.2 + 1.8 * len(traces)), layout="constrained")
    axes = fig.subplots(len(traces), 1, sharex=True, squeeze=False)[:, 0]
    rest = 4 * sum(traces[0]["padded"].values()) / traces[0]["world_size"]
    for rank, (ax, t) in enumerate(zip(axes, traces, strict=True)):
        xs = range(len(t["samples"]))
        ax.step(xs, [s[3] / MB for s in t["samples"]], where="post", label="params")
        if second is None:
            grads = [s[4] / MB for s in t["samples"]]
            ax.step(xs, grads, where="post", color="tab:orange", label="gradient buffers")
        else:
            other = [s[3] / MB for s in second[rank]["samples"]]
            ax.step(range(len(other)), other, where="post", linestyle="--", label="with prefetch")
        ax.axhline(rest / MB, color="tab:blue", linestyle=":", label="the slices (at rest)")
        for phase, shade in (("forward", "0.93"), ("backward", "0.85")):
            at = [i for i, s in enumerate(t["samples"]) if s[0] == phase]
            ax.axvspan(min(at), max(at) + 1, color=shade, zorder=0)
        ax.set(ylim=(0, None), ylabel=f"rank {rank} [MB]")
    axes[0].set_title(title, fontsize=10)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    labels = [_label(s) for s in traces[0]["samples"]]
    axes[-1].set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    return fig


def check_trace(traces: list[dict]) -> str:
    """Raise AssertionError unless, at every event on every rank, the parameters hold the
    slices plus at most one unit's full buffer, and only the slices once forward, backward
    and the step are over."""
    for rank, t in enumerate(traces):
        rest = 4 * sum(t["padded"].values()) // t["world_size"]
        allowed = {0} | {4 * p for p in t["padded"].values()}
        for s in t["samples"]:
            extra = s[3] - rest
            assert extra in allowed, f"rank {rank} at '{_label(s)}': {extra:,} bytes beyond"
            if s[2] == "starts":
                want = 4 * t["padded"][s[1]]
                assert extra == want, f"rank {rank}: unit {s[1]} not gathered as it started"
            if s[2] in ("ends", "returned", "done"):
                assert extra == 0, f"rank {rank} at '{_label(s)}': a unit left gathered"
    peak = max(s[3] for s in traces[0]["samples"])
    return f"rank 0: slices {rest:,} bytes at rest, at most {peak:,} while a unit runs"


# -- memory and traffic ----------------------------------------------------------------------
def measure_on_rank(strategy, make_model, local_batch, optimizer, precision="fp32", steps=3):
    """Train a few steps; bytes held after the last backward and after its step, and the
    traffic of the steps after the first (the counters are reset then: no set-up)."""
    model, opt = dzl.parallelize(
        make_model(), strategy, optimizer=optimizer, precision=precision, track_memory=False
    )
    for step in range(steps):
        if step == 1:
            dzl.reset_traffic()
        x, y = local_batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        after_backward = dzl.model_state_bytes(model, opt)
        opt.step()
        after_step = dzl.model_state_bytes(model, opt)
        opt.zero_grad()
    engine = model.strategy.engine
    flats = engine.flats() if engine else getattr(opt, "buckets", [])
    return {
        "held": {
            "params": after_backward["params"],
            "grads": after_backward["grads"],
            "optimizer": after_step["optimizer"],
        },
        "per_step": {op: c["sent"] / (steps - 1) for op, c in dzl.traffic().items()},
        "flats": len(flats),
        "padded": sum(f.layout.padded_numel for f in flats),
    }


def memory_check(per_rank: list[dict], num_params: int, stage: int, preset: str) -> str:
    """Notebook 04's formula against what each rank holds: raise AssertionError unless every
    rank's total is the formula plus padding and the optimizer's per-tensor step counters."""
    n = len(per_rank)
    formula = dzl.zero_memory_estimate(num_params, n, stage, preset=preset)["total"]
    for rank, r in enumerate(per_rank):
        total = sum(r["held"].values())
        padding = 16 * max(r["padded"] - num_params, 0)
        slack = padding + 4 * max(r["flats"], 1) * 16  # step counters: a few bytes per tensor
        assert 0 <= total - formula <= slack, (
            f"rank {rank} holds {total:,} bytes; the stage-{stage} formula says {formula:,.0f}"
        )
    total = sum(per_rank[0]["held"].values())
    return (
        f"stage {stage} ({preset}), N = {n}: every rank holds {total:,} bytes; formula "
        f"{formula:,.0f} (+{total - formula:,.0f}: padding, step counters)"
    )
