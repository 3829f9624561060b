"""One explained epoch of the monitor: every method's maps, scores, shortcut watch,
grids and the epoch's record.

Runs on one process (rank zero) and calls no collective; the monitor
(:class:`callbacks.ExplanationMonitor`, passed in as ``monitor``) holds the options and
the state (the fixed images, the previous maps, the shortcut tracker) and does each step
through its own module: :mod:`callbacks.monitor_explain`, :mod:`callbacks.monitor_scores`,
:mod:`callbacks.shortcut_watch`, :mod:`callbacks.monitor_grid`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

import explain
from explain import records
from explain.measures import tracking

from . import fixed_images, shortcut_watch
from .tensorboard_layout import SHORTCUTS, image_step, scalar_tag


def explain_epoch(monitor: Any, trainer: L.Trainer, pl_module: L.LightningModule,
                  ) -> dict[str, float]:
    """Explain the fixed images, draw the grids, save the maps; return the scalars
    ``{"explain/<method>/<score>": value}``. Leaves the model as found (train/eval flags,
    BatchNorm statistics, ``.grad``, hooks, the RNG stream)."""
    batch = monitor._fixed_batch(trainer, pl_module.device)
    images, labels = batch["image"], batch["label"].long()
    with explain.eval_mode(pl_module), torch.no_grad():  # eval mode: BN stats stay
        logits = pl_module(images.clone()).float()
    probs = logits.softmax(-1)
    record: dict[str, Any] = {
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "indices": torch.tensor(monitor.indices),
        "labels": labels.cpu(),
        "probs": probs.cpu(),
        "maps": {},
        "scalars": {},
        "nan_maps": {},
    }
    record["explained"], record["explained_rule"] = monitor.explained(logits.shape[-1])
    tb = monitor._tensorboard(trainer)
    out: dict[str, float] = {}
    for method in monitor.methods:
        out.update(_method(monitor, trainer, pl_module, method, batch, logits, record, tb))
    if monitor.save_maps:
        folder = monitor._dir or monitor._log_dir(trainer)
        records.save_fixed_images(
            folder, fixed_images.record(trainer, monitor.indices, batch, monitor.methods))
        records.save_epoch(folder, record)
    return out


def _method(
    monitor: Any,
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    method: str,
    batch: dict[str, torch.Tensor],
    logits: torch.Tensor,
    record: dict[str, Any],
    tb: Any,
) -> dict[str, float]:
    """One method's epoch: its maps into ``record``, its grids to ``tb`` (None: no
    TensorBoard); its scalars (and, for ``shortcut_method``, the shortcut watch's)."""
    images, labels = batch["image"], batch["label"].long()
    probs = logits.softmax(-1)
    preds = probs.argmax(-1)
    n, num_classes = len(images), logits.shape[-1]
    maps, classes = monitor._explain(pl_module, images, method,
                                     bool(torch.isfinite(logits).all()), labels, preds,
                                     num_classes)
    # Images whose map is not finite (a diverged or poisoned model): counted and
    # logged, never drawn or scored (their scores are NaN), and training goes on.
    bad = int((~torch.isfinite(maps).flatten(1).all(1)).sum()) if maps is not None else n
    record["nan_maps"][method] = bad
    out = {scalar_tag(method, "nan_maps"): float(bad)}
    if bad:
        rank_zero_warn(
            f"ExplanationMonitor: {method} gave non-finite maps for {bad} of {n} fixed "
            f"images at epoch {trainer.current_epoch} (does the model output NaN?); "
            "no grid or scores this epoch"
        )
        maps = None
    scalars = monitor._scalars(method, maps, classes, labels.cpu(), batch)
    true_maps = None if maps is None else records.class_maps(maps, classes, labels)
    names = fixed_images.class_names(trainer, num_classes)
    lifts, hotspots = ({}, None) if not monitor.discovery_per_class else (
        shortcut_watch.lift_scores(true_maps, labels.cpu(), names))
    scalars.update(lifts)
    if method == monitor.shortcut_method and hotspots is not None:
        verdict = shortcut_watch.run_tracker(
            monitor.tracker, trainer.current_epoch, pl_module, images, labels.cpu(),
            preds.cpu(), true_maps, hotspots, num_classes)
        out.update(shortcut_watch.verdict_scalars(verdict, names))
        shortcut_watch.announce(verdict, names, method)
        if tb is not None:
            tb.add_text(scalar_tag(SHORTCUTS, "summary"),
                        tracking.summary_markdown(verdict, names), image_step(trainer))
    out.update({scalar_tag(method, k): v for k, v in scalars.items()})
    if maps is None:
        return out
    record["maps"][method] = maps.half()
    if classes is not None:
        record.setdefault("map_classes", {})[method] = classes
    record["scalars"][method] = scalars
    if tb is not None:
        g = min(monitor.num_images, n)  # the grid shows the first num_images
        tb.add_image(scalar_tag(method, "grid"), monitor._grid(
            trainer, images[:g], maps[:g], None if classes is None else classes[:g],
            labels[:g], preds[:g], probs[:g]), image_step(trainer))
        if hotspots is not None:
            followed = monitor.tracker.followed if method == monitor.shortcut_method else {}
            tb.add_image(scalar_tag(method, "hotspots"), shortcut_watch.hotspot_image(
                true_maps.float(), labels.cpu(), hotspots, num_classes, followed,
                monitor.upscale), image_step(trainer))
    return out
