"""CIFAR-10 from torchvision's pickles, an ImageFolder tree, or a (fail-fast) download.

Two on-disk layouts are recognised under ``root``:

* torchvision's ``cifar-10-batches-py`` folder (``root`` may hold it or be it),
* an ImageFolder tree ``root/train/<class>/*`` and ``root/test/<class>/*`` (any classes;
  images of another size are resized to 32x32).

With neither, torchvision downloads CIFAR-10 into ``root`` (when ``download`` is on).
Validation is a seeded split of the training set; the test split is never touched.

The batch files of ``cifar-10-batches-py`` are pickles, and ``pickle.load`` (which
torchvision's ``CIFAR10`` uses) runs whatever code a crafted file asks for. They are read
here instead by checking each file's MD5 against the sums torchvision publishes, then
unpickling with :class:`BatchUnpickler`, which only rebuilds numpy arrays and containers.
"""

from __future__ import annotations

import codecs
import contextlib
import pickle
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity
from tqdm.auto import tqdm

from .base import BaseImageDataModule
from .choices import DataPath, SplitName
from .cue import CueConfig
from .sampling import check_limits, limit_indices
from .split import SplitDataset

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
# The files of a complete cifar-10-batches-py and their MD5 sums (torchvision's list).
BATCH_FILES: dict[str, list[tuple[str, str]]] = {
    "train": [(name, md5) for name, md5 in CIFAR10.train_list],
    "test": [(name, md5) for name, md5 in CIFAR10.test_list],
}


# How to get the data, said by every "not found" or "corrupt" error.
_HOW_TO_GET = (
    "To fix: run once with network access (download=True) to download CIFAR-10, or pass "
    "--data.root pointing at an existing copy (either layout: a folder holding "
    f"{TORCHVISION_FOLDER}, or one with train/ and test/ folders of class folders)."
)


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


def imagefolder_classes(root: Path, how_to_fix: str = _HOW_TO_GET) -> list[str]:
    """Class names of an ImageFolder root: the sorted folders of ``train/``.

    ``how_to_fix`` ends the error for a root without class folders (the CIFAR-10 module
    suggests a download; the ImageFolder module must not).
    """
    classes = _class_dirs(root / "train")
    if not classes:
        raise RuntimeError(
            f"no class folders in {(root / 'train').resolve()}: an ImageFolder root needs "
            "train/<class>/<image> and test/<class>/<image> (e.g. train/cat/0001.png). "
            + how_to_fix
        )
    extra = sorted(set(_class_dirs(root / "test")) - set(classes))
    if extra:
        raise RuntimeError(f"{(root / 'test').resolve()} has classes not in train/: {extra}")
    return classes


@dataclass
class _Part:
    """The train or test part on disk: labels now, images loaded only for chosen indices."""

    labels: Tensor
    load: Callable[[Tensor], Tensor]  # indices -> uint8 [n, 3, 32, 32]


def read_rgb(path: Path) -> Image.Image:
    """Decode one image file to an RGB PIL image; a bad file raises an error naming it."""
    # PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29.
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() loads the pixels: the file can close
    # PIL reports unreadable files as OSError (UnidentifiedImageError, "truncated"),
    # some broken chunks as SyntaxError or ValueError: all mean this file is bad.
    except (OSError, SyntaxError, ValueError) as err:
        raise RuntimeError(
            f"could not decode image {path} ({type(err).__name__}: {err}). Every file "
            f"with an image extension ({', '.join(IMAGE_EXTENSIONS)}) under train/ and "
            "test/ must be a readable image: delete or replace this one."
        ) from err


def _decode_files(files: list[Path], desc: str) -> Tensor:
    """Decode image files into one uint8 ``[n, 3, 32, 32]`` tensor (a progress bar if many)."""
    out = np.empty((len(files), _IMAGE_SIZE, _IMAGE_SIZE, 3), dtype=np.uint8)
    for i, path in enumerate(tqdm(files, desc=desc, unit="img", disable=len(files) < 1000)):
        image = read_rgb(path)
        if image.size != (_IMAGE_SIZE, _IMAGE_SIZE):
            image = image.resize((_IMAGE_SIZE, _IMAGE_SIZE), Image.Resampling.BILINEAR)
        out[i] = np.asarray(image)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def imagefolder_files(root: Path, part: str, classes: list[str]) -> tuple[list[Path], Tensor]:
    """The image files of ``root/part/<class>/`` (sorted) and their int64 labels."""
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
    return files, torch.tensor(labels, dtype=torch.long)


def _imagefolder_part(root: Path, part: str, classes: list[str]) -> _Part:
    folder = root / part
    files, labels = imagefolder_files(root, part, classes)

    def load(indices: Tensor) -> Tensor:
        chosen = [files[i] for i in indices.tolist()]
        return _decode_files(chosen, desc=f"decoding {folder}")

    return _Part(labels, load)


# Numpy's array-rebuilding functions, taken from numpy itself so the names are right for
# the installed version (a pickle names them as numpy.core.* or numpy._core.*).
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it for bytes, and no other codec."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing codec {encoding!r} in a CIFAR-10 batch")
    return codecs.encode(text, "latin1")


class BatchUnpickler(pickle.Unpickler):
    """Unpickle a CIFAR-10 batch, refusing anything but numpy arrays and plain containers.

    Pickles reach code only through ``find_class`` (a global the file names, which is then
    called); only the few numpy globals needed to rebuild an array are resolved, so a
    crafted file fails with ``UnpicklingError`` before its payload can run.
    """

    _SAFE = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # pickles from numpy < 2
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,  # how protocol 2 writes bytes from Python 3
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._SAFE[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a CIFAR-10 batch holds only numpy arrays and lists"
            ) from None


def _corrupt(path: Path, problem: str) -> RuntimeError:
    return RuntimeError(
        f"CIFAR-10 file {path} {problem}. Delete {path.parent} and run with network access "
        "(download=True) to download it again, or pass --data.root pointing at a good copy."
    )


def read_batch(path: Path, md5: str | None = None) -> tuple[Tensor, Tensor]:
    """One ``cifar-10-batches-py`` file -> uint8 images ``[N, 3, 32, 32]``, labels ``[N]``.

    Checks, in order: the file exists, its MD5 (when given), that it unpickles safely
    (:class:`BatchUnpickler`) and that it holds ``data`` ``[N, 3072]`` uint8 and ``N``
    labels in 0..9. Each failure names the file and how to get a good copy.
    """
    if not path.is_file():
        raise _corrupt(path, "is missing (a complete copy has data_batch_1..5 and test_batch)")
    if md5 is not None and not check_integrity(str(path), md5):
        raise _corrupt(path, f"is corrupt or truncated (its MD5 is not CIFAR-10's {md5})")
    try:
        with open(path, "rb") as f:
            # latin1: the original batches were written by Python 2 (as torchvision reads them).
            entry = BatchUnpickler(f, encoding="latin1").load()
    except Exception as err:  # truncation shows up as EOFError, ValueError, UnpicklingError...
        raise _corrupt(path, f"could not be read ({type(err).__name__}: {err})") from err
    if not isinstance(entry, dict):
        raise _corrupt(path, f"holds a {type(entry).__name__}, not a CIFAR-10 batch dict")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data, labels = entry.get("data"), entry.get("labels")
    pixels = 3 * _IMAGE_SIZE * _IMAGE_SIZE
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == pixels
    ):
        shape = getattr(data, "shape", type(data).__name__)
        raise _corrupt(path, f"has 'data' {shape}, expected uint8 [N, 3072]")
    try:
        targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    except (TypeError, ValueError) as err:
        raise _corrupt(path, f"has unreadable 'labels' ({err})") from err
    if targets.shape != (data.shape[0],):
        raise _corrupt(path, f"has labels {tuple(targets.shape)} for {data.shape[0]} images")
    if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < 10):
        raise _corrupt(path, "has labels outside 0..9")
    images = torch.from_numpy(data.reshape(-1, 3, _IMAGE_SIZE, _IMAGE_SIZE).copy())
    return images, targets


def _torchvision_part(root: Path, part: str) -> _Part:
    folder = root / TORCHVISION_FOLDER
    loaded = [read_batch(folder / name, md5) for name, md5 in BATCH_FILES[part]]
    images = torch.cat([im for im, _ in loaded])
    labels = torch.cat([lb for _, lb in loaded])

    def load(indices: Tensor) -> Tensor:
        return images[indices].contiguous()

    return _Part(labels, load)


def _describe(root: Path) -> str:
    """What is at ``root``, for error messages: missing, empty, or its first entries."""
    if not root.exists():
        return "the folder does not exist"
    entries = sorted(p.name for p in root.iterdir())
    if not entries:
        return "the folder is empty"
    shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
    return f"it holds: {shown}"


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

    An ImageFolder root is shrunk to 32x32 here, as CIFAR-10 is. For your own images at
    their own size (224 by default, ImageNet or computed statistics, files decoded per
    item) use :class:`lit_modules.data.ImageFolderDataModule` instead.

    Bad data stops ``prepare_data``/``setup`` with a ``RuntimeError`` that names the path,
    what was expected there and how to get the data: a missing or empty root (after the
    download, if allowed, failed), a root that is a file, an ImageFolder with ``train/``
    but no ``test/`` (or the reverse; never "fixed" by downloading into it), no class
    folders, a missing, truncated or tampered ``cifar-10-batches-py`` file (MD5 checked,
    then unpickled with :class:`BatchUnpickler`, which cannot run code). An ImageFolder
    image that cannot be decoded raises too, naming the file, rather than being skipped:
    skipping would shift the seeded train/val split and the monitor's fixed images
    between runs, which is worse than one clear error.

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
        cue: a spurious cue to stamp (see ``CueConfig``), or None for no cue.
        limit_train: keep a seeded subset of this many train images (CPU smoke runs).
        limit_val: the same for validation.
        limit_test: the same for test.
        data_path: ``classic`` (DataLoader) or ``fast`` (the split on the training device,
            augmented in batches there; ignores ``num_workers``).
        drop_last: drop the last training batch when it is smaller than ``batch_size``.
        predict_split: the split ``train.py predict`` predicts: ``test`` or ``val``.
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
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        limits = check_limits(limit_train, limit_val, limit_test)
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
            f"no CIFAR-10 found at {root} ({_describe(root)}; looked for {TORCHVISION_FOLDER} "
            f"and a train/ + test/ ImageFolder), and {reason}. " + _HOW_TO_GET
        )

    def _check_root(self) -> None:
        """Refuse roots no download can fix: a file, or an ImageFolder missing a split.

        A half ImageFolder must not trigger a download: torchvision's copy would land
        beside the user's images and silently be used instead of them.
        """
        root = Path(self.root).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise RuntimeError(f"data root {root} is a file, not a folder. " + _HOW_TO_GET)
        has = {part: (root / part).is_dir() for part in ("train", "test")}
        if has["train"] != has["test"] and not (root / TORCHVISION_FOLDER).is_dir():
            present, absent = ("train", "test") if has["train"] else ("test", "train")
            raise RuntimeError(
                f"ImageFolder root {root} has {present}/ but no {absent}/ folder: expected "
                f"both {root / 'train'}/<class>/<image> and {root / 'test'}/<class>/<image> "
                f"(the same class folder names). Add {root / absent}, or pass --data.root "
                f"pointing at a complete copy (or at a folder holding {TORCHVISION_FOLDER})."
            )

    def _locate(self) -> tuple[str, Path]:
        """Find the local copy, downloading it first if allowed and needed."""
        self._check_root()
        found = find_cifar10(self.root)
        if found is None:
            if not self.download:
                raise self._not_found("the download is disabled (download=False)")
            try:
                # Safe to let torchvision unpickle here: it checks every file's MD5 first.
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
        self._class_names = list(CIFAR10_CLASSES)
        return _torchvision_part(path, part)

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
                    indices = limit_indices(chosen[split].sort().values, self.limits[split],
                                            self.split_seed, split)
                    out[split] = self._make(part, indices, split)
        if "test" in splits:
            part = self._load_part(layout, path, "test")
            indices = limit_indices(torch.arange(part.labels.numel()),
                                    self.limits["test"], self.split_seed, "test")
            out["test"] = self._make(part, indices, "test")
        return out
