"""The split dataset every data path serves (``SplitDataset``).

Batch format (other code relies on it), one dict per item:

* ``image``: float32 ``[3, H, W]``, normalised with the datamodule's mean/std,
* ``label``: int64 scalar,
* ``object_mask``: bool ``[H, W]`` (all False when the dataset has no object masks),
* ``cue_mask``: bool ``[H, W]`` (all False when no cue was stamped on this item),
* ``index``: int64 scalar, the index within its split dataset.

Per item: uint8 -> ``[0, 1]`` float -> augmentation (train only; image and object mask
jointly) -> spurious cue -> normalisation.

Augmentation is a function of ``(seed, epoch, index)`` only (:func:`augment_draws`), never
of the global RNG: the training loaders ask for an :class:`ItemKey` (index, epoch, seed), so
a resumed run, a run with another number of workers and the fast path (which draws from
the same function) all see the same crop and flip for an image in an epoch. A plain index
means epoch 0 with seed 0.

Its own module because both data paths need it: ``base.py`` builds the ``classic`` path
on it and ``fast.py`` copies it to the device. With it in ``base.py``, ``base`` and
``fast`` imported each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .cue import SpuriousCue, check_split, derive_seed


class ItemKey(NamedTuple):
    """What a training loader asks a dataset for: item ``index`` as augmented in ``epoch``
    of a run whose augmentation is seeded with ``seed``."""

    index: int
    epoch: int
    seed: int


def item_key(key: int | Tensor | ItemKey) -> ItemKey:
    """``key`` as an :class:`ItemKey`; a plain index is epoch 0 of seed 0."""
    if isinstance(key, ItemKey):
        return ItemKey(int(key.index), int(key.epoch), int(key.seed))
    return ItemKey(int(key), 0, 0)


def augment_draws(
    seed: int, epoch: int, n: int, crop_padding: int, flip: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The crops and flips of one epoch for ``n`` items, indexed by dataset index.

    Returns int64 ``tops`` and ``lefts`` in ``0..2 * crop_padding`` and bool ``flips``
    (all False without ``flip``), drawn on the CPU from a private generator seeded with
    ``(seed, epoch)``. Per dataset index, not per position in the order, so an image gets
    the same crop in an epoch whatever the order, the number of workers or processes. Both
    data paths draw from here (the seed's label is the fast path's, where it began, so its
    runs repeat the earlier ones).
    """
    g = torch.Generator().manual_seed(derive_seed("fast-augment", seed, epoch))
    tops = torch.randint(0, 2 * crop_padding + 1, (n,), generator=g)
    lefts = torch.randint(0, 2 * crop_padding + 1, (n,), generator=g)
    flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return tops, lefts, flips


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
        self._draws: tuple[tuple[int, ...], tuple[Tensor, Tensor, Tensor]] | None = None
        if cue is not None:
            cue.check_fits(*images.shape[2:])

    #: The classic training loader may ask for :class:`ItemKey` items (see ``classic.py``).
    item_keys = True

    def __len__(self) -> int:
        return self.images.shape[0]

    def draws(self, epoch: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`augment_draws` of ``epoch`` for this split, kept for the epoch in use (each
        worker process works them out once per epoch)."""
        key = (seed, epoch, len(self), self.crop_padding, bool(self.flip))
        if self._draws is None or self._draws[0] != key:
            self._draws = (key, augment_draws(seed, epoch, len(self), self.crop_padding,
                                              self.flip))
        return self._draws[1]

    def _augment(
        self, image: Tensor, mask: Tensor | None, key: ItemKey
    ) -> tuple[Tensor, Tensor | None]:
        """Crop and flip item ``key.index`` as drawn for its epoch (:meth:`draws`)."""
        p = self.crop_padding
        if p <= 0 and not self.flip:
            return image, mask
        tops, lefts, flips = self.draws(key.epoch, key.seed)
        if p > 0:
            h, w = image.shape[-2:]
            top, left = int(tops[key.index]), int(lefts[key.index])
            image = F.pad(image.unsqueeze(0), (p, p, p, p), mode="reflect")[0]
            image = image[:, top : top + h, left : left + w]
            if mask is not None:
                # Reflect the mask too, so object pixels mirrored into the border stay marked.
                padded = F.pad(mask[None, None].float(), (p, p, p, p), mode="reflect")[0, 0]
                mask = padded[top : top + h, left : left + w] > 0.5
        if self.flip and bool(flips[key.index]):
            image = image.flip(-1)
            mask = None if mask is None else mask.flip(-1)
        return image, mask

    def __getitem__(self, key: int | ItemKey) -> dict[str, Tensor]:
        """Item ``key``: an index, or an :class:`ItemKey` (its epoch's augmentation)."""
        key = item_key(key)
        index = key.index
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a {self.split} split of {len(self)}")
        image = self.images[index].float().div_(255.0)
        label = self.labels[index]
        mask = None if self.object_masks is None else self.object_masks[index]
        if self.split == "train":
            image, mask = self._augment(image, mask, key)
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
