"""The synthetic-shapes datamodule: the offline quickstart, with exact object masks."""

from __future__ import annotations

from .base import BaseImageDataModule
from .choices import DataPath, SplitName
from .cue import CueConfig
from .shapes import SHAPE_CLASSES, SyntheticShapes
from .split import SplitDataset


class SyntheticShapesDataModule(BaseImageDataModule):
    """Ten shape classes generated from a seed; no files, no network.

    Normalisation uses the fixed constants mean 0.5 and std 0.25 per channel rather than
    statistics of the generated images: colours are uniformly random, so every seed gives
    a per-channel mean of about 0.50 and a std of about 0.29 (measured on 2,000 images),
    and fixed constants keep a checkpoint's input scaling independent of the data seed.

    Args:
        num_train: training images.
        num_val: validation images.
        num_test: test images.
        image_size: side of the square images in pixels.
        seed: generation seed (each split also mixes in its name, so splits differ); it
            also seeds the training loader's shuffling.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        flip: random horizontal flips on train (image and object mask together).
        cue: a spurious cue to stamp (see ``CueConfig``), or None for no cue.
        data_path: ``classic`` (DataLoader) or ``fast`` (the split on the training device,
            augmented in batches there; ignores ``num_workers``).
        drop_last: drop the last training batch when it is smaller than ``batch_size``.
        predict_split: the split ``train.py predict`` predicts: ``test`` or ``val``.
    """

    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)
    has_object_masks = True

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 400,
        num_test: int = 400,
        image_size: int = 32,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        flip: bool = True,
        cue: CueConfig | None = None,
        data_path: DataPath = "classic",
        drop_last: bool = False,
        predict_split: SplitName = "test",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            cue=cue,
            loader_seed=seed,
            data_path=data_path,
            drop_last=drop_last,
            predict_split=predict_split,
        )
        for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if n < 1:
                raise ValueError(f"{name} must be positive, got {n}")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.image_size = image_size
        self.seed = seed
        self.flip = flip
        if self.cue is not None:
            self.cue.check_fits(image_size, image_size)

    @property
    def class_names(self) -> list[str]:
        return list(SHAPE_CLASSES)

    def _build(self, splits: list[str]) -> dict[str, SplitDataset]:
        out = {}
        for split in splits:
            shapes = SyntheticShapes(self.sizes[split], self.image_size, self.seed, split)
            out[split] = SplitDataset(
                shapes.images,
                shapes.labels,
                shapes.masks,
                split=split,
                mean=self.mean,
                std=self.std,
                cue=self.cue,
                flip=self.flip,
            )
        return out
