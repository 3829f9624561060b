"""Suspected shortcuts: a cue nobody declared, found from the maps and confirmed by experiment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import explain
from explain.measures import discovery
from lit_modules.data.sampling import dataset_labels, sample_batch, stratified_indices

from ..figures import fig_hotspots, fig_transplant
from ..findings import Finding
from ..page import Drawing, esc
from .base import VISUAL, Section

if TYPE_CHECKING:
    from torch import Tensor

    from ..page import Page
    from ..settings import AuditSettings
    from ..state import AuditRun, ModelAudit

# A pixel-level method: Grad-CAM at a ResNet's layer4 has 4 x 4 cells at 32 x 32 and misses a
# 4-pixel cue; saliency resolves it and costs one backward for the true class.
DISCOVERY_METHOD = "saliency"
# The audit tests more candidates than the monitor warns about: a suspect here is only
# reported as a shortcut when the transplant experiment confirms it, so a lower bar costs a
# few transplant runs, not false alarms.
AUDIT_SUSPECT_Z = 2.5
# Images a saliency call explains at once: it holds a backward graph for each of them, and
# the 300 of the default discovery sample in one call took the default audit's peak memory
# from 1.9 to 2.6 GB (quickstart ResNet-18). The maps do not depend on the chunk.
DISCOVERY_CHUNK = 64


@dataclass
class ShortcutResult:
    """Per class: the hotspot of the class-mean map; per suspect: the transplant and cover."""

    method: str
    n_images: int
    window: list[int]
    z_threshold: float
    min_lift: float
    smallest_flagged_lift: float
    classes: dict[str, dict[str, Any]]
    suspects: list[dict[str, Any]]
    declared_cue_found: bool | None = None  # a self-check where the data declares a cue
    mean_maps: Tensor | None = field(default=None, metadata=VISUAL)  # [K, H, W]
    examples: dict[str, dict[str, Tensor]] = field(default_factory=dict, metadata=VISUAL)
    images01: Tensor | None = field(default=None, metadata=VISUAL)


def _box(window: tuple[int, int, int, int]) -> list[int]:
    return [int(v) for v in window]


def _interval(iv: discovery.Interval) -> dict[str, float]:
    return {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}


def discovery_key(settings: AuditSettings) -> dict[str, Any]:
    """What the discovery's result depends on besides the checkpoint, data, split and seed
    (its cache key, also read by the time estimate)."""
    return {"discovery_images": settings.discovery_images, "z": AUDIT_SUSPECT_Z,
            "min_lift": discovery.SUSPECT_MIN_LIFT, "method": DISCOVERY_METHOD}


class SuspectedShortcutsSection(Section):
    """Label-free shortcut discovery: it leads the page when it finds something."""

    id = "shortcuts"
    title = "Suspected shortcuts"

    def units(self, audit: AuditRun) -> int:
        return 1

    def compute(self, audit: AuditRun, model: ModelAudit) -> ShortcutResult:
        return audit.reuse(model, "shortcuts", lambda: self._discover(audit, model),
                           ShortcutResult, **discovery_key(audit.settings))

    def _discover(self, audit: AuditRun, model: ModelAudit) -> ShortcutResult:
        """Discovery on its own sample, the transplant and cover tests of each suspect."""
        settings, sample = audit.settings, audit.sample
        dm = audit.data_run.datamodule
        dataset = dm.dataset(settings.split)
        k = len(sample.class_names)
        idx = stratified_indices(dataset_labels(dataset), settings.discovery_images * k,
                                 settings.seed + 2)
        batch = sample_batch(dataset, idx)
        images, labels = batch["image"].float(), batch["label"].long()
        maps = torch.cat([
            explain.run(model.model, images[i:i + DISCOVERY_CHUNK], DISCOVERY_METHOD,
                        targets=labels[i:i + DISCOVERY_CHUNK]).cpu()
            for i in range(0, len(labels), DISCOVERY_CHUNK)])
        found = discovery.discover(model.model, images, labels, maps, k, seed=settings.seed,
                                   batch_size=settings.batch_size, z_threshold=AUDIT_SUSPECT_Z)
        norm, usable = discovery.normalise_maps(maps)
        mean_maps = torch.stack([
            norm[(labels == c) & usable].mean(0) if bool(((labels == c) & usable).any())
            else torch.zeros(maps.shape[-2:]) for c in range(k)])
        lifts = torch.tensor([h.hotspot.lift if h.hotspot else float("nan")
                              for h in found.classes])
        names = sample.class_names
        classes = {}
        for h in found.classes:
            if h.hotspot is None:
                continue
            classes[names[h.label]] = {
                "box": _box(h.hotspot.window), "lift": h.hotspot.lift, "z": h.z,
                "consistency": h.hotspot.consistency, "n": h.hotspot.n, "suspect": h.suspect,
                "clusters": [{"share": c.share, "box": _box(c.hotspot.window),
                              "lift": c.hotspot.lift, "consistency": c.hotspot.consistency}
                             for c in h.clusters],
            }
        suspects, examples = [], {}
        denorm = getattr(dm, "denormalize", None)
        for s in found.suspects:
            tr, cover = found.transplants[s.label], found.covers[s.label]
            largest = max((c.share for c in found.classes[s.label].clusters), default=1.0)
            suspects.append({
                "class": names[s.label], "index": s.label, "box": _box(s.window),
                "lift": s.lift, "z": s.z,
                "consistency": found.classes[s.label].hotspot.consistency,
                "largest_cluster_share": largest,
                "flip_rate": tr.flip_rate, "flip_rate_random_window": tr.flip_rate_random_window,
                "flip_rate_other_class": tr.flip_rate_other_class,
                "vs_random_window": _interval(tr.vs_random_window),
                "vs_other_class": _interval(tr.vs_other_class), "targets": len(tr.targets),
                "accuracy": cover.accuracy, "accuracy_hotspot_covered": cover.accuracy_hotspot_covered,
                "accuracy_random_covered": cover.accuracy_random_covered,
                "cover_drop_vs_random": _interval(cover.drop_vs_random),
                "confirmed": tr.confirmed,
            })
            show = (lambda x: denorm(x).clamp(0, 1)) if denorm else (lambda x: x.clamp(0, 1))
            before, after = tr.examples_before[:6], tr.examples_after[:6]
            examples[names[s.label]] = {
                "before": show(before), "after": show(after),
                "pred_before": discovery.predict(model.model, before, settings.batch_size),
                "pred_after": discovery.predict(model.model, after, settings.batch_size),
            }
        result = ShortcutResult(
            DISCOVERY_METHOD, len(idx), list(found.window_size), AUDIT_SUSPECT_Z,
            discovery.SUSPECT_MIN_LIFT,
            discovery.smallest_flagged_lift(lifts, AUDIT_SUSPECT_Z), classes,
            suspects, None, mean_maps, examples,
        )
        cue = getattr(dm, "cue", None)
        if cue is not None and cue.position != "random":
            h, w = images.shape[-2:]
            truth = cue.mask(h, w)
            result.declared_cue_found = any(
                s["confirmed"] and s["index"] in cue.classes
                and bool(truth[s["box"][1]:s["box"][3], s["box"][0]:s["box"][2]].any())
                for s in suspects)
        return result

    def leads(self, audit: AuditRun) -> bool:
        """The page opens with this section when any model has a confirmed suspect."""
        return any(s["confirmed"] for m in audit.models for s in m.results[self.id].suspects)

    def findings(self, audit: AuditRun, model: ModelAudit,
                 result: ShortcutResult) -> list[Finding]:
        out = []
        for s in result.suspects:
            x0, y0, x1, y1 = s["box"]
            if s["confirmed"]:
                out.append(Finding(
                    f"class {s['class']}: suspected shortcut in the window x {x0}-{x1}, "
                    f"y {y0}-{y1} ({result.method} lift {s['lift']:.1f}, consistency "
                    f"{s['consistency']:.0%}); pasting it onto other classes' images turns "
                    f"{s['flip_rate']:.0%} of them into {s['class']} against "
                    f"{s['flip_rate_random_window']:.0%} and {s['flip_rate_other_class']:.0%} "
                    f"for the controls (n={s['targets']}).", flag=True))
            else:
                out.append(Finding(
                    f"class {s['class']}: its maps concentrate in x {x0}-{x1}, y {y0}-{y1} "
                    f"(lift {s['lift']:.1f}), but pasting that window does not beat the "
                    "controls: not confirmed as a shortcut."))
        return out

    def intro(self, page: Page) -> str:
        result = page.audit.models[0].results[self.id]
        kh, kw = result.window
        return (
            "<p>A shortcut nobody declared (a watermark, a tag, a patch) sits at the same place "
            "in a class's images while objects move, so it survives averaging. For each class "
            f"the {esc(result.method)} maps of its own images (true class, {result.n_images} "
            "images in all) are normalised to sum 1 and averaged; the best "
            f"{kh}\u00d7{kw} window of that mean map is the class's hotspot, its mass over its "
            "area share the <i>lift</i> (1 = no more than an even map) and the share of the "
            "class's images whose own map puts over 3\u00d7 the area share there the "
            "<i>consistency</i>. A class is a suspect when its lift stands out from the "
            f"others' (robust z \u2265 {result.z_threshold}, median and MAD) and is at least "
            f"{result.min_lift}. A suspect is confirmed only by experiment: its window, cut "
            "from its own images, is pasted onto other classes' images, and must turn more of "
            "them into the class than two controls do (the same-size window from another place "
            "of the same images; the same place cut from other classes' images), with a 95% "
            "interval (Student's t, paired by image) above zero.</p>"
        )

    def render(self, page: Page, model: ModelAudit, result: ShortcutResult) -> str:
        out = []
        if not result.suspects:
            out.append(
                '<p><span class="badge ok">no suspect</span> No class\'s hotspot stands out: '
                f"checked {len(result.classes)} classes; a class would have needed a lift of "
                f"at least {result.smallest_flagged_lift:.1f} to be a suspect here (the "
                "highest lift is "
                f"{max((c['lift'] for c in result.classes.values()), default=float('nan')):.1f})."
                " A cue that covers the whole image (a tint, a texture) has no location and "
                "is not found this way.</p>")
        for s in result.suspects:
            badge = ('<span class="badge bad">confirmed</span>' if s["confirmed"]
                     else '<span class="badge ok">not confirmed</span>')
            vr, vo = s["vs_random_window"], s["vs_other_class"]
            out.append(
                f"<h3>{esc(s['class'])} {badge}</h3><table class=\"facts\">"
                f"<tr><td>hotspot (x0, y0, x1, y1)</td><td>{s['box']}</td></tr>"
                f"<tr><td>lift / robust z / consistency</td><td>{s['lift']:.1f} / {s['z']:.1f}"
                f" / {s['consistency']:.0%}</td></tr>"
                f"<tr><td>largest cluster of its maps</td><td>{s['largest_cluster_share']:.0%}"
                " of the class</td></tr>"
                f"<tr><td>transplant: turned into {esc(s['class'])}</td><td>"
                f"{s['flip_rate']:.0%} with the hotspot; {s['flip_rate_random_window']:.0%} "
                f"with a window from elsewhere (margin {vr['mean']:+.2f}, 95% "
                f"[{vr['low']:+.2f}, {vr['high']:+.2f}]); {s['flip_rate_other_class']:.0%} with "
                f"the same place from other classes (margin {vo['mean']:+.2f}, 95% "
                f"[{vo['low']:+.2f}, {vo['high']:+.2f}]); n={s['targets']}</td></tr>"
                f"<tr><td>cover: its own accuracy</td><td>{s['accuracy']:.0%} as is, "
                f"{s['accuracy_hotspot_covered']:.0%} with the hotspot covered, "
                f"{s['accuracy_random_covered']:.0%} with a random window covered</td></tr>"
                "</table>")
            ex = result.examples.get(s["class"])
            if ex is not None and len(ex["before"]):
                out.append(page.figures.add(
                    f"transplant_{s['class']}{page.tag(model)}",
                    Drawing(fig_transplant, ex["before"], ex["after"], s["box"], [
                        [f"\u2192 {page.names[int(p)]}" for p in ex[key]]
                        for key in ("pred_before", "pred_after")]),
                    f"Other classes' images before (top) and after (bottom) the {s['class']} "
                    "hotspot (yellow box) is pasted onto them, with the model's prediction "
                    "above each.", "transplant examples"))
        if result.mean_maps is not None:
            boxes = {name: c["box"] for name, c in result.classes.items()}
            suspects = {s["class"] for s in result.suspects}
            out.append(page.figures.add(
                f"hotspots{page.tag(model)}",
                Drawing(fig_hotspots, result.mean_maps, list(result.classes), boxes, suspects,
                             [c["lift"] for c in result.classes.values()]),
                f"Class-mean {esc(result.method)} map of each class (true class, each map "
                "normalised to sum 1 before averaging) with its hotspot window; red: a "
                "suspect. A shortcut shows as a sharp spot at the same place; objects that "
                "move from image to image blur into a spread map.", "class-mean maps"))
        if result.declared_cue_found is not None:
            out.append(
                f'<p class="note">Self-check: the data declares a cue, and discovery '
                f"{'found' if result.declared_cue_found else 'did <b>not</b> find'} it without "
                "being told.</p>")
        return "".join(out)
