"""The model the strategy benchmarks share: an MLP of about 4.2 M parameters (17 MB of float32),
four 1024-wide layers and a 10-way head, the same initial values on every rank."""

from __future__ import annotations

import torch
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(1024, 10))
