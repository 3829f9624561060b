"""From a confirmed shortcut to the command that fine-tunes it away.

When the audit confirms a shortcut with a place (a box, or a cluster's box) on the first
model it writes, beside the report:

* ``remove_shortcuts.yaml``: a config to add after the run's own, which fine-tunes from the
  audited checkpoint's weights (``model.init_weights``; not its optimizer or epoch counter)
  with the default counter-measure (``model.shortcut_removal``) for a proposed number of
  epochs;
* ``shortcut_pixels.pt``: the box contents cut from the class's images of the validation
  split (the test split never feeds training), plain tensors that load with
  ``weights_only=True``.

A shortcut confirmed by its range (a filter: a tint, a cast) joins the plan as a filter
(``model.shortcut_removal.filters``): the counter-measures swap ranges instead of boxes,
with the class's images of each batch as sources, so it needs no pixels. The report's
shortcut section prints the command. A moving cue (no fixed box) gets no plan: the
counter-measures need a place or a range.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from lit_modules.data.sampling import dataset_labels, sample_batch
from lit_modules.shortcut_removal import (
    ShortcutBox,
    ShortcutFilter,
    ShortcutRemoval,
    save_pixels,
)

if TYPE_CHECKING:
    from torch import Tensor

    from .state import AuditRun, ModelAudit

CONFIG_NAME = "remove_shortcuts.yaml"
PIXELS_NAME = "shortcut_pixels.pt"
#: Images of each class the pixels are cut from.
PIXELS_PER_CLASS = 64
#: Epochs proposed: a quarter of the audited model's training, at least this many. The fix
#: restarts the run's schedule (one-cycle: up to the peak rate, then down); a short one
#: ends before the model has recovered from the peak. Measured on the quickstart's model
#: (86.6% accuracy): 2 epochs of ``augment`` removed both shortcuts but left 83.8% and
#: square right on 78% of its images without the patch; 4 epochs 98.4% and 97%.
MIN_EPOCHS = 4
MAX_EPOCHS = 10
#: The quick alternative the report prints beside the plan: one epoch of ``refit`` (each
#: epoch re-fits the head from scratch on that epoch's rows; one is enough).
QUICK_METHOD = "refit"
QUICK_EPOCHS = 1


@dataclass
class RemovalPlan:
    """What the audit proposes for model ``label``'s confirmed shortcuts."""

    model: str  # "A"
    shortcuts: list[dict[str, Any]]  # class_index, box, class_name
    epochs: int
    method: str
    config_path: str
    pixels_path: str
    command: str
    pixels_from: str  # the split the pixels were cut from
    skipped: list[str] = field(default_factory=list)  # confirmed: no box and no filter
    # The same fix with ``refit`` (the backbone frozen, the head re-fitted; one epoch): it
    # keeps the model's features and accuracy but cannot teach a class the shortcut hid.
    quick_command: str = ""
    filters: list[dict[str, Any]] = field(default_factory=list)  # class_index, class_name


def proposed_epochs(trained_epochs: int | None) -> int:
    """A quarter of the audited model's epochs, between ``MIN_EPOCHS`` and ``MAX_EPOCHS``."""
    if not trained_epochs:
        return MIN_EPOCHS
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(trained_epochs / 4)))


def _class_images(audit: AuditRun, label: int) -> tuple[Tensor, str]:
    """Up to ``PIXELS_PER_CLASS`` images of class ``label`` from the validation split, or
    from the audited split where the data has no validation split."""
    dm = audit.data_run.datamodule
    for split in ("val", audit.settings.split):
        try:
            dataset = dm.dataset(split)
        except (ValueError, KeyError, NotImplementedError, RuntimeError):
            continue
        labels = dataset_labels(dataset)
        idx = torch.nonzero(labels == label).flatten()[:PIXELS_PER_CLASS].tolist()
        if idx:
            return sample_batch(dataset, idx)["image"].float(), split
    return torch.empty(0), ""


def plan_removal(audit: AuditRun, out: Path) -> RemovalPlan | None:
    """The plan for the first model's confirmed shortcuts with a box or a filter, or None."""
    model = audit.models[0]
    result = model.results.get("shortcuts")
    run = model.run
    if result is None or run.ckpt_path is None or run.config_path is None:
        return None
    confirmed = [s for s in result.suspects if s.confirmed]
    boxed = [s for s in confirmed if s.box and s.kind in ("box", "cluster")]
    filtered = [s for s in confirmed if s.kind == "filter"]
    if not boxed and not filtered:
        return None
    epochs = proposed_epochs(_trained_epochs(model))
    config_path = out / CONFIG_NAME
    pixels_path = out / PIXELS_NAME
    command = " ".join([
        "python train.py fit", "--config", shlex.quote(str(run.config_path)),
        "--config", shlex.quote(str(config_path))])
    quick = " ".join([command, "--model.shortcut_removal.method", QUICK_METHOD,
                      "--trainer.max_epochs", str(QUICK_EPOCHS)])
    return RemovalPlan(
        model=model.label,
        shortcuts=[{"class_index": int(s.index), "box": [int(v) for v in s.box],
                    "class_name": str(s.class_name)} for s in boxed],
        epochs=epochs, method="augment", config_path=str(config_path),
        pixels_path=str(pixels_path), command=command, pixels_from="",
        skipped=[str(s.class_name) for s in confirmed if s not in boxed and s not in filtered],
        quick_command=quick,
        filters=[{"class_index": int(s.index), "class_name": str(s.class_name)}
                 for s in filtered])


def _trained_epochs(model: ModelAudit) -> int | None:
    epoch = model.run.meta.get("epoch")
    return int(epoch) + 1 if isinstance(epoch, int) else None


def write_removal(audit: AuditRun, plan: RemovalPlan, folder: Path) -> None:
    """Write the plan's config and pixels into ``folder`` (the report's folder before it is
    swapped into place; the config names the final paths)."""
    patches, boxes = {}, {}
    for s in plan.shortcuts:
        c, box = s["class_index"], tuple(s["box"])
        images, split = _class_images(audit, c)
        if not len(images):
            continue
        x0, y0, x1, y1 = box
        patches[c] = images[:, :, y0:y1, x0:x1]
        boxes[c] = box
        plan.pixels_from = split
    removal = ShortcutRemoval(
        shortcuts=[ShortcutBox(**s) for s in plan.shortcuts], method=plan.method,
        pixels=plan.pixels_path if patches and len(patches) == len(plan.shortcuts) else None,
        filters=[ShortcutFilter(**f) for f in plan.filters])
    if removal.pixels is None:
        plan.pixels_path = ""  # nothing written: the report must not name a missing file
    if removal.pixels is not None:
        save_pixels(folder / PIXELS_NAME, patches, boxes)
    ckpt = audit.models[0].run.ckpt_path
    settings = removal.as_dict()
    config = {
        "model": {"init_weights": str(ckpt), "shortcut_removal": settings},
        "trainer": {"max_epochs": plan.epochs},
    }
    header = [
        "# Written by audit.py: fine-tune the audited checkpoint until it stops relying on",
        f"# the shortcut(s) it confirmed ({len(plan.shortcuts) + len(plan.filters)}: see "
        "`shortcuts` (boxes) and `filters` below).",
        "# Starts from the checkpoint's weights (init_weights), not its optimizer or epochs.",
        "# Run it after the run's own config:",
        f"#   {plan.command}",
        "# Switch the counter-measure with --model.shortcut_removal.method penalty|both|refit",
        "# (refit: the backbone frozen, the last layer re-fitted; one epoch is enough:",
        "# --trainer.max_epochs 1) and its strength with --model.shortcut_removal.p_paste /",
        "# p_cover / penalty_weight / refit_l2;",
        "# the monitor tests each box every epoch (explain/shortcuts/* in TensorBoard).",
        "# Then audit both: python audit.py --ckpt <this checkpoint> --ckpt <the new one>",
    ]
    # Class names come from the data: they reach the YAML only through the dumper.
    text = "\n".join(line.replace("\n", " ") for line in header) + "\n" + yaml.safe_dump(
        config, sort_keys=False, default_flow_style=None, allow_unicode=True)
    (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
