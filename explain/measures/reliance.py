"""How much a model still relies on a known shortcut: the measures before and after a fix.

For a class and a box (a shortcut confirmed earlier, or declared), one :class:`Reliance`
holds what a user needs to decide whether a fix worked:

* the transplant (:func:`.causal.box_test`): the box cut from the class's images and
  pasted onto other classes' images, flips towards the class against its controls;
* the class's accuracy on its own images with the box *covered* by the same place of
  another class's image (the images the shortcut was hiding), against as they are;
* accuracy on all the images;
* the relevance left in the box: the share of the class's saliency mass inside it over
  the box's share of the area (1 = no more than anywhere else).

A shortcut with no place (a filter: a tint, a cast) is measured the same way by
:func:`measure_filter`, with ranges where boxes take pixels (:func:`.causal.filter_test`)
and no relevance.

:func:`verdict` reads them as ``gone`` (the margin within the controls' interval),
``weakened`` or ``still there``. Torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import causal
from .confirmation import predict

Box = causal.Box
VERDICTS = ("gone", "weakened", "still there")


@dataclass
class Reliance:
    """One model's reliance on one shortcut (class ``label``, ``box``; ``box`` None: a
    filter, measured by its range)."""

    label: int
    box: Box | None
    transplant: causal.CausalTest
    accuracy: float  # on every image
    class_accuracy: float  # the class's own images as they are
    # The same with the box covered by another class's content (a filter: with another
    # class's image's range laid over them).
    class_accuracy_covered: float
    relevance_ratio: float  # saliency mass in the box over its area share (NaN: no maps)

    @property
    def verdict(self) -> str:
        return verdict(self.transplant)


def verdict(test: causal.CausalTest) -> str:
    """``gone`` when the transplant's margin is within the controls' interval (below
    ``MIN_FLIP_MARGIN`` with the interval reaching zero), ``still there`` when it is
    confirmed, ``weakened`` in between."""
    if test.confirmed:
        return "still there"
    return "gone" if test.gone else "weakened"


def cover_with_others(images: Tensor, labels: Tensor, label: int, box: Box,
                      seed: int = 0) -> tuple[Tensor, Tensor]:
    """The class's own images with ``box`` covered by the same place of a random image of
    another class (seeded), and their indices."""
    own = torch.nonzero(labels == label).flatten()
    others = torch.nonzero(labels != label).flatten()
    out = images[own].clone()
    if own.numel() and others.numel():
        g = torch.Generator().manual_seed(seed)
        src = others[torch.randint(others.numel(), (own.numel(),), generator=g)]
        x0, y0, x1, y1 = box
        out[:, :, y0:y1, x0:x1] = images[src, :, y0:y1, x0:x1]
    return out, own


def relevance_ratio(maps: Tensor, box: Box) -> float:
    """Mean over maps ``[n, H, W]`` of the positive mass inside ``box`` over the box's area
    share; NaN without a map that has mass."""
    pos = maps.detach().float().clamp_min(0)
    total = pos.flatten(1).sum(1)
    keep = total > 0
    if not bool(keep.any()):
        return float("nan")
    x0, y0, x1, y1 = box
    inside = pos[:, y0:y1, x0:x1].flatten(1).sum(1)
    area = (x1 - x0) * (y1 - y0) / (maps.shape[-1] * maps.shape[-2])
    return float((inside[keep] / total[keep]).mean() / area)


def measure(model: nn.Module, images: Tensor, labels: Tensor, label: int, box: Box,
            maps: Tensor | None = None, norm_maps: Tensor | None = None, seed: int = 0,
            batch_size: int = 256, sources: list[int] | None = None) -> Reliance:
    """Every measure of :class:`Reliance` for one model on ``images`` (model input space).

    ``maps``: the true-class saliency maps of ``images`` ``[N, H, W]`` for the relevance
    (NaN without); ``norm_maps``: the same normalised, for the transplant's
    most-salient-window control (a random window without). ``sources``: the images the
    box is cut from (default: all of the class's).
    """
    labels = labels.long().cpu()
    preds = predict(model, images, batch_size)
    test = causal.box_test(model, images, labels, preds, label, box, sources, seed=seed,
                           batch_size=batch_size, norm_maps=norm_maps)
    covered, own = cover_with_others(images, labels, label, box, seed)
    relevance = relevance_ratio(maps[own], box) if maps is not None else float("nan")
    return _reliance(model, label, box, test, preds, labels, own, covered, relevance,
                     batch_size)


def filter_with_others(images: Tensor, labels: Tensor, label: int, seed: int = 0,
                       ) -> tuple[Tensor, Tensor]:
    """The class's own images with the per-channel range of a random image of another
    class laid over each (seeded; the filter's cover), and their indices."""
    own = torch.nonzero(labels == label).flatten()
    others = torch.nonzero(labels != label).flatten()
    if not (own.numel() and others.numel()):
        return images[own].clone(), own
    g = torch.Generator().manual_seed(seed)
    src = others[torch.randint(others.numel(), (own.numel(),), generator=g)]
    lo, span = causal.channel_ranges(images)
    return causal.lay_range(images[own], lo[own], span[own], lo[src], span[src]), own


def measure_filter(model: nn.Module, images: Tensor, labels: Tensor, label: int,
                   seed: int = 0, batch_size: int = 256) -> Reliance:
    """:func:`measure` for a filter of class ``label``: the range test as the transplant,
    the class's images with another class's range as the covered ones, no relevance."""
    labels = labels.long().cpu()
    preds = predict(model, images, batch_size)
    test = causal.filter_test(model, images, labels, preds, label, seed, batch_size)
    covered, own = filter_with_others(images, labels, label, seed)
    return _reliance(model, label, None, test, preds, labels, own, covered, float("nan"),
                     batch_size)


def _reliance(model: nn.Module, label: int, box: Box | None, test: causal.CausalTest,
              preds: Tensor, labels: Tensor, own: Tensor, covered: Tensor,
              relevance: float, batch_size: int) -> Reliance:
    covered_preds = predict(model, covered, batch_size)
    nan = float("nan")
    return Reliance(
        label=label, box=None if box is None else tuple(int(v) for v in box),  # type: ignore[arg-type]
        transplant=test,
        accuracy=float((preds == labels).float().mean()) if labels.numel() else nan,
        class_accuracy=float((preds[own] == label).float().mean()) if own.numel() else nan,
        class_accuracy_covered=(float((covered_preds == label).float().mean())
                                if own.numel() else nan),
        relevance_ratio=relevance,
    )
