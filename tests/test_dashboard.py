"""The dashboard: each panel draws what a fixed event log says (numbers read back from the
artists), the live path in a real cluster run, replay from a file, and bad input; pixel density,
fitted last frames, the shard legend, the status line, the drawing thread's lifetime, and the
picture a headless notebook run saves."""

from __future__ import annotations

import base64
import gc
import io
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.telemetry import EVERY_RANK, Event, shard_map_entry
from ddpzero_lab.viz.dashboard import _draw_on, png_size
from ddpzero_lab.viz.panels import SHARD_KEY_GATHERED, SHARD_KEY_REPLICATED, boxes, shard_image
from ddpzero_lab.viz.render import sticky_limits

MB = 1e6


def _ev(kind, rank, t, **fields):
    return Event(kind=kind, rank=rank, time=t, fields=fields)


def _log():
    """Two ranks, a ZeRO-1-like shard map, one step."""
    events = [
        _ev(
            "shard_map",
            0,
            0.0,
            strategy="zero1",
            world_size=2,
            element_size=4,
            params=[
                shard_map_entry(
                    "w", 10, [[EVERY_RANK, 0, 10]], [[EVERY_RANK, 0, 10]], [[0, 0, 5], [1, 5, 10]]
                ),
                shard_map_entry("b", 4, [[EVERY_RANK, 0, 4]], [[EVERY_RANK, 0, 4]], [[1, 0, 4]]),
            ],
        ),
    ]
    for rank in (0, 1):
        events += [
            _ev(
                "memory",
                rank,
                1.0,
                phase="after_forward",
                step=0,
                params=56,
                grads=0,
                optimizer=0,
                activations=1000,
                buffers=0,
                scratch=0,
            ),
            _ev(
                "memory",
                rank,
                1.1,
                phase="after_backward",
                step=0,
                params=56,
                grads=56,
                optimizer=28 + 28 * rank,
                activations=0,
                buffers=0,
                scratch=8,
            ),
            _ev(
                "memory",
                rank,
                1.2,
                phase="after_step",
                step=0,
                params=56,
                grads=56,
                optimizer=28 + 28 * rank,
                activations=0,
                buffers=0,
                scratch=8,
            ),
            _ev(
                "collective",
                rank,
                1.15,
                op="reduce_scatter",
                bytes=56,
                sent=28,
                recv=28,
                start=1.05,
                end=1.1,
                seq=0,
                tag="bucket0",
            ),
            _ev(
                "collective",
                rank,
                1.25,
                op="all_gather",
                bytes=56,
                sent=28,
                recv=28,
                start=1.2,
                end=1.25,
                seq=1,
                tag="params",
            ),
            _ev("step", rank, 1.3, step=0, compute_s=0.2, comm_s=0.1, exposed_comm_s=0.05),
            _ev("loss", rank, 1.3, step=0, loss=2.0 + rank),
            _ev("loss", rank, 2.3, step=1, loss=1.0 + rank),
        ]
    return events


def test_memory_panel_draws_each_category_per_rank_and_the_formula():
    dash = dzl.Dashboard(panels=("memory",)).feed(_log())
    drawn = dash.drawn["memory"]
    assert drawn[1]["optimizer"] == 56 and drawn[0]["optimizer"] == 28
    assert drawn[0]["activations"] == 1000  # from the after_forward phase
    fig = dash.figure()
    ax = fig.axes[0]
    heights = {
        bars.get_label(): [round(h * MB) for *_, h in boxes(bars)]
        for bars in ax.collections
        if str(bars.get_gid()).startswith("mem:")
    }
    assert heights["optimizer"] == [28, 56] and heights["grads"] == [56, 56]
    assert heights["activations"] == [1000, 1000] and heights["scratch"] == [8, 8]
    # the ZeRO-1 formula: 4 + 4 bytes per parameter, K from what both ranks hold (84/14 = 6),
    # divided by 2: 14 * (8 + 3) = 154 bytes per rank
    marks = [line for line in ax.lines if str(line.get_gid()).startswith("formula")]
    assert [round(m.get_ydata()[0] * MB) for m in marks] == [154, 154]


def test_shards_panel_colours_each_slice_by_its_owner():
    dash = dzl.Dashboard(panels=("shards",)).feed(_log())
    images = dash.drawn["shards"]
    optimizer = images["optimizer"]
    assert set(optimizer[0, :59].tolist()) == {0} and set(optimizer[0, 61:].tolist()) == {1}
    assert set(optimizer[1].tolist()) == {1}
    assert set(images["params"].ravel().tolist()) == {EVERY_RANK}
    unit = shard_image(
        [{"name": "x", "numel": 4, "grads": [[0, 0, 1], [1, 1, 4]]}], "grads", 2, width=8
    )
    assert unit.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1]]


def test_traffic_panel_sums_sent_bytes_and_draws_the_expectation():
    dash = dzl.Dashboard(panels=("traffic",)).feed(_log())
    assert dash.drawn["traffic"] == {0: 56, 1: 56}
    ax = dash.figure().axes[0]
    expected = {
        line.get_gid(): line.get_ydata()[0] * MB
        for line in ax.lines
        if str(line.get_gid()).startswith("expected")
    }
    # zero1: 2(N-1)/N of the 14 parameters x 4 bytes, one step done
    assert {k: round(v) for k, v in expected.items()} == {"expected:0": 56, "expected:1": 56}


def test_timeline_panel_places_compute_and_collectives():
    dash = dzl.Dashboard(panels=("timeline",)).feed(_log())
    drawn = sorted((r, k, round(a, 3), round(b, 3)) for r, k, a, b in dash.drawn["timeline"])
    # compute runs from step end - exposed - compute to step end - exposed: 1.05 .. 1.25
    assert (0, "compute", 0.0, 0.2) in drawn
    assert (1, "reduce_scatter", 0.0, 0.05) in drawn and (1, "all_gather", 0.15, 0.2) in drawn


def test_loss_panel_draws_each_rank_and_the_mean():
    dash = dzl.Dashboard(panels=("loss",)).feed(_log())
    assert dash.drawn["loss"] == {"rank 0": [2.0, 1.0], "rank 1": [3.0, 2.0], "mean": [2.5, 1.5]}
    ax = dash.figure().axes[0]
    mean = [line for line in ax.lines if line.get_gid() == "loss:mean"][0]
    assert list(mean.get_ydata()) == [2.5, 1.5]


def test_empty_dashboard_and_bad_arguments(tmp_path):
    dash = dzl.Dashboard()
    assert dash.render().keys() == set(dzl.Dashboard().panels)  # empty panels still draw
    assert dash.save(tmp_path / "empty.png").stat().st_size > 0
    with pytest.raises(ValueError, match="panels"):
        dzl.Dashboard(panels=("memory", "gpu"))
    with pytest.raises(ValueError, match="panels"):
        dzl.Dashboard(panels=())
    with pytest.raises(ValueError, match="refresh_s"):
        dzl.Dashboard(refresh_s=0)


def _train(steps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    model, opt = dzl.parallelize(model, "ddp", optimizer=lambda p: torch.optim.AdamW(p))
    for step in range(steps):
        x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        dzl.emit("loss", step=step, loss=loss.item())


def test_live_run_updates_the_dashboard_and_replays_the_same(tmp_path):
    dash = dzl.Dashboard(refresh_s=0.05, max_duty=1.0)
    with dzl.LiveCluster(2, timeout=20.0) as cluster:
        job = cluster.submit(_train, 30, dashboard=dash)
        job.wait()
    assert dash.frames >= 2
    assert set(dash.drawn["loss"]) == {"rank 0", "rank 1", "mean"}
    assert len(dash.drawn["loss"]["mean"]) == 30
    # DDP holds every byte of model state on every rank: the formula mark is stage 0's
    psi = 32 * 64 + 64 + 64 * 4 + 4
    memory = dash.drawn["memory"]
    assert memory[0]["params"] == 4 * psi and memory[1]["params"] == 4 * psi
    assert dash.state.snapshot()["expected_memory"][0] == pytest.approx(
        4 * psi + 4 * psi + memory[0]["optimizer"]
    )
    path = job.save_events(tmp_path / "run.jsonl")
    replay = dzl.Dashboard.from_events(path)
    assert replay.drawn["loss"] == dash.drawn["loss"]
    assert replay.drawn["traffic"] == dash.drawn["traffic"]
    assert np.array_equal(replay.drawn["shards"]["params"], dash.drawn["shards"]["params"])
    assert replay.save(tmp_path / "replay.png").stat().st_size > 0


def test_sticky_limits_keep_the_background_until_the_data_outgrows_it():
    assert sticky_limits((0.0, 10.0), None) == (0.0, 20.0)  # headroom past the growing end
    assert sticky_limits((0.0, 19.0), (0.0, 20.0)) == (0.0, 20.0)  # still fits: kept
    assert sticky_limits((0.0, 21.0), (0.0, 20.0)) == (0.0, 42.0)  # outgrown: renewed
    assert sticky_limits((0.0, 5.0), (0.0, 20.0)) == (0.0, 10.0)  # fills too little: renewed
    assert sticky_limits((2.0, 4.0), None) == (1.5, 6.0)
    for wanted in [(0.0, 1.0), (3.0, 4.0), (-2.0, 7.0)]:  # renewed limits hold what they got
        assert sticky_limits(wanted, sticky_limits(wanted, None)) == sticky_limits(wanted, None)


def _pixels(png):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)))


@pytest.mark.parametrize("panel", ["memory", "traffic", "timeline", "loss"])
def test_a_blitted_frame_equals_the_same_frame_drawn_in_full(panel):
    """Live frames paste the background and draw only the data: the pixels must be those of a
    full draw of the same snapshot with the same limits."""
    events = []
    for repeat in range(3):  # the same step again, later: the data moves on
        for e in _log()[1 if repeat else 0 :]:
            fields = {
                k: v + 2.0 * repeat if k in ("start", "end") else v for k, v in e.fields.items()
            }
            if "step" in fields:
                fields["step"] += 2 * repeat
            events.append(_ev(e.kind, e.rank, e.time + 2.0 * repeat, **fields))
    dash = dzl.Dashboard(panels=(panel,))
    dash.render()  # empty first, as when displayed before the job: no ticks
    for event in events[: len(events) // 2]:
        dash.state.update(event)
    dash.render()
    canvas = dash._canvases[panel]
    full_draws = canvas.full_draws
    for event in events[len(events) // 2 :]:
        dash.state.update(event)
    snap = dash.state.snapshot()
    draw = lambda axes, legend: _draw_on(axes, panel, snap, legend)  # noqa: E731
    _, blitted = canvas.frame(draw)
    _, again = canvas.frame(draw)
    assert canvas.full_draws <= full_draws + 1  # at most one new background, then reused
    canvas._key = None  # force the full path
    _, full = canvas.frame(draw)
    assert np.array_equal(_pixels(blitted), _pixels(full))
    assert np.array_equal(_pixels(again), _pixels(full))
    assert len(canvas.axes[0].get_yticks()) >= 2  # the empty frame's tick removal is undone


class _Job:
    """What a dashboard reads of a job: its id and name."""

    def __init__(self, job_id: int) -> None:
        self.id, self.name = job_id, "train"


def _steps(count: int, start: int = 0):
    """`count` more steps of the two-rank log, each a second later than the one before."""
    events = []
    for step in range(start, start + count):
        for e in _log()[1:]:
            fields = {k: v + step if k in ("start", "end") else v for k, v in e.fields.items()}
            if "step" in fields:
                fields["step"] = step
            events.append(_ev(e.kind, e.rank, e.time + step, **fields))
    return events


def _run_offline(dash, job_id: int, events) -> None:
    """Drive the consumer interface as a cluster run does: submit, start, events, end, wait."""
    job = _Job(job_id)
    dash.on_submit()
    dash.on_job_start(job)
    for event in events:
        dash.on_event(event)
    dash.on_job_end(job)
    dash.on_wait_end(job)


def test_panels_are_drawn_at_twice_their_css_pixels():
    dash = dzl.Dashboard(panels=("loss", "shards"), width_in=10, dpi=80).feed(_log())
    assert dash.css_width == 800
    for panel, data in dash.render().items():
        width, height = png_size(data)
        assert width == 2 * 800, panel  # a device-pixel ratio of 2
    widget = dash.widget
    images = [child for child in widget.children if hasattr(child, "format")]
    assert [image.layout.width for image in images] == ["800px", "800px"]
    assert png_size(dash.still())[0] == 1600
    data, metadata = dash._bundle()
    assert metadata["image/png"]["width"] == 800  # shown at its CSS size


def test_the_last_frame_of_a_job_fits_the_data():
    dash = dzl.Dashboard(panels=("loss", "timeline", "traffic", "memory"))
    for event in _steps(20):
        dash.state.update(event)
    dash.render()  # a live frame: limits with headroom
    loss_ax = dash._canvases["loss"].axes[0]
    assert loss_ax.get_xlim()[1] > 25  # 20 steps (0..19) on a longer axis
    dash.render(final=True)
    lo, hi = loss_ax.get_xlim()
    assert -2 <= lo <= 0 and 19 <= hi <= 21  # matplotlib's margins, no headroom
    y_lo, y_hi = loss_ax.get_ylim()
    assert 0.8 <= y_lo <= 1.0 and 3.0 <= y_hi <= 3.2  # losses 1..3
    t_lo, t_hi = dash._canvases["timeline"].axes[0].get_xlim()
    last = max(end for *_, end in dash.drawn["timeline"])
    assert t_hi == pytest.approx(last, rel=0.02)
    sent = dash._canvases["traffic"].axes[0].get_ylim()[1] * MB
    assert sent <= 1.15 * max(dash.drawn["traffic"].values(), default=0) + 1e-9 or sent <= (
        1.15 * max(dash.state.snapshot()["expected_sent_per_step"].values()) * 20
    )
    memory_top = dash._canvases["memory"].axes[0].get_ylim()[1] * MB
    tallest = max(sum(parts.values()) for parts in dash.drawn["memory"].values())
    assert memory_top <= 1.15 * tallest


def test_the_shard_legend_names_every_colour():
    dash = dzl.Dashboard(panels=("shards",)).feed(_log())
    fig = dash.figure()
    legend = fig.axes[-1].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == [SHARD_KEY_REPLICATED, "rank 0", "rank 1"]
    # ZeRO-3: parameters gathered for forward/backward and freed after, hatched over the map
    events = _log()
    events[0].fields["strategy"] = "zero3"
    dash3 = dzl.Dashboard(panels=("shards",)).feed(events)
    labels3 = [t.get_text() for t in dash3.figure().axes[-1].get_legend().get_texts()]
    assert SHARD_KEY_GATHERED in labels3 and "freed" in SHARD_KEY_GATHERED
    live = dash3._canvases["shards"].axes
    assert any(c.get_gid() == "shards:gathered" for c in live[-1].collections)


def test_the_status_line_counts_steps_and_events_while_running():
    dash = dzl.Dashboard(panels=("loss",))
    dash.widget  # noqa: B018 - the status widget
    dash.on_job_start(_Job(7))
    seen = []
    for step, chunk in enumerate([_steps(1, s) for s in range(3)], start=1):
        for event in chunk:
            dash.state.update(event)
        dash.render()
        seen.append(dash.status)
        assert f"{step} steps" in dash.status and "running" in dash.status
        assert f"{dash.state.events_seen} events" in dash._status.value
    assert len(set(seen)) == 3
    # between frames, the consumer thread refreshes the counts (every STATUS_EVERY_S)
    dash._status_at = 0.0
    dash.on_event([e for e in _steps(1, 3) if e.kind == "loss"][0])
    assert f"{dash.state.events_seen} events" in dash.status and "4 steps" in dash.status
    dash.on_job_end(_Job(7))
    assert "finished" in dash.status
    dash.close()


def _rss() -> int:
    import ctypes
    import ctypes.util

    import psutil

    gc.collect()
    try:  # hand freed heap pages back, so that RSS counts what is still held
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss


@pytest.mark.timeout(600)
def test_a_dashboard_per_run_leaves_no_thread_or_memory_behind():
    """100 runs, each with a new Dashboard fed through the consumer interface: every drawing
    thread ends with its job, old dashboards are collected, memory stays flat."""
    events = _steps(2)
    for job_id in range(3):  # warm-up: matplotlib's caches, fonts
        _run_offline(dzl.Dashboard(refresh_s=0.01, max_duty=1.0), job_id, events)
    threads, rss = set(threading.enumerate()), _rss()
    refs = []
    for job_id in range(100):
        dash = dzl.Dashboard(refresh_s=0.01, max_duty=1.0)
        _run_offline(dash, job_id, events)
        assert dash.frames >= 2
        refs.append(weakref.ref(dash))
        del dash
    deadline = time.monotonic() + 10
    while set(threading.enumerate()) - threads and time.monotonic() < deadline:
        time.sleep(0.05)
    growth = (_rss() - rss) / 1e6
    print(f"threads {threading.active_count()} (baseline {len(threads)}); RSS {growth:+.1f} MB")
    assert set(threading.enumerate()) - threads == set()  # no thread more than before
    assert not [t for t in threading.enumerate() if t.name == "ddpzero-dashboard"]
    assert [r for r in refs if r() is not None] == []
    assert growth < 50


def test_close_ends_the_drawing_thread_and_a_new_job_starts_another():
    dash = dzl.Dashboard(panels=("loss",), refresh_s=0.01)
    dash.on_job_start(_Job(1))
    dash.on_event(_log()[-1])
    thread = dash._drawer.thread
    assert thread.is_alive()
    dash.close()
    assert not thread.is_alive() and dash._drawer is None
    dash.on_submit()
    dash.on_event(_log()[-1])
    assert dash._drawer.thread.is_alive()
    dash.on_job_end(_Job(1))
    dash.on_wait_end(_Job(1))
    assert dash._drawer is None and not threading.enumerate().count(thread)


NOTEBOOK_CELLS = [
    "import ddpzero_lab as dzl\n"
    "cluster = dzl.LiveCluster(2, timeout=60.0)\n"
    "dash = dzl.Dashboard(panels=('memory', 'loss'))\n"
    "dash",
    "import torch\n"
    "from torch import nn\n"
    "def train(steps):\n"
    "    torch.manual_seed(0)\n"
    "    model, opt = dzl.parallelize(nn.Linear(8, 2), 'ddp',\n"
    "                                 optimizer=lambda p: torch.optim.SGD(p, lr=0.1))\n"
    "    for step in range(steps):\n"
    "        loss = model(torch.randn(4, 8)).pow(2).mean()\n"
    "        loss.backward(); opt.step(); opt.zero_grad()\n"
    "        dzl.emit('loss', step=step, loss=loss.item())\n"
    "cluster.run(train, 3, dashboard=dash)\n"
    "cluster.close()",
]


@pytest.mark.timeout(300)
def test_a_headless_notebook_saves_the_final_frame_as_a_png(tmp_path):
    """nbclient runs a notebook as a static site's build does: the dashboard cell's saved
    output must hold the last frame as image/png (a widget view alone would show nothing)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in NOTEBOOK_CELLS]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    client = NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    nbformat.write(nb, tmp_path / "executed.ipynb")
    outputs = nb.cells[0].outputs
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 1, outputs
    data = base64.b64decode(pictures[0]["data"]["image/png"])
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = png_size(data)
    assert width >= 800 and height >= 400
    from PIL import Image

    Image.open(io.BytesIO(data)).verify()  # a whole, valid PNG
    status = Image.open(io.BytesIO(data)).text["ddpzero-status"]
    assert "finished · 3 steps" in status, status  # the job's last frame, not the first
    assert pictures[0]["data"]["text/plain"].startswith("Dashboard(")
    assert "application/vnd.jupyter.widget-view+json" not in pictures[0]["data"]
    assert pictures[0]["metadata"]["image/png"]["width"] == width // 2


def _phase_markers(ax, prefix: str) -> dict[tuple[str, int], int]:
    """{(phase, rank): bytes} of the memory panel's markers whose gid starts with `prefix`."""
    out = {}
    for line in ax.lines:
        gid = str(line.get_gid())
        if gid.startswith(prefix + ":"):
            _, phase, rank = gid.split(":")
            out[(phase, int(rank))] = round(line.get_ydata()[0] * MB)
    return out


def test_memory_panel_marks_each_phases_peak_from_the_trackers_events():
    # a real tracker in this process: two AdamW steps of a small MLP, its memory events fed in
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    events = []
    tracker = dzl.memory.MemoryTracker(emit=False).attach(model, optimizer)
    for step, batch in enumerate((16, 4)):  # the first step saves more activations
        model(torch.randn(batch, 12)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        events += [
            _ev("memory", 0, step + 0.1 * i, **f) for i, f in enumerate(tracker.last.values())
        ]
    tracker.detach()
    by_phase = {}
    for e in events:
        phase = {"after_forward": "forward", "after_backward": "backward"}.get(e["phase"], "step")
        by_phase.setdefault(phase, []).append(e["peak"])
    assert len(by_phase["forward"]) == 2 and len(set(by_phase["forward"])) == 2
    dash = dzl.Dashboard(panels=("memory",)).feed(events)
    marks = _phase_markers(dash.figure().axes[0], "peak")
    # each phase's marker is the highest peak the events report for it (the run's peak)
    assert marks == {(phase, 0): max(values) for phase, values in by_phase.items()}
    assert not _phase_markers(dash.figure().axes[0], "peak_formula")
    # the formula, once given, is drawn per phase and rank
    estimate = {"forward": 1000.0, "backward": 2000.0, "step": 3000.0, "peak": 3000.0}
    dash.expect_peak(estimate)
    ax = dash.figure().axes[0]
    assert _phase_markers(ax, "peak_formula") == {
        ("forward", 0): 1000,
        ("backward", 0): 2000,
        ("step", 0): 3000,
    }
    assert "peak per phase" in [line.get_label() for line in ax.lines]
    assert ax.get_ylim()[1] * MB >= max(marks.values())  # every marker inside the axes
    dash.expect_peak(None)
    assert not _phase_markers(dash.figure().axes[0], "peak_formula")


def test_memory_panel_without_peaks_draws_the_highest_total():
    # a recording made before the tracker reported peaks: the dashed line, as before
    ax = dzl.Dashboard(panels=("memory",)).feed(_log()).figure().axes[0]
    assert not _phase_markers(ax, "peak")
    dashed = [c for c in ax.collections if c.get_gid() == "peak"]
    assert len(dashed) == 1
