"""Data for training and auditing: synthetic shapes, CIFAR-10, your own ImageFolder, and a
spurious-cue option.

Every dataset item is a dict: ``image`` float32 ``[3,H,W]`` (normalised), ``label`` int64,
``object_mask`` bool ``[H,W]``, ``cue_mask`` bool ``[H,W]`` and ``index`` int64 (the index
within its split dataset). The default collate turns them into batched tensors.
"""

from .base import DATA_PATHS, BaseImageDataModule
from .cifar import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10DataModule,
    find_cifar10,
)
from .cue import POSITIONS, SPLITS, CueConfig, SpuriousCue
from .fast import DeviceLoader, DeviceSplit, EpochSampler
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD, ImageFileDataset, ImageFolderDataModule
from .shapes import SHAPE_CLASSES, SyntheticShapes, generate_shapes
from .split import SplitDataset
from .synthetic import SyntheticShapesDataModule

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATA_PATHS",
    "POSITIONS",
    "SHAPE_CLASSES",
    "SPLITS",
    "BaseImageDataModule",
    "CIFAR10DataModule",
    "CueConfig",
    "DeviceLoader",
    "DeviceSplit",
    "EpochSampler",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "SplitDataset",
    "SpuriousCue",
    "SyntheticShapes",
    "SyntheticShapesDataModule",
    "find_cifar10",
    "generate_shapes",
]
