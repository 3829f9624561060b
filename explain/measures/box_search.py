"""Choosing a shortcut's box by evidence: windows of several sizes at a class's hotspot,
each tested by :func:`.causal.box_test`, the one with the largest margin kept (the monitor
and the audit search the same way). Torch only."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .causal import Box, CausalTest, _flips, _targets, box_test
from .confirmation import MIN_FLIP_MARGIN, _paste

#: Window sides tried for a box, as fractions of the image side (4, 6, 8 and 11 px at 32).
BOX_FRACTIONS = (1 / 8, 3 / 16, 1 / 4, 1 / 3)
#: The one window a class is screened with before the search (8 px at 32): large enough to
#: hold a smaller cue near the hotspot's centre, small enough to miss most of an object.
SCREEN_FRACTION = 1 / 4
#: Boxes whose margin is within this of the best one count as equally good; the smallest
#: of them that flips within this of the most is kept (a larger box around a cue pastes the
#: cue too, and scores the same; a box inside it scores nearly the same margin, its larger
#: controls being held down as much as its flips, yet loses the flips the rest of the cue
#: carried: 81% against 100% for a 2 px box in a 4 px patch).
TIE_MARGIN = 0.05
#: Most boxes of one search that get the full test (with controls) after the screen.
FULL_TESTS = 2


def window_side(side: int, fraction: float) -> int:
    return min(side, max(1, round(fraction * side)))


def window_size(h: int, w: int, fraction: float) -> tuple[int, int]:
    """The ``(height, width)`` of a window ``fraction`` of an ``h`` x ``w`` image's sides."""
    return window_side(h, fraction), window_side(w, fraction)


def best_window(mean_map: Tensor, size: tuple[int, int]) -> Box:
    """The ``size`` window holding the most of ``mean_map`` ``[H, W]``."""
    kh, kw = size
    mass = F.avg_pool2d(mean_map[None, None].float(), (kh, kw), stride=1)[0, 0]
    best = int(mass.flatten().argmax())
    y0, x0 = divmod(best, mass.shape[1])
    return (x0, y0, x0 + kw, y0 + kh)


def candidate_boxes(mean_map: Tensor, fractions: Sequence[float] = BOX_FRACTIONS) -> list[Box]:
    """The best window of each size, plus the peak's own box (the pixels of the largest
    window holding at least half its peak), smallest first, without repeats."""
    h, w = mean_map.shape
    boxes = [best_window(mean_map, window_size(h, w, f)) for f in fractions]
    x0, y0, x1, y1 = boxes[-1]
    part = mean_map[y0:y1, x0:x1]
    if float(part.max()) > 0:
        ys, xs = torch.nonzero(part >= 0.5 * float(part.max()), as_tuple=True)
        boxes.append((x0 + int(xs.min()), y0 + int(ys.min()),
                      x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1))
    unique = list(dict.fromkeys(boxes))
    return sorted(unique, key=lambda b: ((b[2] - b[0]) * (b[3] - b[1]), b))


def search_box(model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor, label: int,
               mean_map: Tensor, sources: Sequence[int] | None = None, seed: int = 0,
               batch_size: int = 256, fractions: Sequence[float] = BOX_FRACTIONS,
               others_of_class: Sequence[int] | None = None, kind: str = "box",
               share: float = 1.0, norm_maps: Tensor | None = None) -> CausalTest:
    """The candidate box (:func:`candidate_boxes`) with the largest margin over its
    controls; among boxes within ``TIE_MARGIN`` of it, the smallest that flips within
    ``TIE_MARGIN`` of the most (the whole cue, not a piece of it). Every box is
    screened; the full test runs on at most ``FULL_TESTS`` of those that pass (the largest
    screened margin, then the smallest)."""
    def test(b: Box, stop: str) -> CausalTest:
        return box_test(model, images, labels, preds, label, b, sources, others_of_class, seed,
                        batch_size, screen=stop != "full", kind=kind, share=share,
                        norm_maps=norm_maps, stop=stop)

    # Three stages, each on fewer boxes: the flips of every box on a few targets; the
    # controls on the same few for those that flip; the full test for at most FULL_TESTS
    # of those that beat the controls there.
    flips = [test(b, "flips") for b in candidate_boxes(mean_map, fractions)]  # smallest first
    flipping = [t for t in flips if not t.screened and t.n]
    if not flipping:
        return max(flips, key=lambda t: (t.flip_rate if t.n else -1.0))
    # The smallest box that flips, and the largest of those that flip (nearly) most: a box
    # inside a larger cue has the rest of the cue "elsewhere" and fails its control, so a
    # box around the whole cue must be among those tested.
    top_flips = max(t.flip_rate for t in flipping)
    widest = [t for t in flipping if t.flip_rate >= top_flips - TIE_MARGIN][-1]
    screened = [test(b, "screen")
                for b in dict.fromkeys([flipping[0].box, widest.box]) if b is not None]
    passing = [t for t in screened if not t.screened]
    if not passing:
        return max(screened, key=lambda t: t.margin.mean)
    best = max(passing, key=lambda t: t.margin.mean)
    chosen = list(dict.fromkeys([best.box] + [t.box for t in passing]))[:FULL_TESTS]
    def extends(small: CausalTest, large: CausalTest) -> bool:
        ring = ring_flip_rate(model, images, labels, preds, label, large.box, small.box,
                              sources, seed, batch_size)
        return ring >= large.strongest_control + MIN_FLIP_MARGIN

    return pick_box([test(b, "full") for b in chosen if b is not None], extends)


def pick_box(full: Sequence[CausalTest],
             extends: Callable[[CausalTest, CausalTest], bool] | None = None) -> CausalTest:
    """Of fully tested boxes, the one a search reports: among those within ``TIE_MARGIN``
    of the largest margin (confirmed ones only, when any is), the smallest that flips
    within ``TIE_MARGIN`` of the most of them; but the smallest tied box when
    ``extends(smallest, that one)`` says the rest of the larger box carries no cue (its
    extra flips came from what sits around the cue)."""
    top = max(full, key=lambda t: t.margin.mean)
    tied = [t for t in sorted(full, key=lambda t: _area(t.box))  # smallest first
            # never trade a confirmed box for a weaker one
            if t.margin.mean >= top.margin.mean - TIE_MARGIN and (t.confirmed or not top.confirmed)]
    most = max(t.flip_rate for t in tied)
    kept = next(t for t in tied if t.flip_rate >= most - TIE_MARGIN)
    smallest = tied[0]
    if (kept is not smallest and extends is not None and smallest.confirmed
            and smallest.box is not None and kept.box is not None
            and not extends(smallest, kept)):
        return smallest
    return kept


def ring_flip_rate(model: nn.Module, images: Tensor, labels: Tensor, preds: Tensor,
                   label: int, outer: Box, inner: Box, sources: Sequence[int] | None = None,
                   seed: int = 0, batch_size: int = 256) -> float:
    """The share of targets (those of :func:`box_test`) that turn into ``label`` when
    ``outer`` cut from the class's images (``sources``) is pasted with the part inside
    ``inner`` left as the target's own: whether the larger box holds cue beyond the
    smaller one (a 2 px box inside a 4 px patch leaves most of the patch in the ring; a
    box around the whole patch leaves only what sits around it)."""
    labels, preds = labels.long().cpu(), preds.long().cpu()
    pool = (torch.as_tensor(list(sources), dtype=torch.long) if sources
            else torch.nonzero(labels == label).flatten())
    targets = _targets(labels, preds, label, seed)
    if targets.numel() == 0 or pool.numel() == 0:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    src = pool[torch.randint(pool.numel(), (targets.numel(),), generator=g)]
    base = images[targets]
    ring = _paste(base, images[src], [outer] * targets.numel(), outer)
    x0, y0 = max(outer[0], inner[0]), max(outer[1], inner[1])
    x1, y1 = min(outer[2], inner[2]), min(outer[3], inner[3])
    if x1 > x0 and y1 > y0:
        ring[:, :, y0:y1, x0:x1] = base[:, :, y0:y1, x0:x1]
    return float(_flips(model, label, {"cue": ring}, batch_size)["cue"].mean())


def _area(box: Box | None) -> int:
    return 0 if box is None else (box[2] - box[0]) * (box[3] - box[1])

