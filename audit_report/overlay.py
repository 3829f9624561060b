"""One image and one explanation map as a figure with a colour bar: for notebooks and scripts.

    from audit_report.overlay import show_overlay
    maps = explain.run(model, images, "gradcam", targets=labels)
    show_overlay(images01[0], maps[0], path="gradcam.png", title="Grad-CAM, true class")

matplotlib, so it lives here and not in the engine. The map keeps its raw scale: the colour
bar reads the map's own values (its minimum to its maximum), not a 0..1 share.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from torch import Tensor

from explain import render
from explain.records import atomic_write_bytes

from .figures import np_image


def _check(image: Tensor, heatmap: Tensor) -> tuple[Tensor, Tensor]:
    image = torch.as_tensor(image).detach().float().cpu()
    heatmap = torch.as_tensor(heatmap).detach().float().cpu()
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W] in [0, 1], got {tuple(image.shape)}")
    if heatmap.dim() != 2:
        raise ValueError(f"heatmap must be one map [H, W], got {tuple(heatmap.shape)}")
    if not torch.isfinite(heatmap).all():
        raise ValueError("the heatmap holds NaN or infinite values: nothing honest to draw")
    if heatmap.shape != image.shape[1:]:
        # A coarse map (a layer's h x w) is stretched to the image, as the engine does.
        heatmap = F.interpolate(heatmap[None, None], size=tuple(image.shape[1:]),
                                mode="bilinear", align_corners=False)[0, 0]
    return image, heatmap


def show_overlay(
    image: Tensor,
    heatmap: Tensor,
    *,
    path: str | Path | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    alpha: float = 0.5,
) -> Figure:
    """Draw ``heatmap`` over ``image`` in the turbo colours, with a colour bar of its values.

    Args:
        image: ``[3, H, W]`` in ``[0, 1]`` (denormalise model inputs first).
        heatmap: ``[H, W]`` (or a coarser ``[h, w]``, stretched bilinearly), any scale.
        path: write a PNG there (atomically); None: only return the figure.
        ax: draw into these axes (the colour bar goes beside them); None: a new figure.
        title: the axes' title.
        alpha: the map's weight in the blend (0: image only, 1: map only).

    Returns:
        The figure (a notebook shows it when it is a cell's last value).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    image, heatmap = _check(image, heatmap)
    low, high = float(heatmap.min()), float(heatmap.max())
    # A constant map has no range: draw it at the bottom colour on a unit-wide bar.
    span = high - low if high > low else 1.0
    scaled = (heatmap - low) / span
    blended = render.overlay(image[None].clamp(0, 1), scaled[None], alpha=alpha)[0]
    if ax is None:
        fig = Figure(figsize=(3.6, 3.0), dpi=100)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    ax.imshow(np_image(blended), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    cmap = ListedColormap(render.TURBO.numpy(), name="turbo")
    bar = fig.colorbar(ScalarMappable(norm=Normalize(low, low + span), cmap=cmap), ax=ax,
                       fraction=0.046, pad=0.04)
    bar.set_label("map value (raw)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if path is not None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        atomic_write_bytes(Path(path), buf.getvalue())
    return fig
