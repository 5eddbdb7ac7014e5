"""Record one short run of each strategy for the README and for machines too small to run a
cluster: docs/runs/<strategy>.jsonl (the events) and docs/runs/<strategy>.png (the dashboard).

    python docs/record_runs.py            # then: dzl.Dashboard.from_events("docs/runs/ddp.jsonl")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import ddpzero_lab as dzl
from ddpzero_lab.parallel import STRATEGIES
from ddpzero_lab.parallel.api import AVAILABLE

OUT = Path(__file__).parent / "runs"


def train(strategy: str, steps: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    model, opt = dzl.parallelize(model, strategy, optimizer=lambda p: torch.optim.AdamW(p, 3e-3))
    g = torch.Generator().manual_seed(dzl.rank())
    for step in range(steps):
        x = torch.randn(32, 32, generator=g)
        y = x[:, :10].argmax(dim=1)  # a learnable rule, so that the loss falls
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        dzl.emit("loss", step=step, loss=loss.item())


def main() -> None:
    OUT.mkdir(exist_ok=True)
    with dzl.LiveCluster(2, timeout=60.0) as cluster:
        for strategy in STRATEGIES:
            if strategy == "local" or strategy not in AVAILABLE:
                continue
            job = cluster.submit(train, strategy, 40)
            job.wait()
            job.save_events(OUT / f"{strategy}.jsonl")
            dzl.Dashboard.from_events(OUT / f"{strategy}.jsonl").save(OUT / f"{strategy}.png")
            print("recorded", strategy, len(job.events), "events")


if __name__ == "__main__":
    main()
