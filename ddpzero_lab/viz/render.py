"""Live frames of one panel, drawn by blitting.

Drawing a matplotlib Axes from scratch costs tens of milliseconds, most of it in the ticks,
labels and legend, which barely change while a job runs. A `PanelCanvas` draws them once into a
background picture and, for each later frame, pastes that picture and draws only the data
artists on top (Agg's `restore_region` and `draw_artist`), then encodes the pixels as PNG. The
background is drawn again only when what it shows changes: the axis limits, the ticks, the
titles or the legend's entries.

Axis limits would change with every frame (a growing loss curve, cumulative traffic, the
timeline's moving window), so a live frame keeps the limits of the frame before while the data
still fits them well, and otherwise takes new ones with some headroom: the background is redrawn
a few times a run, not every frame. When the job ends, one last frame is drawn with limits fitted
to the data (`frame(..., fit=True)`), so that the picture left on the page has no empty headroom.

Figures are drawn at a device-pixel ratio of 2 (the dashboard's `pixel_ratio`): the PNG has
twice the CSS pixels of the <img> it is shown in, as matplotlib's own "retina" figures do.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import panels as P

# When limits are renewed, the span is doubled past the upper end (a growing series: time,
# cumulative bytes, steps) and widened by a quarter below the lower end (a falling loss), so
# that a series that grows steadily renews them only each time it doubles.
HEADROOM = 1.0
HEADROOM_BELOW = 0.25
MIN_FILL = 0.3  # renew the limits when the data fills less than this share of them


def clear(ax) -> None:
    """Remove what a frame drew, keep the Axes; ticks go back to automatic (an empty panel
    removes them)."""
    from matplotlib.ticker import AutoLocator, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(AutoLocator())
        axis.set_major_formatter(ScalarFormatter())
    for artist in data_artists(ax):
        artist.remove()
    ax.containers.clear()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    ax.relim()
    ax.set_autoscale_on(True)


def data_artists(ax) -> list:
    """The artists a frame drew, in the order a full draw paints them (by zorder, then in the
    order they were added), so that a blitted frame layers them as the full draw does."""
    artists = [*ax.lines, *ax.collections, *ax.patches, *ax.images, *ax.texts]
    order = {id(a): i for i, a in enumerate(getattr(ax, "_children", artists))}
    return sorted(artists, key=lambda a: (a.get_zorder(), order.get(id(a), 0)))


def sticky_limits(wanted: tuple[float, float], held: tuple[float, float] | None):
    """The limits a live frame shows: `held` while `wanted` fits inside them and fills at least
    MIN_FILL of them, else `wanted` widened by HEADROOM of its span past its upper end and by
    HEADROOM_BELOW past its lower end unless that is zero (the floor of bars and byte counts)."""
    lo, hi = wanted
    if held is not None:
        held_lo, held_hi = held
        if held_lo <= lo and hi <= held_hi and (hi - lo) >= MIN_FILL * (held_hi - held_lo):
            return held
    span = (hi - lo) or 1.0
    return (lo if lo == 0 else lo - HEADROOM_BELOW * span, hi + HEADROOM * span)


def png(canvas) -> bytes:
    """The canvas's pixels as PNG: RGB (the figures are opaque), no row filter, zlib's fastest
    level. A live frame lives for a second; this is about a third quicker than Pillow's
    encoder at its fastest setting, for somewhat larger files (a local websocket carries them)."""
    width, height = canvas.get_width_height()
    rgb = np.asarray(canvas.buffer_rgba())[:, :, :3].reshape(height, 3 * width)
    rows = np.empty((height, 1 + 3 * width), dtype=np.uint8)
    rows[:, 0] = 0  # filter type 0 (none) for every row
    rows[:, 1:] = rgb
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.data, 1)),
            _chunk(b"IEND", b""),
        )
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


class PanelCanvas:
    """One panel's Figure and Axes, made once; `frame` draws a snapshot and returns the PNG."""

    def __init__(self, fig, axes: Sequence, sticky: bool = True) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        self.fig = fig
        self.axes = list(axes)
        self.canvas = FigureCanvasAgg(fig)
        self.sticky = sticky  # False: show each frame's own limits (maps that fill their axes)
        self.full_draws = 0  # how often the background was drawn again
        self._key: Any = None
        self._background = None
        self._limits: dict[tuple[int, str], tuple[float, float]] = {}

    def frame(self, draw: Callable[..., Any], fit: bool = False) -> tuple[Any, bytes]:
        """`draw(axes, legend=...)` puts this frame's artists on the axes; returns what it
        drew and the frame's PNG. `fit`: limits fitted to the data (matplotlib's own margins),
        no headroom: the last frame of a job; the next live frame takes new limits."""
        for ax in self.axes:
            clear(ax)
        drawn = draw(self.axes, legend=False)
        if fit:
            self._limits.clear()
            for ax in self.axes:
                ax.autoscale_view()
        elif self.sticky:
            for index, ax in enumerate(self.axes):
                self._stick(index, ax)
        key = tuple(self._layout(ax) for ax in self.axes)
        data = [artist for ax in self.axes for artist in data_artists(ax)]
        if key != self._key or self._background is None:
            for ax in self.axes:
                P.add_legend(ax)
            for artist in data:
                artist.set_animated(True)  # left out of the full draw: the background
            self.canvas.draw()
            self._background = self.canvas.copy_from_bbox(self.fig.bbox)
            self._key = key
            self.full_draws += 1
        else:
            self.canvas.restore_region(self._background)
        for artist in data:
            artist.axes.draw_artist(artist)
        return drawn, png(self.canvas)

    def _stick(self, index: int, ax) -> None:
        ax.autoscale_view()
        for axis, get, set_ in (("x", ax.get_xlim, ax.set_xlim), ("y", ax.get_ylim, ax.set_ylim)):
            lo, hi = get()
            limits = sticky_limits((min(lo, hi), max(lo, hi)), self._limits.get((index, axis)))
            self._limits[(index, axis)] = limits
            set_(*(limits if lo <= hi else limits[::-1]))  # an image's y axis runs downwards

    @staticmethod
    def _layout(ax) -> tuple:
        """What the background of this Axes shows besides the data."""
        fixed = getattr(ax.yaxis.get_major_formatter(), "seq", None)
        return (
            ax.get_xlim(),
            ax.get_ylim(),
            tuple(ax.get_xticks()),
            tuple(ax.get_yticks()),
            tuple(fixed) if fixed is not None else None,
            ax.get_title(loc="left"),
            P.legend_labels(ax),
        )
