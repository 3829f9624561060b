"""LightningModules, DataModules and backbones."""

from .backbones import BACKBONES, VGG16GAP, ResNet18Cifar, SplitBackbone, build_backbone
from .classifier import ImageClassifier, unpack_batch

__all__ = [
    "BACKBONES",
    "ImageClassifier",
    "ResNet18Cifar",
    "SplitBackbone",
    "VGG16GAP",
    "build_backbone",
    "unpack_batch",
]
