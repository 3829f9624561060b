"""Localisation: do maps point at the object? (Zhou et al. 2016 boxes; Zhang et al. 2016
pointing game; Wang et al. 2020 energy pointing game)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import map_scores
from .registry import available_measures
from .statistics import summarize


def connected_components(foreground: Tensor, max_iter: int | None = None) -> Tensor:
    """Label 8-connected components of a boolean ``[N, H, W]`` mask (0 = background).

    Label propagation: every foreground pixel starts with its own label and takes the
    largest label in its 3x3 neighbourhood until nothing changes (a max-pool flood fill),
    so each component ends up labelled by its largest pixel index + 1.
    """
    fg = foreground.bool()
    n, h, w = fg.shape
    labels = (torch.arange(1, h * w + 1, device=fg.device, dtype=torch.float32).view(1, h, w))
    labels = labels * fg  # float32 holds integers up to 2**24 exactly
    fgf = fg.float()
    for _ in range(max_iter or h * w):
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * fgf
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def largest_component(foreground: Tensor, weights: Tensor | None = None) -> Tensor:
    """Boolean ``[N, H, W]`` mask of each image's largest 8-connected component.

    Equal sizes are resolved by the larger sum of ``weights`` (the map) inside.
    """
    labels = connected_components(foreground)
    n, h, w = labels.shape
    flat = labels.flatten(1)
    sizes = torch.zeros(n, h * w + 1, device=labels.device).scatter_add_(
        1, flat, torch.ones_like(flat, dtype=torch.float32)
    )
    score = sizes
    if weights is not None:
        wpos = weights.detach().float().clamp_min(0).flatten(1)
        mass = torch.zeros_like(sizes).scatter_add_(1, flat, wpos)
        score = sizes + 0.5 * mass / mass.sum(1, keepdim=True).clamp_min(1e-12)  # < 1: ties only
    score[:, 0] = -1  # the background is never a component
    best = score.argmax(1)
    return (labels == best.view(n, 1, 1)) & foreground.bool()


def mask_boxes(masks: Tensor) -> Tensor:
    """Bounding boxes ``[N, 4]`` as ``(x0, y0, x1, y1)`` pixel edges (x1, y1 exclusive).

    NaN rows for empty masks.
    """
    m = masks.bool()
    n, h, w = m.shape
    rows, cols = m.any(2), m.any(1)
    y0 = rows.float().argmax(1)
    y1 = h - rows.flip(1).float().argmax(1)
    x0 = cols.float().argmax(1)
    x1 = w - cols.flip(1).float().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    empty = ~rows.any(1)
    return torch.where(empty[:, None], torch.full_like(boxes, float("nan")), boxes)


def threshold_boxes(maps: Tensor, frac: float = 0.2) -> tuple[Tensor, Tensor]:
    """Weakly-supervised localisation box of each map (Zhou et al. 2016).

    Keeps pixels at or above ``frac`` times the map's maximum, takes the largest
    8-connected component and returns its box ``[N, 4]`` (see :func:`mask_boxes`) and the
    component ``[N, H, W]``. Maps whose maximum is not positive get a NaN box.
    """
    m = maps.detach().float()
    peak = m.flatten(1).amax(1).view(-1, 1, 1)
    fg = (m >= frac * peak) & (peak > 0)
    comp = largest_component(fg, m)
    return mask_boxes(comp), comp


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of paired boxes ``[N, 4]`` ``(x0, y0, x1, y1)``; NaN where either box is NaN."""
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp_min(0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp_min(0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a + area_b - inter).clamp_min(1e-12)


def localisation(maps: Tensor, object_masks: Tensor | None, frac: float = 0.2) -> dict[str, Tensor]:
    """Boxes of each map and, where object masks exist, the localisation measures per image.

    Returns ``boxes [N, 4]`` always; with masks also ``gt_boxes``, ``box_iou`` (0 when the
    map yields no box, since nothing was localised), ``localisation_accuracy`` (IoU >= 0.5,
    as 0/1), ``pointing_game`` and ``energy_pointing_game`` (from :mod:`explain.measures.map_scores`).
    """
    maps = maps.detach().float().cpu()
    boxes, _ = threshold_boxes(maps, frac)
    out: dict[str, Tensor] = {"boxes": boxes}
    if object_masks is None:
        return out
    masks = object_masks.bool().cpu()
    has_gt = masks.flatten(1).any(1)
    gt = mask_boxes(masks)
    iou = box_iou(boxes, gt)
    iou = torch.where(torch.isnan(iou) & has_gt, torch.zeros_like(iou), iou)
    out["gt_boxes"] = gt
    out["box_iou"] = iou
    out["localisation_accuracy"] = torch.where(has_gt, (iou >= 0.5).float(), iou)
    nan = torch.full_like(iou, float("nan"))
    out["pointing_game"] = torch.where(has_gt, map_scores.pointing_game(maps, masks), nan)
    out["energy_pointing_game"] = torch.where(has_gt, map_scores.energy_in_mask(maps, masks), nan)
    return out


def localisation_summary(
    maps: Tensor, object_masks: Tensor | None, frac: float = 0.2
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Summaries of :func:`localisation`'s measures, and its per-image result."""
    per_image = localisation(maps, object_masks, frac)
    summary = {
        name: summarize(per_image[name], name)
        for name in available_measures("localisation")
        if name in per_image
    }
    return summary, per_image
