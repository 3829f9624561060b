"""Backbones adapted to 32x32 inputs, each split into ``features`` and ``head``.

Both backbones expose the same small interface that the explanation engine uses:

* ``features(x)``: input -> the activation map of the default explanation layer,
* ``head(a)``: that activation -> logits (global average pooling and one Linear layer),
* ``default_layer``: the qualified name of the module whose output ``features`` returns,
* ``classifier``: the Linear layer after global average pooling (what CAM reads).

Because everything after the default layer is "GAP + Linear", CAM applies to both and the
engine can re-run only the head when it perturbs the last conv map.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn
from torchvision import models

BACKBONES: dict[str, Callable[..., SplitBackbone]] = {}


def register_backbone(name: str) -> Callable:
    """Register a backbone factory under ``name`` (refuses duplicates)."""

    def wrap(fn: Callable) -> Callable:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = fn
        return fn

    return wrap


def build_backbone(name: str, **kwargs) -> SplitBackbone:
    """Build a registered backbone; an unknown name lists the valid ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)


class SplitBackbone(nn.Module):
    """A classifier made of a conv trunk, global average pooling and one Linear layer."""

    default_layer: str = ""
    in_channels: int = 3
    # Smallest input side the forward accepts (ResNet-18-CIFAR takes any: its strided convs
    # are padded; each VGG max-pool halves the side and fails below 1x1).
    min_input_size: int = 1

    def __init__(self, trunk: nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Input images -> the last conv activation map ``[B, C, h, w]``."""
        return self.trunk(x)

    def head(self, a: torch.Tensor) -> torch.Tensor:
        """Last conv activation map -> logits ``[B, num_classes]``."""
        return self.classifier(torch.flatten(self.pool(a), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _load_imagenet_state_dict(weights: models.WeightsEnum) -> dict[str, torch.Tensor]:
    """Fetch torchvision ImageNet weights: hub cache if present, else download.

    Without network and without the cached file, the error names the file and the cache
    directory so the user can copy the file there by hand.
    """
    filename = os.path.basename(weights.url)
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        # weights_only=True inside torchvision: a weights file can not run code.
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # URLError, socket errors, HTTP errors all land here
        raise RuntimeError(
            f"could not load pretrained weights {weights}: {exc.__class__.__name__}: {exc}.\n"
            f"Without network, put the file {filename!r} (from {weights.url}) into "
            f"{cache_dir!r} (the torch hub cache; set TORCH_HOME to move it), or use "
            "pretrained=False."
        ) from exc


class ResNet18Cifar(SplitBackbone):
    """torchvision ResNet-18 with a 3x3 stride-1 conv1 and no max-pool (layer4 is 4x4 at 32x32)."""

    default_layer = "trunk.layer4"

    def __init__(self, num_classes: int = 10, pretrained: bool = False) -> None:
        net = models.resnet18(weights=None)
        if pretrained:
            net.load_state_dict(_load_imagenet_state_dict(models.ResNet18_Weights.IMAGENET1K_V1))
            # The ImageNet 7x7 stride-2 kernels are resampled to 3x3 (area average), which
            # keeps their colour/edge selectivity; a random 3x3 kernel would throw it away.
            w7 = net.conv1.weight.detach()
            w3 = nn.functional.adaptive_avg_pool2d(w7, 3) * (49 / 9) ** 0.5
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if pretrained:
            with torch.no_grad():
                net.conv1.weight.copy_(w3)
        trunk = nn.Sequential()
        for name in ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer4"):
            trunk.add_module(name, getattr(net, name))
        super().__init__(trunk, 512, num_classes)
        # The new classifier keeps PyTorch's default (Kaiming-uniform) initialisation.


class VGG16GAP(SplitBackbone):
    """VGG16 conv stack with the last two max-pools removed, then GAP and one Linear layer.

    At 32x32 input the three remaining pools leave a 4x4 map (VGG16 keeps all five and ends
    at 1x1, where a heatmap has one pixel). Nothing sits between GAP and the classifier, so
    CAM (Zhou et al. 2016) applies.
    """

    default_layer = ""  # set per instance: the final ReLU of the trunk

    def __init__(
        self, num_classes: int = 10, pretrained: bool = False, batch_norm: bool = True
    ) -> None:
        if batch_norm:
            net = models.vgg16_bn(weights=None)
            weights = models.VGG16_BN_Weights.IMAGENET1K_V1
        else:
            net = models.vgg16(weights=None)
            weights = models.VGG16_Weights.IMAGENET1K_V1
        if pretrained:
            net.load_state_dict(_load_imagenet_state_dict(weights))
        layers = list(net.features.children())
        pool_idx = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        drop = set(pool_idx[-2:])  # pool4 and pool5: 32 -> 16 -> 8 -> 4 with the first three
        trunk = nn.Sequential(*[m for i, m in enumerate(layers) if i not in drop])
        super().__init__(trunk, 512, num_classes)
        self.min_input_size = 2 ** sum(isinstance(m, nn.MaxPool2d) for m in trunk)
        self.default_layer = f"trunk.{len(trunk) - 1}"  # the final ReLU


@register_backbone("resnet18_cifar")
def resnet18_cifar(num_classes: int = 10, pretrained: bool = False) -> ResNet18Cifar:
    """CIFAR-adapted ResNet-18; default explanation layer ``trunk.layer4``."""
    return ResNet18Cifar(num_classes=num_classes, pretrained=pretrained)


@register_backbone("vgg16_gap")
def vgg16_gap(
    num_classes: int = 10, pretrained: bool = False, batch_norm: bool = True
) -> VGG16GAP:
    """VGG16 conv stack + GAP + Linear; default explanation layer: the last ReLU."""
    return VGG16GAP(num_classes=num_classes, pretrained=pretrained, batch_norm=batch_norm)
