"""Bias: where the evidence sits (border, a declared cue) and the with/without-cue test."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import map_scores
from .inference import predict_proba, target_probability
from .statistics import by_class, group_mean, mean_interval, proportion


def border_mask(h: int, w: int, width: int) -> Tensor:
    """Boolean ``[H, W]`` frame ``width`` pixels wide."""
    m = torch.ones(h, w, dtype=torch.bool)
    if 2 * width < min(h, w):
        m[width : h - width, width : w - width] = False
    return m


def region_energy(maps: Tensor, regions: Tensor) -> Tensor:
    """Share of each map's positive mass inside its region ``[N]`` (NaN for empty maps).

    ``regions`` is ``[N, H, W]`` or one ``[H, W]`` region for all maps.
    """
    regions = regions.bool()
    if regions.dim() == 2:
        regions = regions.expand(maps.shape[0], *regions.shape)
    return map_scores.energy_in_mask(maps.detach().float().cpu(), regions.cpu())


def counterfactual(
    model: nn.Module,
    clean: Tensor,
    stamped: Tensor,
    control: Tensor,
    labels: Tensor,
    cue_classes: list[int],
    num_classes: int,
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """Predictions on the same images clean, with the cue, and with a control patch.

    ``stamped`` carries the cue on every image; ``control`` a patch of the same size at the
    same place in a texture the data never carried. Per class ``c`` (``[K]`` tensors):

    * ``n``: images of class ``c``; ``acc_without`` / ``acc_with`` / ``acc_control``:
      their accuracy clean / with the cue / with the control patch; ``conf_without`` /
      ``conf_with``: mean probability of the true class;
    * ``reliance``: ``acc_with - acc_without``; ``reliance_margin``: ``acc_with -
      acc_control`` per image pair, with its 95% t interval (``reliance_lo``/``_hi``);
    * ``attraction``: over images of classes outside ``cue_classes`` and other than ``c``
      (``attraction_n``), the share predicted as ``c`` with the cue minus without it;
      ``attraction_margin``: with the cue minus with the control patch, paired, with its
      interval (``attraction_lo``/``_hi``).

    The margins are the evidence: stamping any patch on a fragile model moves its
    predictions, and only what the cue does beyond the control patch is the cue's doing.
    Also ``correct_without`` / ``correct_with`` / ``correct_control``: ``[N]`` booleans.
    """
    labels = labels.long().cpu()
    p0 = predict_proba(model, clean, batch_size).cpu()
    p1 = predict_proba(model, stamped, batch_size).cpu()
    pc = predict_proba(model, control, batch_size).cpu()
    pred0, pred1, predc = p0.argmax(1), p1.argmax(1), pc.argmax(1)
    k = num_classes
    ok0, ok1, okc = pred0 == labels, pred1 == labels, predc == labels
    acc0, n = group_mean(ok0.float(), labels, k)
    acc1, _ = group_mean(ok1.float(), labels, k)
    accc, _ = group_mean(okc.float(), labels, k)
    conf0, _ = group_mean(target_probability(p0, labels), labels, k)
    conf1, _ = group_mean(target_probability(p1, labels), labels, k)
    is_cue = torch.zeros(k, dtype=torch.bool)
    is_cue[[c for c in cue_classes if c < k]] = True
    pool = ~is_cue[labels]
    out = {name: torch.full((k,), float("nan")) for name in (
        "reliance", "reliance_margin", "reliance_lo", "reliance_hi", "attraction",
        "attraction_margin", "attraction_lo", "attraction_hi")}
    attraction_n = torch.zeros(k, dtype=torch.long)
    for c in range(k):
        own = labels == c
        if own.any():
            out["reliance"][c] = float((ok1[own].float() - ok0[own].float()).mean())
            (out["reliance_margin"][c], out["reliance_lo"][c],
             out["reliance_hi"][c]) = mean_interval(ok1[own].float() - okc[own].float())
        sel = pool & (labels != c)
        attraction_n[c] = int(sel.sum())
        if sel.any():
            to_c = (pred1[sel] == c).float()
            out["attraction"][c] = float((to_c - (pred0[sel] == c).float()).mean())
            (out["attraction_margin"][c], out["attraction_lo"][c],
             out["attraction_hi"][c]) = mean_interval(to_c - (predc[sel] == c).float())
    return {
        "n": n,
        "acc_without": acc0,
        "acc_with": acc1,
        "acc_control": accc,
        "conf_without": conf0,
        "conf_with": conf1,
        **out,
        "attraction_n": attraction_n,
        "correct_without": ok0,
        "correct_with": ok1,
        "correct_control": okc,
    }


def _beats_control(margin: float, lo: float, threshold: float) -> bool:
    """The cue's effect beyond the control reaches ``threshold`` and its interval excludes 0.

    With every pair moving the same way the interval has zero width (``lo == margin``); a
    single pair has no interval and is not enough.
    """
    return math.isfinite(margin) and margin >= threshold and math.isfinite(lo) and lo > 0


def flag_classes(cf: Mapping[str, Tensor], threshold: float = 0.2, min_n: int = 5) -> list[int]:
    """Classes that lean on the cue, from :func:`counterfactual`'s result.

    A class with at least ``min_n`` images is flagged when its reliance margin or its
    attraction margin over the control patch reaches ``threshold`` (20 points of accuracy
    or of predictions by default) and the lower end of its 95% interval is above zero.
    """
    out = []
    for c in range(len(cf["n"])):
        if int(cf["n"][c]) < min_n:
            continue
        reliance = _beats_control(float(cf["reliance_margin"][c]), float(cf["reliance_lo"][c]),
                                  threshold)
        attraction = _beats_control(float(cf["attraction_margin"][c]),
                                    float(cf["attraction_lo"][c]), threshold)
        if reliance or attraction:
            out.append(c)
    return out


def energy_by_class(
    maps: Tensor,
    labels: Tensor,
    names: list[str],
    cue_masks: Tensor | None = None,
    cue_regions: Tensor | None = None,
    border_frac: float = 0.1,
) -> dict[str, Any]:
    """Per class: the map energy in the image border and, with a known cue, on the cue.

    ``cue_masks`` marks where a cue was stamped on each image (empty where none was) and
    ``cue_regions`` where it would sit on each image; ``cue_energy`` is measured on the
    images that carry it, and ``cue_region_energy_without_cue`` in the same region of the
    images that do not (the baseline to read it against).
    """
    h, w = maps.shape[-2:]
    width = max(1, round(border_frac * min(h, w)))
    border = region_energy(maps, border_mask(h, w, width))
    out: dict[str, Any] = {"border_energy": by_class(border, labels, names, "border_energy")}
    if cue_masks is not None and cue_regions is not None:
        carries = cue_masks.flatten(1).any(1).cpu()
        region = region_energy(maps, cue_regions)
        nan = torch.full_like(region, float("nan"))
        out["cue_energy"] = by_class(torch.where(carries, region, nan), labels, names,
                                     "cue_energy")
        out["cue_region_energy_without_cue"] = by_class(
            torch.where(~carries, region, nan), labels, names, "cue_energy"
        )
    return out


def counterfactual_summary(
    cf: Mapping[str, Tensor], labels: Tensor, names: list[str], cue_classes: list[int],
    threshold: float = 0.2, min_n: int = 5,
) -> dict[str, Any]:
    """:func:`counterfactual`'s result per class (with intervals) and the flagged classes."""
    labels = labels.long().cpu()
    table = {}
    for c, name in enumerate(names):
        sel = labels == c
        n = int(sel.sum())
        table[name] = {
            "n": n,
            "cue_class": c in cue_classes,
            "accuracy_without_cue": proportion(int(cf["correct_without"][sel].sum()), n),
            "accuracy_with_cue": proportion(int(cf["correct_with"][sel].sum()), n),
            "confidence_without_cue": float(cf["conf_without"][c]),
            "confidence_with_cue": float(cf["conf_with"][c]),
            "accuracy_with_control": proportion(int(cf["correct_control"][sel].sum()), n),
            "cue_reliance": float(cf["reliance"][c]),
            "cue_reliance_margin": float(cf["reliance_margin"][c]),
            "cue_reliance_margin_ci95": [float(cf["reliance_lo"][c]), float(cf["reliance_hi"][c])],
            "cue_attraction": float(cf["attraction"][c]),
            "cue_attraction_margin": float(cf["attraction_margin"][c]),
            "cue_attraction_margin_ci95": [float(cf["attraction_lo"][c]),
                                           float(cf["attraction_hi"][c])],
            "attraction_n": int(cf["attraction_n"][c]),
        }
    return {
        "n_images": len(labels),
        "threshold": threshold,
        "classes": table,
        "flagged": flag_classes(cf, threshold, min_n),
    }
