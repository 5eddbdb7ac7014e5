"""Progress for cells that run longer than a few seconds.

`progress(label)` is an event consumer for `cluster.run(..., dashboard=progress("..."))`: a
one-line status that counts steps and events while the ranks work, and prints how long the job
took when it returns (so the saved notebook says so too). It sets widget state from the
cluster's consumer thread and never prints from there (telemetry.EventConsumer).
"""

from __future__ import annotations

import time


class Progress:
    def __init__(self, label: str) -> None:
        self.label = label
        self.events = 0
        self.steps = 0
        self._start = 0.0
        self._widget = None
        self._last = 0.0

    def on_submit(self) -> None:
        self._start = time.perf_counter()
        try:
            import ipywidgets
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is not None:
                self._widget = ipywidgets.HTML(f"{self.label}: starting ...")
                display(self._widget)
        except ImportError:  # no widgets: the final line still says how long it took
            self._widget = None

    def on_event(self, event) -> None:
        self.events += 1
        if event.kind in ("step", "loss") and event.get("step") is not None:
            self.steps = max(self.steps, int(event.get("step")) + 1)
        now = time.perf_counter()
        if self._widget is not None and now - self._last > 0.25:
            self._last = now
            self._widget.value = self._text(now)

    def _text(self, now: float) -> str:
        steps = f"step {self.steps} · " if self.steps else ""
        return f"{self.label}: {steps}{self.events} events · {now - self._start:.1f} s"

    def on_wait_end(self, job) -> None:
        now = time.perf_counter()
        if self._widget is not None:
            self._widget.value = self._text(now) + " · done"
        print(f"{self.label}: done in {now - self._start:.1f} s")


def progress(label: str = "running") -> Progress:
    """A status line for one job: cluster.run(fn, dashboard=course.progress("sweep"))."""
    return Progress(label)
