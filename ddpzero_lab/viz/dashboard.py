"""Dashboard: live panels of a run (memory, shards, traffic, timeline, loss) in a notebook.

This module owns the Dashboard object: it consumes events (the cluster's consumer thread
calls `on_event`, which only folds them into a `DashboardState`), and a drawing thread renders
each panel with matplotlib's object API into its own PNG, shown by an ipywidgets Image at twice
its CSS size in pixels (crisp on a high-density screen). Only panels whose data changed are
redrawn, at most every `refresh_s` seconds, and never more often than keeps the drawing under
`max_duty` of one core. The drawing thread runs at the lowest CPU priority (Linux nice 19),
so that on a machine with no spare core it takes the time the ranks leave idle rather than time
from their steps. It lives as long as a job: when the job ends it draws one last frame with
axes fitted to the data and ends (`close()` ends it too). Neither thread prints. `from_events`
replays a recorded run without a cluster.

In a notebook run headless (nbclient, nbval, nbconvert) widgets are not rendered, so the
display also carries a plain PNG of all panels under a display_id; when `run`/`wait` returns,
the notebook's own thread replaces that display with the final picture (image/png and
text/plain), so the saved notebook, and a static site built from it, show the run. The next job
shows the live widget again.
"""

from __future__ import annotations

import base64
import io
import itertools
import struct
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..telemetry import Event
from . import mesh_panels
from . import panels as P
from .render import PanelCanvas
from .state import DashboardState, load_events

PANELS = ("memory", "shards", "traffic", "timeline", "loss")
# Panels one asks for by name (mesh_panels.py: the mesh, traffic per group, the pipeline).
ALL_PANELS = PANELS + tuple(mesh_panels.PANELS)
_ROW_HEIGHT_IN = 2.3
_ids = itertools.count(1)
# A drawing thread with nothing to draw for this long ends (a job that never reports its end
# must not keep one alive); the next event starts another.
IDLE_EXIT_S = 10.0
_TICK_PT = 7.5
STATUS_EVERY_S = 0.25  # the status line's counts are refreshed at least this often


def _draw_panel(fig, spec, panel: str, snap: dict[str, Any]) -> Any:
    """Draw one panel into the grid cell `spec` of `fig`; returns what it drew."""
    if panel == "shards":
        sub = spec.subgridspec(1, 3, wspace=0.3)
        axes = [fig.add_subplot(sub[0, col]) for col in range(3)]
    else:
        axes = [fig.add_subplot(spec)]
    return _draw_on(axes, panel, snap)


def _draw_on(axes, panel: str, snap: dict[str, Any], legend: bool = True) -> Any:
    """Draw one panel on its axes (three for the shard maps, one for the others)."""
    if panel == "shards":
        return P.draw_shards(axes, snap, legend=legend)
    if panel in mesh_panels.PANELS:
        return mesh_panels.PANELS[panel](axes[0], snap, legend=legend)
    draw = {
        "memory": P.draw_memory,
        "traffic": P.draw_traffic,
        "timeline": P.draw_timeline,
        "loss": P.draw_loss,
    }[panel]
    return draw(axes[0], snap, legend=legend)


def _tidy(fig) -> None:
    for ax in fig.axes:  # every tick is several artists: few ticks, quick frames
        ax.tick_params(labelsize=_TICK_PT)


def _lowest_priority() -> None:
    """Give the calling thread the lowest nice value (Linux: nice is per thread), so that on a
    machine with no spare core it mostly takes the time the ranks leave idle.

    Not SCHED_IDLE by default (DZL_SCHED_IDLE=1 asks for it): a thread that low is preempted for
    long stretches while it holds the GIL, and the cluster's consumer thread, which needs the GIL
    to read the ranks' events, waits with it (on a busy, shared 2-core machine some runs drew
    no frame at all and were no faster for it)."""
    import os

    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, int(os.environ.get("DZL_NICE", "19")))
    except (AttributeError, OSError, ValueError):
        pass  # elsewhere the drawing runs at normal priority; max_duty still bounds it
    if os.environ.get("DZL_SCHED_IDLE", "0") == "1":
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            pass


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels of a PNG, from its header."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


class _Drawer:
    """One drawing thread and its signals. It holds its Dashboard weakly, so that a dashboard
    nobody holds any more is collected, and the thread ends, even mid-job."""

    def __init__(self, dash: Dashboard) -> None:
        self.wake = threading.Event()  # news to draw
        self.finish = threading.Event()  # the job ended: last frame, then end
        self.thread = threading.Thread(
            target=_draw_loop, args=(weakref.ref(dash), self), name="ddpzero-dashboard", daemon=True
        )


def _draw_loop(ref, drawer: _Drawer) -> None:
    """The drawing thread: a frame whenever there is news, spaced by refresh_s and max_duty;
    one fitted frame and the end when the job ends. It sets widget state only."""
    _lowest_priority()
    while True:
        woke = drawer.wake.wait(IDLE_EXIT_S)
        dash = ref()
        if dash is None:
            return
        if drawer.finish.is_set():
            dash._render_quietly(final=True)
            return
        if not woke:
            with dash._drawer_lock:
                if not drawer.wake.is_set():  # on_event wakes under this lock: none is lost
                    if dash._drawer is drawer:
                        dash._drawer = None
                    return
        drawer.wake.clear()
        delay = dash._next_frame - time.monotonic()
        del dash  # not held while waiting
        if delay > 0:
            drawer.finish.wait(delay)  # the job's end cuts the wait short
        dash = ref()
        if dash is None:
            return
        dash._render_quietly(final=drawer.finish.is_set())
        if drawer.finish.is_set():
            return
        del dash


class Dashboard:
    """Live panels for `cluster.run(fn, ..., dashboard=dash)`; display `dash` in a cell.

    panels: any of "memory", "shards", "traffic", "timeline", "loss" (the default) and
        "mesh", "group_traffic", "pipeline", in display order.
    refresh_s: the shortest time between two frames while events arrive.
    max_duty: the largest share of one core the drawing may take (frames are spaced out to
        stay under it).
    width_in, dpi: each panel's size in inches and CSS pixels per inch (shown width_in x dpi
        CSS pixels wide); pixel_ratio: device pixels per CSS pixel the PNGs are drawn with
        (2: as crisp as a "retina" matplotlib figure).
    """

    def __init__(
        self,
        panels: Sequence[str] = PANELS,
        refresh_s: float = 1.0,
        max_duty: float = 0.1,
        width_in: float = 10.0,
        dpi: int = 80,
        pixel_ratio: float = 2.0,
    ) -> None:
        panels = tuple(panels)
        unknown = [p for p in panels if p not in ALL_PANELS]
        if unknown or not panels:
            raise ValueError(f"panels must be a non-empty selection of {ALL_PANELS}, got {panels}")
        if len(set(panels)) != len(panels):
            raise ValueError(f"panels must not repeat, got {panels}")
        for name, value in (
            ("refresh_s", refresh_s),
            ("max_duty", max_duty),
            ("width_in", width_in),
            ("dpi", dpi),
            ("pixel_ratio", pixel_ratio),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.panels = panels
        self.refresh_s = float(refresh_s)
        self.max_duty = float(max_duty)
        self.width_in = float(width_in)
        self.dpi = float(dpi)
        self.pixel_ratio = float(pixel_ratio)
        self.state = DashboardState()
        self.frames = 0  # how many times panels were redrawn
        self.render_errors = 0
        self.render_seconds = 0.0  # CPU seconds spent drawing: the dashboard's own cost
        self.drawn: dict[str, Any] = {}  # what each panel drew last, for tests and lessons
        self.status = "waiting for a job"  # the status line's text
        self.closed = False
        self._panel_png: dict[str, bytes] = {}
        self._canvases: dict[str, PanelCanvas] = {}
        self._drawn_versions: dict[str, tuple] = {}
        self._png = b""  # all panels in one picture (the saved notebook's picture)
        self._render_lock = threading.Lock()
        self._drawer_lock = threading.Lock()
        self._next_frame = 0.0
        self._drawer: _Drawer | None = None
        self._job: tuple[int, str] | None = None
        self._job_running = False
        self._status_at = 0.0
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

    @property
    def css_width(self) -> int:
        """A panel's width on the page, in CSS pixels."""
        return round(self.width_in * self.dpi)

    # -- the consumer interface (called on the cluster's consumer thread) -------------------
    def on_event(self, event: Event) -> None:
        self.state.update(event)
        if time.monotonic() - self._status_at >= STATUS_EVERY_S:
            self._set_status()  # between frames too: a starved drawing thread leaves it live
        with self._drawer_lock:
            drawer = self._drawer
            if drawer is None:
                if self.closed:
                    return
                drawer = self._drawer = _Drawer(self)
                drawer.thread.start()
            drawer.wake.set()

    def _render_quietly(self, final: bool = False) -> None:
        try:
            self.render(final=final)
        except Exception:  # noqa: BLE001 - a drawing bug must not end the job's frames
            self.render_errors += 1

    def _stop_drawer(self) -> _Drawer | None:
        """Ask the drawing thread to draw its last, fitted frame and end."""
        with self._drawer_lock:
            drawer, self._drawer = self._drawer, None
        if drawer is not None:
            drawer.finish.set()
            drawer.wake.set()
        return drawer

    def on_submit(self) -> None:
        """Build the panels' figures and backgrounds now, in the caller's thread, so that the
        first frame while the ranks run is as cheap as the others; show the live widget again
        where the last job's end left a still picture."""
        self.closed = False
        self.render()
        if self._displayed and self._widget is not None:
            self._update_display(self._bundle(live=True))

    def on_job_start(self, job) -> None:
        self._job = (job.id, job.name)
        self._job_running = True
        self._set_status()

    def on_job_end(self, job) -> None:
        self._job_running = False
        self._stop_drawer()  # its last frame fits the axes to the data, then it ends
        self._set_status()

    def on_wait_end(self, job) -> None:
        """Called in the notebook's own thread when `run`/`wait` returns: the last frame with
        fitted axes, and the display replaced by the final picture (image/png), so that a
        headless run saves it."""
        self._job_running = False
        drawer = self._stop_drawer()
        # drawn here, at the notebook's priority: the drawing thread's lowest priority would
        # make the cell wait for it on a busy machine (its own last frame is then a no-op)
        self.render(final=True)
        self._png = self.still()
        if self._displayed:
            self._update_display(self._bundle(live=False))
        if drawer is not None:
            drawer.thread.join(timeout=5.0)

    def close(self) -> None:
        """End the drawing thread now and close the widgets (the figures go with the
        dashboard). A later job starts a new drawing thread."""
        self.closed = True
        drawer = self._stop_drawer()
        if drawer is not None and drawer.thread.is_alive():
            drawer.thread.join(timeout=10.0)
        for widget in [*self._images.values(), self._status, self._widget]:
            if widget is not None:
                widget.close()
        self._widget, self._status, self._images = None, None, {}

    def expect_peak(self, estimate: dict[str, float] | None) -> Dashboard:
        """Show a peak formula per phase (`dzl.peak_memory_estimate_for(...)`'s dict) beside
        each rank's measured peaks on the memory panel; None removes it."""
        self.state.expect_peak(estimate)
        return self

    # -- drawing ----------------------------------------------------------------------------
    def feed(self, events: Iterable[Event]) -> Dashboard:
        """Fold events in without a cluster (replay, tests), then draw (axes fitted)."""
        for event in events:
            self.state.update(event)
        self.render(final=True)
        self._png = self.still()
        return self

    def render(self, final: bool = False) -> dict[str, bytes]:
        """Redraw the panels whose data changed; update their widgets and the status line;
        return all panels' PNGs. Schedules the next frame so that drawing stays under max_duty.
        final: axes fitted to the data (the last frame of a job) rather than live limits."""
        from matplotlib.figure import Figure

        with self._render_lock:
            # CPU time of this thread: what the drawing takes from the machine (wall time
            # would also count the waits of a low-priority thread)
            start, began = time.thread_time(), time.monotonic()
            snap = self.state.snapshot()
            for panel in self.panels:
                version = (self._content(panel, snap), final)
                if self._drawn_versions.get(panel) == version and panel in self._panel_png:
                    continue
                canvas = self._panel_canvas(panel, Figure)
                self.drawn[panel], self._panel_png[panel] = canvas.frame(
                    lambda axes, legend, panel=panel: _draw_on(axes, panel, snap, legend),
                    fit=final,
                )
                self._drawn_versions[panel] = version
                if panel in self._images:
                    self._images[panel].value = self._panel_png[panel]  # widget state only
            self._set_status()
            cost = time.thread_time() - start
            self.frames += 1
            self.render_seconds += cost
            # frames start refresh_s apart (or further apart, to stay under max_duty)
            self._next_frame = began + max(self.refresh_s, cost / self.max_duty)
            return dict(self._panel_png)

    @staticmethod
    def _content(panel: str, snap: dict[str, Any]) -> Any:
        """What decides a panel's picture: its version, or for the panels that a step
        usually leaves as they were (memory, shards), the data itself."""
        if panel == "memory":
            return (
                snap["memory"],
                snap["peak"],
                snap["expected_memory"],
                snap["phase_peaks"],
                snap["expected_peak"],
            )
        if panel == "shards":
            return snap["versions"]["shards"]
        return snap["versions"][panel]

    def _panel_canvas(self, panel: str, figure_class) -> PanelCanvas:
        """The panel's own Figure, Axes and canvas, made once and reused: building axes (their
        ticks above all) costs more than drawing them, so frames only swap the artists."""
        if panel not in self._canvases:
            fig = figure_class(
                figsize=(self.width_in, _ROW_HEIGHT_IN), dpi=self.dpi * self.pixel_ratio
            )
            count = 3 if panel == "shards" else 1
            grid = fig.add_gridspec(
                1, count, left=0.08, right=0.84, top=0.86, bottom=0.2, wspace=0.3
            )
            axes = [fig.add_subplot(grid[0, i]) for i in range(count)]
            for ax in axes:
                ax.tick_params(labelsize=_TICK_PT)
            # maps and one-step pictures fill their axes: each frame shows its own limits
            sticky = panel != "shards" and panel not in mesh_panels.PANELS
            self._canvases[panel] = PanelCanvas(fig, axes, sticky=sticky)
        return self._canvases[panel]

    def figure(self):
        """All panels in one new matplotlib Figure (object API; no pyplot state), axes fitted
        to the data."""
        from matplotlib.figure import Figure

        snap = self.state.snapshot()
        rows = len(self.panels)
        fig = Figure(
            figsize=(self.width_in, _ROW_HEIGHT_IN * rows), dpi=self.dpi * self.pixel_ratio
        )
        grid = fig.add_gridspec(
            rows, 1, left=0.08, right=0.84, top=1 - 0.35 / rows, bottom=0.3 / rows, hspace=0.6
        )
        drawn = {
            panel: _draw_panel(fig, grid[row, 0], panel, snap)
            for row, panel in enumerate(self.panels)
        }
        _tidy(fig)
        fig.suptitle(f"ddpzero_lab · ranks {snap['ranks']} · {self._status_text()}", fontsize=9)
        self.drawn.update(drawn)
        return fig

    def still(self) -> bytes:
        """The status line and the panels as the widget shows them now, one under the other,
        as one PNG: the picture a saved notebook keeps. Made from the panels' last frames, so
        it costs no drawing beyond the status line."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        with self._render_lock:
            pngs = dict(self._panel_png)
        if any(panel not in pngs for panel in self.panels):
            pngs = self.render()
        panels = [Image.open(io.BytesIO(pngs[panel])).convert("RGB") for panel in self.panels]
        width = max(image.width for image in panels)
        header = Figure(figsize=(width / (self.dpi * self.pixel_ratio), 0.3))
        header.set_dpi(self.dpi * self.pixel_ratio)
        header.text(0.01, 0.5, self.status, fontsize=9, fontweight="bold", va="center")
        canvas = FigureCanvasAgg(header)
        canvas.draw()
        strip = Image.frombuffer(
            "RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1
        ).convert("RGB")
        picture = Image.new(
            "RGB", (width, strip.height + sum(i.height for i in panels)), (255, 255, 255)
        )
        picture.paste(strip, (0, 0))
        top = strip.height
        for image in panels:
            picture.paste(image, (0, top))
            top += image.height
        info = PngInfo()
        info.add_text("ddpzero-status", self.status)  # what the picture shows, for readers
        buffer = io.BytesIO()
        picture.save(buffer, format="png", compress_level=1, pnginfo=info)
        return buffer.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write all panels as one picture (PNG, or any format matplotlib knows by suffix)."""
        path = Path(path)
        self.figure().savefig(path, bbox_inches="tight")
        return path

    @classmethod
    def from_events(cls, source: str | Path | Iterable, **kwargs: Any) -> Dashboard:
        """A dashboard of a recorded run: a JSON-lines file from `job.save_events(path)`, a
        list of such files (one per rank, as `telemetry.record_jsonl` writes them under
        torchrun: merged in time order), or an iterable of events."""
        if (
            isinstance(source, (list, tuple))
            and source
            and all(isinstance(item, (str, Path)) for item in source)
        ):
            events = [event for path in source for event in load_events(path)]
            events.sort(key=lambda event: event.time)  # stable: one rank's order is kept
            return cls(**kwargs).feed(events)
        return cls(**kwargs).feed(load_events(source))

    # -- the status line ------------------------------------------------------------------------
    def _status_text(self) -> str:
        """The job, how many steps and events have arrived: read from the state's counters
        (two integers), so that the consumer thread can afford it between frames."""
        counts = f"{self.state.steps_seen} steps · {self.state.events_seen} events"
        if self._job is None:
            return counts if self.state.events_seen else "waiting for a job"
        job_id, name = self._job
        return f"job {job_id} ({name}) {'running' if self._job_running else 'finished'} · {counts}"

    def _set_status(self) -> None:
        self._status_at = time.monotonic()
        self.status = self._status_text()
        if self._status is not None:
            self._status.value = f"<b>{self.status}</b>"  # widget state only

    # -- display --------------------------------------------------------------------------------
    def _ensure_widget(self) -> None:
        if self._widget is not None:
            return
        try:
            import ipywidgets
        except ImportError:
            return
        pngs = self.render()
        layout = {"width": f"{self.css_width}px", "max_width": "100%", "height": "auto"}
        self._images = {
            panel: ipywidgets.Image(format="png", value=pngs[panel], layout=dict(layout))
            for panel in self.panels
        }
        self._status = ipywidgets.HTML(value=f"<b>{self.status}</b>")
        self._widget = ipywidgets.VBox([self._status, *self._images.values()])

    @property
    def widget(self):
        """The ipywidgets box (status line and one image per panel), created on first use."""
        self._ensure_widget()
        return self._widget

    def _bundle(self, live: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """The display's data and metadata: the picture as image/png (shown at its CSS size)
        and text/plain, plus the widget's view while `live`."""
        if not self._png:
            self._png = self.still()
        width, _ = png_size(self._png)
        data: dict[str, Any] = {
            "text/plain": repr(self),
            "image/png": base64.b64encode(self._png).decode("ascii"),
        }
        if live and self._widget is not None:
            data["application/vnd.jupyter.widget-view+json"] = {
                "model_id": self._widget.model_id,
                "version_major": 2,
                "version_minor": 0,
            }
        return data, {"image/png": {"width": round(width / self.pixel_ratio)}}

    def _repr_mimebundle_(self, include=None, exclude=None):
        self._ensure_widget()
        return self._bundle(live=True)

    def _update_display(self, bundle: tuple[dict[str, Any], dict[str, Any]]) -> None:
        try:
            from IPython.display import update_display

            data, metadata = bundle
            update_display(data, metadata=metadata, raw=True, display_id=self._display_id)
        except Exception:  # noqa: BLE001 - not in IPython: nothing to update
            pass

    def _ipython_display_(self) -> None:
        from IPython.display import display

        self._ensure_widget()
        data, metadata = self._bundle(live=True)
        display(data, metadata=metadata, raw=True, display_id=self._display_id)
        self._displayed = True
