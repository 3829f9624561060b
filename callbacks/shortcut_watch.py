"""The monitor's shortcut watch: lifts as a detector, the causal test as the verdict.

Per method, the class-mean hotspot lift of the true-class maps is logged as a detector
(``explain/<method>/hotspot_lift/<class>``; a class without a usable map logs nothing
rather than NaN). Once per epoch, on one method's maps (``shortcut_method``), a
:class:`explain.measures.tracking.ShortcutTracker` runs the transplant test of every
candidate class and of every shortcut already confirmed, and the watch logs its numbers
under ``explain/shortcuts/...``, writes the epoch's table to TensorBoard's text tab and
prints one line when a shortcut is confirmed, goes or comes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from explain import render
from explain.measures import discovery, tracking
from explain.measures.causal import box_label, place_words

from .tensorboard_layout import SHORTCUTS, scalar_tag


def lift_scores(true_maps: Tensor | None, labels: Tensor, names: Sequence[str],
                ) -> tuple[dict[str, float], list[discovery.ClassHotspots] | None]:
    """``hotspot_lift/<class>`` of every class with a usable map, and the hotspots."""
    if true_maps is None:
        return {}, None
    hotspots = discovery.class_hotspots(true_maps.float(), labels, len(names), cluster=False)
    scores = {f"hotspot_lift/{names[h.label]}": h.hotspot.lift
              for h in hotspots if h.hotspot is not None}
    return scores, hotspots


def verdict_scalars(verdict: tracking.EpochVerdict, names: Sequence[str]) -> dict[str, float]:
    """The tracker's numbers as ``explain/shortcuts/...`` scalars (never NaN: a class with
    no test this epoch logs nothing)."""
    out = {scalar_tag(SHORTCUTS, "confirmed"): float(len(verdict.confirmed))}
    for r in verdict.rows:
        t, name = r.test, names[r.label]
        if t is None or not t.n:
            continue
        out[scalar_tag(SHORTCUTS, f"flips/{name}")] = t.flip_rate
        out[scalar_tag(SHORTCUTS, f"is_confirmed/{name}")] = float(r.state == "confirmed")
        if t.intervals:
            out[scalar_tag(SHORTCUTS, f"margin/{name}")] = t.margin.mean
            out[scalar_tag(SHORTCUTS, f"strongest_control/{name}")] = t.strongest_control
    return out


def announce(verdict: tracking.EpochVerdict, names: Sequence[str], method: str) -> None:
    """One console line per event of the epoch."""
    for e in verdict.events:
        name, epoch = names[e.label], verdict.epoch
        kind = e.test.kind
        where = place_words(kind, e.box)
        found = (f"the box of {' and '.join(names[a] for a in e.test.also)}'s shortcut, "
                 "which its images carry too" if e.test.also else f"found in its {method} maps")
        how = (f"laying {where} over other images" if kind in ("filter", "colour") else
               f"pasting {where} ({found}) from its images")
        if e.kind == "confirmed":
            rank_zero_warn(
                f"ExplanationMonitor: class {name} relies on a shortcut at epoch {epoch}: "
                f"{how} makes {e.test.describe(names)}; it is followed every epoch from now "
                "on")
        elif e.kind == "gone":
            rank_zero_warn(f"ExplanationMonitor: class {name} no longer relies on {where} at "
                           f"epoch {epoch}: {e.test.describe(names)}")
        else:
            rank_zero_warn(f"ExplanationMonitor: class {name} relies on {where} again at "
                           f"epoch {epoch}: {e.test.describe(names)}")


def _resized(true_maps: Tensor, images: Tensor) -> Tensor:
    """The maps at the images' resolution (bilinear), where they differ."""
    if true_maps.shape[-2:] == images.shape[-2:]:
        return true_maps
    return torch.nn.functional.interpolate(
        true_maps.float().unsqueeze(1), size=tuple(images.shape[-2:]), mode="bilinear",
        align_corners=False).squeeze(1)


def run_tracker(tracker: tracking.ShortcutTracker, epoch: int, model: nn.Module,
                images: Tensor, labels: Tensor, preds: Tensor, true_maps: Tensor,
                hotspots: list[discovery.ClassHotspots], num_classes: int,
                ) -> tracking.EpochVerdict:
    """One epoch of causal tests on the fixed images (maps resized to the images first)."""
    norm, usable = discovery.normalise_maps(_resized(true_maps, images))
    return tracker.step(epoch, model, images.detach().cpu(), labels, preds, norm, usable,
                        hotspots, num_classes)


def baseline(tracker: tracking.ShortcutTracker, model: nn.Module, images: Tensor,
             labels: Tensor, preds: Tensor, true_maps: Tensor, num_classes: int,
             ) -> tracking.EpochVerdict:
    """The followed boxes tested on the starting weights (the "before" point of a run that
    removes known shortcuts), maps resized to the images first."""
    norm, usable = discovery.normalise_maps(_resized(true_maps.float(), images))
    return tracker.baseline(model, images.detach().cpu(), labels, preds, norm, usable,
                            num_classes)


def log_before(verdict: tracking.EpochVerdict, names: Sequence[str], loggers: Sequence[Any],
               tb: Any) -> None:
    """The "before" point at step 0: its scalars to every logger, a console line per
    followed shortcut (:func:`before_line`), the table to TensorBoard's text tab."""
    scalars = verdict_scalars(verdict, names)
    for line in before_line(verdict, names):
        rank_zero_warn(line)
    for logger in loggers:
        logger.log_metrics(scalars, step=0)
    if tb is not None:
        tb.add_text(scalar_tag(SHORTCUTS, "summary"), tracking.summary_markdown(verdict, names), 0)


def before_line(verdict: tracking.EpochVerdict, names: Sequence[str]) -> list[str]:
    """One console line per followed shortcut at the start of a run that removes it."""
    def where(r: tracking.ClassRow) -> str:
        return place_words(r.followed.kind, r.followed.box) if r.followed else box_label(None)

    return [f"ExplanationMonitor: before fine-tuning, class {names[r.label]} reads as "
            f"{r.state} on {where(r)}: {r.test.describe(names)}"
            for r in verdict.rows if r.test is not None]


def hotspot_image(true_maps: Tensor, labels: Tensor, hotspots: list[discovery.ClassHotspots],
                  num_classes: int, confirmed: dict[int, Any], upscale: int) -> Tensor:
    """The class-mean maps side by side with each hotspot window (white) or followed
    shortcut box (red)."""
    norm, usable = discovery.normalise_maps(true_maps)
    h, w = true_maps.shape[-2:]
    tiles = []
    for c in range(num_classes):
        mean = tracking.class_mean_maps(norm, usable, labels, c)
        tile = render.overlay(torch.zeros(1, 3, h, w), render.normalize_maps(mean[None]),
                              alpha=1.0)[0]
        followed = confirmed.get(c)
        box = followed.box if followed is not None and followed.box is not None else (
            hotspots[c].hotspot.window if hotspots[c].hotspot is not None else None)
        if box is not None:
            x0, y0, x1, y1 = box  # maps and images share one resolution here
            colour = torch.tensor([0.9, 0.1, 0.1] if followed is not None else [1.0, 1.0, 1.0])
            for ys, xs in ((slice(y0, y0 + 1), slice(x0, x1)), (slice(y1 - 1, y1), slice(x0, x1)),
                           (slice(y0, y1), slice(x0, x0 + 1)), (slice(y0, y1), slice(x1 - 1, x1))):
                tile[:, ys, xs] = colour.view(3, 1, 1)
        tiles.append(tile)
    stacked = render.upscale(torch.stack(tiles).clamp(0, 1), upscale)
    return render.grid(stacked, ncol=num_classes)
