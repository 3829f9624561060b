"""The split dataset every datamodule serves, and the shared LightningDataModule base.

Batch format (other code relies on it), one dict per item:

* ``image``: float32 ``[3, H, W]``, normalised with the datamodule's mean/std,
* ``label``: int64 scalar,
* ``object_mask``: bool ``[H, W]`` (all False when the dataset has no object masks),
* ``cue_mask``: bool ``[H, W]`` (all False when no cue was stamped on this item),
* ``index``: int64 scalar, the index within its split dataset.

Per item: uint8 -> ``[0, 1]`` float -> augmentation (train only; image and object mask
jointly) -> spurious cue -> normalisation.

Two data paths serve these batches (the datamodules' ``data_path``): ``classic``, a
``DataLoader`` over ``SplitDataset`` items (worker processes, per-item augmentation), and
``fast`` (``fast.py``), the whole split on the training device with batched augmentation,
the same values and no workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .cue import SPLITS, SpuriousCue, check_split
from .fast import DeviceLoader, DeviceSplit

DATA_PATHS = ("classic", "fast")


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
        h, w = image.shape[-2:]
        if mask is None:
            mask = torch.zeros(h, w, dtype=torch.bool)
        if self.cue is not None:
            image, cue_mask = self.cue.apply(image, label, index, self.split)
        else:
            cue_mask = torch.zeros(h, w, dtype=torch.bool)
        return {
            "image": (image - self.mean) / self.std,
            "label": label.clone(),
            "object_mask": mask.clone(),
            "cue_mask": cue_mask,
            "index": torch.tensor(index, dtype=torch.long),
        }


class BaseImageDataModule(L.LightningDataModule):
    """Loaders, cue options and (de)normalisation shared by the project's datamodules.

    Subclasses set ``mean``, ``std``, ``has_object_masks`` and ``class_names`` and implement
    ``_build(splits)`` returning a ``SplitDataset`` for each requested split.

    Args:
        batch_size: images per batch.
        num_workers: DataLoader worker processes (workers persist between epochs).
        cue_classes: classes that get the spurious cue; None means no cue.
        cue_size: side of the cue patch in pixels.
        cue_color: RGB colour of the patch in ``[0, 1]``.
        cue_position: ``top_left``, ``top_right``, ``bottom_left``, ``bottom_right``,
            ``center`` or ``random``.
        cue_p_train: probability that a train item of a cue class carries the patch.
        cue_p_eval: the same for validation and test items.
        cue_seed: seed of the per-item cue draws.
        loader_seed: seed of the training loader's shuffling (and, on the fast path, of its
            crops and flips).
        data_path: ``classic`` (DataLoader, per-item augmentation on the CPU) or ``fast``
            (the split held on the training device, augmented in batches there; ignores
            ``num_workers``). See ``lit_modules/data/fast.py``.
        drop_last: drop the last training batch when it is smaller than ``batch_size``.
    """

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    has_object_masks: bool = False

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        cue_classes: list[int] | None = None,
        cue_size: int = 4,
        cue_color: tuple[float, float, float] = (1.0, 0.0, 1.0),
        cue_position: str = "top_left",
        cue_p_train: float = 0.95,
        cue_p_eval: float = 0.95,
        cue_seed: int = 0,
        loader_seed: int = 0,
        data_path: str = "classic",
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if data_path not in DATA_PATHS:
            raise ValueError(f"data_path must be one of {list(DATA_PATHS)}, got {data_path!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.loader_seed = loader_seed
        self.data_path = data_path
        self.drop_last = drop_last
        self._device_splits: dict[tuple[str, str], DeviceSplit] = {}
        # Built here (not in setup) so a bad cue option fails when the config is parsed.
        self.cue: SpuriousCue | None = None
        if cue_classes is not None:
            self.cue = SpuriousCue(
                classes=cue_classes,
                size=cue_size,
                color=cue_color,
                position=cue_position,
                p_train=cue_p_train,
                p_eval=cue_p_eval,
                seed=cue_seed,
            )
        self.train_set: SplitDataset | None = None
        self.val_set: SplitDataset | None = None
        self.test_set: SplitDataset | None = None

    # -- to be provided by subclasses -------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    def _build(self, splits: list[str]) -> dict[str, SplitDataset]:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _check_cue_classes(self) -> None:
        """Refuse cue classes the data does not have (only knowable once classes are)."""
        if self.cue is not None:
            bad = [c for c in self.cue.classes if c >= self.num_classes]
            if bad:
                raise ValueError(
                    f"cue_classes {bad} out of range for {self.num_classes} classes "
                    f"({self.class_names})"
                )

    def setup(self, stage: str | None = None) -> None:
        """Build the splits the stage needs (each once): fit -> train+val, test -> test."""
        wanted = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": ["test"],
            None: list(SPLITS),
        }
        if stage not in wanted:
            raise ValueError(f"unknown stage {stage!r}; expected one of {list(wanted)}")
        missing = [s for s in wanted[stage] if getattr(self, f"{s}_set") is None]
        if not missing:
            return
        self._check_cue_classes()
        for split, ds in self._build(missing).items():
            setattr(self, f"{split}_set", ds)

    def dataset(self, split: str) -> SplitDataset:
        """The dataset of ``train``, ``val`` or ``test``, set up on first use."""
        check_split(split)
        if getattr(self, f"{split}_set") is None:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return getattr(self, f"{split}_set")

    def _device(self) -> torch.device:
        """The training device: the strategy's root device once a trainer is attached."""
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def device_split(self, split: str, device: torch.device | str | None = None) -> DeviceSplit:
        """``split`` held on ``device`` (default: the training device), copied there once."""
        dataset = self.dataset(split)
        device = torch.device(device) if device is not None else self._device()
        key = (split, str(device))
        held = self._device_splits.get(key)
        if held is None:
            held = DeviceSplit.from_dataset(dataset, device)
            self._device_splits[key] = held
        return held

    def _fast_loader(self, split: str, shuffle: bool) -> DeviceLoader:
        trainer = self.trainer
        # Each process takes its share (Lightning only shards real DataLoaders itself).
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return DeviceLoader(
            self.device_split(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.loader_seed,
            drop_last=self.drop_last and split == "train",
            num_replicas=replicas,
            rank=rank,
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader | DeviceLoader:
        if self.data_path == "fast":
            return self._fast_loader(split, shuffle)
        generator = torch.Generator().manual_seed(self.loader_seed) if shuffle else None
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=self.drop_last and split == "train",
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("test", shuffle=False)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std shaped to broadcast over ``[..., 3, H, W]``."""
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(3, 1, 1)
        return mean, std

    def normalize(self, images01: Tensor) -> Tensor:
        """``[0, 1]`` images ``[..., 3, H, W]`` -> the model's input space."""
        mean, std = self._stats(images01)
        return (images01 - mean) / std

    def denormalize(self, images: Tensor) -> Tensor:
        """Model inputs ``[..., 3, H, W]`` -> ``[0, 1]`` images (exact inverse, no clamping)."""
        mean, std = self._stats(images)
        return images * std + mean
