"""The split dataset every data path serves (``SplitDataset``).

Batch format (other code relies on it), one dict per item:

* ``image``: float32 ``[3, H, W]``, normalised with the datamodule's mean/std,
* ``label``: int64 scalar,
* ``object_mask``: bool ``[H, W]`` (all False when the dataset has no object masks),
* ``cue_mask``: bool ``[H, W]`` (all False when no cue was stamped on this item),
* ``index``: int64 scalar, the index within its split dataset.

Per item: uint8 -> ``[0, 1]`` float -> augmentation (train only; image and object mask
jointly) -> spurious cue -> normalisation.

Its own module because both data paths need it: ``base.py`` builds the ``classic`` path
on it and ``fast.py`` copies it to the device. With it in ``base.py``, ``base`` and
``fast`` imported each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .cue import SpuriousCue, check_split


class SplitDataset(Dataset):
    """One split held in memory as uint8, served in the project's batch format.

    Args:
        images: uint8 ``[N, 3, H, W]``.
        labels: int64 ``[N]``.
        object_masks: bool ``[N, H, W]``, or None when the data has none.
        split: ``train``, ``val`` or ``test`` (picks the cue probability).
        mean: per-channel mean used for normalisation.
        std: per-channel std used for normalisation.
        cue: the spurious cue to stamp, or None.
        flip: random horizontal flips (image and object mask together).
        crop_padding: random crops of the original size after padding this many pixels
            (reflect) on every side; 0 disables.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        object_masks: Tensor | None,
        split: str,
        mean: Sequence[float],
        std: Sequence[float],
        cue: SpuriousCue | None = None,
        flip: bool = False,
        crop_padding: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{labels.numel()} labels for {images.shape[0]} images")
        if object_masks is not None and object_masks.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(
                f"object masks {tuple(object_masks.shape)} do not match images {tuple(images.shape)}"
            )
        self.images = images
        self.labels = labels.long()
        self.object_masks = object_masks
        self.split = check_split(split)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.cue = cue
        self.flip = flip
        self.crop_padding = crop_padding
        if cue is not None:
            cue.check_fits(*images.shape[2:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def _augment(self, image: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Random crop and flip from the global RNG (seeded per worker by the DataLoader)."""
        p = self.crop_padding
        if p > 0:
            h, w = image.shape[-2:]
            top, left = (int(t) for t in torch.randint(0, 2 * p + 1, (2,)))
            image = F.pad(image.unsqueeze(0), (p, p, p, p), mode="reflect")[0]
            image = image[:, top : top + h, left : left + w]
            if mask is not None:
                # Reflect the mask too, so object pixels mirrored into the border stay marked.
                padded = F.pad(mask[None, None].float(), (p, p, p, p), mode="reflect")[0, 0]
                mask = padded[top : top + h, left : left + w] > 0.5
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            mask = None if mask is None else mask.flip(-1)
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a {self.split} split of {len(self)}")
        image = self.images[index].float().div_(255.0)
        label = self.labels[index]
        mask = None if self.object_masks is None else self.object_masks[index]
        if self.split == "train":
            image, mask = self._augment(image, mask)
        return make_item(image, label, index, self.split, self.cue, self.mean, self.std, mask)


def make_item(
    image01: Tensor,
    label: Tensor,
    index: int,
    split: str,
    cue: SpuriousCue | None,
    mean: Tensor,
    std: Tensor,
    object_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """One item in the format above from a ``[3, H, W]`` image in ``[0, 1]`` after its
    geometric transforms: the cue stamped (if any), then normalised with ``mean``/``std``."""
    h, w = image01.shape[-2:]
    mask = torch.zeros(h, w, dtype=torch.bool) if object_mask is None else object_mask.clone()
    if cue is not None:
        image01, cue_mask = cue.apply(image01, label, index, split)
    else:
        cue_mask = torch.zeros(h, w, dtype=torch.bool)
    return {
        "image": (image01 - mean) / std,
        "label": label.clone(),
        "object_mask": mask,
        "cue_mask": cue_mask,
        "index": torch.tensor(index, dtype=torch.long),
    }
