"""The dashboard: each panel draws what a fixed event log says (numbers read back from the
artists), the live path in a real cluster run, replay from a file, and bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.telemetry import EVERY_RANK, Event, shard_map_entry
from ddpzero_lab.viz.dashboard import _draw_on
from ddpzero_lab.viz.panels import boxes, shard_image
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
