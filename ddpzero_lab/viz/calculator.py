"""A ZeRO memory calculator: how many bytes of model state each rank holds, stage by stage.

This module owns the calculator widget and its two pure parts:

* `compute(num_params, world_size, budget_gb, preset=...)`: the per-rank bytes of every stage
  (DP, P_os, P_os+g, P_os+g+p) by category, and whether each fits a device of `budget_gb`.
  Every number comes from `ddpzero_lab.memory.zero_memory_estimate`, the model of
  Rajbhandari et al., "ZeRO", SC20, §5 and Table 1; nothing here restates its formulas.
* `figure(estimate)`: a stacked bar per stage (params, grads, optimizer state) with the
  budget as a horizontal line, drawn with matplotlib's object API (no pyplot state).

`MemoryCalculator()` puts both behind ipywidgets controls. It knows nothing of processes,
and measures nothing: the measured side of the story is `memory.MemoryTracker`. matplotlib and
ipywidgets are imported when a figure or widget is built, not when this module is imported.
"""

from __future__ import annotations

import html
import io
import math
import re
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from ..memory import PRESETS, STAGE_NAMES, format_gb, peak_memory_estimate, zero_memory_estimate

STAGES = tuple(STAGE_NAMES)  # 0, 1, 2, 3
CATEGORIES = ("params", "grads", "optimizer")
COLORS = {"params": "tab:blue", "grads": "tab:orange", "optimizer": "tab:green"}
GB = 1e9  # decimal gigabytes, as Table 1 of the paper counts them
_UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))  # the figure's unit: the largest that fits

# Labels of the preset menu; "custom" takes the three byte counts from the boxes.
PRESET_LABELS = {
    "mixed_adam": "mixed-precision Adam (2 + 2 + 12)",
    "fp32_adam": "fp32 Adam (4 + 4 + 8)",
    "custom": "custom bytes per parameter",
}
_BYTE_KEYS = ("params_bytes", "grads_bytes", "optimizer_bytes_per_param")


@dataclass(frozen=True)
class Estimate:
    """Model-state bytes per rank for one model, one world size and one device budget."""

    num_params: float
    world_size: int
    budget_gb: float
    bytes_per_param: dict[str, float]  # {"params", "grads", "optimizer"}: bytes per parameter
    stages: dict[int, dict[str, float]]  # stage -> zero_memory_estimate(...) for that stage
    # stage -> peak_memory_estimate(...): model state plus a step's transient buffers and
    # activations, at the step's worst moment
    peaks: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def fits(self) -> dict[int, bool]:
        """stage -> True if the rank's model states fit in budget_gb (equal counts as fitting)."""
        return {s: est["total"] / GB <= self.budget_gb for s, est in self.stages.items()}

    def answer(self) -> str:
        """One line per stage: its GB per rank and whether that fits the budget."""
        lines = []
        for stage, est in self.stages.items():
            verdict = "fits in" if self.fits[stage] else "does not fit in"
            lines.append(
                f"{STAGE_NAMES[stage]:<9} {format_gb(est['total'] / GB):>8} GB per rank: "
                f"{verdict} {self.budget_gb:g} GB"
            )
        return "\n".join(lines)


def _check_positive_finite(name: str, value: Any, allow_zero: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} finite number, got {value!r}")


def compute(
    num_params: float,
    world_size: int,
    budget_gb: float,
    preset: str = "mixed_adam",
    params_bytes: float | None = None,
    grads_bytes: float | None = None,
    optimizer_bytes_per_param: float | None = None,
    activation_bytes: float = 0.0,
    largest_layer_params: float | None = None,
) -> Estimate:
    """Per-rank bytes of every ZeRO stage and whether each fits `budget_gb` (10^9 bytes).

    preset: "mixed_adam" (2 + 2 + 12, the paper's setting), "fp32_adam" (4 + 4 + 8), or
    "custom", which needs all three byte counts. Byte counts given with a named preset
    override its values, as in zero_memory_estimate. Raises ValueError on bad input.

    `peaks` adds, per stage, the peak of a step (ddpzero_lab.memory.peak_memory_estimate):
    `activation_bytes` per rank, 25 MB gradient buckets, and for P_os+g+p units of
    `largest_layer_params` (default Ψ/100) gathered one at a time, DeepSpeed's "largest
    layer" term.
    """
    _check_positive_finite("activation_bytes", activation_bytes, allow_zero=True)
    _check_positive_finite("num_params", num_params, allow_zero=True)
    _check_positive_finite("budget_gb", budget_gb, allow_zero=False)
    given = dict(
        zip(_BYTE_KEYS, (params_bytes, grads_bytes, optimizer_bytes_per_param), strict=True)
    )
    if preset == "custom":
        missing = [key for key, value in given.items() if value is None]
        if missing:
            raise ValueError(f"preset 'custom' needs all three byte counts; missing {missing}")
        preset = "mixed_adam"  # every value is overridden below
    elif preset not in PRESETS:
        choices = sorted(PRESETS) + ["custom"]
        raise ValueError(f"preset must be one of {choices}, got {preset!r}")
    overrides = {key: value for key, value in given.items() if value is not None}
    stages = {
        stage: zero_memory_estimate(num_params, world_size, stage, preset=preset, **overrides)
        for stage in STAGES
    }
    # the bytes per parameter are the model's own: stage 0 of a one-parameter model
    per = zero_memory_estimate(1, 1, 0, preset=preset, **overrides)
    layer = float(largest_layer_params if largest_layer_params is not None else num_params / 100)
    _check_positive_finite("largest_layer_params", layer, allow_zero=True)
    layer = min(layer, float(num_params))
    per_param = {
        "params_bytes": per["params"],
        "grads_bytes": per["grads"],
        "optimizer_bytes_per_param": per["optimizer"],
    }
    grads = per["grads"] * num_params
    cap = 25 * 2**20  # ZeRO-2's buckets: one filling, one in flight
    buckets = [grads] if grads <= cap else [cap, min(cap, grads - cap)]
    peaks = {
        stage: peak_memory_estimate(
            num_params,
            world_size,
            "ddp" if stage == 0 else f"zero{stage}",
            activation_bytes,
            bucket_bytes=buckets,
            # the worst of backward: one unit filling, one in flight (the others sharded)
            unit_params=[layer, layer] if 2 * layer <= num_params else [layer],
            root_params=0.0,
            **per_param,
        )
        for stage in STAGES
    }
    return Estimate(
        num_params=float(num_params),
        world_size=world_size,
        budget_gb=float(budget_gb),
        bytes_per_param={c: per[c] for c in CATEGORIES},
        stages=stages,
        peaks=peaks,
    )


def figure(estimate: Estimate | float, *args: Any, **kwargs: Any):
    """A matplotlib Figure: one stacked bar per stage, the budget as a dashed line.

    Takes an `Estimate`, or the arguments of `compute(...)`.
    """
    from matplotlib.figure import Figure

    if not isinstance(estimate, Estimate):
        estimate = compute(estimate, *args, **kwargs)
    # GB as the paper counts; MB or kB when the largest figure is below one GB
    largest = max(estimate.stages[0]["total"], estimate.budget_gb * GB)
    unit, scale = next(((name, size) for name, size in _UNITS if largest >= size), _UNITS[-1])
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    x = list(range(len(STAGES)))
    bottom = [0.0] * len(STAGES)
    for category in CATEGORIES:
        heights = [estimate.stages[s][category] / scale for s in STAGES]
        ax.bar(x, heights, bottom=bottom, width=0.6, color=COLORS[category], label=category)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    budget = estimate.budget_gb * GB / scale
    ax.axhline(
        budget,
        color="black",
        linestyle="--",
        linewidth=1.5,
        label=f"budget {format_gb(budget)} {unit}",
    )
    top = max(max(bottom), budget) or 1.0
    for xi, stage in zip(x, STAGES, strict=True):
        total = estimate.stages[stage]["total"] / scale
        mark = "fits" if estimate.fits[stage] else "too big"
        ax.annotate(
            f"{format_gb(total)} {unit}\n{mark}",
            (xi, total),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize="small",
            color="black" if estimate.fits[stage] else "tab:red",
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"},
        )
    ax.set_xticks(x, [STAGE_NAMES[s] for s in STAGES])
    ax.set_ylim(0, top * 1.25)
    ax.set_ylabel(f"model states per rank [{unit} = $10^{{{round(math.log10(scale))}}}$ bytes]")
    per = estimate.bytes_per_param
    psi = estimate.num_params
    psi_text = f"{int(psi):,}" if psi.is_integer() and psi < 1e9 else format_count(psi)
    ax.set_title(
        f"Ψ = {psi_text} parameters, N_d = {estimate.world_size}, "
        f"{per['params']:g} + {per['grads']:g} + {per['optimizer']:g} bytes per parameter",
        fontsize="medium",
    )
    ax.legend(loc="upper right", fontsize="small")
    return fig


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def format_count(value: float) -> str:
    """7.5e9 -> '7.5e9', 85002 -> '85002': the shortest form that reads back exactly."""
    for digits in range(4, 18):
        mantissa, _, exponent = f"{value:.{digits}g}".partition("e")
        text = mantissa if not exponent else f"{mantissa}e{int(exponent)}"
        if float(text) == value:
            break
    return text


def parse_num_params(text: str) -> float:
    """'7.5e9', '7,500,000,000', '7.5B' or '1T' -> a float; ValueError with a hint otherwise."""
    cleaned = str(text).strip().replace(",", "").replace("_", "")
    match = re.fullmatch(r"([-+]?[0-9.]+(?:e[-+]?[0-9]+)?)\s*([kmbgt]?)", cleaned, re.IGNORECASE)
    try:
        if match is None:
            raise ValueError
        value = float(match.group(1)) * _SUFFIXES.get(match.group(2).lower(), 1.0)
    except ValueError:
        raise ValueError(
            f"num_params: cannot read {text!r}; write a number such as 7.5e9, 7.5B or 1T"
        ) from None
    return value


class MemoryCalculator:
    """The calculator as ipywidgets: change any input and the chart and answer follow.

    Inputs: number of parameters (text box and log slider, 1e6..1e13), world size N_d,
    a precision/optimizer preset or custom bytes per parameter, the device budget in GB.
    Output: the stacked bars of `figure()` (a PNG in an Image widget) and, per stage, whether
    the model states fit. Display the object itself, or `.widget`. Bad input shows a message
    in place of the chart instead of raising.
    """

    def __init__(
        self,
        num_params: float = 7.5e9,
        world_size: int = 64,
        budget_gb: float = 32.0,
        preset: str = "mixed_adam",
        params_bytes: float | None = None,
        grads_bytes: float | None = None,
        optimizer_bytes_per_param: float | None = None,
    ) -> None:
        import ipywidgets as widgets

        if preset not in PRESET_LABELS:
            raise ValueError(f"preset must be one of {sorted(PRESET_LABELS)}, got {preset!r}")
        given = (params_bytes, grads_bytes, optimizer_bytes_per_param)
        base = PRESETS["mixed_adam" if preset == "custom" else preset]
        if any(value is not None for value in given):
            preset = "custom"
        defaults = (base.params, base.grads, base.optimizer)
        bytes_values = [d if v is None else v for v, d in zip(given, defaults, strict=True)]

        style = {"description_width": "initial"}
        self.num_params_box = widgets.Text(
            value=format_count(num_params),
            description="parameters Ψ",
            continuous_update=False,
            style=style,
            layout=widgets.Layout(width="220px"),
        )
        self.num_params_slider = widgets.FloatLogSlider(
            value=min(max(num_params, 1e6), 1e13) if num_params > 0 else 1e6,
            base=10,
            min=6,
            max=13,
            step=0.01,
            readout_format=".3g",
            continuous_update=False,
            layout=widgets.Layout(width="340px"),
        )
        self.world_size_box = widgets.IntText(
            value=world_size, description="world size N_d", style=style
        )
        self.preset_menu = widgets.Dropdown(
            options=[(label, key) for key, label in PRESET_LABELS.items()],
            value=preset,
            description="precision / optimizer",
            style=style,
            layout=widgets.Layout(width="420px"),
        )
        self.params_bytes_box, self.grads_bytes_box, self.optimizer_bytes_box = (
            widgets.FloatText(value=value, description=label, style=style)
            for value, label in zip(
                bytes_values,
                ("bytes/param: params", "grads", "optimizer state K"),
                strict=True,
            )
        )
        self.budget_box = widgets.FloatText(
            value=budget_gb, description="device memory [GB]", style=style
        )
        self.chart = widgets.Image(format="png", layout=widgets.Layout(max_width="760px"))
        self.answer = widgets.HTML()
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.num_params_box, self.num_params_slider]),
                widgets.HBox([self.world_size_box, self.budget_box]),
                self.preset_menu,
                widgets.HBox(
                    [self.params_bytes_box, self.grads_bytes_box, self.optimizer_bytes_box]
                ),
                self.chart,
                self.answer,
            ]
        )
        self.estimate: Estimate | None = None
        self.error: str | None = None
        self.draws = 0  # how many times the chart was redrawn
        self._syncing = False
        self._sync_byte_boxes()

        self.num_params_slider.observe(self._on_slider, names="value")
        self.num_params_box.observe(self._on_text, names="value")
        self.preset_menu.observe(self._on_preset, names="value")
        for box in (
            self.world_size_box,
            self.budget_box,
            self.params_bytes_box,
            self.grads_bytes_box,
            self.optimizer_bytes_box,
        ):
            box.observe(self._on_change, names="value")
        self.update()

    # -- events ---------------------------------------------------------------------------------
    def _on_change(self, change: dict) -> None:
        if not self._syncing:
            self.update()

    def _on_slider(self, change: dict) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            # three significant digits, as the slider's readout shows them
            self.num_params_box.value = format_count(float(f"{change['new']:.3g}"))
        finally:
            self._syncing = False
        self.update()

    def _on_text(self, change: dict) -> None:
        if self._syncing:
            return
        try:
            value = parse_num_params(change["new"])
        except ValueError:
            value = None
        if value is not None and 1e6 <= value <= 1e13:  # the slider follows when it can
            self._syncing = True
            try:
                self.num_params_slider.value = value
            finally:
                self._syncing = False
        self.update()

    def _on_preset(self, change: dict) -> None:
        self._syncing = True
        try:
            self._sync_byte_boxes()
        finally:
            self._syncing = False
        self.update()

    def _sync_byte_boxes(self) -> None:
        """A named preset shows its bytes (read-only); "custom" leaves the boxes editable."""
        preset = self.preset_menu.value
        boxes = (self.params_bytes_box, self.grads_bytes_box, self.optimizer_bytes_box)
        if preset != "custom":
            per = PRESETS[preset]
            for box, value in zip(boxes, (per.params, per.grads, per.optimizer), strict=True):
                box.value = value
        for box in boxes:
            box.disabled = preset != "custom"

    # -- the pure part, then the drawing ----------------------------------------------------
    def inputs(self) -> dict[str, Any]:
        """The current inputs as compute(...) keyword arguments (ValueError if unreadable)."""
        args: dict[str, Any] = {
            "num_params": parse_num_params(self.num_params_box.value),
            "world_size": self.world_size_box.value,
            "budget_gb": self.budget_box.value,
            "preset": self.preset_menu.value,
        }
        if args["preset"] == "custom":
            args.update(
                params_bytes=self.params_bytes_box.value,
                grads_bytes=self.grads_bytes_box.value,
                optimizer_bytes_per_param=self.optimizer_bytes_box.value,
            )
        return args

    def update(self) -> Estimate | None:
        """Recompute from the controls and redraw; on bad input show why, and return None."""
        try:
            estimate = compute(**self.inputs())
        except ValueError as exc:
            self.estimate, self.error = None, str(exc)
            self.chart.value = b""
            self.answer.value = (
                f'<p style="color:#b00020"><b>Cannot compute:</b> {html.escape(self.error)}</p>'
            )
            return None
        self.estimate, self.error = estimate, None
        fig = figure(estimate)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=96)
        self.chart.value = buffer.getvalue()
        self.draws += 1
        rows = []
        for stage, est in estimate.stages.items():
            fits = estimate.fits[stage]
            color = "#1b7f3b" if fits else "#b00020"
            verdict = "yes" if fits else "no"
            peak = estimate.peaks[stage]["peak"] / GB
            rows.append(
                f"<tr><td>{STAGE_NAMES[stage]}</td>"
                f"<td style='text-align:right'>{format_gb(est['total'] / GB)} GB</td>"
                f"<td style='text-align:right'>{format_gb(peak)} GB</td>"
                f"<td style='color:{color}'><b>{verdict}</b></td></tr>"
            )
        self.answer.value = (
            f"<b>Does it fit in {estimate.budget_gb:g} GB per rank?</b>"
            f"<table><tr><th>stage</th><th>model states</th><th>peak of a step*</th>"
            f"<th>fits</th></tr>"
            f"{''.join(rows)}</table><small>* model states plus a step's buffers: DDP's fresh "
            "gradients beside its buckets, ZeRO-2's 25 MB buckets, ZeRO-3's gathered layers "
            "(Ψ/100 each) and their gradients; activations not included. The fit is judged "
            "on model states.</small>"
        )
        return estimate

    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)
