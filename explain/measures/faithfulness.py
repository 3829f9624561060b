"""Faithfulness: does removing what a map points at change the prediction?

Deletion / insertion (Petsiuk et al. 2018, RISE); Average Drop and Increase in Confidence
(Chattopadhay et al. 2018, Grad-CAM++).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inference import eval_no_grad, model_device, predict_proba, target_probability
from .statistics import summarize


def gaussian_blur(images: Tensor, sigma: float = 4.0) -> Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with reflect padding (the insertion start)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    h, w = images.shape[-2:]
    # Reflect padding must be smaller than the image side.
    radius = min(radius, h - 1, w - 1)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def pixel_ranks(maps: Tensor, seed: int = 0) -> Tensor:
    """Importance rank of each pixel, ``[N, H*W]`` long: 0 for the largest map value.

    Ties (large zero regions after a ReLU are common) are broken by a seeded random order,
    not by raster order, which would always remove the top rows first.
    """
    flat = maps.detach().float().flatten(1).cpu()
    n, d = flat.shape
    g = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(n, d, generator=g), dim=1)
    shuffled = flat.gather(1, perm)
    order = perm.gather(1, torch.argsort(-shuffled, dim=1, stable=True))  # pixel per rank
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(d).expand(n, d).contiguous())
    return ranks.to(maps.device)


def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    steps: int = 16,
    fill: str = "mean",
    start: str = "blur",
    blur_sigma: float = 4.0,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Deletion and insertion curves and their areas (Petsiuk et al. 2018).

    Pixels are taken in decreasing map order, ``H*W/steps`` at a time. Deletion replaces
    them with the fill: ``"mean"`` (zero in the normalised input space, i.e. the dataset's
    mean colour) or ``"blur"`` (a Gaussian blur of the image). Insertion starts from
    ``start`` (``"blur"``, the paper's choice, or ``"mean"``) and puts the original pixels
    back. The mean fill is used for deletion by default because a blur keeps the object's
    coarse shape, which a CNN still recognises. The score is the softmax probability
    of ``targets``; the areas use the trapezoid rule over the fraction of pixels in [0, 1].
    All ``N * (steps + 1)`` perturbed images of a curve go through the model in batches.

    Returns ``fractions [steps+1]``, ``deletion_curve`` / ``insertion_curve``
    ``[N, steps+1]`` and ``deletion_auc`` / ``insertion_auc`` ``[N]``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    for name, value in (("fill", fill), ("start", start)):
        if value not in ("mean", "blur"):
            raise ValueError(f"{name} must be 'mean' or 'blur', got {value!r}")
    device = model_device(model)
    images = images.detach().float().to(device)
    n, _, h, w = images.shape
    d = h * w
    targets = targets.to(device).long()
    ranks = pixel_ranks(maps, seed).to(device)  # [N, HW]
    fractions = torch.linspace(0, 1, steps + 1)
    counts = (fractions * d).round().long().to(device)  # pixels switched at each step
    blurred = gaussian_blur(images, blur_sigma)
    filler = blurred if fill == "blur" else torch.zeros_like(images)
    origin = blurred if start == "blur" else torch.zeros_like(images)
    # Images per model call: whole curves of several images at once.
    per_chunk = max(1, batch_size // (steps + 1))
    curves: dict[str, list[Tensor]] = {"deletion": [], "insertion": []}
    with eval_no_grad(model):
        for start in range(0, n, per_chunk):
            sl = slice(start, start + per_chunk)
            x, xo, xf = images[sl], origin[sl], filler[sl]
            top = ranks[sl][:, None, :] < counts[None, :, None]  # [n, S+1, HW]
            top = top.view(-1, steps + 1, 1, h, w)
            t = targets[sl].repeat_interleave(steps + 1)
            deleted = torch.where(top, xf[:, None], x[:, None]).flatten(0, 1)
            inserted = torch.where(top, x[:, None], xo[:, None]).flatten(0, 1)
            for key, batch in (("deletion", deleted), ("insertion", inserted)):
                probs = model(batch).float().softmax(-1)
                curves[key].append(target_probability(probs, t).view(-1, steps + 1))
    out: dict[str, Tensor] = {"fractions": fractions}
    for key, parts in curves.items():
        curve = torch.cat(parts).cpu()
        out[f"{key}_curve"] = curve
        out[f"{key}_auc"] = torch.trapezoid(curve, fractions, dim=1)
    return out


def average_drop_increase(
    model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, batch_size: int = 256
) -> dict[str, Tensor]:
    """Average Drop and Increase in Confidence (Chattopadhay et al. 2018), per image.

    The image is multiplied by its map scaled to ``[0, 1]`` by its maximum (positive part),
    in the model's normalised input space, so suppressed pixels tend to the dataset's mean
    colour. ``average_drop`` is ``100 * max(0, Y - O) / Y`` and ``increase_in_confidence``
    is ``100 * [O > Y]``, with ``Y`` / ``O`` the target probability on the original / the
    masked image. Both are ``[N]``; their means are the paper's numbers.
    """
    device = model_device(model)
    images = images.detach().float().to(device)
    pos = maps.detach().float().to(device).clamp_min(0)
    peak = pos.flatten(1).amax(1).view(-1, 1, 1)
    weights = torch.where(peak > 0, pos / peak.clamp_min(1e-12), torch.zeros_like(pos))
    y = target_probability(predict_proba(model, images, batch_size), targets)
    o = target_probability(predict_proba(model, images * weights[:, None], batch_size), targets)
    drop = 100 * (y - o).clamp_min(0) / y.clamp_min(1e-12)
    return {
        "average_drop": drop.cpu(),
        "increase_in_confidence": 100 * (o > y).float().cpu(),
        "score": y.cpu(),
        "masked_score": o.cpu(),
    }


def faithfulness_summary(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    steps: int = 16,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Deletion/insertion AUC, Average Drop and Increase in Confidence, summarised.

    Returns the summary (with the mean curves) and the per-image curves for figures.
    """
    di = deletion_insertion(model, images, maps, targets, steps=steps, batch_size=batch_size,
                            seed=seed)
    ad = average_drop_increase(model, images, maps, targets, batch_size)
    summary: dict[str, Any] = {
        name: summarize(src[name], name)
        for name, src in (("deletion_auc", di), ("insertion_auc", di), ("average_drop", ad),
                          ("increase_in_confidence", ad))
    }
    summary["curves"] = {
        "fractions": di["fractions"].tolist(),
        "deletion_mean": di["deletion_curve"].mean(0).tolist(),
        "insertion_mean": di["insertion_curve"].mean(0).tolist(),
    }
    return summary, di
