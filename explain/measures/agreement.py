"""Agreement between two methods' maps of the same images (e.g. CAM vs Grad-CAM)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .statistics import summarize


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of paired maps ``[N, ...]``; NaN where either map is constant."""
    x = a.detach().double().flatten(1)
    y = b.detach().double().flatten(1)
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    den = (x.norm(dim=1) * y.norm(dim=1))
    r = (x * y).sum(1) / den.clamp_min(1e-300)
    return torch.where(den > 0, r, torch.full_like(r, float("nan"))).float()


def threshold_iou(a: Tensor, b: Tensor, frac: float = 0.2) -> Tensor:
    """IoU of the regions at or above ``frac`` of each map's maximum, ``[N]``."""

    def region(m: Tensor) -> Tensor:
        m = m.detach().float().flatten(1)
        peak = m.amax(1, keepdim=True)
        return (m >= frac * peak) & (peak > 0)

    ra, rb = region(a), region(b)
    union = (ra | rb).sum(1).float()
    inter = (ra & rb).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def agreement_summary(a: Tensor, b: Tensor, frac: float = 0.2) -> dict[str, Any]:
    """Pearson correlation and thresholded-region IoU of paired maps, summarised."""
    r = pearson(a, b)
    return {
        "correlation": summarize(r, "cam_gradcam_correlation"),
        "iou": summarize(threshold_iou(a, b, frac), "cam_gradcam_iou"),
        "per_image_correlation": r.tolist(),
    }
