"""Evolution over training: the maps and numbers the monitor saved every epoch."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from explain.records import explanations_dir, load_monitor_records, record_class_maps

from ..figures import fig_evolution_curves, fig_evolution_maps
from ..findings import lead_method
from ..page import Drawing
from .base import VISUAL, Section

if TYPE_CHECKING:
    from markupsafe import Markup

    from ..page import Page
    from ..state import AuditRun, ModelAudit


@dataclass
class EvolutionResult:
    """The monitor's numbers per method and epoch, and the lead method's filmstrip."""

    skipped: str | None = None
    epochs: list[int] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    filmstrip_method: str | None = None
    n_images: int = 0
    scalars: dict[str, dict[str, list]] = field(default_factory=dict)
    filmstrip: dict[str, Any] | None = field(default=None, metadata=VISUAL)


def evolution_data(
    fixed: dict[str, Any], epochs: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The monitor's records -> the numbers (per method, per epoch) and the filmstrip maps.

    The filmstrip shows the lead method (:func:`audit_report.findings.lead_method`) and the
    true-class map of each fixed image.
    """
    # Every method any epoch has (an epoch whose maps were not finite has none).
    methods = list(dict.fromkeys(m for rec in epochs for m in rec.get("maps", {})))
    method = lead_method(methods)
    names = sorted({(m, q) for rec in epochs for m, per in rec.get("scalars", {}).items()
                    for q in per})
    scalars: dict[str, dict[str, list]] = {}
    for meth, q in names:
        scalars.setdefault(meth, {})[q] = [
            rec.get("scalars", {}).get(meth, {}).get(q) for rec in epochs
        ]
    ep = [int(r["epoch"]) for r in epochs]
    result = {
        "epochs": ep,
        "methods": methods,
        "filmstrip_method": method,
        "n_images": int(fixed["labels"].numel()),
        "scalars": scalars,
    }
    if method is None:
        return result, None
    labels = fixed["labels"].long()
    n = len(labels)
    size = tuple(fixed["images"].shape[-2:])
    stacks = []
    for rec in epochs:
        stacks.append(record_class_maps(rec, method, labels).float()
                      if method in rec.get("maps", {})
                      else torch.full((n, *size), float("nan")))
    return result, {
        "images01": fixed["images"].float() / 255.0,
        "labels": labels,
        "class_names": list(fixed.get("class_names") or []),
        "epochs": ep,
        "maps": torch.stack(stacks),  # [E, N, H, W]
        "method": method,
    }


class EvolutionSection(Section):
    """From the maps the training monitor saved every epoch (same fixed images throughout)."""

    id = "evolution"
    title = "Evolution over training"

    def compute(self, audit: AuditRun, model: ModelAudit) -> EvolutionResult:
        if model.run.log_dir is None:
            return EvolutionResult(skipped="the model was given from Python, not as a "
                                   "training run: there are no monitor maps to draw")
        try:
            found = load_monitor_records(model.run.log_dir)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
            return EvolutionResult(skipped=f"the monitor's files are unreadable: {exc}")
        if found is None or not found[1]:
            folder = explanations_dir(model.run.log_dir)
            return EvolutionResult(skipped=f"no ExplanationMonitor maps under {folder}")
        numbers, filmstrip = evolution_data(*found)
        return EvolutionResult(None, **numbers, filmstrip=filmstrip)

    def intro(self, page: Page) -> Markup:
        return self.html("intro")

    def render(self, page: Page, model: ModelAudit, result: EvolutionResult) -> Markup:
        filmstrip = curves = None
        if not result.skipped and result.filmstrip is not None:
            filmstrip = page.figures.add(
                f"evolution_maps{page.tag(model)}",
                Drawing(fig_evolution_maps, result.filmstrip),
                f"Filmstrip: the monitor's {result.filmstrip_method} map (true class) of each "
                "fixed validation image (rows) at the end of each epoch (columns). Each row is "
                "scaled by its largest value over all epochs, so growing or fading evidence "
                "stays visible. A shortcut shows up as evidence moving to the same place "
                f"(e.g. a corner) across images. n={result.n_images} images, "
                f"{len(result.epochs)} epochs.",
                "evolution filmstrip",
            )
        if not result.skipped and result.scalars:
            curves = page.figures.add(
                f"evolution_curves{page.tag(model)}",
                Drawing(fig_evolution_curves,
                        {"scalars": result.scalars, "epochs": result.epochs}),
                "The monitor's numbers per epoch, one panel per quantity, one line per "
                "method: cue energy on biased images (rising = a shortcut forming) and on "
                "clean ones, object energy and pointing game (higher = on the object), drift "
                "(1 \u2212 cosine with the previous epoch) and concentration. "
                f"n={result.n_images} fixed validation images.",
                "evolution curves",
            )
        return self.html("body", result=result, filmstrip=filmstrip, curves=curves)
