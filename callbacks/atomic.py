"""Lightning's checkpoint writer on top of the project's one atomic writer.

The writer itself (temporary file beside the target, fsync, rename) lives in
:mod:`explain.records`, because ``explain`` may not import Lightning and the report and the
monitor's maps need it too.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from explain.records import atomic_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with :func:`explain.records.atomic_save` for local paths.

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
