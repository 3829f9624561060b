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


SCHEDULES = ("uniform", "quadratic")


def curve_fractions(steps: int, schedule: str = "uniform") -> Tensor:
    """The ``steps + 1`` fractions of pixels changed along a deletion/insertion curve.

    ``uniform``: ``k / steps`` (Petsiuk et al.). ``quadratic``: ``(k / steps) ** 2``,
    dense at the start, where the curves move most: with 10 steps its areas came closer
    to a 64-step curve's than 16 uniform steps did (BENCHMARKS.md, "An audit in a minute").
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    fractions = torch.linspace(0, 1, steps + 1)
    return fractions if schedule == "uniform" else fractions**2


def _fill_and_origin(images: Tensor, fill: str, start: str,
                     blur_sigma: float) -> tuple[Tensor, Tensor]:
    """The deletion fill and the insertion start images (see :func:`deletion_insertion`)."""
    for name, value in (("fill", fill), ("start", start)):
        if value not in ("mean", "blur"):
            raise ValueError(f"{name} must be 'mean' or 'blur', got {value!r}")
    blurred = gaussian_blur(images, blur_sigma) if "blur" in (fill, start) else None
    filler = blurred if fill == "blur" else torch.zeros_like(images)
    origin = blurred if start == "blur" else torch.zeros_like(images)
    return filler, origin


def curve_ends(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    fill: str = "mean",
    start: str = "blur",
    blur_sigma: float = 4.0,
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """The probabilities at both ends of every deletion and insertion curve, ``[N]`` each.

    They do not depend on the map (nothing or every pixel changed), so an audit scores
    them once and passes them to :func:`deletion_insertion` for every method.
    ``original``: the image; ``filled``: every pixel deleted; ``origin``: insertion's start.
    """
    device = model_device(model)
    images = images.detach().float().to(device)
    targets = targets.to(device).long()
    filler, origin = _fill_and_origin(images, fill, start, blur_sigma)
    return {
        key: target_probability(predict_proba(model, batch, batch_size), targets).cpu()
        for key, batch in (("original", images), ("filled", filler), ("origin", origin))
    }


def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    steps: int = 16,
    schedule: str = "uniform",
    fill: str = "mean",
    start: str = "blur",
    blur_sigma: float = 4.0,
    batch_size: int = 256,
    seed: int = 0,
    ends: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Deletion and insertion curves and their areas (Petsiuk et al. 2018).

    Pixels are taken in decreasing map order, at the fractions of :func:`curve_fractions`
    (``steps`` and ``schedule``). Deletion replaces them with the fill: ``"mean"`` (zero in
    the normalised input space, i.e. the dataset's mean colour) or ``"blur"`` (a Gaussian
    blur of the image). Insertion starts from ``start`` (``"blur"``, the paper's choice, or
    ``"mean"``) and puts the original pixels back. The mean fill is used for deletion by
    default because a blur keeps the object's coarse shape, which a CNN still recognises.
    The score is the softmax probability of ``targets``; the areas use the trapezoid rule
    over the fraction of pixels in [0, 1]. The ``2 * (steps - 1)`` inner points of the two
    curves go through the model in batches; the ends come from ``ends`` (see
    :func:`curve_ends`, computed here when None).

    Returns ``fractions [steps+1]``, ``deletion_curve`` / ``insertion_curve``
    ``[N, steps+1]`` and ``deletion_auc`` / ``insertion_auc`` ``[N]``.
    """
    return deletion_insertion_many(
        model, images, {"map": maps}, targets, steps=steps, schedule=schedule, fill=fill,
        start=start, blur_sigma=blur_sigma, batch_size=batch_size, seed=seed, ends=ends,
    )["map"]


def deletion_insertion_many(
    model: nn.Module,
    images: Tensor,
    maps: dict[str, Tensor],
    targets: Tensor,
    *,
    steps: int = 16,
    schedule: str = "uniform",
    fill: str = "mean",
    start: str = "blur",
    blur_sigma: float = 4.0,
    batch_size: int = 256,
    seed: int = 0,
    ends: dict[str, Tensor] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """:func:`deletion_insertion` for several maps of the same images (e.g. one per
    method), each distinct perturbed image scored once.

    A perturbed image is fixed by its image and the set of pixels switched; two maps that
    rank an image's pixels alike at a step (the CAM family on a GAP + Linear head often do)
    give the same image, and the model sees it once. On the quickstart's test images, 13
    methods' curves held 28% repeated images. The curves equal those computed one map at a
    time (up to the float noise of batch composition).
    """
    fractions = curve_fractions(steps, schedule)
    device = model_device(model)
    images = images.detach().float().to(device)
    n, _, h, w = images.shape
    d = h * w
    targets = targets.to(device).long()
    filler, origin = _fill_and_origin(images, fill, start, blur_sigma)
    if ends is None:
        ends = curve_ends(model, images, targets, fill=fill, start=start,
                          blur_sigma=blur_sigma, batch_size=batch_size)
    names = list(maps)
    inner = steps - 1
    counts = (fractions[1:-1] * d).round().long().to(device)  # pixels switched, inner points
    # [M, N, S-1, HW]: the switched pixels of every map, image and inner point.
    switched = torch.stack([
        pixel_ranks(maps[name], seed).to(device)[:, None, :] < counts[None, :, None]
        for name in names])
    scores = {key: torch.zeros(len(names), n, inner) for key in ("deletion", "insertion")}
    if inner:
        distinct, owner, where = [], [], []
        for i in range(n):
            flat = switched[:, i].reshape(-1, d)
            unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
            where.append(inverse + sum(len(u) for u in distinct))
            distinct.append(unique)
            owner.append(torch.full((len(unique),), i, device=device))
        masks, owners = torch.cat(distinct), torch.cat(owner)
        probs = {key: torch.empty(len(masks)) for key in scores}
        with eval_no_grad(model):
            for first in range(0, len(masks), batch_size):
                sl = slice(first, first + batch_size)
                top, who = masks[sl].view(-1, 1, h, w), owners[sl]
                x = images[who]
                t = targets[who]
                for key, batch in (("deletion", torch.where(top, filler[who], x)),
                                   ("insertion", torch.where(top, x, origin[who]))):
                    out = model(batch).float().softmax(-1)
                    probs[key][sl] = target_probability(out, t).cpu()
        for i in range(n):
            index = where[i].cpu().view(len(names), inner)
            for key in scores:
                scores[key][:, i] = probs[key][index]
    first_last = {"deletion": ("original", "filled"), "insertion": ("origin", "original")}
    results: dict[str, dict[str, Tensor]] = {}
    for m, name in enumerate(names):
        out: dict[str, Tensor] = {"fractions": fractions}
        for key, (head, tail) in first_last.items():
            curve = torch.cat([ends[head].cpu()[:, None], scores[key][m],
                               ends[tail].cpu()[:, None]], 1)
            out[f"{key}_curve"] = curve
            out[f"{key}_auc"] = torch.trapezoid(curve, fractions, dim=1)
        results[name] = out
    return results


def average_drop_increase(
    model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, batch_size: int = 256,
    original: Tensor | None = None,
) -> dict[str, Tensor]:
    """Average Drop and Increase in Confidence (Chattopadhay et al. 2018), per image.

    The image is multiplied by its map scaled to ``[0, 1]`` by its maximum (positive part),
    in the model's normalised input space, so suppressed pixels tend to the dataset's mean
    colour. ``average_drop`` is ``100 * max(0, Y - O) / Y`` and ``increase_in_confidence``
    is ``100 * [O > Y]``, with ``Y`` / ``O`` the target probability on the original / the
    masked image. Both are ``[N]``; their means are the paper's numbers. ``original``
    (``Y``, e.g. ``curve_ends(...)["original"]``) saves scoring the images again.
    """
    device = model_device(model)
    images = images.detach().float().to(device)
    pos = maps.detach().float().to(device).clamp_min(0)
    peak = pos.flatten(1).amax(1).view(-1, 1, 1)
    weights = torch.where(peak > 0, pos / peak.clamp_min(1e-12), torch.zeros_like(pos))
    if original is None:
        y = target_probability(predict_proba(model, images, batch_size), targets)
    else:
        y = original.to(device).float()
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
    schedule: str = "uniform",
    batch_size: int = 256,
    seed: int = 0,
    ends: dict[str, Tensor] | None = None,
    curves: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Deletion/insertion AUC, Average Drop and Increase in Confidence, summarised.

    ``ends`` (:func:`curve_ends`) and ``curves`` (this map's entry of
    :func:`deletion_insertion_many`) let several methods share model calls.
    Returns the summary (with the mean curves) and the per-image curves for figures.
    """
    if ends is None:
        ends = curve_ends(model, images, targets, batch_size=batch_size)
    di = curves if curves is not None else deletion_insertion(
        model, images, maps, targets, steps=steps, schedule=schedule, batch_size=batch_size,
        seed=seed, ends=ends)
    ad = average_drop_increase(model, images, maps, targets, batch_size,
                               original=ends["original"])
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
