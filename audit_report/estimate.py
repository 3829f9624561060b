"""A time estimate for an audit, from a quick calibration on the model itself.

Printed before the work starts, so a user knows whether to wait or to choose fewer
methods. It times one batch of plain forwards and each selected method on a few images
(two outside the CAM family, where an image is already a batch of copies), then counts
how many of each the sections will run. An estimate, not a promise: methods whose
cost grows with the batch differently (LIME, Score-CAM) are extrapolated linearly.
"""

from __future__ import annotations

import time

import torch

import explain
from explain.measures.inference import predict_proba
from explain.measures.sanity import cascade_steps

from .settings import (
    SANITY_FINAL_ONLY,
    AuditSettings,
    curve_schedule,
    faithfulness_images,
    method_options,
)

CALIBRATION_IMAGES = 8
# Outside the CAM family an image is already a batch of copies for most methods (49
# occlusion windows, 64 LIME samples, 64 Score-CAM channels, 8 IG nodes, 8 SmoothGrad
# draws): two images time it well at a quarter of the cost. The CAM family runs its head
# on a whole batch, so it is timed on more.
FEW_CALIBRATION_IMAGES = 2


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _peak_map_cost(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Seconds an image of the search's second view of recurring peaks (0 where the model
    has no layer for it: the search then goes without)."""
    try:
        return _timed(lambda: explain.run(model, images, explain.PEAK_METHOD,
                                          targets=targets)) / len(images)
    except explain.ExplainError:
        return 0.0


SEARCH_CALLS_PER_CLASS = 400


def estimate_seconds(settings: AuditSettings, model: torch.nn.Module, images: torch.Tensor,
                     num_classes: int, split_size: int, cached: set[str] | None = None,
                     reused: set[str] | None = None) -> float:
    """Seconds one model's audit should take on this machine.

    Methods in ``cached`` and the map-free results in ``reused`` (``accuracy``,
    ``discovery``, ``counterfactual``) come from an earlier audit's cache and cost nothing.
    """
    cached, reused = cached or set(), reused or set()
    # The first call pays for allocations and thread start-up; then a whole batch, since the
    # audit's model calls are batched (per-call overhead would be overcounted on a few images).
    predict_proba(model, images[:2], settings.batch_size)
    forward = _timed(lambda: predict_proba(model, images, settings.batch_size)) / len(images)
    n = len(images)  # the images actually sampled: a small split has fewer than asked for
    total = 0.0 if "accuracy" in reused else split_size * forward  # accuracy on the split
    faithful = faithfulness_images(settings, n)
    steps, _ = curve_schedule(settings)
    # Deletion and insertion: the inner points per method, the ends once for all methods.
    fresh = [m for m in settings.methods if m not in cached]
    total += (2 * (steps - 1) * len(fresh) + 3) * faithful * forward
    if "counterfactual" not in reused:
        total += 3 * settings.counterfactual_images * num_classes * forward
    few = images[:CALIBRATION_IMAGES]
    if "discovery" not in reused:
        zero = torch.zeros(len(images), dtype=torch.long)  # discovery's batches are alike
        map_seconds = _timed(lambda: explain.run(model, images, explain.DISCOVERY_METHOD,
                                                 targets=zero)) / len(images)
        map_seconds += _peak_map_cost(model, images, zero)
        sampled = min(settings.discovery_images * num_classes, split_size)
        # The shortcut search's model calls per class: screens on 24 images, full tests on
        # 64 where they pass (about 400 a class on the quickstart's ResNet-18, measured with
        # explain.measures.tracking.search_class: 42 s for 10 classes at ~100 images/s).
        total += sampled * map_seconds + num_classes * SEARCH_CALLS_PER_CLASS * forward
    steps = len(cascade_steps(model))
    # The classes the audit explains (every one, or true and predicted beyond the limit).
    zeros = torch.zeros(len(few), dtype=torch.long)
    shared = explain.CLASS_SELECTION.targets(zeros, zeros, num_classes)
    for method in fresh:
        torch.manual_seed(settings.seed)
        # Per-class-cost methods are asked for one class an image, by the sample and the
        # cascade alike (plus the predicted class of the errors, not counted).
        cost = explain.get(method).cost
        k = len(few) if cost.light else FEW_CALIBRATION_IMAGES
        targets = zeros if cost.backward_per_class else shared
        targets = None if targets is None else targets[:k]
        per_image = _timed(lambda m=method, x=few[:k], t=targets: explain.run(
            model, x, m, targets=t, **method_options(m, settings))) / k
        # The sanity cascade: every step, or (a costly method, not exact) the last one only.
        cascade = 1 if method in SANITY_FINAL_ONLY and not settings.exact else steps
        total += per_image * (n + cascade * min(settings.sanity_images, n))
    return total
