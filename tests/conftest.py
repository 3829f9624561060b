"""Test-wide settings: a fixed seed for every test."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread a worker: the workers already share the cores, and the tests' tiny
    # tensors gain nothing from a second thread that spins while it waits. The scripts the
    # tests start inherit it, so a run in a subprocess and its in-process reference add
    # their sums in the same order (a resumed run is compared bit for bit).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


class _TinyBlock(torch.nn.Module):
    """A residual block with ResNet's pitfalls: one in-place ReLU called twice, ``+=``."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(ch)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class TinyExplainNet(torch.nn.Module):
    """A seconds-cheap classifier for the explanation engine's tests.

    BatchNorm (running stats to protect), Dropout (RNG and train mode to protect), in-place
    ReLUs, a residual block, GAP + Linear. With ``split=True`` it declares the
    features/head split the engine uses (``default_layer = "block"``); without, the engine
    must hook the layer by name.
    """

    def __init__(self, num_classes: int = 5, split: bool = True, ch: int = 8) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, ch, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(ch),
            torch.nn.ReLU(inplace=True),
            torch.nn.MaxPool2d(2),
        )
        self.block = _TinyBlock(ch)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.drop = torch.nn.Dropout(0.5)
        self.classifier = torch.nn.Linear(ch, num_classes)
        if split:
            self.default_layer = "block"
            self.features = lambda x: self.block(self.stem(x))
            self.head = lambda a: self.classifier(self.drop(torch.flatten(self.pool(a), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.block(self.stem(x))
        return self.classifier(self.drop(torch.flatten(self.pool(a), 1)))


@pytest.fixture
def tiny_explain_net():
    """Factory: ``tiny_explain_net(seed=0, split=True, num_classes=5)`` -> TinyExplainNet."""

    def make(seed: int = 0, split: bool = True, num_classes: int = 5) -> TinyExplainNet:
        gen_state = torch.get_rng_state()
        torch.manual_seed(seed)
        net = TinyExplainNet(num_classes=num_classes, split=split)
        with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        torch.set_rng_state(gen_state)
        return net

    return make
