"""The monitor's fixed images: which validation images, their batch, their record.

The choice is a pure function of ``(labels, seed, sizes)``, so every DDP rank picks the
same images with no communication, and a resumed run keeps the ones it saved.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from lit_modules.data.protocol import is_auditable
from lit_modules.data.sampling import dataset_labels, sample_batch, stratified_indices


def val_dataset(trainer: L.Trainer) -> Any:
    """The validation split: the datamodule's ``dataset("val")`` where it is
    :class:`~lit_modules.data.protocol.AuditableData`, else the val loader's."""
    dm = trainer.datamodule
    if is_auditable(dm):
        return dm.dataset("val")
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
    return loader.dataset


def pick(labels: Tensor, num_images: int, per_class: int, seed: int) -> list[int]:
    """The fixed images: ``num_images`` for the grid, grown to ``per_class`` a class for
    shortcut discovery. Stratified round robin, so the first ``num_images`` are the same
    with or without discovery."""
    n = max(num_images, per_class * len(torch.unique(labels)))
    return stratified_indices(labels, n, seed)


def pick_from(dataset: Any, num_images: int, per_class: int, seed: int) -> list[int]:
    """:func:`pick` over a dataset's labels (read without decoding images where it can)."""
    return pick(dataset_labels(dataset), num_images, per_class, seed)


def load(dataset: Any, indices: list[int]) -> dict[str, Tensor]:
    """The fixed images' batch (on the CPU; the monitor keeps it and moves a copy)."""
    return sample_batch(dataset, indices)


def class_names(trainer: L.Trainer, num_classes: int) -> list[str]:
    """The datamodule's class names, or the class indices as strings when it has none
    (or a different number)."""
    names = list(getattr(trainer.datamodule, "class_names", None) or [])
    return names if len(names) == num_classes else [str(c) for c in range(num_classes)]


def denormalize(trainer: L.Trainer, images: Tensor) -> Tensor:
    """Images in ``[0, 1]``: the datamodule's ``denormalize`` where it is
    :class:`~lit_modules.data.protocol.AuditableData`, else each image stretched to its
    own range."""
    dm = trainer.datamodule
    if is_auditable(dm):
        return dm.denormalize(images).clamp(0, 1)
    lo = images.amin((1, 2, 3), keepdim=True)
    hi = images.amax((1, 2, 3), keepdim=True)
    return (images - lo) / (hi - lo).clamp_min(1e-12)


def record(trainer: L.Trainer, indices: list[int], batch: dict[str, Tensor],
           methods: list[str]) -> dict[str, Any]:
    """What :func:`explain.records.save_fixed_images` writes: the images as uint8, labels,
    masks, class names and the monitored methods."""
    dm = trainer.datamodule
    return {
        "indices": torch.tensor(indices),
        "images": (denormalize(trainer, batch["image"]).cpu() * 255).round().byte(),
        "labels": batch["label"].cpu(),
        "object_mask": batch.get("object_mask", torch.zeros(0)).cpu(),
        "cue_mask": batch.get("cue_mask", torch.zeros(0)).cpu(),
        "class_names": list(getattr(dm, "class_names", []) or []),
        "methods": list(methods),
    }
