"""Numbers computed from maps: how much evidence sits where, and how maps change.

All functions take raw maps ``[N, H, W]`` (one map per image) and use their positive
part, so they are independent of the map's scale.
"""

from __future__ import annotations

import torch


def _positive_mass(maps: torch.Tensor) -> torch.Tensor:
    return maps.float().clamp_min(0).flatten(1)


def energy_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's positive mass inside its mask (energy-based pointing game).

    Returns ``[N]`` in ``[0, 1]``; NaN for a map with no positive mass. Higher = more of
    the evidence inside the mask.
    """
    m = _positive_mass(maps)
    total = m.sum(1)
    inside = (m * masks.flatten(1).to(m)).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.full_like(total, float("nan")))


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1.0 where the map's maximum falls inside the mask, else 0.0 (Zhang et al. 2016).

    Ties: the first maximum in raster order. Returns ``[N]`` floats; NaN for constant maps.
    """
    flat = maps.float().flatten(1)
    hit = masks.flatten(1).gather(1, flat.argmax(1, keepdim=True)).squeeze(1).float()
    constant = flat.amax(1) == flat.amin(1)
    return torch.where(constant, torch.full_like(hit, float("nan")), hit)


def drift(maps: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``1 - cosine similarity`` between each map and its previous version, ``[N]``.

    0 = unchanged up to scale; 1 = orthogonal. Scale-free, so a map that only grows in
    magnitude does not count as drift.
    """
    a, b = maps.float().flatten(1), previous.float().flatten(1)
    return 1 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


def concentration(maps: torch.Tensor) -> torch.Tensor:
    """``1 - H(p) / log(HW)`` of the positive mass as a distribution ``p``, ``[N]``.

    1 = all evidence on one pixel, 0 = spread evenly over the image. NaN for empty maps.
    """
    m = _positive_mass(maps)
    total = m.sum(1, keepdim=True)
    p = m / total.clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(1)
    out = 1 - entropy / torch.log(torch.tensor(float(m.shape[1])))
    return torch.where(total.squeeze(1) > 0, out, torch.full_like(out, float("nan")))


def nanmean(values: torch.Tensor) -> float:
    """Mean over finite entries; NaN when there are none (so a curve shows a gap)."""
    v = values[torch.isfinite(values)]
    return float(v.mean()) if v.numel() else float("nan")
