"""Your own images at their own size: an ImageFolder datamodule (``ImageFolderDataModule``).

Files are decoded one item at a time (a 224x224 split is far too large to hold decoded),
then go through the usual ImageNet-style transforms (torchvision.transforms.v2):

* train: ``RandomResizedCrop(image_size)`` and a horizontal flip,
* val/test: ``Resize(round(image_size * 256 / 224))`` then ``CenterCrop(image_size)``,

then get the spurious cue (after the geometry, so it lands where it is configured), then
are normalised. Items follow ``SplitDataset``'s format (``split.py``); there are no object
masks.

Normalisation is stated, not guessed: ImageNet's mean/std by default (every torchvision
weight expects it), explicit ``mean``/``std``, or ``computed`` on a seeded subset of the
training split. The values used are logged once and kept in the datamodule's
``state_dict()``, which Lightning stores in every checkpoint; ``lit_modules.loading``
restores it when ``audit.py`` rebuilds the datamodule, so an audit uses the values the
model was trained with even if the folder has changed since.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .base import BaseImageDataModule
from .choices import DataPath, SplitName
from .cifar import IMAGE_EXTENSIONS, imagefolder_classes, imagefolder_files, read_rgb
from .cue import CueConfig, SpuriousCue, check_split, derive_seed
from .sampling import check_limits, limit_indices
from .split import ItemKey, SplitDataset, item_key, make_item

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("imagenet", "computed")
# The fast path holds a whole split decoded on the device: fine for 32-64 px images, not
# for 224 px ones (a 50,000-image split is 7.5 GB of uint8 at 224, 0.6 GB at 64).
FAST_PATH_MAX_SIZE = 64

_HOW_TO_FIX = (
    "To fix: pass --data.init_args.root pointing at a folder with train/<class>/<image> and "
    "test/<class>/<image> (the same class folder names in both)."
)


def resize_size(image_size: int) -> int:
    """The short side images are resized to before the centre crop (ImageNet's 256/224)."""
    return round(image_size * 256 / 224)


def train_transform(image_size: int) -> v2.Compose:
    """Random resized crop to ``image_size`` and a horizontal flip (torch's CPU RNG, which
    ``ImageFileDataset`` seeds per item and epoch)."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, antialias=True),
        v2.RandomHorizontalFlip(),
    ])


def eval_transform(image_size: int) -> v2.Compose:
    """Resize the short side to ``resize_size(image_size)``, then centre-crop (deterministic)."""
    return v2.Compose([
        v2.Resize(resize_size(image_size), antialias=True),
        v2.CenterCrop(image_size),
    ])


class ImageFileDataset(Dataset):
    """Image files decoded per item, served in ``SplitDataset``'s item format.

    Per item: decode (RGB) -> ``transform`` on uint8 -> ``[0, 1]`` -> spurious cue ->
    normalisation. ``labels`` is exposed so sampling never decodes images to stratify.
    On train, the transform's random draws come from torch's CPU RNG seeded with the
    item's ``(seed, epoch, index)`` (an ``ItemKey``; a plain index is epoch 0, seed 0), the
    global state restored afterwards: the same crop for a resumed run or another worker.

    Args:
        files: one image file per item.
        labels: int64 ``[N]``.
        split: ``train``, ``val`` or ``test`` (picks the cue probability).
        transform: maps a uint8 ``[3, H, W]`` image to ``[3, S, S]``.
        mean: per-channel mean used for normalisation.
        std: per-channel std used for normalisation.
        cue: the spurious cue to stamp, or None.
    """

    def __init__(
        self,
        files: Sequence[Path],
        labels: Tensor,
        split: str,
        transform: Callable[[Tensor], Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        cue: SpuriousCue | None = None,
    ) -> None:
        if labels.shape != (len(files),):
            raise ValueError(f"{labels.numel()} labels for {len(files)} files")
        self.files = list(files)
        self.labels = labels.long()
        self.split = check_split(split)
        self.transform = transform
        self.set_stats(mean, std)
        self.cue = cue

    def set_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Normalise with ``mean``/``std`` from now on (a checkpoint's values replace these)."""
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Tensor:
        """Item ``index`` decoded and transformed: uint8 ``[3, S, S]``, no cue."""
        return self.transform(TF.pil_to_tensor(read_rgb(self.files[index])))

    def clean01(self, indices: Sequence[int]) -> Tensor:
        """``[n, 3, S, S]`` images in ``[0, 1]`` without the cue (the counterfactual's base).

        Deterministic on val/test only: train items get a fresh random crop each call.
        """
        return torch.stack([self.load(int(i)) for i in indices]).float().div_(255.0)

    #: The classic training loader may ask for ``ItemKey`` items (see ``classic.py``).
    item_keys = True

    def __getitem__(self, key: int | ItemKey) -> dict[str, Tensor]:
        key = item_key(key)
        index = key.index
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a {self.split} split of {len(self)}")
        if self.split == "train":
            with torch.random.fork_rng(devices=[]):  # the CPU generator only, restored
                torch.default_generator.manual_seed(
                    derive_seed("item-augment", key.seed, key.epoch, index))
                image = self.load(index)
        else:
            image = self.load(index)
        image = image.float().div_(255.0)
        return make_item(image, self.labels[index], index, self.split, self.cue, self.mean,
                         self.std)


def channel_stats(images: Iterable[Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std over every pixel of uint8 ``[3, H, W]`` images.

    Sums are float64 so a large subset does not lose precision.
    """
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for image in images:
        x = image.to(torch.float64).div_(255.0).flatten(1)
        total += x.sum(1)
        squares += (x * x).sum(1)
        count += x.shape[1]
    if count == 0:
        raise ValueError("channel_stats needs at least one image")
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _check_stats(name: str, values: Sequence[float] | None) -> tuple[float, float, float] | None:
    if values is None:
        return None
    if len(values) != 3:
        raise ValueError(f"{name} needs one value per RGB channel (3), got {list(values)}")
    if name == "std" and any(v <= 0 for v in values):
        raise ValueError(f"std values must be positive, got {list(values)}")
    return (float(values[0]), float(values[1]), float(values[2]))


class ImageFolderDataModule(BaseImageDataModule):
    """Your own images, ``root/train/<class>/*`` and ``root/test/<class>/*``, at ``image_size``.

    Validation is a seeded split of ``train/`` (``val_size``); ``test/`` is never touched.
    Train items get ``RandomResizedCrop(image_size)`` and a horizontal flip; val/test items
    ``Resize(round(image_size * 256 / 224))`` and ``CenterCrop(image_size)``; the cue is
    stamped after them. Files are decoded per item on the classic path. An image that cannot
    be decoded raises an error naming the file (skipping it would shift the seeded split).

    ``data_path: fast`` (the whole split decoded once on the training device, see
    ``fast.py``) is for small images only: it is refused above 64 px, where a split no longer
    fits comfortably in device memory (a 50,000-image split is 7.5 GB at 224). On it, images
    are decoded once at the eval transforms and train augmentation is the fast path's
    reflect-padded random crop (``image_size // 8`` pixels) and flip, not a resized crop.

    Args:
        root: the folder holding ``train/`` and ``test/``.
        image_size: side of the square images the model sees, in pixels.
        normalization: ``imagenet`` (ImageNet's mean/std, what every torchvision weight
            expects; the default unless ``mean``/``std`` are given) or ``computed`` (per-channel
            mean/std of ``stats_images`` seeded training images at the eval transforms).
        mean: explicit per-channel mean (with ``std``; not with ``normalization``).
        std: explicit per-channel std (with ``mean``).
        stats_images: training images the ``computed`` statistics are taken over.
        val_size: training images held out for validation: a count, or a fraction below 1.
        split_seed: seed of the train/val split, the ``limit_*`` subsets, the statistics'
            subset and the training loader's shuffling.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (decoding happens there).
        augment: random resized crop and flip on train (else train gets the eval transforms).
        cue: a spurious cue to stamp (see ``CueConfig``), or None for no cue.
        limit_train: keep a seeded subset of this many train images (CPU smoke runs).
        limit_val: the same for validation.
        limit_test: the same for test.
        data_path: ``classic`` (DataLoader, files decoded per item) or ``fast`` (at most 64 px).
        drop_last: drop the last training batch when it is smaller than ``batch_size``.
        predict_split: the split ``train.py predict`` predicts: ``test`` or ``val``.
    """

    has_object_masks = False

    def __init__(
        self,
        root: str = "data/images",
        image_size: int = 224,
        normalization: str | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        stats_images: int = 1000,
        val_size: int | float = 0.1,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 4,
        augment: bool = True,
        cue: CueConfig | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        data_path: DataPath = "classic",
        drop_last: bool = False,
        predict_split: SplitName = "test",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            cue=cue,
            loader_seed=split_seed,
            data_path=data_path,
            drop_last=drop_last,
            predict_split=predict_split,
        )
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        if data_path == "fast" and image_size > FAST_PATH_MAX_SIZE:
            raise ValueError(
                f"data_path='fast' holds every image of a split decoded on the training device, "
                f"which is meant for small images (at most {FAST_PATH_MAX_SIZE} px); at "
                f"image_size={image_size} a split would take {3 * image_size**2} bytes an image "
                "of device memory. Use data_path: classic (files decoded per item by "
                "DataLoader workers)."
            )
        mean_t, std_t = _check_stats("mean", mean), _check_stats("std", std)
        if (mean_t is None) != (std_t is None):
            raise ValueError("give both mean and std (explicit normalisation), or neither")
        if normalization is not None and normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {list(NORMALIZATIONS)} (or give mean and std), "
                f"got {normalization!r}"
            )
        if normalization is not None and mean_t is not None:
            raise ValueError(
                f"normalization={normalization!r} and explicit mean/std contradict each other: "
                "give one or the other"
            )
        if stats_images < 1:
            raise ValueError(f"stats_images must be positive, got {stats_images}")
        if val_size < 0 or (isinstance(val_size, float) and val_size >= 1):
            raise ValueError(f"val_size must be a count >= 0 or a fraction in [0, 1), got {val_size}")
        limits = check_limits(limit_train, limit_val, limit_test)
        if self.cue is not None:
            self.cue.check_fits(image_size, image_size)
        self.root = root
        self.image_size = image_size
        self.stats_images = stats_images
        self.val_size = val_size
        self.split_seed = split_seed
        self.augment = augment
        self.limits = limits
        self._class_names: list[str] | None = None
        # The statistics in use and where they come from, resolved at most once.
        self._normalization: str = "explicit" if mean_t is not None else normalization or "imagenet"
        self._stats_used: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self._stats_source = ""
        if mean_t is not None and std_t is not None:
            self._set_stats(mean_t, std_t, "explicit mean/std")
        elif self._normalization == "imagenet":
            self._set_stats(IMAGENET_MEAN, IMAGENET_STD, "ImageNet's")

    # -- normalisation ----------------------------------------------------------------------

    def _set_stats(self, mean: Sequence[float], std: Sequence[float], source: str) -> None:
        self._stats_used = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
        self._stats_source = source
        rank_zero_info(
            f"{type(self).__name__}: normalising with mean {list(self._stats_used[0])} and std "
            f"{list(self._stats_used[1])} ({source})"
        )

    def _resolved_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self._stats_used is None:  # only "computed" gets here, once
            mean, std, n = self._compute_stats()
            self._set_stats(mean, std, f"computed on {n} training images at the eval transforms")
        assert self._stats_used is not None
        return self._stats_used

    @property
    def mean(self) -> tuple[float, ...]:  # type: ignore[override]
        """Per-channel mean in use (computed on first use for ``normalization: computed``)."""
        return self._resolved_stats()[0]

    @property
    def std(self) -> tuple[float, ...]:  # type: ignore[override]
        """Per-channel std in use."""
        return self._resolved_stats()[1]

    @property
    def normalization_used(self) -> dict[str, Any]:
        """What normalises the images: ``normalization``, ``source``, ``mean`` and ``std``."""
        mean, std = self._resolved_stats()
        return {"normalization": self._normalization, "source": self._stats_source,
                "mean": list(mean), "std": list(std)}

    def _compute_stats(self) -> tuple[tuple[float, ...], tuple[float, ...], int]:
        files, labels = self._files("train")
        train = self._split_indices(labels.numel())["train"]
        g = torch.Generator().manual_seed(derive_seed("stats", self.split_seed))
        chosen = train[torch.randperm(train.numel(), generator=g)[: self.stats_images]].sort().values
        transform = eval_transform(self.image_size)
        images = (transform(TF.pil_to_tensor(read_rgb(files[i]))) for i in chosen.tolist())
        mean, std = channel_stats(images)
        return mean, std, chosen.numel()

    def state_dict(self) -> dict[str, Any]:
        """The normalisation in use (Lightning keeps this in every checkpoint)."""
        used = self.normalization_used
        return {"normalization": used["normalization"], "mean": used["mean"], "std": used["std"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Normalise with a checkpoint's statistics (also in datasets already built)."""
        mean, std = _check_stats("mean", state_dict["mean"]), _check_stats("std", state_dict["std"])
        assert mean is not None and std is not None
        self._normalization = str(state_dict.get("normalization", self._normalization))
        self._set_stats(mean, std, f"{self._normalization}, from the checkpoint")
        for split in ("train", "val", "test"):
            ds = getattr(self, f"{split}_set")
            if isinstance(ds, ImageFileDataset):
                ds.set_stats(mean, std)
            elif isinstance(ds, SplitDataset):
                ds.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
                ds.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._device_splits.clear()  # device copies hold the old statistics

    # -- files and splits -------------------------------------------------------------------

    def _root(self) -> Path:
        root = Path(self.root).expanduser().resolve()
        if not root.is_dir():
            what = "is a file" if root.exists() else "does not exist"
            raise RuntimeError(f"ImageFolder root {root} {what}. " + _HOW_TO_FIX)
        missing = [part for part in ("train", "test") if not (root / part).is_dir()]
        if missing:
            raise RuntimeError(
                f"ImageFolder root {root} has no {' and no '.join(p + '/' for p in missing)} "
                f"folder (it holds: {', '.join(sorted(p.name for p in root.iterdir())) or 'nothing'}). "
                + _HOW_TO_FIX
            )
        return root

    @property
    def class_names(self) -> list[str]:
        """The class folders of ``train/``, sorted (label ``i`` is the ``i``-th)."""
        if self._class_names is None:
            self._class_names = imagefolder_classes(self._root(), _HOW_TO_FIX)
        return self._class_names

    def _files(self, part: str) -> tuple[list[Path], Tensor]:
        return imagefolder_files(self._root(), part, self.class_names)

    def _split_indices(self, n: int) -> dict[str, Tensor]:
        """The seeded train/val split of ``n`` training files (sorted indices)."""
        n_val = round(self.val_size * n) if isinstance(self.val_size, float) else self.val_size
        if n_val >= n:
            raise ValueError(f"val_size={self.val_size} leaves no training images out of {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        return {"val": perm[:n_val].sort().values, "train": perm[n_val:].sort().values}

    def _make(self, files: list[Path], labels: Tensor, split: str) -> Dataset:
        augment = self.augment and split == "train"
        mean, std = self._resolved_stats()
        if self.data_path == "fast":
            # Decoded once at the eval transforms; the fast path crops and flips on the device.
            transform = eval_transform(self.image_size)
            images = torch.stack([transform(TF.pil_to_tensor(read_rgb(f))) for f in files])
            return SplitDataset(images, labels, None, split=split, mean=mean, std=std,
                                cue=self.cue, flip=augment,
                                crop_padding=self.image_size // 8 if augment else 0)
        transform = train_transform(self.image_size) if augment else eval_transform(self.image_size)
        return ImageFileDataset(files, labels, split, transform, mean, std, self.cue)

    def _build(self, splits: list[str]) -> dict[str, Dataset]:  # type: ignore[override]
        out: dict[str, Dataset] = {}
        if "train" in splits or "val" in splits:
            files, labels = self._files("train")
            chosen = self._split_indices(labels.numel())
            for split in ("train", "val"):
                if split in splits:
                    idx = limit_indices(chosen[split], self.limits[split], self.split_seed,
                                        split)
                    out[split] = self._make([files[i] for i in idx.tolist()], labels[idx], split)
        if "test" in splits:
            files, labels = self._files("test")
            idx = limit_indices(torch.arange(labels.numel()), self.limits["test"],
                                self.split_seed, "test")
            out["test"] = self._make([files[i] for i in idx.tolist()], labels[idx], "test")
        return out


__all__ = [
    "FAST_PATH_MAX_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "channel_stats",
    "eval_transform",
    "resize_size",
    "train_transform",
]
