"""Dashboard: live panels of a run (memory, shards, traffic, timeline, loss) in a notebook.

This module owns the Dashboard object: it consumes events (the cluster's consumer thread
calls `on_event`, which only folds them into a `DashboardState`), and one drawing thread renders
each panel with matplotlib's object API into its own PNG, shown by an ipywidgets Image. Only
panels whose data changed are redrawn, at most every `refresh_s` seconds, and never more often
than keeps the drawing under `max_duty` of one core. The drawing thread runs at the lowest CPU
priority (Linux), so that on a machine with no spare core it takes the time the ranks leave
idle rather than time from their steps. Neither thread prints. `from_events` replays a recorded
run without a cluster.

In a notebook run headless (nbval, nbconvert) widgets are not rendered, so the display also
carries a plain PNG of all panels, refreshed from the notebook's own thread when the job ends:
the final picture is in the saved notebook.
"""

from __future__ import annotations

import base64
import io
import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..telemetry import Event
from . import panels as P
from .render import PanelCanvas
from .state import DashboardState, load_events

PANELS = ("memory", "shards", "traffic", "timeline", "loss")
_ROW_HEIGHT_IN = 2.3
_ids = itertools.count(1)


def _draw_panel(fig, spec, panel: str, snap: dict[str, Any]) -> Any:
    """Draw one panel into the grid cell `spec` of `fig`; returns what it drew."""
    if panel == "shards":
        sub = spec.subgridspec(1, 3, wspace=0.25)
        axes = [fig.add_subplot(sub[0, col]) for col in range(3)]
    else:
        axes = [fig.add_subplot(spec)]
    return _draw_on(axes, panel, snap)


def _draw_on(axes, panel: str, snap: dict[str, Any], legend: bool = True) -> Any:
    """Draw one panel on its axes (three for the shard maps, one for the others)."""
    if panel == "shards":
        return P.draw_shards(axes, snap, legend=legend)
    draw = {
        "memory": P.draw_memory,
        "traffic": P.draw_traffic,
        "timeline": P.draw_timeline,
        "loss": P.draw_loss,
    }[panel]
    return draw(axes[0], snap, legend=legend)


def _tidy(fig) -> None:
    for ax in fig.axes:  # every tick is several artists: few ticks, quick frames
        ax.tick_params(labelsize=7)


def _lowest_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux: nice is per thread)."""
    import os

    try:
        os.setpriority(
            os.PRIO_PROCESS, threading.get_native_id(), int(os.environ.get("DZL_NICE", "19"))
        )
    except (AttributeError, OSError):
        pass  # elsewhere the drawing runs at normal priority; max_duty still bounds it


def _png(fig) -> bytes:
    """The whole picture, drawn tight (legends included): the saved notebook's fallback."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


class Dashboard:
    """Live panels for `cluster.run(fn, ..., dashboard=dash)`; display `dash` in a cell.

    panels: any of "memory", "shards", "traffic", "timeline", "loss", in display order.
    refresh_s: the shortest time between two frames while events arrive.
    max_duty: the largest share of one core the drawing may take (frames are spaced out to
        stay under it).
    """

    def __init__(
        self,
        panels: Sequence[str] = PANELS,
        refresh_s: float = 0.4,
        max_duty: float = 0.2,
        width_in: float = 10.0,
        dpi: int = 64,
    ) -> None:
        panels = tuple(panels)
        unknown = [p for p in panels if p not in PANELS]
        if unknown or not panels:
            raise ValueError(f"panels must be a non-empty selection of {PANELS}, got {panels}")
        if len(set(panels)) != len(panels):
            raise ValueError(f"panels must not repeat, got {panels}")
        for name, value in (("refresh_s", refresh_s), ("max_duty", max_duty)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.panels = panels
        self.refresh_s = float(refresh_s)
        self.max_duty = float(max_duty)
        self.width_in = float(width_in)
        self.dpi = int(dpi)
        self.state = DashboardState()
        self.frames = 0  # how many times panels were redrawn
        self.render_errors = 0
        self.render_seconds = 0.0  # CPU seconds spent drawing: the dashboard's own cost
        self.drawn: dict[str, Any] = {}  # what each panel drew last, for tests and lessons
        self._panel_png: dict[str, bytes] = {}
        self._canvases: dict[str, PanelCanvas] = {}
        self._drawn_versions: dict[str, int] = {}
        self._png = b""  # all panels in one picture (the plain fallback)
        self._render_lock = threading.Lock()
        self._next_frame = 0.0
        self._wake = threading.Event()
        self._drawer: threading.Thread | None = None
        self._widget = None
        self._images: dict[str, Any] = {}
        self._status = None
        self._displayed = False
        self._display_id = f"ddpzero-dashboard-{next(_ids)}"

    def __repr__(self) -> str:
        return (
            f"Dashboard(panels={self.panels}, events={self.state.events_seen}, "
            f"frames={self.frames})"
        )

    # -- the consumer interface (called on the cluster's consumer thread) -------------------
    def on_event(self, event: Event) -> None:
        self.state.update(event)
        self._wake.set()
        if self._drawer is None:
            self._drawer = threading.Thread(
                target=self._draw_loop, name="ddpzero-dashboard", daemon=True
            )
            self._drawer.start()

    def _draw_loop(self) -> None:
        """The drawing thread: a frame whenever there is news, spaced by refresh_s and
        max_duty. It sets widget state only."""
        _lowest_priority()
        while True:
            self._wake.wait()
            self._wake.clear()
            delay = self._next_frame - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                self.render()
            except Exception:  # noqa: BLE001 - a drawing bug must not end the thread
                self.render_errors += 1

    def on_submit(self) -> None:
        """Build the panels' figures and backgrounds now, in the caller's thread, so that the
        first frame while the ranks run is as cheap as the others."""
        self.render()

    def on_job_start(self, job) -> None:
        self._set_status(f"job {job.id} ({job.name}) running")

    def on_job_end(self, job) -> None:
        self._wake.set()
        self._set_status(f"job {job.id} ({job.name}) finished")

    def on_wait_end(self, job) -> None:
        """Called in the notebook's own thread when `run`/`wait` returns: refresh the plain
        PNG of the display so that a headless run saves the final picture."""
        self.render()
        self._png = _png(self.figure())
        if self._displayed:
            try:
                from IPython.display import update_display

                update_display(self._bundle(), raw=True, display_id=self._display_id)
            except Exception:  # noqa: BLE001 - not in IPython: nothing to update
                pass

    # -- drawing ----------------------------------------------------------------------------
    def feed(self, events: Iterable[Event]) -> Dashboard:
        """Fold events in without a cluster (replay, tests), then draw."""
        for event in events:
            self.state.update(event)
        self.render()
        self._png = _png(self.figure())
        return self

    def render(self) -> dict[str, bytes]:
        """Redraw the panels whose data changed; update their widgets; return all panels'
        PNGs. Schedules the next frame so that drawing stays under max_duty."""
        from matplotlib.figure import Figure

        with self._render_lock:
            # CPU time of this thread: what the drawing takes from the machine (wall time
            # would also count the waits of a low-priority thread)
            start, began = time.thread_time(), time.monotonic()
            snap = self.state.snapshot()
            for panel in self.panels:
                version = snap["versions"][panel]
                if self._drawn_versions.get(panel) == version and panel in self._panel_png:
                    continue
                canvas = self._panel_canvas(panel, Figure)
                self.drawn[panel], self._panel_png[panel] = canvas.frame(
                    lambda axes, legend, panel=panel: _draw_on(axes, panel, snap, legend)
                )
                self._drawn_versions[panel] = version
                if panel in self._images:
                    self._images[panel].value = self._panel_png[panel]  # widget state only
            cost = time.thread_time() - start
            self.frames += 1
            self.render_seconds += cost
            # frames start refresh_s apart (or further apart, to stay under max_duty)
            self._next_frame = began + max(self.refresh_s, cost / self.max_duty)
            return dict(self._panel_png)

    def _panel_canvas(self, panel: str, figure_class) -> PanelCanvas:
        """The panel's own Figure, Axes and canvas, made once and reused: building axes (their
        ticks above all) costs more than drawing them, so frames only swap the artists."""
        if panel not in self._canvases:
            fig = figure_class(figsize=(self.width_in, _ROW_HEIGHT_IN), dpi=self.dpi)
            grid = fig.add_gridspec(
                1,
                3 if panel == "shards" else 1,
                left=0.08,
                right=0.88,
                top=0.86,
                bottom=0.2,
                wspace=0.25,
            )
            count = 3 if panel == "shards" else 1
            axes = [fig.add_subplot(grid[0, i]) for i in range(count)]
            for ax in axes:
                ax.tick_params(labelsize=7)
            self._canvases[panel] = PanelCanvas(fig, axes, sticky=panel != "shards")
        return self._canvases[panel]

    def figure(self):
        """All panels in one new matplotlib Figure (object API; no pyplot state)."""
        from matplotlib.figure import Figure

        snap = self.state.snapshot()
        rows = len(self.panels)
        fig = Figure(figsize=(self.width_in, _ROW_HEIGHT_IN * rows), dpi=self.dpi)
        grid = fig.add_gridspec(
            rows, 1, left=0.08, right=0.98, top=1 - 0.35 / rows, bottom=0.3 / rows, hspace=0.6
        )
        drawn = {
            panel: _draw_panel(fig, grid[row, 0], panel, snap)
            for row, panel in enumerate(self.panels)
        }
        _tidy(fig)
        fig.suptitle(
            f"ddpzero_lab · ranks {snap['ranks']} · {snap['events_seen']} events", fontsize=9
        )
        self.drawn.update(drawn)
        return fig

    def save(self, path: str | Path) -> Path:
        """Write all panels as one picture (PNG, or any format matplotlib knows by suffix)."""
        path = Path(path)
        self.figure().savefig(path, bbox_inches="tight")
        return path

    @classmethod
    def from_events(cls, source: str | Path | Iterable, **kwargs: Any) -> Dashboard:
        """A dashboard of a recorded run: a JSON-lines file from `job.save_events(path)`, or
        an iterable of events."""
        return cls(**kwargs).feed(load_events(source))

    # -- display --------------------------------------------------------------------------------
    def _ensure_widget(self) -> None:
        if self._widget is not None:
            return
        try:
            import ipywidgets
        except ImportError:
            return
        pngs = self.render()
        self._images = {
            panel: ipywidgets.Image(
                format="png", value=pngs[panel], layout=ipywidgets.Layout(width="100%")
            )
            for panel in self.panels
        }
        self._status = ipywidgets.HTML(value="<i>waiting for a job</i>")
        self._widget = ipywidgets.VBox([self._status, *self._images.values()])

    def _set_status(self, text: str) -> None:
        if self._status is not None:
            self._status.value = f"<b>{text}</b> · {self.state.events_seen} events"

    @property
    def widget(self):
        """The ipywidgets box (status line and one image per panel), created on first use."""
        self._ensure_widget()
        return self._widget

    def _bundle(self) -> dict[str, Any]:
        if not self._png:
            self._png = _png(self.figure())
        bundle: dict[str, Any] = {
            "text/plain": repr(self),
            "image/png": base64.b64encode(self._png).decode("ascii"),
        }
        if self._widget is not None:
            bundle["application/vnd.jupyter.widget-view+json"] = {
                "model_id": self._widget.model_id,
                "version_major": 2,
                "version_minor": 0,
            }
        return bundle

    def _ipython_display_(self) -> None:
        from IPython.display import display

        self._ensure_widget()
        display(self._bundle(), raw=True, display_id=self._display_id)
        self._displayed = True
