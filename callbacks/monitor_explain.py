"""The monitor's explanation step: which classes are explained, and their maps.

Unless every class is explained, only the true (and the predicted) class of each image
is: for per-class methods such as saliency that is one or two backward passes instead
of one per class.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

import explain


def explained(explain_classes: str, classes: str, num_classes: int) -> tuple[str, str]:
    """Which classes are explained for ``num_classes`` classes, and why.

    ``("all", ...)`` or the class mode whose classes alone are explained (``true``, or
    ``predicted``: the true and the predicted class), with a sentence for the record.
    ``explain_classes`` and ``classes`` are the monitor's options of those names.
    """
    if explain_classes == "all":
        return "all", "explain_classes=all" if classes != "all" else "classes=all"
    if explain_classes == "shown":
        return classes, "explain_classes=shown: the classes the grid shows"
    rule = explain.CLASS_SELECTION
    limit = rule.max_all
    if rule.every_class(num_classes):
        return "all", f"explain_classes=auto: {num_classes} classes <= {limit}, all"
    return "predicted", (
        f"explain_classes=auto: {num_classes} classes > {limit}, only the true and "
        "predicted class of each image"
    )


def class_maps(
    model: nn.Module,
    images: Tensor,
    method: str,
    options: dict,
    mode: str,
    finite_logits: bool,
    labels: Tensor,
    preds: Tensor,
    num_classes: int,
) -> tuple[Tensor | None, Tensor | None]:
    """``(maps, classes)`` on the CPU; maps None when a non-finite model broke the method.

    ``mode`` is :func:`explained`'s first value. Explaining every class gives ``[N, K, H,
    W]`` maps and ``classes`` None. Otherwise, up to ``explain.ALL_CLASSES_MAX`` classes the
    maps are ``[N, K, H, W]`` with the classes not explained zero and ``classes`` None;
    beyond, only the explained maps ``[N, T, H, W]`` and their classes ``[N, T]`` (a
    zero-filled array of 1,000 classes at 224 x 224 takes gigabytes).
    """
    try:
        with warnings.catch_warnings():
            # The engine warns about non-finite maps; the monitor reports them itself.
            warnings.filterwarnings("ignore", message=".*non-finite values")
            if mode == "all":
                return explain.run(model, images, method, **options).cpu(), None
            wanted = [labels] + ([preds] if mode == "predicted" else [])
            targets = torch.stack(wanted, 1)  # [N, T]: one call shares the forwards
            some = explain.run(model, images, method, targets=targets, **options).cpu()
            if not explain.CLASS_SELECTION.every_class(num_classes):
                return some, targets.cpu()
            n = len(images)
            maps = some.new_zeros(n, num_classes, *some.shape[-2:])
            for t in range(targets.shape[1]):
                maps[torch.arange(n), targets[:, t].cpu()] = some[:, t]
            return maps, None
    except (RuntimeError, ValueError):
        if finite_logits:
            raise  # a real failure of the method, not a symptom of NaN weights
        return None, None  # e.g. an SVD that can not converge on NaN activations
