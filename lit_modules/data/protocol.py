"""What the audit and the explanation monitor read of a DataModule, declared once.

The project's datamodules (``BaseImageDataModule`` and its subclasses) and the Python
API's :class:`audit_report.api.UserData` provide it; ``tests/test_data_protocol.py``
checks both. Code that may also meet a foreign ``LightningDataModule`` (the monitor
attached to a user's own) asks :func:`is_auditable` once instead of probing member by
member, and falls back to the loaders when it says no.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from .cue import SpuriousCue


@runtime_checkable
class AuditableData(Protocol):
    """A DataModule as the audit and the monitor use it.

    Attributes:
        class_names: one name per class, in label order.
        has_object_masks: whether items carry ground-truth ``object_mask`` es.
        cue: the spurious cue stamped on the data, or None.
        mean, std: the per-channel normalisation of the images (None: the images are in
            ``[0, 1]`` already, as the Python API allows).
    """

    class_names: Sequence[str]
    has_object_masks: bool
    cue: SpuriousCue | None
    mean: Sequence[float] | None
    std: Sequence[float] | None

    def dataset(self, split: str) -> Any:
        """The map-style dataset of ``train``, ``val`` or ``test`` (items: the project's
        dicts with ``image``, ``label`` and optionally ``object_mask``, ``cue_mask``)."""
        ...

    def normalize(self, images01: Tensor) -> Tensor:
        """``[0, 1]`` images ``[..., 3, H, W]`` -> the model's input space."""
        ...

    def denormalize(self, images: Tensor) -> Tensor:
        """Model inputs ``[..., 3, H, W]`` -> ``[0, 1]`` images (no clamping)."""
        ...


#: The members :class:`AuditableData` declares.
MEMBERS: tuple[str, ...] = tuple(sorted(
    set(AuditableData.__annotations__)
    | {name for name, value in vars(AuditableData).items()
       if not name.startswith("_") and inspect.isfunction(value)}))


def is_auditable(obj: Any) -> bool:
    """``isinstance(obj, AuditableData)`` without evaluating any property.

    Python 3.11's protocol check reads every data member with ``hasattr``, which runs a
    property: an ImageFolder datamodule's ``class_names`` scans its folder and its
    ``mean`` may measure statistics over thousands of images. This looks the members up
    statically (as Python 3.12's check does).
    """
    if obj is None:
        return False
    missing = object()
    return all(inspect.getattr_static(obj, name, missing) is not missing for name in MEMBERS)
