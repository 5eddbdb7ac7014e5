"""The environment `make test` builds: torch and torchvision match and work."""

import torch
import torchvision


def test_torchvision_resnet18_forward_and_backward():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    loss = model(x).logsumexp(dim=1).mean()
    loss.backward()
    assert model.fc.weight.grad is not None and torch.isfinite(model.fc.weight.grad).all()
    assert model.conv1.weight.grad.abs().sum() > 0
