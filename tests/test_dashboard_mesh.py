"""The dashboard's mesh panels (viz/mesh_panels.py): the mesh (who holds which slice of which
layer, and which ZeRO shard), traffic per process group, and a pipeline's timeline. Each is
checked against what the ranks themselves hold, count and record: live on a 2 x 2 mesh, and
replayed from the recorded events."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.course.lesson_14 import SleepyLayer
from ddpzero_lab.memory import optimizer_state_breakdown
from ddpzero_lab.parallel.layout import emit_layout
from ddpzero_lab.parallel.pipeline import PipelineStage
from ddpzero_lab.parallel.tensor import TensorParallelMLP
from ddpzero_lab.telemetry import Event
from ddpzero_lab.viz.mesh_panels import cell_mask

D_MODEL, HIDDEN = 8, 16
MESH_PANELS = ("mesh", "group_traffic", "pipeline")


def _mesh_job(strategy):
    """A tensor-parallel MLP with ZeRO over the data-parallel columns of a 2 x 2 mesh, then
    a pipeline of 4 stages over all ranks; returns what this rank holds, counts and recorded."""
    dzl.reset_traffic()
    grid = dzl.mesh(dp=2, tp=2)
    torch.manual_seed(0)
    model = TensorParallelMLP(D_MODEL, HIDDEN, group=grid.tp)
    emit_layout(model)
    held = {n: p.numel() for n, p in model.named_parameters()}
    rows = (model.up.rows.start, model.up.rows.stop)
    momentum = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    model, opt = dzl.parallelize(model, strategy, optimizer=momentum, group=grid.dp)
    for _ in range(2):
        model(torch.randn(4, D_MODEL)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    owned = optimizer_state_breakdown(opt).get("momentum_buffer", 0) // 4  # elements
    dzl.set_link("eth-10g")  # the pipeline's messages as on a slow link
    stage = PipelineStage(SleepyLayer(0.005), micro_batches=4, loss_fn=nn.functional.mse_loss)
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    timelines = []
    for _ in range(2):
        timelines.append(stage.step(x if stage.is_first else None, y if stage.is_last else None))
    dzl.set_link(None)
    return {
        "coordinates": grid.coordinates,
        "held": held,
        "rows": rows,
        "owned": owned,
        "traffic": dzl.comm.traffic_by_group(),
        "timeline": timelines[-1]["timeline"],
        "waits": timelines[-1]["waits"],
    }


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    dash = dzl.Dashboard(panels=MESH_PANELS, refresh_s=0.05, max_duty=1.0)
    with dzl.LiveCluster(4, timeout=30.0) as cluster:
        job = cluster.submit(_mesh_job, "zero2", dashboard=dash)
        results = job.wait()
    path = job.save_events(tmp_path_factory.mktemp("mesh") / "run.jsonl")
    return dash, results, path


def test_mesh_panel_shows_each_ranks_slice_and_zero_shard(live):
    dash, results, _ = live
    drawn = dash.drawn["mesh"]
    for rank, mine in enumerate(results):
        dp, tp = mine["coordinates"]
        assert drawn["coordinates"][rank] == f"dp {dp} · tp {tp} · pp {rank}"  # stage = rank
        cells = {name: mask for (name, r), mask in drawn["cells"].items() if r == rank}
        assert set(cells) == set(mine["held"])
        # small layers are drawn element by element: what is coloured is what the rank holds
        for name, numel in mine["held"].items():
            assert int((cells[name] > 0).sum()) == numel, (rank, name)
        lo, hi = mine["rows"]  # the column-parallel layer's rows of W
        assert np.flatnonzero(cells["up.weight"].any(axis=1)).tolist() == list(range(lo, hi))
        # solid: the ZeRO shard this rank keeps optimizer state for, as its optimizer does
        assert sum(int((m == 2).sum()) for m in cells.values()) == mine["owned"] > 0, rank
    # the two ranks of a column hold the same slices and own complementary shards
    for name in results[0]["held"]:
        a, b = drawn["cells"][(name, 0)], drawn["cells"][(name, 2)]
        assert np.array_equal(a > 0, b > 0)
        assert not np.any((a == 2) & (b == 2))
        assert np.array_equal((a == 2) | (b == 2), a > 0)


def test_group_traffic_panel_equals_traffic_by_group(live):
    dash, results, _ = live
    drawn = dash.drawn["group_traffic"]
    for rank, mine in enumerate(results):
        assert set(drawn[rank]) == set(mine["traffic"])
        for group, ops in mine["traffic"].items():
            model = sum(c["sent"] for op, c in ops.items() if op not in ("send", "recv"))
            counted = sum(c["sent"] for op, c in ops.items() if op in ("send", "recv"))
            assert drawn[rank][group] == {"model": model, "counted": counted}, (rank, group)
        dp, tp = mine["coordinates"]
        row = f"{2 * dp},{2 * dp + 1}"
        assert drawn[rank][row]["model"] > 0 and drawn[rank][row]["counted"] == 0  # TP
        assert drawn[rank]["world"]["counted"] > 0  # the pipeline's send/recv


def test_pipeline_panel_draws_each_stages_recorded_spans(live):
    dash, results, _ = live
    drawn = dash.drawn["pipeline"]
    assert drawn["step"] == 1  # the newest step every stage reported
    for rank, mine in enumerate(results):
        boxes, spans = drawn["boxes"][rank], mine["timeline"]
        assert [(k, i) for k, i, *_ in boxes] == [(k, i) for k, i, *_ in spans]
        offsets = {round(b - s[2], 9) for (_, _, b, _), s in zip(boxes, spans, strict=True)}
        assert len(offsets) == 1  # one shift per stage: the stage's start in the step
        widths = [e - b for *_, b, e in boxes]
        assert widths == pytest.approx([e - b for *_, b, e in spans])
        assert len(drawn["waits"][rank]) == len(mine["waits"])
    busy = [sum(e - b for *_, b, e in r["timeline"]) for r in results]
    assert drawn["bubble"] == pytest.approx(1 - sum(busy) / len(busy) / drawn["span"])
    fig = dash.figure()
    labels = [ax.get_xlabel() for ax in fig.axes]
    assert any("measured under emulated eth-10g" in label for label in labels)


def test_replayed_events_draw_the_same_panels(live):
    dash, _, path = live
    replay = dzl.Dashboard.from_events(path, panels=MESH_PANELS)
    assert replay.drawn["group_traffic"] == dash.drawn["group_traffic"]
    assert replay.drawn["pipeline"]["boxes"] == dash.drawn["pipeline"]["boxes"]
    for key, mask in dash.drawn["mesh"]["cells"].items():
        assert np.array_equal(replay.drawn["mesh"]["cells"][key], mask)


def test_cell_mask_of_a_row_parallel_slice_and_its_zero_shard():
    # W is 4 x 6, split by columns over 2 ranks: this rank holds columns 3-5 (4 x 3 = 12
    # elements, row-major), and of those its data-parallel rank 1 owns elements 6-11
    entry = {"name": "w", "shape": [4, 6], "tp_dim": 1, "start": 3, "end": 6}
    mask = cell_mask(entry, [[0, 0, 6], [1, 6, 12]], dp_rank=1)
    want = np.zeros((4, 6), dtype=int)
    want[:, 3:] = 1
    want[2:, 3:] = 2
    assert np.array_equal(mask, want)
    assert np.array_equal(cell_mask(entry, None, dp_rank=0) > 0, want > 0)
    replicated = {"name": "b", "shape": [6], "tp_dim": -1, "start": 0, "end": 6}
    assert cell_mask(replicated, [[-1, 0, 6]], dp_rank=0).tolist() == [[2] * 6]


def test_panels_without_their_events_say_what_to_send():
    dash = dzl.Dashboard(panels=MESH_PANELS).feed([Event("loss", 0, 1.0, {"step": 0, "loss": 1})])
    assert dash.drawn["mesh"] == {"cells": {}, "coordinates": {}}
    assert dash.drawn["group_traffic"] == {} and dash.drawn["pipeline"] == {}
    with pytest.raises(ValueError, match="group_traffic"):
        dzl.Dashboard(panels=("mesh", "no such panel"))


@pytest.mark.parametrize("panel", MESH_PANELS)
def test_a_blitted_frame_equals_a_full_draw(live, panel):
    """A live frame pastes the background and draws only the data: its pixels must be those of
    a full draw of the same snapshot."""
    from PIL import Image

    from ddpzero_lab.viz.dashboard import _draw_on
    from ddpzero_lab.viz.state import load_events

    events = load_events(live[2])
    dash = dzl.Dashboard(panels=(panel,))
    dash.render()  # empty first, as when displayed before the job
    for event in events[: len(events) // 2]:
        dash.state.update(event)
    dash.render()
    for event in events[len(events) // 2 :]:
        dash.state.update(event)
    canvas, snap = dash._canvases[panel], dash.state.snapshot()
    draw = lambda axes, legend: _draw_on(axes, panel, snap, legend)  # noqa: E731
    _, blitted = canvas.frame(draw)
    _, again = canvas.frame(draw)
    canvas._key = None  # force the full path
    _, full = canvas.frame(draw)
    pixels = [np.asarray(Image.open(io.BytesIO(png))) for png in (blitted, again, full)]
    assert np.array_equal(pixels[0], pixels[2]) and np.array_equal(pixels[1], pixels[2])
