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
from ..page import Drawing, esc, fmt_prop, fmt_stat, measure_head, signed
from .base import Section

if TYPE_CHECKING:
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

    def intro(self, page: Page) -> str:
        return (
            "<p>Does a class lean on something other than the object? Border energy shows "
            "evidence in the image frame; cue energy shows evidence on a known spurious patch; "
            "the counterfactual test measures what happens to predictions when the patch is "
            "added or removed on the same images, against a control patch of the same size and "
            "place.</p>"
        )

    def render(self, page: Page, model: ModelAudit, result: BiasResult) -> str:
        out = []
        if result.flagged:
            items = "".join(
                f"<li><b>{esc(f['class'])}</b>: {esc('; '.join(f['evidence']))}</li>"
                for f in result.flagged
            )
            out.append(f'<div class="findings"><b>Flagged classes</b><ul>{items}</ul></div>')
        elif result.counterfactual is not None:
            out.append('<p><span class="badge ok">no class flagged</span> by the '
                       "counterfactual test.</p>")
        if result.counterfactual is not None:
            out.append(self._counterfactual_table(page, result))
        else:
            out.append(f'<p class="muted">Counterfactual test not run: '
                       f"{esc(result.counterfactual_skipped or '')}.</p>")
        out.append(self._energy_table(page, result))
        lead = lead_method(result.methods)
        if lead is not None:
            out.append(page.figures.add(
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
            ))
        return "".join(out)

    @staticmethod
    def _counterfactual_table(page: Page, result: BiasResult) -> str:
        cf = result.counterfactual
        flagged = {f["class"] for f in result.flagged}
        rows = []
        for name, row in cf["classes"].items():
            rows.append(
                f'<tr{" class=flag" if name in flagged else ""}><td>{esc(name)}'
                f"{' (cue class)' if row['cue_class'] else ''}</td>"
                f'<td class="num">{fmt_prop(row["accuracy_with_cue"])}</td>'
                f'<td class="num">{fmt_prop(row["accuracy_without_cue"])}</td>'
                f'<td class="num">{fmt_prop(row["accuracy_with_control"])}</td>'
                f'<td class="num">{row["confidence_with_cue"]:.2f} / '
                f'{row["confidence_without_cue"]:.2f}</td>'
                f'<td class="num">{_margin(row["cue_reliance_margin"], row["cue_reliance_margin_ci95"])}'
                f' <span class="n">n={row["n"]}</span></td>'
                f'<td class="num">{_margin(row["cue_attraction_margin"], row["cue_attraction_margin_ci95"])}'
                f' <span class="n">n={row["attraction_n"]}</span></td></tr>'
            )
        return (
            "<h3>Counterfactual: the same images with the cue, without it, and with a control "
            "patch</h3>"
            f"<p>{cf['n_images']} {esc(page.audit.settings.split)} images, stratified over "
            "classes; every image is scored clean, with the cue stamped on it, and with a "
            "control patch (same size and place, a checkerboard of the cue colour's complement "
            "and black, which the data never carried). A fragile model moves its predictions "
            "for any patch, so the evidence is the cue's effect beyond the control's: a class is "
            f"flagged when its accuracy with the cue exceeds its accuracy with the control by at "
            f"least {cf['threshold']:.0%} points (reliance), or when the cue makes at least "
            f"{cf['threshold']:.0%} more of other classes' images predicted as this class than "
            "the control does (attraction), and the 95% interval (Student's t, paired by "
            "image) of that margin excludes zero.</p>"
            "<table><tr><th>class</th><th class=\"num\">accuracy with cue \u2191</th>"
            "<th class=\"num\">accuracy without cue \u2191</th>"
            "<th class=\"num\">accuracy with control \u2191</th>"
            "<th class=\"num\">true-class confidence with / without</th>"
            + measure_head("cue_reliance", "reliance beyond control")
            + measure_head("cue_attraction", "attraction beyond control") + "</tr>"
            + "".join(rows) + "</table>"
        )

    @staticmethod
    def _energy_table(page: Page, result: BiasResult) -> str:
        has_cue = any("cue_energy" in m for m in result.methods.values())
        head = (f"<tr><th>method</th><th>class</th>{measure_head('border_energy')}"
                + (measure_head("cue_energy") + '<th class="num">same region, no cue</th>'
                   if has_cue else "") + "</tr>")
        rows = []
        for method, stats in result.methods.items():
            for name in page.names:
                cells = f'<td class="num">{fmt_stat(stats["border_energy"].get(name))}</td>'
                if has_cue:
                    cells += (
                        f'<td class="num">{fmt_stat(stats.get("cue_energy", {}).get(name))}</td>'
                        '<td class="num">'
                        f'{fmt_stat(stats.get("cue_region_energy_without_cue", {}).get(name))}'
                        "</td>")
                rows.append(f"<tr><td>{esc(method)}</td><td>{esc(name)}</td>{cells}</tr>")
        area = (f"The border ({result.border_width} px) is {result.border_area:.0%} of the "
                "image")
        if result.cue_area is not None:
            area += f"; the cue patch is {result.cue_area:.1%}"
        return (f"<h3>Where the evidence sits, per method and class</h3><p>{area} (the "
                "baselines for a map spread evenly).</p>"
                f"<details><summary>Table for every method ({len(rows)} rows)</summary>"
                f"<table>{head}{''.join(rows)}</table></details>")


def _margin(value: float, ci: list[float]) -> str:
    """A margin with its interval, e.g. ``+0.45 [0.30, 0.60]``."""
    lo, hi = ci
    text = signed(value)
    if all(isinstance(v, float) and v == v for v in (lo, hi)):
        text += f' <span class="ci">[{lo:+.2f}, {hi:+.2f}]</span>'
    return text
