"""dzl.plan: each term of a layout's step time and memory against its formula, counted by hand
from the α-β link and the ZeRO paper's model-state bytes; the choice of link per dimension;
the ordering; the errors. And project()'s precision."""

from __future__ import annotations

import pytest

import ddpzero_lab as dzl
from ddpzero_lab.comm.link import ACCELERATORS, Link
from ddpzero_lab.memory import zero_memory_estimate
from ddpzero_lab.planning import activation_bytes_per_layer
from ddpzero_lab.projection import StepProfile, UnitProfile, project_one

PSI, L, H, S, HEADS = 1e9, 8, 1024, 512, 8
F = ACCELERATORS["h100"] * 0.5  # the default mfu
NVLINK, IB = Link.preset("nvlink4"), Link.preset("ib-100g")


def only(layouts, **want):
    """The one layout with these fields."""
    found = [x for x in layouts if all(getattr(x, k) == v for k, v in want.items())]
    assert len(found) == 1, (want, [x.name for x in found])
    return found[0]


def layouts(gpus, global_batch=64, **kw):
    return dzl.plan(
        PSI, layers=L, hidden=H, seq_len=S, global_batch=global_batch, gpus=gpus, heads=HEADS,
        **kw,
    )  # fmt: skip


def test_one_gpu_is_compute_and_the_paper_s_memory():
    (x,) = layouts(1, micro_batch=4, strategies=("ddp",))
    assert (x.dp, x.tp, x.pp, x.micro_batches) == (1, 1, 1, 16)
    assert x.compute_s == pytest.approx(6 * PSI * 64 * S / F)
    assert x.step_s == pytest.approx(x.compute_s)
    assert x.exposed == {"tp": 0.0, "pp": 0.0, "dp": 0.0} and x.dp_comm_s == 0.0
    state = zero_memory_estimate(PSI, 1, 0)  # 2 + 2 + 12 bytes per parameter
    activations = L * S * 4 * H * (10 + 24)  # one micro-batch in flight, no scores kept
    assert x.memory["activations"] == pytest.approx(activations)
    assert x.memory["total"] == pytest.approx(state["total"] + activations)
    assert x.tokens_per_s == pytest.approx(64 * S / x.step_s)
    assert x.mfu == pytest.approx(0.5)


def test_attention_scores_and_checkpointing_change_activations_as_korthikanti_counts():
    kept = activation_bytes_per_layer(S, 2, H, HEADS, tp=2, flash_attention=False)
    assert kept == pytest.approx(S * 2 * H * (10 + 12 + 5 * HEADS * S / (H * 2)))
    (x,) = layouts(1, micro_batch=4, strategies=("ddp",), activation_checkpointing=True)
    # each layer keeps its 16-bit input; one layer is rebuilt at a time; forward runs twice
    assert x.memory["activations"] == pytest.approx(L * 2 * S * 4 * H + S * 4 * H * 34)
    assert x.compute_s == pytest.approx(8 * PSI * 64 * S / F)


def test_data_parallel_time_and_what_backward_hides():
    rows = layouts(4, micro_batch=16)  # one micro-batch per rank and step
    grads = PSI * 2  # bf16 gradients of the whole model on each rank
    ddp = only(rows, tp=1, pp=1, strategy="ddp", micro_batch=16)
    assert ddp.dp_comm_s == pytest.approx(NVLINK.seconds("all_reduce", grads, 4))
    assert ddp.exposed["dp"] == pytest.approx(max(ddp.dp_comm_s - ddp.compute_s * 2 / 3, 0))
    zero1 = only(rows, tp=1, pp=1, strategy="zero1", micro_batch=16)
    rs, ag = NVLINK.seconds("reduce_scatter", grads, 4), NVLINK.seconds("all_gather", grads, 4)
    assert zero1.dp_comm_s == pytest.approx(rs + ag)
    assert zero1.exposed["dp"] == pytest.approx(rs + ag)  # after backward, after the step
    zero3 = only(rows, tp=1, pp=1, strategy="zero3", micro_batch=16)
    assert zero3.dp_comm_s == pytest.approx(2 * ag + rs)  # 1.5x DDP's bytes
    assert zero3.exposed["dp"] == pytest.approx(max(2 * ag + rs - zero3.compute_s, 0))
    assert zero3.memory["buffers"] == pytest.approx(2 * PSI / L * 2)  # two gathered layers


def test_sharded_gradients_are_reduced_once_per_micro_batch():
    rows = layouts(4, micro_batch=2)  # m = 64 / (4 * 2) = 8 micro-batches
    grads = PSI * 2
    rs, ag = NVLINK.seconds("reduce_scatter", grads, 4), NVLINK.seconds("all_gather", grads, 4)
    zero2 = only(rows, tp=1, pp=1, strategy="zero2", micro_batch=2)
    assert zero2.micro_batches == 8
    assert zero2.dp_comm_s == pytest.approx(8 * rs + ag)
    zero3 = only(rows, tp=1, pp=1, strategy="zero3", micro_batch=2)
    assert zero3.dp_comm_s == pytest.approx(8 * (2 * ag + rs))
    ddp = only(rows, tp=1, pp=1, strategy="ddp", micro_batch=2)  # no_sync: once per step
    assert ddp.dp_comm_s == pytest.approx(NVLINK.seconds("all_reduce", grads, 4))
    assert ddp.exposed["dp"] == pytest.approx(max(ddp.dp_comm_s - ddp.compute_s * 2 / 3 / 8, 0))


def test_pipeline_bubble_and_messages():
    rows = layouts(4, micro_batch=2)  # pp = 4: dp = 1, m = 32
    x = only(rows, tp=1, pp=4, strategy="ddp", micro_batch=2)
    assert x.micro_batches == 32
    assert x.bubble_s == pytest.approx(x.compute_s * 3 / 32)  # (p - 1) / m
    message = 2 * S * H * 2  # one micro-batch's bf16 activations
    assert x.pp_comm_s == pytest.approx(2 * 32 * NVLINK.seconds("send", message, 2))
    assert x.exposed["pp"] == pytest.approx(2 * 3 * NVLINK.seconds("send", message, 2))
    # a stage holds its layers' activations for min(p, m) micro-batches (1F1B)
    per_layer = activation_bytes_per_layer(S, 2, H, HEADS)
    assert x.memory["activations"] == pytest.approx(L // 4 * 4 * per_layer)
    state = zero_memory_estimate(PSI / 4, 1, 0)
    assert x.memory["params"] == pytest.approx(state["params"])


def test_tensor_parallel_all_reduces_and_the_link_they_run_on():
    message = 1 * S * H * 2
    inside = only(layouts(8, micro_batch=1), tp=8, pp=1, strategy="ddp")  # one node
    assert inside.tp_comm_s == pytest.approx(64 * L * 4 * NVLINK.seconds("all_reduce", message, 8))
    sixteen_heads = dzl.plan(
        PSI, layers=L, hidden=H, seq_len=S, global_batch=64, gpus=16, heads=16, micro_batch=1
    )
    across = only(sixteen_heads, tp=16, pp=1, strategy="ddp")  # two nodes of 8
    assert across.tp_comm_s == pytest.approx(64 * L * 4 * IB.seconds("all_reduce", message, 16))
    assert across.exposed["tp"] == across.tp_comm_s  # on the critical path
    # data parallelism across nodes: tp * dp spans 16 GPUs > 8 per node
    dp16 = only(layouts(16, micro_batch=4), tp=1, pp=1, strategy="ddp")
    assert dp16.dp_comm_s == pytest.approx(IB.seconds("all_reduce", PSI * 2, 16))


def test_order_fitting_fastest_first_and_fits_is_the_budget():
    rows = layouts(8, gpu_memory_gb=6)
    assert any(x.fits for x in rows) and any(not x.fits for x in rows)
    for x in rows:
        assert x.fits == (x.memory["total"] <= 6e9)
        assert x.step_s == pytest.approx(x.compute_s + x.bubble_s + x.exposed_comm_s)
    fitting = [x for x in rows if x.fits]
    assert rows[: len(fitting)] == fitting
    assert [x.step_s for x in fitting] == sorted(x.step_s for x in fitting)
    others = rows[len(fitting) :]
    assert [x.memory["total"] for x in others] == sorted(x.memory["total"] for x in others)
    assert "fits" in dzl.plan_table(rows, top=3).splitlines()[0]


def test_the_zero_paper_s_figure_for_7_5b_on_64_gpus():
    rows = dzl.plan(
        7.5e9, layers=32, hidden=4096, seq_len=1024, global_batch=64, gpus=64, micro_batch=1,
        strategies=("zero3",),
    )  # fmt: skip
    x = only(rows, tp=1, pp=1)
    state = x.memory["params"] + x.memory["grads"] + x.memory["optimizer"]
    assert state / 1e9 == pytest.approx(1.875)  # Table 1: 1.88 GB


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"gpu": "h900"}, "unknown gpu"),
        ({"precision": "int8"}, "precision"),
        ({"strategies": ("fsdp",)}, "strategies"),
        ({"intra_link": "nvlink4:h100"}, "unscaled"),
        ({"micro_batch": 0}, "micro_batch"),
        ({"gpus": 0}, "gpus"),
        ({"mfu": 1.5}, "mfu"),
    ],
)
def test_bad_input_is_refused(kw, message):
    args = dict(layers=L, hidden=H, seq_len=S, global_batch=64, gpus=4, heads=HEADS)
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        dzl.plan(PSI, **args)


def test_no_layout_is_an_error_that_says_why():
    with pytest.raises(ValueError, match="no layout"):
        dzl.plan(PSI, layers=7, hidden=H, seq_len=S, global_batch=3, gpus=2, heads=1,
                 micro_batch=2)  # fmt: skip


def test_projection_precision_halves_the_bytes_and_uses_the_mixed_formula():
    profile = StepProfile([UnitProfile("a", [1000, 24], 0.01, 0.02)], 0.001, element_size=4)
    link = Link(latency=0.0, bandwidth=1e6)
    fp32 = project_one(profile, "ddp", 4, link)
    bf16 = project_one(profile, "ddp", 4, link, precision="bf16-mixed")
    assert bf16.comm_s["all_reduce"] == pytest.approx(fp32.comm_s["all_reduce"] / 2)
    assert bf16.memory_bytes == zero_memory_estimate(1024, 4, 0, preset="mixed_adam")["total"]
    assert fp32.memory_bytes == zero_memory_estimate(1024, 4, 0, preset="fp32_adam")["total"]
    with pytest.raises(ValueError, match="precision"):
        project_one(profile, "ddp", 4, link, precision="fp8")
