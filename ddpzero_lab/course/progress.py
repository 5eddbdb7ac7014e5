"""Progress for cells that run longer than a few seconds.

`progress(label)` is an event consumer for `cluster.run(..., dashboard=progress("..."))`: a
one-line status that counts steps and events while the ranks work, and prints how long the job
took when it returns (so the saved notebook says so too). It updates its display from the
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
        self._handle = None
        self._last = 0.0

    def on_submit(self) -> None:
        self._start = time.perf_counter()
        try:
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is not None:
                # A display with an id, not a widget: updates reach the live page, and the saved
                # notebook (and the course's site) keeps the last line as plain HTML.
                self._handle = display(self._html("starting ..."), display_id=True)
        except ImportError:  # no IPython: the final line still says how long it took
            self._handle = None

    @staticmethod
    def _html(text: str):
        from IPython.display import HTML

        return HTML(f"<code>{text}</code>")

    def on_event(self, event) -> None:
        self.events += 1
        if event.kind in ("step", "loss") and event.get("step") is not None:
            self.steps = max(self.steps, int(event.get("step")) + 1)
        now = time.perf_counter()
        if self._handle is not None and now - self._last > 0.25:
            self._last = now
            self._handle.update(self._html(self._text(now)))

    def _text(self, now: float) -> str:
        steps = f"step {self.steps} · " if self.steps else ""
        return f"{self.label}: {steps}{self.events} events · {now - self._start:.1f} s"

    def on_wait_end(self, job) -> None:
        now = time.perf_counter()
        if self._handle is not None:
            self._handle.update(self._html(self._text(now) + " · done"))
        print(f"{self.label}: done in {now - self._start:.1f} s")


def progress(label: str = "running") -> Progress:
    """A status line for one job: cluster.run(fn, dashboard=course.progress("sweep"))."""
    return Progress(label)
