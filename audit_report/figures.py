"""The audit report's figures, drawn with matplotlib's object API on the Agg canvas.

No pyplot, no display, no global backend switch: each function returns a ``Figure`` that
:class:`audit_report.page.FigureStore` saves and inlines. matplotlib never enters the
training loop or the engine: only the report imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from explain import render
from explain.measures.agreement import pearson
from explain.measures.statistics import t_quantile

from .html import finite

# What the colour of an overlay means, for each way the maps are scaled before drawing.
PER_MAP = "share of the map's maximum\n(negative values at 0)"
PER_IMAGE = "share of the image's largest value\nover all classes shown"
PER_FILMSTRIP = "share of the image's largest value\nover the epochs shown"

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]


def np_image(t: Tensor) -> np.ndarray:
    return t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def overlays(images01: Tensor, maps: Tensor, joint: bool = False) -> list[np.ndarray]:
    """Overlay tiles; ``joint`` scales all maps of an image together (``maps [N, K, H, W]``)."""
    if joint:
        n, k = maps.shape[:2]
        scaled = render.normalize_maps(maps.float(), dims=(-3, -2, -1))
        tiles = render.overlay(images01.repeat_interleave(k, 0), scaled.flatten(0, 1))
        return [np_image(t) for t in tiles.view(n, k, *tiles.shape[1:]).flatten(0, 1)]
    scaled = render.normalize_maps(maps.float())
    return [np_image(t) for t in render.overlay(images01.float(), scaled)]


def grid_figure(
    tiles: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str] = (),
    col_labels: Sequence[str] = (),
    titles: Sequence[Sequence[str]] | None = None,
    frames: Sequence[Sequence[str | None]] | None = None,
    size: float = 1.0,
    colorbar: str | None = PER_MAP,
) -> tuple[Figure, Any, list[list[tuple[int, int]]]]:
    """A grid of image tiles drawn as one image, with row labels left and column labels on top.

    All tiles are pasted into a single canvas shown by one ``imshow`` (a hundred small axes
    cost matplotlib seconds to lay out and save). ``colorbar`` labels the one turbo colour
    bar drawn on the right (None: no bar, for grids without heatmaps). Returns the figure,
    its axes and the top-left pixel ``(y, x)`` of every tile, so callers can draw boxes on
    a tile.
    """
    rows, cols = len(tiles), max(len(r) for r in tiles)
    first = next(t for r in tiles for t in r if t is not None)
    h, w = first.shape[:2]
    pad = max(2, h // 10)
    gap = h // 2 if titles else 0  # room for a title line above each tile
    height = rows * (h + pad + gap) + pad
    width = cols * (w + pad) + pad
    canvas = np.ones((height, width, 3))
    where: list[list[tuple[int, int]]] = []
    for r in range(rows):
        where.append([])
        for c in range(cols):
            y, x = pad + gap + r * (h + pad + gap), pad + c * (w + pad)
            where[r].append((y, x))
            tile = tiles[r][c] if c < len(tiles[r]) else None
            if tile is not None:
                canvas[y : y + h, x : x + w] = tile
    scale = size / w  # inches per tile pixel
    fig = Figure(figsize=(width * scale, height * scale), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for r in range(rows):
        y, x = where[r][0]
        if r < len(row_labels):
            ax.text(x - pad, y + h / 2, row_labels[r], ha="right", va="center", fontsize=8)
        for c in range(cols):
            y, x = where[r][c]
            if c >= len(tiles[r]) or tiles[r][c] is None:
                continue
            if titles and titles[r][c]:
                ax.text(x + w / 2, y - 2.2, titles[r][c], ha="center", va="bottom", fontsize=6.5)
            colour = frames[r][c] if frames else None
            if colour:
                ax.add_patch(Rectangle((x - 1.5, y - 1.5), w + 2, h + 2, fill=False,
                                       edgecolor=colour, linewidth=2))
    for c, label in enumerate(col_labels[:cols]):
        y, x = where[0][c]
        ax.text(x + w / 2, y - gap - pad, label, ha="center", va="bottom", fontsize=7.5)
    if colorbar:
        heatmap_colorbar(fig, colorbar)
    return fig, ax, where


def heatmap_colorbar(fig: Figure, label: str) -> None:
    """A 0..1 colour bar right of a full-figure tile grid, in the overlays' own colours.

    The bar's colour map is the engine's table (``render.TURBO``, matplotlib's turbo to
    within 1/255), so it shows exactly the colours the tiles were blended with. It sits
    outside the figure's box; the page saves with ``bbox_inches="tight"``, which takes it
    in. Sized in inches, so a one-row grid and a twenty-row grid get the same bar.
    """
    width, height = fig.get_size_inches()
    bar = min(0.85 * height, 3.0)
    cax = fig.add_axes((1 + 0.12 / width, (height - bar) / (2 * height), 0.1 / width,
                        bar / height))
    cmap = ListedColormap(render.TURBO.numpy(), name="turbo")
    cb = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), cax=cax)
    cb.set_ticks([0, 0.5, 1])
    cb.ax.tick_params(labelsize=6, length=2)
    cb.set_label(label, fontsize=6.5)


def draw_box(
    ax: Any, box: Tensor | None, colour: str, at: tuple[int, int], style: str = "-"
) -> None:
    if box is None or not bool(torch.isfinite(box).all()):
        return
    x0, y0, x1, y1 = (float(v) for v in box)
    top, left = at
    # Boxes are pixel edges with exclusive ends; imshow puts pixel centres on integers.
    ax.add_patch(Rectangle((left + x0 - 0.5, top + y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                           edgecolor=colour, linewidth=1.6, linestyle=style))


def fig_confusion(confusion: Tensor, names: list[str]) -> Figure:
    """Counts with row-normalised colour."""
    c = confusion.float()
    share = c / c.sum(1, keepdim=True).clamp_min(1)
    k = len(names)
    side = max(3.5, 0.42 * k + 1.4)
    fig = Figure(figsize=(side + 0.8, side), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(c[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.55 else "#1d232b")
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return fig


def fig_images_classes(images01: Tensor, maps: Tensor, probs: Tensor, labels: Tensor,
                       names: list[str]) -> Figure:
    n, k = maps.shape[:2]
    tiles = overlays(images01, maps, joint=True)
    grid = [[tiles[i * k + j] for j in range(k)] for i in range(n)]
    titles = [[f"p={float(probs[i, j]):.2f}" for j in range(k)] for i in range(n)]
    frames = [["#1e7d34" if j == int(labels[i]) else None for j in range(k)] for i in range(n)]
    row_labels = [f"{names[int(labels[i])]}" for i in range(n)]
    fig, _, _ = grid_figure(grid, row_labels, [f"map: {c}" for c in names[:k]], titles, frames,
                            colorbar=PER_IMAGE)
    return fig


def fig_methods(images01: Tensor, maps: dict[str, Tensor], col_labels: list[str]) -> Figure:
    rows = [[np_image(t) for t in images01]]
    rows += [overlays(images01, m) for m in maps.values()]
    fig, _, _ = grid_figure(rows, ["image", *maps], col_labels)
    return fig


def fig_side_by_side(images01: Tensor, maps: list[dict[str, Tensor]], labels: list[str],
                     methods: list[str], col_labels: list[str]) -> Figure:
    rows = [[np_image(t) for t in images01]]
    row_labels = ["image"]
    for m in methods:
        for label, per_model in zip(labels, maps, strict=True):
            rows.append(overlays(images01, per_model[m]))
            row_labels.append(f"{m} [{label}]")
    fig, _, _ = grid_figure(rows, row_labels, col_labels)
    return fig


def fig_cam_pair(images01: Tensor, cam: Tensor, grad: Tensor, col_labels: list[str]) -> Figure:
    r = pearson(cam, grad)
    rows = [[np_image(t) for t in images01], overlays(images01, cam), overlays(images01, grad)]
    titles = [[""] * len(cam), [""] * len(cam), [f"r={float(v):.3f}" for v in r]]
    fig, _, _ = grid_figure(rows, ["image", "CAM", "Grad-CAM"], col_labels, titles)
    return fig


def fig_localisation(images01: Tensor, maps: dict[str, Tensor], boxes: dict[str, Tensor],
                     gt: Tensor | None, col_labels: list[str]) -> Figure:
    rows = [overlays(images01, m) for m in maps.values()]
    fig, ax, where = grid_figure(rows, list(maps), col_labels)
    for r, m in enumerate(maps):
        for c in range(len(images01)):
            if gt is not None:
                draw_box(ax, gt[c], "#2ca02c", where[r][c], "--")
            draw_box(ax, boxes[m][c], "#d62728", where[r][c])
    return fig


def fig_faithfulness(curves: dict[str, dict[str, Tensor]]) -> Figure:
    fig = Figure(figsize=(11, 4.2), dpi=100)
    axes = fig.subplots(1, 2)
    for i, (m, c) in enumerate(curves.items()):
        x = c["fractions"].numpy()
        style = "-" if i < 10 else "--"
        colour = PALETTE[i % len(PALETTE)]
        for ax, key in zip(axes, ("deletion", "insertion"), strict=True):
            y = c[f"{key}_curve"].mean(0).numpy()
            auc = float(c[f"{key}_auc"].mean())
            ax.plot(x, y, style, color=colour, label=f"{m} ({auc:.3f})", linewidth=1.5)
    for ax, title in zip(axes, ("Deletion (lower area is better)",
                                "Insertion (higher area is better)"), strict=True):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("fraction of pixels deleted / inserted")
        ax.set_ylabel("probability of the predicted class")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, title="method (mean AUC)", title_fontsize=7)
    fig.tight_layout()
    return fig


def fig_sanity_curves(steps: list[str], spearman: dict[str, Tensor], threshold: float) -> Figure:
    fig = Figure(figsize=(10, 4.2), dpi=100)
    ax = fig.add_subplot()
    x = np.arange(1, len(steps) + 1)
    for i, (m, rho) in enumerate(spearman.items()):
        vals = rho.float()
        mean = torch.nanmean(vals, 1).numpy()
        ok = torch.isfinite(vals)
        cnt = ok.sum(1).clamp_min(1).float()
        centred = torch.where(ok, vals - torch.nanmean(vals, 1, keepdim=True),
                              torch.zeros_like(vals))
        sd = (centred.pow(2).sum(1) / (cnt - 1).clamp_min(1)).sqrt()
        tq = torch.tensor([t_quantile(0.975, max(int(c) - 1, 1)) for c in cnt])
        half = (tq * sd / cnt.sqrt()).numpy()
        colour = PALETTE[i % len(PALETTE)]
        style = "-o" if i < 10 else "--s"
        ax.plot(x, mean, style, color=colour, label=m, markersize=4, linewidth=1.5)
        ax.fill_between(x, mean - half, mean + half, color=colour, alpha=0.12)
    ax.axhline(threshold, color="#b3261e", linestyle="--", linewidth=1)
    ax.axhline(0.0, color="#888888", linewidth=0.6)
    ax.set_xticks(x, [f"+{s}" for s in steps], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Spearman rank correlation with trained maps")
    ax.set_xlabel("cascading randomisation: blocks re-initialised so far (head first)")
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return fig


def fig_sanity_maps(image01: Tensor, maps: dict[str, Tensor], columns: list[str]) -> Figure:
    rows = []
    for stack in maps.values():
        rows.append(overlays(image01.expand(stack.shape[0], *image01.shape), stack[:, 0]))
    fig, _, _ = grid_figure(rows, list(maps), columns, size=0.9)
    return fig


def fig_bias(energy: dict[str, Any], method: str, names: list[str], border_width: int,
             border_area: float, cue_area: float | None) -> Figure:
    """Per class: the method's energy in the border and, with a declared cue, in the patch."""
    st = energy[method]
    has_cue = "cue_energy" in st
    fig = Figure(figsize=(11 if has_cue else 6, 3.8), dpi=100)
    axes = fig.subplots(1, 2 if has_cue else 1, squeeze=False)[0]
    x = np.arange(len(names))

    def means(d: dict[str, Any]) -> np.ndarray:
        return np.array([
            (d.get(n) or {}).get("mean") if finite((d.get(n) or {}).get("mean")) else np.nan
            for n in names
        ], dtype=float)

    ax = axes[0]
    ax.bar(x, means(st["border_energy"]), color="#1f77b4")
    ax.axhline(border_area, color="#b3261e", linestyle="--", linewidth=1,
               label="border share of the area")
    ax.set_title(f"{method} energy in the {border_width}-px border", fontsize=10)
    if has_cue:
        ax = axes[1]
        ax.bar(x - 0.2, means(st["cue_energy"]), width=0.4, color="#d62728", label="with cue")
        ax.bar(x + 0.2, means(st["cue_region_energy_without_cue"]), width=0.4, color="#d62728",
               alpha=0.35, hatch="//", label="same region, no cue")
        ax.axhline(cue_area, color="#444444", linestyle="--", linewidth=1,
                   label="patch share of the area")
        ax.set_title(f"{method} energy in the cue patch", fontsize=10)
    for i, ax in enumerate(axes):
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        # The cue panel zooms in: a 4x4 patch is ~2% of a 32x32 image, invisible on 0..1.
        top = 1.0 if i == 0 else min(1.0, max(0.1, 1.3 * max(
            [cue_area or 0.0] + [v for v in (*means(st["cue_energy"]),
                                           *means(st["cue_region_energy_without_cue"]))
                               if np.isfinite(v)])))
        ax.set_ylim(0, top)
        ax.set_ylabel("share of positive map mass")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_evolution_maps(evis: dict[str, Any], max_epochs: int = 12, max_images: int = 10) -> Figure:
    maps = evis["maps"]  # [E, N, H, W]
    e, n = maps.shape[:2]
    cols = np.unique(np.linspace(0, e - 1, min(e, max_epochs)).round().astype(int)).tolist()
    n = min(n, max_images)
    images01 = evis["images01"][:n]
    sel = torch.nan_to_num(maps[cols, :n].float(), nan=0.0).clamp_min(0)  # [E', N, H, W]
    peak = sel.amax(dim=(0, 2, 3), keepdim=True)
    scaled = torch.where(peak > 0, sel / peak.clamp_min(1e-12), torch.zeros_like(sel))
    rows = []
    for i in range(n):
        row = [np_image(images01[i])]
        row += [np_image(render.overlay(images01[i : i + 1], scaled[j, i : i + 1])[0])
                for j in range(len(cols))]
        rows.append(row)
    names = evis["class_names"]
    labels = [names[int(c)] if int(c) < len(names) else str(int(c)) for c in evis["labels"][:n]]
    fig, _, _ = grid_figure(rows, labels, ["image", *[f"epoch {evis['epochs'][j]}" for j in cols]],
                            size=0.9, colorbar=PER_FILMSTRIP)
    return fig


def fig_evolution_curves(ev: dict[str, Any]) -> Figure:
    scalars = ev["scalars"]
    quantities = sorted({q for per in scalars.values() for q in per})
    cols = min(3, len(quantities))
    rows = -(-len(quantities) // cols)
    fig = Figure(figsize=(4 * cols, 2.8 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    epochs = ev["epochs"]
    for qi, q in enumerate(quantities):
        ax = axes[qi // cols, qi % cols]
        for mi, (m, per) in enumerate(scalars.items()):
            ys = [np.nan if v is None else v for v in per.get(q, [])]
            if ys:
                ax.plot(epochs[: len(ys)], ys, "-o", markersize=3,
                        color=PALETTE[mi % len(PALETTE)], label=m)
        ax.set_title(q, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if qi == 0:
            ax.legend(fontsize=7)
    for qi in range(len(quantities), rows * cols):
        axes[qi // cols, qi % cols].axis("off")
    fig.tight_layout()
    return fig


def fig_hotspots(mean_maps: Tensor, names: list[str], boxes: dict[str, list[int]],
                 suspects: set[str], lifts: list[float]) -> Figure:
    """Class-mean maps with their hotspot windows (red for suspects)."""
    k = len(names)
    fig = Figure(figsize=(1.5 * k + 0.8, 2.1), dpi=100)
    axes = fig.subplots(1, k, squeeze=False)[0]
    peak = float(mean_maps.max()) or 1.0
    image = None
    for ax, name, mean, lift in zip(axes, names, mean_maps, lifts, strict=False):
        image = ax.imshow(mean.numpy(), cmap="turbo", vmin=0, vmax=peak)
        x0, y0, x1, y1 = boxes[name]
        colour = "#d62728" if name in suspects else "white"
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                               edgecolor=colour, linewidth=2))
        ax.set_title(f"{name}\nlift {lift:.1f}", fontsize=8,
                     color=colour if name in suspects else "black")
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.01,
                     label="mean share of a map's mass")
    return fig


def fig_transplant(before: Tensor, after: Tensor, box: list[int],
                   titles: list[list[str]] | None = None) -> Figure:
    """Images before and after a hotspot transplant (the pasted window outlined), with the
    model's prediction above each tile."""
    rows = [[np_image(t) for t in before], [np_image(t) for t in after]]
    fig, ax, where = grid_figure(rows, ["before", "after"], titles=titles, colorbar=None)
    x0, y0, x1, y1 = box
    for c in range(len(after)):
        draw_box(ax, torch.tensor([x0, y0, x1, y1], dtype=torch.float32), "#ffd400",
                 where[1][c])
    return fig
