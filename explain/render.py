"""Colour maps, overlays and grids as tensors (no matplotlib in hot paths)."""

from __future__ import annotations

import torch
from torch import nn

# Anchor colours of a perceptually ordered dark-blue -> teal -> yellow -> red ramp
# (close to matplotlib's "turbo" at eight stops); linear interpolation in between.
_RAMP = torch.tensor(
    [
        [0.19, 0.07, 0.23],
        [0.27, 0.40, 0.89],
        [0.16, 0.73, 0.92],
        [0.19, 0.93, 0.56],
        [0.64, 0.99, 0.24],
        [0.95, 0.80, 0.23],
        [0.98, 0.45, 0.08],
        [0.71, 0.13, 0.01],
    ]
)


def colorize(maps: torch.Tensor) -> torch.Tensor:
    """Maps in ``[0, 1]`` of shape ``[..., H, W]`` -> RGB ``[..., 3, H, W]``."""
    ramp = _RAMP.to(maps.device)
    pos = maps.clamp(0, 1) * (len(ramp) - 1)
    lo = pos.floor().long().clamp(max=len(ramp) - 2)
    frac = (pos - lo).unsqueeze(-1)
    rgb = ramp[lo] * (1 - frac) + ramp[lo + 1] * frac
    return rgb.movedim(-1, -3)


def normalize_maps(maps: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Scale non-negative maps by their maximum over ``dims`` (display only; 0 stays 0).

    Maps are raw in the engine; this is the explicit, separate normalisation step. A map
    whose maximum is not positive becomes all zeros rather than noise.
    """
    m = maps.clamp_min(0)
    peak = m.amax(dim=dims, keepdim=True)
    return torch.where(peak > 0, m / peak.clamp_min(1e-12), torch.zeros_like(m))


def overlay(images01: torch.Tensor, maps01: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend ``[B, 3, H, W]`` images in ``[0, 1]`` with ``[B, H, W]`` maps in ``[0, 1]``."""
    return (1 - alpha) * images01 + alpha * colorize(maps01)


def frame(tiles: torch.Tensor, ok: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Draw a green (``ok``) or red border inside each ``[N, 3, H, W]`` tile."""
    out = tiles.clone()
    colour = torch.where(
        ok[:, None], torch.tensor([0.1, 0.8, 0.2]), torch.tensor([0.9, 0.1, 0.1])
    ).to(tiles)[:, :, None, None]
    for sl in (
        (..., slice(0, width), slice(None)),
        (..., slice(-width, None), slice(None)),
        (..., slice(None), slice(0, width)),
        (..., slice(None), slice(-width, None)),
    ):
        out[sl] = colour.expand_as(out[sl])
    return out


def upscale(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour enlargement, so 32x32 tiles stay crisp in TensorBoard."""
    if factor == 1:
        return images
    return nn.functional.interpolate(images, scale_factor=factor, mode="nearest")


def grid(tiles: torch.Tensor, ncol: int, pad: int = 2, fill: float = 1.0) -> torch.Tensor:
    """Lay out ``[N, 3, H, W]`` tiles row by row into one ``[3, H', W']`` image."""
    n, c, h, w = tiles.shape
    nrow = -(-n // ncol)
    out = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), fill)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[:, y : y + h, x : x + w] = tiles[i]
    return out
