"""The monitor's TensorBoard: score tags, the custom-scalars layout, the writer and the
step its images are logged at."""

from __future__ import annotations

import re
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

TAG_PREFIX = "explain"
#: The shortcut tracker's scalars and summary: ``explain/shortcuts/...`` (not a method).
SHORTCUTS = "shortcuts"

# Scores that belong on one chart in TensorBoard's custom-scalars layout (per method):
# the cue share on cue-carrying images against its baseline on clean ones, and the two
# object-localisation scores. Every other score gets a chart of its own.
PAIRED_SCORES = {
    "cue energy: biased vs clean": ("cue_energy/biased", "cue_energy/clean"),
    "object: energy and pointing game": ("object_energy", "pointing_game"),
}
SINGLE_SCORES = ("drift", "concentration", "nan_maps")


def scalar_tag(method: str, score: str) -> str:
    """The logged name of a score: ``explain/<method>/<score>``."""
    return f"{TAG_PREFIX}/{method}/{score}"


def custom_scalars_layout(
    methods: list[str], discovery: bool = False
) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard custom-scalars layout: ``{category: {chart title: ["Multiline", tags]}}``.

    One category per method (its paired scores on shared charts, the others alone) and,
    with several methods, a category comparing their biased cue energy. Tags are regular
    expressions in TensorBoard; they are escaped and anchored so that ``gradcam`` does not
    also pick up ``gradcam_pp``.
    """

    def exact(tag: str) -> str:
        return f"^{re.escape(tag)}$"

    layout: dict[str, dict[str, list[Any]]] = {}
    for method in methods:
        charts: dict[str, list[Any]] = {}
        for title, scores in PAIRED_SCORES.items():
            charts[f"{method}: {title}"] = ["Multiline", [exact(scalar_tag(method, s)) for s in scores]]
        for score in SINGLE_SCORES:
            charts[f"{method}: {score}"] = ["Multiline", [exact(scalar_tag(method, score))]]
        if discovery:
            # Every class's hotspot lift on one chart: a shortcut is the line that leaves
            # the pack.
            charts[f"{method}: hotspot lift per class"] = [
                "Multiline", [f"^{re.escape(scalar_tag(method, 'hotspot_lift'))}/"]]
        layout[f"{TAG_PREFIX}/{method}"] = charts
    if discovery:
        # The verdict: one line per class, the margin of its transplant over the strongest
        # control (a shortcut is a line far above 0.1; a gone one falls back to 0).
        layout[f"{TAG_PREFIX}/{SHORTCUTS}"] = {
            f"{SHORTCUTS}: {name} per class": [
                "Multiline", [f"^{re.escape(scalar_tag(SHORTCUTS, name))}/"]]
            for name in ("margin", "flips", "strongest_control", "is_confirmed")
        } | {f"{SHORTCUTS}: confirmed": ["Multiline", [exact(scalar_tag(SHORTCUTS, "confirmed"))]]}
    if len(methods) > 1:
        score = "cue_energy/biased"
        layout[f"{TAG_PREFIX}: methods side by side"] = {
            f"{score}, every method": ["Multiline", [exact(scalar_tag(m, score)) for m in methods]],
        }
    return layout


def writer(trainer: L.Trainer) -> Any:
    """The first TensorBoardLogger's ``SummaryWriter``, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def image_step(trainer: L.Trainer) -> int:
    """The step Lightning logs this validation's metrics at, for the grids.

    While fitting, Lightning logs a validation at the index of the last training batch
    that stepped the optimiser, which is ``global_step - 1`` for this project's one
    optimiser (the scalars get it from Lightning itself); ``trainer.validate`` logs at
    ``global_step``. Sharing it puts the grids on ``val/acc``'s x positions and lets a
    resumed run purge exactly the lost steps.
    """
    fitting = trainer.state.fn == "fit"
    return max(trainer.global_step - (1 if fitting else 0), 0)
