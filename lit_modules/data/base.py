"""The LightningDataModule base shared by the project's datamodules.

Items and batches follow the format documented in ``split.py`` (``SplitDataset``).

Two data paths serve these batches (the datamodules' ``data_path``): ``classic``, a
``DataLoader`` over ``SplitDataset`` items (worker processes, per-item augmentation; the
training loader is ``classic.py``'s), and ``fast`` (``fast.py``), the whole split on the
training device with batched augmentation, the same values and no workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .classic import epoch_loader
from .cue import SPLITS, CueConfig, SpuriousCue, check_split
from .fast import DeviceLoader, DeviceSplit
from .split import SplitDataset

DATA_PATHS = ("classic", "fast")


class BaseImageDataModule(L.LightningDataModule):
    """Loaders, cue options and (de)normalisation shared by the project's datamodules.

    Subclasses set ``mean``, ``std``, ``has_object_masks`` and ``class_names`` and implement
    ``_build(splits)`` returning a ``SplitDataset`` for each requested split.

    Args:
        batch_size: images per batch.
        num_workers: DataLoader worker processes (workers persist between epochs).
        cue: a spurious cue to stamp (see ``CueConfig``), or None for no cue.
        loader_seed: seed of the training loader's order and of its crops and flips (both
            paths draw them from ``(loader_seed, epoch, index)`` only).
        data_path: ``classic`` (DataLoader, per-item augmentation on the CPU) or ``fast``
            (the split held on the training device, augmented in batches there; ignores
            ``num_workers``). See ``lit_modules/data/fast.py``.
        drop_last: drop the last training batch when it is smaller than ``batch_size``.
        predict_split: the split ``train.py predict`` predicts: ``test`` or ``val`` (the
            training split is augmented, so it is not offered).
    """

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    has_object_masks: bool = False

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        cue: CueConfig | None = None,
        loader_seed: int = 0,
        data_path: str = "classic",
        drop_last: bool = False,
        predict_split: str = "test",
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
        if predict_split not in ("val", "test"):
            raise ValueError(f"predict_split must be 'val' or 'test', got {predict_split!r}")
        self.predict_split = predict_split
        self._device_splits: dict[tuple[str, str], DeviceSplit] = {}
        # Built here (not in setup) so a bad cue option fails when the config is parsed. A
        # mapping is accepted too: audit.py rebuilds datamodules from a YAML-loaded config.
        config = CueConfig.coerce(cue)
        self.cue: SpuriousCue | None = None if config is None else SpuriousCue.from_config(config)
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
                    f"cue.classes {bad} out of range for {self.num_classes} classes "
                    f"({self.class_names})"
                )

    def setup(self, stage: str | None = None) -> None:
        """Build the splits the stage needs (each once): fit -> train+val, test -> test."""
        wanted = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": [self.predict_split],
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
        replicas, rank = self._replicas()
        return DeviceLoader(
            self.device_split(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.loader_seed,
            drop_last=self.drop_last and split == "train",
            num_replicas=replicas,
            rank=rank,
        )

    def _replicas(self) -> tuple[int, int]:
        """(processes, this one's rank): each process takes its share of the training data
        itself (Lightning shards only DataLoaders with a sampler it knows)."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, split: str, shuffle: bool) -> DataLoader | DeviceLoader:
        if self.data_path == "fast":
            return self._fast_loader(split, shuffle)
        workers = {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }
        if shuffle:
            # Order and augmentation from (loader_seed, epoch, index), resumable mid-epoch
            # (classic.py): a resumed run trains on what the uninterrupted one did.
            replicas, rank = self._replicas()
            return epoch_loader(self.dataset(split), self.batch_size, self.loader_seed,
                                drop_last=self.drop_last and split == "train",
                                num_replicas=replicas, rank=rank, **workers)
        return DataLoader(self.dataset(split), batch_size=self.batch_size, shuffle=False,
                          drop_last=self.drop_last and split == "train", **workers)

    def train_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader(self.predict_split, shuffle=False)

    def normalize(self, images01: Tensor) -> Tensor:
        """``[0, 1]`` images ``[..., 3, H, W]`` -> the model's input space."""
        return normalize_with(images01, self.mean, self.std)

    def denormalize(self, images: Tensor) -> Tensor:
        """Model inputs ``[..., 3, H, W]`` -> ``[0, 1]`` images (exact inverse, no clamping)."""
        return denormalize_with(images, self.mean, self.std)


def _stats(like: Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Mean and std shaped to broadcast over ``[..., 3, H, W]``, in ``like``'s dtype/device."""
    as_tensor = {"dtype": like.dtype, "device": like.device}
    return (torch.tensor(mean, **as_tensor).view(3, 1, 1),
            torch.tensor(std, **as_tensor).view(3, 1, 1))


def normalize_with(images01: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel of ``[..., 3, H, W]`` images in ``[0, 1]``."""
    m, s = _stats(images01, mean, std)
    return (images01 - m) / s


def denormalize_with(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The exact inverse of :func:`normalize_with` (no clamping)."""
    m, s = _stats(images, mean, std)
    return images * s + m
