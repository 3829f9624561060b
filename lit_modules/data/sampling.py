"""Picking and stacking a few dataset items: the monitor's fixed images, the audit's sample,
and the seeded ``limit_<split>`` subsets of the datamodules.

The first two pick with :func:`stratified_indices` over :func:`dataset_labels` and stack with
:func:`sample_batch`, so the same ``(labels, n, seed)`` gives the same images everywhere
(and on every DDP rank, with no communication).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .cue import derive_seed

#: The splits a datamodule can limit (``limit_train``, ``limit_val``, ``limit_test``).
SPLITS = ("train", "val", "test")


def dataset_labels(dataset: Any) -> Tensor:
    """Labels ``[N]`` (int64) of a dataset, without decoding images where it exposes them
    (``labels`` or torchvision's ``targets``); else item by item."""
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr)).long()
    labels = []
    for i in range(len(dataset)):
        item = dataset[i]
        labels.append(int(item["label"] if isinstance(item, dict) else item[1]))
    return torch.tensor(labels, dtype=torch.long)


def stratified_indices(labels: Tensor, n: int, seed: int) -> list[int]:
    """``n`` indices spread evenly over the classes present, a function of the arguments only.

    Each class's indices are shuffled with ``seed``; then classes are taken round robin in
    class order (one of each class, then a second of each, ...), so the first ``K`` picks
    are one image per class and a class with few images just drops out when exhausted.
    Fewer than ``n`` come back only when the dataset has fewer items.
    """
    g = torch.Generator().manual_seed(seed)
    per_class = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        per_class.append(idx[torch.randperm(len(idx), generator=g)].tolist())
    picked: list[int] = []
    depth = 0
    while len(picked) < n and any(depth < len(p) for p in per_class):
        picked += [p[depth] for p in per_class if depth < len(p)][: n - len(picked)]
        depth += 1
    return picked


def sample_batch(dataset: Any, indices: list[int]) -> dict[str, Tensor]:
    """Stack the items at ``indices`` into one batch dict.

    Items in the project's dict format keep their tensor (and int) fields; ``(x, y)`` pairs
    become ``{"image", "label"}``. Non-tensor fields (e.g. strings) are dropped.
    """
    if len(indices) == 0:
        raise ValueError("sample_batch needs at least one index")
    items = [dataset[i] for i in indices]
    if not isinstance(items[0], dict):
        items = [{"image": it[0], "label": torch.as_tensor(it[1])} for it in items]
    return {
        k: torch.stack([torch.as_tensor(it[k]) for it in items])
        for k in items[0]
        if isinstance(items[0][k], Tensor | int)
    }


def check_limits(train: int | None, val: int | None, test: int | None) -> dict[str, int | None]:
    """``{split: limit}`` of a datamodule's ``limit_<split>`` options (None: the whole
    split); a limit below 1 is refused naming its option."""
    limits = dict(zip(SPLITS, (train, val, test), strict=True))
    for split, limit in limits.items():
        if limit is not None and limit < 1:
            raise ValueError(f"limit_{split} must be positive or None, got {limit}")
    return limits


def limit_indices(indices: Tensor, limit: int | None, seed: int, split: str) -> Tensor:
    """A seeded subset of ``limit`` of ``indices`` (sorted, for locality on disk), or
    ``indices`` themselves when ``limit`` is None or not below their number. The draw is
    a function of ``(seed, split)`` only (:func:`derive_seed`), the same in every process."""
    if limit is None or limit >= indices.numel():
        return indices
    g = torch.Generator().manual_seed(derive_seed("limit", seed, split))
    return indices[torch.randperm(indices.numel(), generator=g)[:limit]].sort().values
