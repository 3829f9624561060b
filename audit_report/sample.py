"""The images an audit explains: a seeded, class-stratified sample of one split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import explain
from lit_modules.data.sampling import dataset_labels, sample_batch, stratified_indices
from lit_modules.loading import LoadedRun


@dataclass
class Sample:
    """The explained images and what is known about them."""

    split: str
    indices: list[int]
    images: Tensor  # normalised, [N, 3, H, W]
    images01: Tensor  # for display
    labels: Tensor
    object_masks: Tensor | None  # ground truth where the data has it
    cue_masks: Tensor | None  # where a cue was stamped on this image (empty if none)
    cue_regions: Tensor | None  # where the cue would sit on each image
    class_names: list[str]
    show: int  # images shown in the grids (one per class, in class order)


def make_sample(run: LoadedRun, split: str, n: int, seed: int) -> Sample:
    """A seeded, class-stratified sample of ``split`` from the run's datamodule."""
    dm = run.datamodule
    dataset = dm.dataset(split)
    indices = stratified_indices(dataset_labels(dataset), n, seed)
    batch = sample_batch(dataset, indices)
    images = batch["image"].float()
    h, w = images.shape[-2:]
    class_names = list(getattr(dm, "class_names", None) or [])
    labels = batch["label"].long()
    if not class_names:
        class_names = [str(c) for c in range(int(labels.max()) + 1)]
    masks = batch.get("object_mask") if getattr(dm, "has_object_masks", False) else None
    cue = getattr(dm, "cue", None)
    cue_masks = batch.get("cue_mask") if cue is not None else None
    regions = None
    if cue is not None:
        regions = torch.stack([cue.mask(h, w, i, split) for i in indices])
    images01 = dm.denormalize(images).clamp(0, 1) if hasattr(dm, "denormalize") else images
    # stratified_indices takes one image per class first, in class order: those are shown.
    show = min(len(indices), len(class_names), 10)
    return Sample(split, indices, images, images01, labels, masks, cue_masks, regions,
                  class_names, show)


def explained_classes(num_classes: int) -> str:
    """Which classes the audit's maps cover, in words (report and ``metrics.json``).

    The rule is :data:`explain.CLASS_SELECTION`'s.
    """
    return explain.CLASS_SELECTION.describe(num_classes)
