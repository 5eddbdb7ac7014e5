"""A rank that only trains (under torchrun, or the CLI's) imports no LiveCluster, widget or
matplotlib code: each check runs in a fresh interpreter and reads its sys.modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = (
    "ddpzero_lab.cluster.cluster",
    "ddpzero_lab.cluster.worker",
    "ddpzero_lab.viz",
    "matplotlib",
    "ipywidgets",
)

_TRAIN_ONE_STEP = """
import datetime, json, os, sys, tempfile
import torch
import torch.distributed as dist
{imports}
store = os.path.join(tempfile.mkdtemp(), "store")
dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=60))
for strategy in ("ddp", "zero3"):
    model, opt = dzl.parallelize(torch.nn.Linear(4, 2), strategy=strategy,
                                 optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    dzl.emit("loss", step=0, loss=0.0)
dist.destroy_process_group()
{after}
heavy = sorted(m for m in sys.modules if m.startswith({heavy!r}))
print(json.dumps(heavy))
"""


def _modules_after(imports: str, after: str = "") -> list[str]:
    code = _TRAIN_ONE_STEP.format(imports=imports, after=after, heavy=HEAVY)
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "imports",
    [
        "import ddpzero_lab.parallel\nimport ddpzero_lab as dzl",
        "import ddpzero_lab as dzl",
        "import ddpzero_lab as dzl\nfrom ddpzero_lab import cli, workloads, checkpoint, faults",
    ],
    ids=["parallel", "package", "cli"],
)
def test_a_training_rank_imports_no_cluster_or_viz_code(imports):
    assert _modules_after(imports) == []


def test_the_public_names_still_resolve_and_load_on_first_use():
    # the positive control: reading the lazy names does load those modules, so the check above
    # would see them
    after = "names = (dzl.LiveCluster, dzl.Job, dzl.Dashboard, dzl.MemoryCalculator)"
    loaded = _modules_after("import ddpzero_lab as dzl", after)
    assert "ddpzero_lab.cluster.cluster" in loaded and "ddpzero_lab.viz" in loaded
    import ddpzero_lab as dzl

    for name in dzl.__all__:
        assert getattr(dzl, name) is not None, name
    assert set(dzl.__all__) <= set(dir(dzl))
    from ddpzero_lab.cluster import Job, LiveCluster, flight

    assert LiveCluster.__module__ == "ddpzero_lab.cluster.cluster" and Job is dzl.Job
    with pytest.raises(AttributeError):
        dzl.NoSuchName  # noqa: B018
    assert flight.recorder is None or flight.recorder.path  # read through from comm.flight
