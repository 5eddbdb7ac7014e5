"""Telemetry outside a LiveCluster: bounded in memory, and recordable to one file per rank.

The ranks here are spawned by the test itself (as torchrun or a user's script starts them), so
no cluster consumes the events: they go to the process-local ring buffer, or to a sink.
"""

from __future__ import annotations

import json

import pytest
import torch
from own_ranks import run_ranks

import ddpzero_lab as dzl
from ddpzero_lab import telemetry
from ddpzero_lab.telemetry import LOCAL_LOG_CAP, EventLog, JsonlSink, make_event


def test_the_ring_buffer_keeps_the_newest_events_and_counts_the_rest():
    log = EventLog(maxlen=3)
    for i in range(5):
        log.append(make_event("log", {"text": str(i)}))
    assert [e["text"] for e in log] == ["2", "3", "4"] and log.dropped == 2
    log.clear()
    assert len(log) == 0 and log.dropped == 0
    with pytest.raises(ValueError):
        EventLog(maxlen=0)
    assert telemetry.local_log.maxlen == LOCAL_LOG_CAP == 10_000
    assert EventLog().maxlen is None  # a job's log in the parent keeps everything


def _long_run(strategy: str, steps: int) -> dict:
    """Train a toy model for `steps` steps; how many events the rank keeps, and how much
    Python memory it holds, after the first 40% of the steps and at the end."""
    import gc
    import tracemalloc

    torch.manual_seed(0)
    model, opt = dzl.parallelize(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)),
        strategy=strategy,
        optimizer=lambda p: torch.optim.SGD(p, lr=1e-3),
    )
    x, y = torch.randn(4, 8), torch.randn(4, 2)
    tracemalloc.start()
    marks = {}
    for step in range(steps):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        dzl.emit("loss", step=step, loss=0.0)
        if step + 1 in (int(steps * 0.4), steps):
            gc.collect()
            marks[step + 1] = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "kept": len(telemetry.local_log),
        "dropped": telemetry.local_log.dropped,
        "memory": [marks[k] for k in sorted(marks)],
    }


@pytest.mark.parametrize("strategy, steps", [("ddp", 10_000), ("zero3", 4_000)])
def test_memory_stays_flat_over_a_long_run_outside_a_cluster(strategy, steps):
    (out,) = run_ranks(_long_run, 1, strategy, steps, timeout=500)
    # every step emits a loss, a step and at least one collective event: the buffer is full
    assert out["kept"] == LOCAL_LOG_CAP
    assert out["kept"] + out["dropped"] >= 3 * steps
    # unbounded, the events of the last 60% of the steps would add 1.3 KB (ddp) to 8.8 KB
    # (zero3) per step: megabytes. Bounded, the memory held does not grow.
    early, late = out["memory"]
    assert late - early < 256 * 1024, out


def _recorded_run(directory: str) -> str:
    sink = telemetry.record_jsonl(f"{directory}/events-rank{{rank}}.jsonl")
    model, opt = dzl.parallelize(
        torch.nn.Linear(4, 2), strategy="ddp", optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )
    for step in range(3):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        dzl.emit("loss", step=step, loss=float(loss))
    before = len(telemetry.local_log)
    telemetry.set_sink(None)  # closes the file
    assert len(telemetry.local_log) == before  # nothing went to the ring buffer meanwhile
    dzl.emit("log", text="after the recording")
    return str(sink.path)


def test_a_torchrun_style_job_records_one_file_per_rank_that_the_dashboard_replays(tmp_path):
    paths = run_ranks(_recorded_run, 2, str(tmp_path), timeout=180)
    assert paths == [str(tmp_path / f"events-rank{r}.jsonl") for r in range(2)]
    for rank, path in enumerate(paths):
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        assert {row["rank"] for row in rows} == {rank}
        kinds = {row["kind"] for row in rows}
        assert {"collective", "step", "loss", "shard_map"} & kinds >= {"collective", "step", "loss"}
        assert not any(row.get("text") == "after the recording" for row in rows)
    dash = dzl.Dashboard.from_events(paths)
    assert dash.state.ranks == {0, 1}
    assert dash.state.steps_seen == 3
    assert dash.state.events_seen == sum(len(open(p).readlines()) for p in paths)


def test_a_closed_sink_ignores_late_events(tmp_path):
    sink = JsonlSink(tmp_path / "late.jsonl")
    sink(make_event("log", {"text": "kept"}))
    sink.close()
    sink(make_event("log", {"text": "late"}))  # an autograd thread after the end: no error
    assert (tmp_path / "late.jsonl").read_text().count("\n") == 1 and sink.written == 1


def test_a_recording_inside_a_cluster_also_ships_events_and_gives_the_sink_back(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("RANK", raising=False)
    shipped = []  # stands in for a LiveCluster worker's sink
    telemetry.set_sink(shipped.append)
    try:
        sink = telemetry.record_jsonl(tmp_path / "run-rank{rank}.jsonl")
        dzl.emit("log", text="recorded and shipped")
        telemetry.set_sink(None)  # the end of the recording: the worker's sink is back
        dzl.emit("log", text="shipped")
    finally:
        telemetry.set_sink(None)
    assert [e["text"] for e in shipped] == ["recorded and shipped", "shipped"]
    assert sink.path == tmp_path / "run-rank0.jsonl"
    rows = [json.loads(line) for line in sink.path.read_text().splitlines()]
    assert [row["text"] for row in rows] == ["recorded and shipped"]
    assert telemetry.get_sink() == telemetry.local_log.append
