"""The explanations folder and atomic file writes: the one owner of both.

The explanation monitor saves, beside a run's logs::

    <log_dir>/explanations/fixed_images.pt   the fixed images, once per run
    <log_dir>/explanations/epoch_NNNN.pt     one record per explained epoch (maps, scores)

and ``audit.py`` reads them back for the evolution section. Both sides go through this
module, so the names are spelled here only. Every file is a dict of tensors and
primitives, readable with ``torch.load(weights_only=True)``.

Every file this project writes (maps, checkpoints, reports, predictions) goes through
:func:`atomic_write_bytes` or :func:`atomic_save`: a temporary file beside the target,
fsync, rename. A crash leaves the previous file or none, never a truncated one.

Torch only (no Lightning, no matplotlib), like the rest of ``explain``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypedDict

import torch

EXPLANATIONS_DIR = "explanations"
FIXED_IMAGES_FILE = "fixed_images.pt"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")

PathLike = str | os.PathLike


class FixedImagesRecord(TypedDict):
    """``fixed_images.pt``: the images the monitor explains every epoch."""

    indices: torch.Tensor  # [N] int64, indices into the validation split
    images: torch.Tensor  # [N, 3, H, W] uint8, denormalised
    labels: torch.Tensor  # [N] int64
    object_mask: torch.Tensor  # [N, H, W] bool, or empty when the data has none
    cue_mask: torch.Tensor  # [N, H, W] bool, or empty when the data has no cue
    class_names: list[str]
    methods: list[str]


class EpochRecord(TypedDict):
    """``epoch_NNNN.pt``: one explained epoch."""

    epoch: int
    global_step: int
    indices: torch.Tensor  # [N] int64, the same as the fixed images'
    labels: torch.Tensor  # [N] int64
    probs: torch.Tensor  # [N, K] float32 softmax of the model at that epoch
    # method -> [N, K, H, W] float16 raw maps (zeros for classes not explained), or beyond
    # explain.ALL_CLASSES_MAX classes with only some explained, [N, T, H, W] with their
    # classes in map_classes (zero-filled, 1,000 classes of 30 images at 224 x 224 took 3 GB
    # an epoch and method): read either with record_class_maps.
    maps: dict[str, torch.Tensor]
    map_classes: dict[str, torch.Tensor]  # method -> [N, T] int64; absent when dense
    scalars: dict[str, dict[str, float]]  # method -> {"cue_energy/biased": ..., ...}
    nan_maps: dict[str, int]  # method -> fixed images whose map was not finite
    explained: str  # "all", or the class mode whose classes alone were explained
    # Why (monitor's explain_classes and the class count); absent in earlier records.
    explained_rule: str


def class_maps(maps: torch.Tensor, classes: torch.Tensor | None,
               targets: torch.Tensor) -> torch.Tensor:
    """Each image's map of class ``targets[i]``: ``[N, H, W]``.

    ``maps`` is ``[N, K, H, W]`` (every class, ``classes`` None) or ``[N, T, H, W]`` with
    the class of each map in ``classes [N, T]``; a class without a map gives zeros.
    """
    rows = torch.arange(len(targets))
    targets = targets.long().cpu()
    if classes is None:
        return maps[rows, targets]
    hit = classes.long().cpu() == targets[:, None]  # [N, T]
    picked = maps[rows, hit.long().argmax(1)]
    return torch.where(hit.any(1)[:, None, None], picked, torch.zeros_like(picked))


def record_class_maps(record: dict[str, Any], method: str, targets: torch.Tensor) -> torch.Tensor:
    """:func:`class_maps` of one method in an epoch record (either layout)."""
    return class_maps(record["maps"][method], record.get("map_classes", {}).get(method), targets)


# -- atomic writes --------------------------------------------------------------------------


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0)  # elsewhere the only way to read it is to set it (and put it back)
    os.umask(mask)
    return mask


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable; a no-op where directories can't be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over
    ``path``. On any exception (Ctrl-C included) the temporary file is removed and the
    previous ``path``, if any, is left as it was."""
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    # Beside the target, not in /tmp: a rename is only atomic within one filesystem.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        # mkstemp makes the file private (0600); give it the permissions open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temporary file, fsync, rename)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


# -- the explanations folder ----------------------------------------------------------------


def explanations_dir(log_dir: PathLike) -> Path:
    """``<log_dir>/explanations``: where the monitor keeps a run's maps."""
    return Path(log_dir) / EXPLANATIONS_DIR


def fixed_images_path(log_dir: PathLike) -> Path:
    """``<log_dir>/explanations/fixed_images.pt``."""
    return explanations_dir(log_dir) / FIXED_IMAGES_FILE


def epoch_path(log_dir: PathLike, epoch: int) -> Path:
    """``<log_dir>/explanations/epoch_NNNN.pt`` (four digits at least, zero-padded)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return explanations_dir(log_dir) / f"epoch_{epoch:04d}.pt"


def epoch_paths(log_dir: PathLike) -> list[Path]:
    """The saved epoch files, in epoch order (numeric, so epoch 10000 follows 9999)."""
    folder = explanations_dir(log_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_fixed_images(log_dir: PathLike, record: FixedImagesRecord) -> Path:
    """Write ``fixed_images.pt`` unless the run already has one; return its path.

    The first one wins: a resumed run explains the same images, so rewriting it would only
    risk a different rendering of them.
    """
    path = fixed_images_path(log_dir)
    if not path.exists():
        atomic_save(dict(record), path)
    return path


def save_epoch(log_dir: PathLike, record: EpochRecord) -> Path:
    """Write ``epoch_NNNN.pt`` for ``record["epoch"]`` (replacing it); return its path."""
    path = epoch_path(log_dir, int(record["epoch"]))
    atomic_save(dict(record), path)
    return path


def load_monitor_records(
    log_dir: PathLike,
) -> tuple[FixedImagesRecord, list[EpochRecord]] | None:
    """The monitor's saved maps: ``(fixed images record, epoch records in epoch order)``.

    None when the run saved no ``fixed_images.pt``. Files are read with
    ``weights_only=True``; an unreadable epoch file is skipped with a warning (a run killed
    mid-write leaves no partial file, but a copied folder might hold one).
    """
    fixed_path = fixed_images_path(log_dir)
    if not fixed_path.is_file():
        return None
    fixed = torch.load(fixed_path, map_location="cpu", weights_only=True)
    epochs: list[EpochRecord] = []
    for path in epoch_paths(log_dir):
        try:
            epochs.append(torch.load(path, map_location="cpu", weights_only=True))
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            warnings.warn(f"skipping unreadable monitor file {path}: {exc}", UserWarning,
                          stacklevel=2)
    epochs.sort(key=lambda r: int(r.get("epoch", 0)))
    return fixed, epochs
