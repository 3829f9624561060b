"""The monitor's image grid: each fixed image, then its map(s), every tile captioned.

Each tile carries its class, probability and the image's right/wrong (:func:`captions`),
on a green strip when the image is predicted right, red when wrong.
"""

from __future__ import annotations

import torch
from torch import Tensor

from explain import records, render

from . import grid_captions


def grid(
    images01: Tensor,
    maps: Tensor,
    classes: Tensor | None,
    labels: Tensor,
    preds: Tensor,
    probs: Tensor,
    names: list[str],
    class_mode: str,
    upscale: int,
) -> Tensor:
    """The grid image ``[3, H, W]``.

    ``images01``: the images in ``[0, 1]``; ``maps``/``classes``: see
    :func:`callbacks.monitor_explain.class_maps`; ``class_mode``: the monitor's ``classes``
    (``all``: every explained map per image; ``true``/``predicted``: that class's map,
    eight tiles a row); ``upscale``: nearest-neighbour enlargement of the tiles.
    """
    images01 = images01.cpu()
    labels, preds, probs = labels.cpu(), preds.cpu(), probs.cpu().float()
    ok = preds == labels
    n, k = maps.shape[:2]
    if class_mode == "all":
        # Scale by each image's peak over all classes so strong and weak classes differ.
        # (Beyond explain.ALL_CLASSES_MAX classes with only some explained, the columns
        # are the explained maps: the true, then the predicted class.)
        shown = render.normalize_maps(maps, dims=(-3, -2, -1))
        overlays = render.overlay(
            images01.repeat_interleave(k, 0), shown.flatten(0, 1)
        ).view(n, k, *images01.shape[1:])
        tiles = torch.cat([render.frame(images01, ok)[:, None], overlays], 1).flatten(0, 1)
        ncol = k + 1
        map_classes = (torch.arange(k).expand(n, k) if classes is None
                       else classes.cpu().long())
    else:
        pick = labels if class_mode == "true" else preds
        shown = render.normalize_maps(records.class_maps(maps, classes, pick))
        overlays = render.overlay(images01, shown)
        tiles = torch.stack([render.frame(images01, ok), overlays], 1).flatten(0, 1)
        ncol = 8
        map_classes = pick[:, None]
    tiles = render.upscale(tiles.clamp(0, 1), upscale)
    texts = captions(names, labels, preds, probs, map_classes,
                     grid_captions.caption_marks(grid_captions.caption_size(tiles.shape[-1])))
    colours = torch.tensor([grid_captions.CAPTION_RIGHT if right else grid_captions.CAPTION_WRONG
                            for right in ok.tolist()]).repeat_interleave(len(tiles) // n, 0)
    return render.grid(grid_captions.caption(tiles, texts, colours), ncol=ncol)


def captions(
    names: list[str],
    labels: Tensor,
    preds: Tensor,
    probs: Tensor,
    map_classes: Tensor,
    marks: tuple[str, str] = ("ok", "x"),
) -> list[list[str]]:
    """Every grid tile's caption lines, in the grid's order (per image: the image, then
    one tile per ``map_classes[i]`` entry).

    The image tile: its true class, then the mark (``marks``: right, wrong) with the
    probability of the true class when predicted right (``cat`` / ``ok 0.82``), or the
    probability and name of the predicted class when wrong (``cat`` / ``x 0.61 dog``: a
    name too long for the tile loses its end, never the number). A map tile: the class
    its map explains, then the image's mark and that class's probability (``cat`` /
    ``x 0.20``).
    """
    out: list[list[str]] = []
    for i, (y, p) in enumerate(zip(labels.tolist(), preds.tolist(), strict=True)):
        right = y == p
        mark = marks[0] if right else marks[1]
        verdict = (f"{mark} {probs[i, y]:.2f}" if right
                   else f"{mark} {probs[i, p]:.2f} {names[p]}")
        out.append([names[y], verdict])
        out.extend([names[c], f"{mark} {probs[i, c]:.2f}"] for c in map_classes[i].tolist())
    return out
