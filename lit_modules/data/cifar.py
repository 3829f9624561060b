"""CIFAR-10 from torchvision's pickles, an ImageFolder tree, or a (fail-fast) download.

Two on-disk layouts are recognised under ``root``:

* torchvision's ``cifar-10-batches-py`` folder (``root`` may hold it or be it),
* an ImageFolder tree ``root/train/<class>/*`` and ``root/test/<class>/*`` (any classes;
  images of another size are resized to 32x32).

With neither, torchvision downloads CIFAR-10 into ``root`` (when ``download`` is on).
Validation is a seeded split of the training set; the test split is never touched.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets import CIFAR10
from tqdm.auto import tqdm

from .base import BaseImageDataModule, SplitDataset
from .cue import derive_seed

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TORCHVISION_FOLDER = "cifar-10-batches-py"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Socket timeout while downloading: without network a connect or read gives up after this
# long instead of hanging (torchvision's urlopen sets no timeout of its own).
DOWNLOAD_TIMEOUT_S = 20.0
_IMAGE_SIZE = 32


def find_cifar10(root: str | Path) -> tuple[str, Path] | None:
    """Detect the layout under ``root``: ``("torchvision", parent_of_batches)``,
    ``("imagefolder", root)`` or None when neither is there."""
    root = Path(root).expanduser()
    if (root / TORCHVISION_FOLDER).is_dir():
        return "torchvision", root
    if root.name == TORCHVISION_FOLDER and root.is_dir():
        return "torchvision", root.parent
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "imagefolder", root
    return None


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def imagefolder_classes(root: Path) -> list[str]:
    """Class names of an ImageFolder root: the sorted folders of ``train/``."""
    classes = _class_dirs(root / "train")
    if not classes:
        raise RuntimeError(f"no class folders in {(root / 'train').resolve()}")
    extra = sorted(set(_class_dirs(root / "test")) - set(classes))
    if extra:
        raise RuntimeError(f"{(root / 'test').resolve()} has classes not in train/: {extra}")
    return classes


@dataclass
class _Part:
    """The train or test part on disk: labels now, images loaded only for chosen indices."""

    labels: Tensor
    load: Callable[[Tensor], Tensor]  # indices -> uint8 [n, 3, 32, 32]


def _decode_files(files: list[Path], desc: str) -> Tensor:
    """Decode image files into one uint8 ``[n, 3, 32, 32]`` tensor (a progress bar if many)."""
    # PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29.
    out = np.empty((len(files), _IMAGE_SIZE, _IMAGE_SIZE, 3), dtype=np.uint8)
    for i, path in enumerate(tqdm(files, desc=desc, unit="img", disable=len(files) < 1000)):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image.size != (_IMAGE_SIZE, _IMAGE_SIZE):
                    image = image.resize((_IMAGE_SIZE, _IMAGE_SIZE), Image.Resampling.BILINEAR)
                out[i] = np.asarray(image)
        except OSError as err:  # a corrupt file must name itself
            raise RuntimeError(f"could not decode image {path}: {err}") from err
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _imagefolder_part(root: Path, part: str, classes: list[str]) -> _Part:
    folder = root / part
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        files += found
        labels += [label] * len(found)
    if not files:
        raise RuntimeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder.resolve()}")

    def load(indices: Tensor) -> Tensor:
        chosen = [files[i] for i in indices.tolist()]
        return _decode_files(chosen, desc=f"decoding {folder}")

    return _Part(torch.tensor(labels, dtype=torch.long), load)


def _torchvision_part(root: Path, part: str) -> tuple[_Part, list[str]]:
    try:
        ds = CIFAR10(str(root), train=part == "train", download=False)
    except RuntimeError as err:
        raise RuntimeError(
            f"CIFAR-10 at {(root / TORCHVISION_FOLDER).resolve()} is incomplete or corrupt "
            f"({err}). Delete that folder and run with network access to download it again, "
            "or pass --data.root pointing at a good copy."
        ) from err
    data = ds.data  # numpy uint8 [N, 32, 32, 3]

    def load(indices: Tensor) -> Tensor:
        return torch.from_numpy(data[indices.numpy()]).permute(0, 3, 1, 2).contiguous()

    return _Part(torch.tensor(ds.targets, dtype=torch.long), load), list(ds.classes)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


class CIFAR10DataModule(BaseImageDataModule):
    """CIFAR-10 (or any ImageFolder with ``train/`` and ``test/``) with a seeded val split.

    Train items are augmented with a reflect-padded random crop (padding 4) and a horizontal
    flip, then get the cue, then are normalised with the CIFAR-10 mean/std (also used for a
    custom ImageFolder). There are no object masks.

    Args:
        root: a folder holding ``cifar-10-batches-py`` (or that folder itself), an
            ImageFolder root with ``train/`` and ``test/``, or where to download to.
        download: download CIFAR-10 with torchvision when no local copy is found.
        val_size: training images held out for validation.
        split_seed: seed of the train/val split, the ``limit_*`` subsets and the training
            loader's shuffling.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        augment: random crop and flip on train.
        cue_classes: classes that get the spurious cue; None means no cue.
        cue_size: side of the cue patch in pixels.
        cue_color: RGB colour of the patch in ``[0, 1]``.
        cue_position: ``top_left``, ``top_right``, ``bottom_left``, ``bottom_right``,
            ``center`` or ``random``.
        cue_p_train: probability that a train item of a cue class carries the patch.
        cue_p_eval: the same for validation and test items.
        cue_seed: seed of the per-item cue draws.
        limit_train: keep a seeded subset of this many train images (CPU smoke runs).
        limit_val: the same for validation.
        limit_test: the same for test.
        data_path: ``classic`` (DataLoader) or ``fast`` (the split on the training device,
            augmented in batches there; ignores ``num_workers``).
        drop_last: drop the last training batch when it is smaller than ``batch_size``.
    """

    mean = CIFAR10_MEAN
    std = CIFAR10_STD
    has_object_masks = False

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 2,
        augment: bool = True,
        cue_classes: list[int] | None = None,
        cue_size: int = 4,
        cue_color: tuple[float, float, float] = (1.0, 0.0, 1.0),
        cue_position: str = "top_left",
        cue_p_train: float = 0.95,
        cue_p_eval: float = 0.95,
        cue_seed: int = 0,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        data_path: str = "classic",
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            cue_classes=cue_classes,
            cue_size=cue_size,
            cue_color=cue_color,
            cue_position=cue_position,
            cue_p_train=cue_p_train,
            cue_p_eval=cue_p_eval,
            cue_seed=cue_seed,
            loader_seed=split_seed,
            data_path=data_path,
            drop_last=drop_last,
        )
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        for split, limit in limits.items():
            if limit is not None and limit < 1:
                raise ValueError(f"limit_{split} must be positive or None, got {limit}")
        if self.cue is not None:
            self.cue.check_fits(_IMAGE_SIZE, _IMAGE_SIZE)
        self.root = root
        self.download = download
        self.val_size = val_size
        self.split_seed = split_seed
        self.augment = augment
        self.limits = limits
        self.layout: str | None = None  # "torchvision" or "imagefolder" once located
        self._class_names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        """CIFAR-10's classes, or the class folders of an ImageFolder root."""
        if self._class_names is None:
            found = find_cifar10(self.root)
            if found is None:
                return list(CIFAR10_CLASSES)  # what a download would bring
            layout, path = found
            names = imagefolder_classes(path) if layout == "imagefolder" else CIFAR10_CLASSES
            self._class_names = list(names)
        return self._class_names

    def _not_found(self, reason: str) -> RuntimeError:
        root = Path(self.root).expanduser().resolve()
        return RuntimeError(
            f"no CIFAR-10 found at {root} (looked for {TORCHVISION_FOLDER} and train/ + test/ "
            f"ImageFolder), and {reason}. To fix: run once with network access (download=True), "
            f"or pass --data.root pointing at an existing copy (either layout: a folder holding "
            f"{TORCHVISION_FOLDER}, or one with train/ and test/ folders of class folders)."
        )

    def _locate(self) -> tuple[str, Path]:
        """Find the local copy, downloading it first if allowed and needed."""
        found = find_cifar10(self.root)
        if found is None:
            if not self.download:
                raise self._not_found("the download is disabled (download=False)")
            try:
                with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                    CIFAR10(str(Path(self.root).expanduser()), train=True, download=True)
            except Exception as err:  # no network, timeout, bad checksum: all end the same
                raise self._not_found(f"the download failed ({type(err).__name__}: {err})") from err
            found = find_cifar10(self.root)
            if found is None:  # pragma: no cover - torchvision extracts where it says
                raise self._not_found("the download left no readable copy")
        self.layout = found[0]
        return found

    def prepare_data(self) -> None:
        """Download if needed (Lightning calls this on one process only)."""
        self._locate()

    def _load_part(self, layout: str, path: Path, part: str) -> _Part:
        if layout == "imagefolder":
            return _imagefolder_part(path, part, self.class_names)
        loaded, classes = _torchvision_part(path, part)
        self._class_names = classes
        return loaded

    def _limit(self, indices: Tensor, split: str) -> Tensor:
        """A seeded subset of ``limit_<split>`` indices (sorted, for locality on disk)."""
        limit = self.limits[split]
        if limit is None or limit >= indices.numel():
            return indices
        g = torch.Generator().manual_seed(derive_seed("limit", self.split_seed, split))
        return indices[torch.randperm(indices.numel(), generator=g)[:limit]].sort().values

    def _make(self, part: _Part, indices: Tensor, split: str) -> SplitDataset:
        augment = self.augment and split == "train"
        return SplitDataset(
            part.load(indices),
            part.labels[indices],
            None,
            split=split,
            mean=self.mean,
            std=self.std,
            cue=self.cue,
            flip=augment,
            crop_padding=4 if augment else 0,
        )

    def _build(self, splits: list[str]) -> dict[str, SplitDataset]:
        layout, path = self._locate()
        out: dict[str, SplitDataset] = {}
        if "train" in splits or "val" in splits:
            part = self._load_part(layout, path, "train")
            n = part.labels.numel()
            if self.val_size >= n:
                raise ValueError(f"val_size={self.val_size} leaves no training images out of {n}")
            g = torch.Generator().manual_seed(self.split_seed)
            perm = torch.randperm(n, generator=g)
            chosen = {"val": perm[: self.val_size], "train": perm[self.val_size :]}
            for split in ("train", "val"):
                if split in splits:
                    indices = self._limit(chosen[split].sort().values, split)
                    out[split] = self._make(part, indices, split)
        if "test" in splits:
            part = self._load_part(layout, path, "test")
            indices = self._limit(torch.arange(part.labels.numel()), "test")
            out["test"] = self._make(part, indices, "test")
        return out
