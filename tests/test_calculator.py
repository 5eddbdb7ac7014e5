"""The ZeRO memory calculator: its numbers are zero_memory_estimate's, its fit answer flips at
the budget, its widget follows its inputs, bad input gives a message, and its bars are right."""

from __future__ import annotations

import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from ddpzero_lab.memory import PAPER_TABLE_1, zero_memory_estimate
from ddpzero_lab.viz import MemoryCalculator
from ddpzero_lab.viz.calculator import compute, figure, format_count, parse_num_params


@pytest.mark.parametrize("world_size", [1, 4, 64, 1024])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"preset": "mixed_adam"},
        {"preset": "fp32_adam"},
        {"preset": "custom", "params_bytes": 2, "grads_bytes": 4, "optimizer_bytes_per_param": 6},
        {"preset": "fp32_adam", "optimizer_bytes_per_param": 4},
    ],
)
def test_compute_is_zero_memory_estimate_for_every_stage(world_size, kwargs):
    psi = 7.5e9
    est = compute(psi, world_size, 32, **kwargs)
    preset = "mixed_adam" if kwargs["preset"] == "custom" else kwargs["preset"]
    overrides = {k: v for k, v in kwargs.items() if k != "preset"}
    assert sorted(est.stages) == [0, 1, 2, 3]
    for stage in range(4):
        assert est.stages[stage] == zero_memory_estimate(
            psi, world_size, stage, preset=preset, **overrides
        )
    one = zero_memory_estimate(1, 1, 0, preset=preset, **overrides)
    assert est.bytes_per_param == {c: one[c] for c in ("params", "grads", "optimizer")}


def test_paper_table_1_row_and_fit_answers():
    est = compute(7.5e9, 64, 32)
    printed = PAPER_TABLE_1[7.5e9][64]
    for stage, value in zip((1, 2, 3), printed, strict=True):
        assert est.stages[stage]["total"] / 1e9 == pytest.approx(value, abs=0.05)
    assert est.fits == {0: False, 1: True, 2: True, 3: True}
    lines = est.answer().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("DP") and "120 GB" in lines[0]
    assert lines[0].endswith("does not fit in 32 GB")
    assert lines[3].startswith("P_os+g+p") and "1.88 GB" in lines[3]
    assert lines[3].endswith(": fits in 32 GB")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fit_answer_flips_at_the_stage_total(stage):
    psi, n = 7.5e9, 16
    total_gb = zero_memory_estimate(psi, n, stage)["total"] / 1e9
    assert compute(psi, n, total_gb).fits[stage] is True  # exactly full still fits
    assert compute(psi, n, total_gb * (1 - 1e-9)).fits[stage] is False
    assert compute(psi, n, total_gb * (1 + 1e-9)).fits[stage] is True


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((-1, 4, 32), {}, "num_params"),
        ((float("nan"), 4, 32), {}, "num_params"),
        ((7.5e9, 0, 32), {}, "world_size"),
        ((7.5e9, 2.5, 32), {}, "world_size"),
        ((7.5e9, 4, 0), {}, "budget_gb"),
        ((7.5e9, 4, -3), {}, "budget_gb"),
        ((7.5e9, 4, 32), {"preset": "sgd"}, "preset"),
        ((7.5e9, 4, 32), {"preset": "custom", "params_bytes": 2}, "custom"),
        (
            (7.5e9, 4, 32),
            {
                "preset": "custom",
                "params_bytes": -2,
                "grads_bytes": 2,
                "optimizer_bytes_per_param": 12,
            },
            "params_bytes",
        ),
    ],
)
def test_compute_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute(*args, **kwargs)


def _bars(fig: Figure):
    (ax,) = fig.axes
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    return ax, containers


@pytest.mark.parametrize("preset", ["mixed_adam", "fp32_adam"])
def test_figure_has_four_stacked_bars_with_the_right_heights(preset):
    psi, n, budget = 7.5e9, 4, 40
    est = compute(psi, n, budget, preset=preset)
    fig = figure(est)
    assert isinstance(fig, Figure)
    ax, containers = _bars(fig)
    assert [c.get_label() for c in containers] == ["params", "grads", "optimizer"]
    assert all(len(c.patches) == 4 for c in containers)
    for stage in range(4):
        want = zero_memory_estimate(psi, n, stage, preset=preset)
        bottom = 0.0
        for container, category in zip(containers, ("params", "grads", "optimizer"), strict=True):
            patch = container.patches[stage]
            assert patch.get_height() == pytest.approx(want[category] / 1e9)
            assert patch.get_y() == pytest.approx(bottom)  # stacked on the one below
            assert patch.get_x() + patch.get_width() / 2 == pytest.approx(stage)
            bottom += patch.get_height()
        assert bottom == pytest.approx(want["total"] / 1e9)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["DP", "P_os", "P_os+g", "P_os+g+p"]
    budget_lines = [line for line in ax.get_lines() if list(line.get_ydata()) == [budget, budget]]
    assert len(budget_lines) == 1
    # the same figure from compute's arguments
    _, again = _bars(figure(psi, n, budget, preset=preset))
    assert [p.get_height() for c in again for p in c.patches] == [
        p.get_height() for c in containers for p in c.patches
    ]


def test_figure_switches_to_mb_for_small_models():
    est = compute(1_191_946, 2, 0.016, preset="fp32_adam")
    ax, containers = _bars(figure(est))
    assert "MB" in ax.get_ylabel()
    assert containers[0].patches[0].get_height() == pytest.approx(4 * 1_191_946 / 1e6)
    assert est.fits == {0: False, 1: True, 2: True, 3: True}
    assert any(line.get_label() == "budget 16 MB" for line in ax.get_lines())


def test_parse_num_params_and_format_count():
    assert parse_num_params("7.5e9") == 7.5e9
    assert parse_num_params(" 7.5B ") == 7.5e9
    assert parse_num_params("1T") == 1e12
    assert parse_num_params("1,000,000") == 1e6
    assert parse_num_params("-5") == -5  # read, then rejected by compute
    with pytest.raises(ValueError, match="num_params"):
        parse_num_params("lots")
    for value in (7.5e9, 85002, 1e13, 1 / 3):
        assert parse_num_params(format_count(value)) == value
    assert format_count(7.5e9) == "7.5e9"


def _answer_says(calc: MemoryCalculator, stage_name: str) -> str:
    for row in calc.answer.value.split("<tr>"):
        if row.startswith(f"<td>{stage_name}</td>"):
            return "yes" if ">yes<" in row else "no"
    raise AssertionError(f"no row for {stage_name} in {calc.answer.value!r}")


def test_widget_updates_answer_and_redraws_when_a_value_changes():
    calc = MemoryCalculator(num_params=7.5e9, world_size=64, budget_gb=32)
    assert calc.error is None and calc.draws == 1
    first_png = bytes(calc.chart.value)
    assert first_png.startswith(b"\x89PNG")
    assert "Does it fit in 32 GB" in calc.answer.value
    assert _answer_says(calc, "DP") == "no" and _answer_says(calc, "P_os") == "yes"

    calc.world_size_box.value = 4  # P_os: 52.5 GB now
    assert calc.draws == 2 and calc.estimate.world_size == 4
    assert calc.estimate.stages[1] == zero_memory_estimate(7.5e9, 4, 1)
    assert _answer_says(calc, "P_os") == "no" and _answer_says(calc, "P_os+g+p") == "yes"
    assert bytes(calc.chart.value) != first_png

    calc.budget_box.value = 60.0
    assert calc.draws == 3 and _answer_says(calc, "P_os") == "yes"
    assert "Does it fit in 60 GB" in calc.answer.value

    calc.num_params_box.value = "128B"
    assert calc.estimate.num_params == 128e9
    assert calc.num_params_slider.value == pytest.approx(128e9)  # the slider follows
    calc.num_params_slider.value = 1e12
    assert calc.num_params_box.value == "1e12" and calc.estimate.num_params == 1e12


def test_widget_presets_and_custom_bytes():
    calc = MemoryCalculator(num_params=1e9, world_size=8, budget_gb=16)
    boxes = (calc.params_bytes_box, calc.grads_bytes_box, calc.optimizer_bytes_box)
    assert [b.value for b in boxes] == [2, 2, 12] and all(b.disabled for b in boxes)
    draws = calc.draws
    calc.preset_menu.value = "fp32_adam"
    assert calc.draws == draws + 1  # one redraw, not one per box the preset filled in
    assert [b.value for b in boxes] == [4, 4, 8]
    assert calc.estimate.stages[0] == zero_memory_estimate(1e9, 8, 0, preset="fp32_adam")
    calc.preset_menu.value = "custom"
    assert not any(b.disabled for b in boxes)
    calc.optimizer_bytes_box.value = 4.0
    assert calc.estimate.bytes_per_param == {"params": 4, "grads": 4, "optimizer": 4}
    assert calc.estimate.stages[1] == zero_memory_estimate(
        1e9, 8, 1, params_bytes=4, grads_bytes=4, optimizer_bytes_per_param=4
    )
    explicit = MemoryCalculator(num_params=1e9, world_size=8, optimizer_bytes_per_param=4)
    assert explicit.preset_menu.value == "custom"
    assert explicit.estimate.bytes_per_param == {"params": 2, "grads": 2, "optimizer": 4}


@pytest.mark.parametrize(
    "control,value,match",
    [
        ("num_params_box", "-5", "num_params"),
        ("num_params_box", "a lot", "num_params"),
        ("world_size_box", 0, "world_size"),
        ("world_size_box", -3, "world_size"),
        ("budget_box", 0.0, "budget_gb"),
        ("params_bytes_box", -1.0, None),  # disabled under a preset: ignored, no error
    ],
)
def test_widget_shows_a_message_on_bad_input(control, value, match):
    calc = MemoryCalculator()
    draws = calc.draws
    getattr(calc, control).value = value  # must not raise
    if match is None:
        assert calc.error is None and calc.draws == draws + 1
        return
    assert calc.estimate is None and match in calc.error
    assert "Cannot compute" in calc.answer.value and match in calc.answer.value
    assert bytes(calc.chart.value) == b""  # no stale chart beside the message
    assert calc.draws == draws
    # and it recovers when the input is fixed
    getattr(calc, control).value = {"num_params_box": "7.5e9"}.get(control, 16)
    assert calc.error is None and calc.draws == draws + 1


def test_custom_negative_bytes_show_a_message():
    calc = MemoryCalculator(preset="custom")
    calc.grads_bytes_box.value = -2.0
    assert calc.estimate is None and "grads_bytes" in calc.error


def test_widget_displays():
    calc = MemoryCalculator()
    bundle = calc._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == calc.widget.model_id
    with pytest.raises(ValueError, match="preset"):
        MemoryCalculator(preset="sgd")
