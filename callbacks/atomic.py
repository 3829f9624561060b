"""Writing files so that a crash never leaves a truncated one under the final name."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    The rename is atomic on one filesystem, which is why the temporary file sits beside the
    target rather than in ``/tmp``. A crash mid-write leaves the previous file (or none),
    never a truncated one, and no temporary file behind.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with :func:`atomic_save` for local paths.

    Lightning's own writer goes through an fsspec transaction whose temporary file lives in
    the system temp folder; where that is another filesystem than the run directory, the
    final move is a copy, and a kill during it leaves a truncated checkpoint. ``train.py``
    installs this writer; remote paths (``s3://...``) keep Lightning's.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        get_filesystem(path)  # same validation of the path as Lightning's writer
        atomic_save(checkpoint, str(path))
