"""A small CNN backbone for the training-pipeline benchmarks.

On this CPU ResNet-18-CIFAR trains at about 40 images a second, so any per-step overhead
of the pipeline vanishes next to the model. A model about 50x cheaper makes the pipeline's
own cost visible. Importing this module registers it as ``bench_small``.
"""

from __future__ import annotations

from torch import nn

from lit_modules.backbones import BACKBONES, SplitBackbone, register_backbone

NAME = "bench_small"


def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class BenchSmall(SplitBackbone):
    """conv-BN-ReLU x 3 (32, 64, 128 channels; strides 1, 2, 2): an 8x8 map at 32x32,
    about 10 MMACs an image."""

    default_layer = "trunk"
    min_input_size = 4

    def __init__(self, num_classes: int = 10, pretrained: bool = False) -> None:
        trunk = nn.Sequential(*_block(3, 32, 1), *_block(32, 64, 2), *_block(64, 128, 2))
        super().__init__(trunk, 128, num_classes)


if NAME not in BACKBONES:
    register_backbone(NAME)(BenchSmall)
