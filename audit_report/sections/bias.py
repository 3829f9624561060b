"""Bias and shortcuts: where the evidence sits, and the with/without-cue test with a control."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from explain.measures.bias import (
    border_mask,
    counterfactual,
    counterfactual_summary,
    energy_by_class,
)
from lit_modules.data.sampling import dataset_labels, stratified_indices
from lit_modules.loading import counterfactual_images

from ..figures import fig_bias
from ..findings import (
    BORDER_ENERGY_CAP,
    BORDER_ENERGY_FACTOR,
    BORDER_FRACTION,
    BORDER_MIN_IMAGES,
    COUNTERFACTUAL_MIN_IMAGES,
    COUNTERFACTUAL_THRESHOLD,
    Finding,
    flag_evidence,
    lead_method,
    mean_of,
)
from ..page import Drawing
from .base import Section

if TYPE_CHECKING:
    from markupsafe import Markup

    from ..page import Page
    from ..settings import AuditSettings
    from ..state import AuditRun, ModelAudit


@dataclass
class BiasResult:
    """Energy in the border (and on a declared cue) per method and class; the cue test."""

    target: str
    border_width: int
    border_area: float
    cue: dict[str, Any] | None
    cue_description: str | None
    cue_area: float | None
    methods: dict[str, dict[str, Any]]
    counterfactual: dict[str, Any] | None = None
    counterfactual_skipped: str | None = None
    flagged: list[dict[str, Any]] = field(default_factory=list)


def counterfactual_key(settings: AuditSettings) -> dict[str, Any]:
    """What the declared-cue test depends on besides the checkpoint, data, split and seed
    (its cache key, also read by the time estimate)."""
    return {"images": settings.counterfactual_images, "threshold": COUNTERFACTUAL_THRESHOLD,
            "min_images": COUNTERFACTUAL_MIN_IMAGES}


class BiasSection(Section):
    """Does a class lean on something other than the object?"""

    id = "bias"
    title = "Bias and shortcuts"

    def compute(self, audit: AuditRun, model: ModelAudit) -> BiasResult:
        sample, settings = audit.sample, audit.settings
        dm = audit.data_run.datamodule
        cue = getattr(dm, "cue", None)
        h, w = sample.images.shape[-2:]
        width = max(1, round(BORDER_FRACTION * min(h, w)))
        energy = {
            method: energy_by_class(maps.true_maps, sample.labels, sample.class_names,
                                    sample.cue_masks, sample.cue_regions, BORDER_FRACTION)
            for method, maps in model.ok_maps().items()
        }
        result = BiasResult(
            "true class", width, float(border_mask(h, w, width).float().mean()),
            cue.as_dict() if cue is not None else None,
            cue.describe() if cue is not None else None,
            float(cue.size**2 / (h * w)) if cue is not None else None, energy,
        )
        if cue is None:
            result.counterfactual_skipped = "the data declares no spurious cue"
            return result

        def test() -> dict[str, Any]:
            labels = dataset_labels(dm.dataset(sample.split))
            idx = stratified_indices(
                labels, settings.counterfactual_images * len(sample.class_names),
                settings.seed + 1)
            images = counterfactual_images(dm, sample.split, idx)
            if images is None:
                return {"skipped": "the data keeps no raw images to remove the cue from"}
            cf = counterfactual(model.model, images.clean, images.stamped, images.control,
                                images.labels, cue.classes, len(sample.class_names),
                                settings.batch_size)
            return {"summary": counterfactual_summary(
                cf, images.labels, sample.class_names, cue.classes, COUNTERFACTUAL_THRESHOLD,
                COUNTERFACTUAL_MIN_IMAGES)}

        found = audit.reuse(model, "counterfactual", test, **counterfactual_key(settings))
        if "skipped" in found:
            result.counterfactual_skipped = found["skipped"]
            return result
        summary = result.counterfactual = found["summary"]
        lead = lead_method(energy)
        for c in summary["flagged"]:
            name = sample.class_names[c]
            cue_energy = (energy.get(lead) or {}).get("cue_energy", {}).get(name)
            evidence = flag_evidence(name, summary["classes"][name], cue_energy, lead,
                                     result.cue_area, summary["threshold"])
            result.flagged.append({"class": name, "index": c, "evidence": evidence})
        return result

    def findings(self, audit: AuditRun, model: ModelAudit, result: BiasResult) -> list[Finding]:
        out = [Finding(f"class {flag['class']}: " + "; ".join(flag["evidence"]) + ".", flag=True,
                       kind="bias", cls=flag["class"], severity="high",
                       numbers=(result.counterfactual or {}).get("classes", {}).get(
                           flag["class"], {}))
               for flag in result.flagged]
        lead = lead_method(result.methods)
        if lead is None:
            return out
        floor = min(BORDER_ENERGY_CAP, BORDER_ENERGY_FACTOR * result.border_area)
        for name, stat in result.methods[lead]["border_energy"].items():
            if stat["n"] >= BORDER_MIN_IMAGES and mean_of(stat) >= floor:
                out.append(Finding(
                    f"class {name}: {mean_of(stat):.0%} of {lead} energy in the "
                    f"{result.border_width}-pixel border, which is {result.border_area:.0%} "
                    f"of the image (n={stat['n']})."
                ))
        return out

    def intro(self, page: Page) -> Markup:
        return self.html("intro")

    def render(self, page: Page, model: ModelAudit, result: BiasResult) -> Markup:
        lead = lead_method(result.methods)
        energy = None
        if lead is not None:
            energy = page.figures.add(
                f"bias{page.tag(model)}",
                # Only the lead method's numbers: the figure is drawn again when they change.
                Drawing(fig_bias, {lead: result.methods[lead]}, lead, page.names,
                        result.border_width, result.border_area, result.cue_area),
                f"Share of the {lead} map's energy (true class) in the image border (left) "
                "and in the cue patch (right, on images that carry it; hatched: the same "
                "region on images without the cue), per class. Dashed lines: the region's "
                "share of the image area, what a map spread evenly would put there. Bars "
                "far above the line mean the class's evidence sits in that region. Sample "
                "sizes are in the tables.",
                "bias energy",
            )
        return self.html("body", result=result, classes=page.names,
                         split=page.audit.settings.split, energy=energy)
