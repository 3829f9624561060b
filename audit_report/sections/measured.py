"""The measured sections: CAM vs Grad-CAM, localisation, faithfulness, sanity."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import explain
from explain.measures.agreement import agreement_summary
from explain.measures.faithfulness import (
    curve_ends,
    deletion_insertion_many,
    faithfulness_summary,
)
from explain.measures.localisation import localisation_summary
from explain.measures.sanity import (
    cascade_steps,
    cascading_randomization,
    reinitialize,
    sanity_summary,
    spearman,
)

from ..figures import (
    fig_cam_pair,
    fig_faithfulness,
    fig_localisation,
    fig_sanity_curves,
    fig_sanity_maps,
)
from ..findings import CAM_AGREEMENT_MIN, SANITY_FLAG_THRESHOLD, Finding, mean_of
from ..page import Drawing
from ..settings import SANITY_FINAL_ONLY, curve_schedule, faithfulness_images, method_options
from .base import VISUAL, Section

if TYPE_CHECKING:
    from markupsafe import Markup
    from torch import Tensor

    from ..page import Page
    from ..state import AuditRun, ModelAudit


@dataclass
class AgreementResult:
    """CAM vs Grad-CAM on the true class: correlation and region IoU, or why not."""

    skipped: str | None = None
    correlation: dict[str, Any] | None = None
    iou: dict[str, Any] | None = None
    per_image_correlation: list[float] = field(default_factory=list)
    target: str = "true class"
    threshold: float = 0.2
    cam: Tensor | None = field(default=None, metadata=VISUAL)
    gradcam: Tensor | None = field(default=None, metadata=VISUAL)


class CamVsGradcamSection(Section):
    """CAM and Grad-CAM must agree on a GAP + Linear head: an exact check of the engine."""

    id = "cam-vs-gradcam"
    title = "CAM vs Grad-CAM"

    def compute(self, audit: AuditRun, model: ModelAudit) -> AgreementResult:
        # The check does not depend on the methods selected: kept for re-runs.
        return audit.reuse(model, "cam-vs-gradcam", lambda: self._agreement(audit, model),
                           AgreementResult, num_images=len(audit.sample.labels),
                           threshold=audit.settings.threshold, layer=str(audit.settings.layer))

    def _agreement(self, audit: AuditRun, model: ModelAudit) -> AgreementResult:
        sample, threshold = audit.sample, audit.settings.threshold
        cam_name, gradcam_name = explain.CAM_IDENTITY_PAIR
        if cam_name not in explain.available():
            return AgreementResult(skipped=f"the engine has no {cam_name!r} method",
                                   threshold=threshold)
        try:
            cam = explain.run(model.model, sample.images, cam_name, targets=sample.labels,
                              layer=audit.settings.layer).cpu()
        except explain.ExplainError as exc:
            return AgreementResult(skipped=f"CAM does not apply to this model: {exc}",
                                   threshold=threshold)
        grad = explain.run(model.model, sample.images, gradcam_name, targets=sample.labels,
                           layer=audit.settings.layer).cpu()
        summary = agreement_summary(cam, grad, threshold)
        return AgreementResult(None, summary["correlation"], summary["iou"],
                               summary["per_image_correlation"], "true class", threshold,
                               cam[: sample.show], grad[: sample.show])

    def findings(self, audit: AuditRun, model: ModelAudit,
                 result: AgreementResult) -> list[Finding]:
        if result.skipped or mean_of(result.correlation) >= CAM_AGREEMENT_MIN:
            return []
        return [Finding(
            f"CAM and Grad-CAM correlate at only {mean_of(result.correlation):.3f}; on a GAP + "
            "Linear head they should be equal up to scale, so check the explained layer."
        )]

    def intro(self, page: Page) -> Markup:
        return self.html("intro")

    def render(self, page: Page, model: ModelAudit, result: AgreementResult) -> Markup:
        pair = None
        if not result.skipped and result.cam is not None:
            n = page.sample.show
            fig = Drawing(fig_cam_pair, page.sample.images01[:n], result.cam[:n],
                          result.gradcam[:n], page.column_labels(n))
            pair = page.figures.add(
                f"cam_vs_gradcam{page.tag(model)}", fig,
                "Top row: the image; middle: CAM (class weights of the linear head applied "
                "to the last conv map); bottom: Grad-CAM, both for the true class and "
                "scaled to their own maximum. The number above each Grad-CAM tile is the "
                "per-image correlation. On a global-average-pooling + Linear head the two "
                f"are equal up to a constant factor. n={n} images.",
                "CAM vs Grad-CAM",
            )
        return self.html("body", result=result, pair=pair)


LOCALISATION_MEASURES = ["box_iou", "localisation_accuracy", "pointing_game",
                         "energy_pointing_game"]


@dataclass
class LocalisationResult:
    """Weakly-supervised localisation per method (scored where object masks exist)."""

    threshold: float
    ground_truth: bool
    target: str
    n_images: int
    methods: dict[str, dict[str, Any]]
    boxes: dict[str, Tensor] = field(default_factory=dict, metadata=VISUAL)
    gt_boxes: Tensor | None = field(default=None, metadata=VISUAL)


class LocalisationSection(Section):
    """Does a map made for classification also find the object?"""

    id = "localisation"
    title = "Weakly-supervised localisation"

    def compute(self, audit: AuditRun, model: ModelAudit) -> LocalisationResult:
        sample, threshold = audit.sample, audit.settings.threshold
        result = LocalisationResult(threshold, sample.object_masks is not None, "true class",
                                    len(sample.labels), {})
        for method, maps in model.ok_maps().items():
            summary, per_image = localisation_summary(maps.true_maps, sample.object_masks,
                                                      threshold)
            result.methods[method] = summary
            result.boxes[method] = per_image["boxes"]
            result.gt_boxes = per_image.get("gt_boxes")
        return result

    def findings(self, audit: AuditRun, model: ModelAudit,
                 result: LocalisationResult) -> list[Finding]:
        if not result.ground_truth or not result.methods:
            return []
        best = max(result.methods, key=lambda m: mean_of(result.methods[m]["box_iou"]))
        stat = result.methods[best]["localisation_accuracy"]
        return [Finding(f"Best localisation: {best}, box IoU \u2265 0.5 on "
                        f"{mean_of(stat):.0%} of images (n={stat['n']}).")]

    def intro(self, page: Page) -> Markup:
        return self.html("intro")

    def render(self, page: Page, model: ModelAudit, result: LocalisationResult) -> Markup:
        boxes = None
        if result.boxes:
            n = page.sample.show
            fig = Drawing(
                fig_localisation,
                page.sample.images01[:n],
                {m: model.methods[m].true_maps[:n] for m in result.boxes},
                {m: b[:n] for m, b in result.boxes.items()},
                None if result.gt_boxes is None else result.gt_boxes[:n],
                page.column_labels(n),
            )
            boxes = page.figures.add(
                f"localisation{page.tag(model)}", fig,
                f"Localisation boxes: each map (true class) is thresholded at "
                f"{result.threshold:.0%} of its maximum and the box around the largest "
                "connected region is drawn in red; the object's ground-truth box is "
                "dashed green where known. A good box hugs the green one. "
                f"n={n} images shown of {result.n_images}.",
                "localisation boxes",
            )
        return self.html("body", result=result, measures=LOCALISATION_MEASURES, boxes=boxes)


FAITHFULNESS_MEASURES = ["deletion_auc", "insertion_auc", "average_drop",
                         "increase_in_confidence"]


@dataclass
class FaithfulnessResult:
    """Deletion/insertion AUC, Average Drop and Increase in Confidence per method."""

    steps: int
    deletion_fill: str
    insertion_start: str
    target: str
    n_images: int
    methods: dict[str, dict[str, Any]]
    schedule: str = "uniform"
    curves: dict[str, dict[str, Tensor]] = field(default_factory=dict, metadata=VISUAL)


class FaithfulnessSection(Section):
    """Does the map point at what the model actually uses?"""

    id = "faithfulness"
    title = "Faithfulness"

    def units(self, audit: AuditRun) -> int:
        return max(1, len(audit.settings.methods))

    def compute(self, audit: AuditRun, model: ModelAudit) -> FaithfulnessResult:
        sample, settings = audit.sample, audit.settings
        n = faithfulness_images(settings, len(sample.labels))
        steps, schedule = curve_schedule(settings)
        result = FaithfulnessResult(steps, "mean", "blur", "predicted class", n, {}, schedule)
        images, preds = sample.images[:n], model.preds[:n]
        parts = {method: audit.cache_parts(model, method, steps=steps, schedule=schedule,
                                           faithfulness_images=n)
                 for method in model.ok_maps()}
        hits = {method: audit.cached("faithfulness", key) for method, key in parts.items()}
        todo = {m: model.methods[m].pred_maps[:n] for m, hit in hits.items() if hit is None}
        if todo:
            # Every method's curves at once: the map-free ends are scored once, and so is
            # every perturbed image two methods share.
            ends = audit.reuse(
                model, "curve-ends",
                lambda: curve_ends(model.model, images, preds, batch_size=settings.batch_size),
                num_images=len(sample.labels), faithfulness_images=n)
            curves = deletion_insertion_many(
                model.model, images, todo, preds, steps=steps, schedule=schedule,
                batch_size=settings.batch_size, seed=settings.seed, ends=ends)
        for method, hit in hits.items():
            if hit is None:
                hit = dict(zip(("summary", "curves"), faithfulness_summary(
                    model.model, images, todo[method], preds, batch_size=settings.batch_size,
                    ends=ends, curves=curves[method],
                ), strict=True))
                audit.keep("faithfulness", parts[method], hit)
            result.methods[method], result.curves[method] = hit["summary"], hit["curves"]
        return result

    def findings(self, audit: AuditRun, model: ModelAudit,
                 result: FaithfulnessResult) -> list[Finding]:
        if not result.methods:
            return []
        best = max(result.methods, key=lambda m: mean_of(result.methods[m]["insertion_auc"]))
        stat = result.methods[best]["insertion_auc"]
        return [Finding(f"Most faithful by insertion AUC (higher is better): {best}, "
                        f"{mean_of(stat):.2f} (n={stat['n']}).")]

    def intro(self, page: Page) -> Markup:
        steps, schedule = curve_schedule(page.audit.settings)
        pace = (f"{steps} steps of {1 / steps:.1%} of the pixels" if schedule == "uniform"
                else f"{steps} steps, small first (the share changed grows as the square of "
                "the step: the curves move most at the start)")
        return self.html("intro", pace=pace)

    def render(self, page: Page, model: ModelAudit, result: FaithfulnessResult) -> Markup:
        curves = None
        if result.curves:
            curves = page.figures.add(
                f"faithfulness{page.tag(model)}", Drawing(fig_faithfulness, result.curves),
                "Mean probability of the predicted class while the pixels a method ranks "
                "highest are deleted (left: a steep fall is faithful, lower area is better) "
                "or inserted into a blurred image (right: a steep rise is faithful, higher "
                f"area is better). x: fraction of pixels changed. n={result.n_images} images "
                "per curve.",
                "deletion and insertion curves",
            )
        return self.html("body", result=result, measures=FAITHFULNESS_MEASURES,
                         sample_size=len(page.sample.labels), curves=curves)


@dataclass
class SanityResult:
    """The cascading randomisation test: per step and method, the rank correlation."""

    steps: list[str]
    n_images: int
    target: str
    flag_threshold: float
    methods: dict[str, dict[str, Any]]
    spearman: dict[str, Tensor] = field(default_factory=dict, metadata=VISUAL)
    maps: dict[str, Tensor] = field(default_factory=dict, metadata=VISUAL)
    final_only: list[str] = field(default_factory=list)


def final_step_only(model: torch.nn.Module, explain_fns: dict, seed: int,
                    keep: int = 1, reference: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """The cascade's verdict step alone: each method on the trained and the fully
    randomised model, nothing in between.

    The fully randomised copy is built exactly as :func:`cascading_randomization` builds
    its last step (the same modules, order and seeds), so the last row equals the full
    cascade's; the rows of the intermediate steps are NaN (maps: zeros). Costs two runs
    of each method instead of one per step plus one; one where ``reference`` holds the
    trained model's maps already.
    """
    steps = cascade_steps(model)
    randomised = copy.deepcopy(model)
    for i, (_, names) in enumerate(steps):
        reinitialize(randomised, names, seed + 1000 * (i + 1))
    out: dict[str, Any] = {"spearman": {}, "maps": {}, "seconds": {}}
    for method, fn in explain_fns.items():
        start = time.perf_counter()
        ref = (reference[method] if reference and method in reference
               else fn(model)).detach().float().cpu()
        maps = fn(randomised).detach().float().cpu()
        out["seconds"][method] = time.perf_counter() - start
        rho = spearman(ref, maps)
        flat = maps.flatten(1).amax(1) == maps.flatten(1).amin(1)
        varies = ref.flatten(1).amax(1) > ref.flatten(1).amin(1)
        rho = torch.where(flat & varies, torch.zeros_like(rho), rho)  # as the full cascade
        rows = torch.full((len(steps), ref.shape[0]), float("nan"))
        rows[-1] = rho
        kept = torch.zeros(len(steps) + 1, *ref[:keep].shape)
        kept[0], kept[-1] = ref[:keep], maps[:keep]
        out["spearman"][method], out["maps"][method] = rows, kept
    return out


class SanitySection(Section):
    """Model-parameter randomisation (Adebayo et al. 2018), cascading from the head."""

    id = "sanity"
    title = "Sanity check"

    def units(self, audit: AuditRun) -> int:
        return len(cascade_steps(audit.models[0].model)) + 1

    def compute(self, audit: AuditRun, model: ModelAudit) -> SanityResult:
        sample, settings = audit.sample, audit.settings
        m = min(settings.sanity_images, len(sample.labels))
        images, targets = sample.images[:m], sample.labels[:m]
        methods = list(model.ok_maps())

        def explainer(method: str):
            options = method_options(method, settings)

            def explain_with(net: torch.nn.Module) -> torch.Tensor:
                torch.manual_seed(settings.seed)
                return explain.run(net, images, method, targets=targets, **options)

            return explain_with

        steps = [label for label, _ in cascade_steps(model.model)]
        per_method, spearman, kept = {}, {}, {}
        todo = []
        for name in methods:
            parts = audit.cache_parts(model, name, sanity_images=m, steps=steps,
                                      final_only=not settings.exact and name in SANITY_FINAL_ONLY)
            hit = audit.cached("sanity", parts)
            if hit is None:
                todo.append((name, parts))
            else:
                per_method[name], spearman[name], kept[name] = (
                    hit["summary"], hit["spearman"], hit["maps"])
        final_only = [] if settings.exact else [n for n in methods if n in SANITY_FINAL_ONLY]
        # The trained model's maps of a deterministic method are the sample's first ones
        # (the same images, classes and options): not computed again. A stochastic method
        # is re-run, so that trained and randomised maps come from the same random draws.
        known = {name: model.methods[name].true_maps[:m] for name, _ in todo
                 if not explain.get(name).stochastic}
        if todo:  # one cascade for every method not cached: the randomised copies are shared
            full = [name for name, _ in todo if name not in final_only]
            res = cascading_randomization(
                model.model, {name: explainer(name) for name in full}, seed=settings.seed,
                keep=1, reference=known,
            ) if full else {"spearman": {}, "maps": {}, "seconds": {}}
            last = final_step_only(
                model.model, {name: explainer(name) for name, _ in todo if name in final_only},
                settings.seed, reference=known,
            )
            for key in ("spearman", "maps", "seconds"):
                res[key].update(last[key])
            for name, parts in todo:
                summary = {**sanity_summary(res["spearman"][name], SANITY_FLAG_THRESHOLD),
                           "seconds": res["seconds"][name]}
                per_method[name], spearman[name], kept[name] = (
                    summary, res["spearman"][name], res["maps"][name])
                audit.keep("sanity", parts, {"summary": summary, "spearman": spearman[name],
                                             "maps": kept[name]})
        order = {name: i for i, name in enumerate(methods)}
        per_method = dict(sorted(per_method.items(), key=lambda kv: order[kv[0]]))
        return SanityResult(steps, m, "true class", SANITY_FLAG_THRESHOLD, per_method,
                            spearman, kept, [n for n in final_only if n in per_method])

    def findings(self, audit: AuditRun, model: ModelAudit,
                 result: SanityResult) -> list[Finding]:
        bad = [name + (" (borderline)" if v.get("uncertain") else "")
               for name, v in result.methods.items() if v["flagged"]]
        if not bad:
            return []
        return [Finding(
            "Sanity check failed for " + ", ".join(bad) + ": their maps keep a mean rank "
            f"correlation of at least {result.flag_threshold} with a fully randomised model, "
            "so they do not reflect what the model learned.", flag=True, kind="sanity",
            severity="medium", numbers={"methods": bad, "threshold": result.flag_threshold},
        )]

    def intro(self, page: Page) -> Markup:
        return self.html("intro")

    def render(self, page: Page, model: ModelAudit, result: SanityResult) -> Markup:
        curves = maps = None
        if result.spearman:
            curves = page.figures.add(
                f"sanity_curves{page.tag(model)}",
                Drawing(fig_sanity_curves, result.steps, result.spearman, result.flag_threshold),
                "Mean Spearman rank correlation (with 95% interval) between the maps of the "
                "trained model and of the progressively randomised model, as the cascade "
                "re-initialises blocks from the head (left) down to the input (right). A "
                "method that reflects the model drops towards 0; a curve that stays high "
                f"(dashed line: {result.flag_threshold}) is flagged. n={result.n_images} images.",
                "sanity curves",
            )
            maps = page.figures.add(
                f"sanity_maps{page.tag(model)}",
                Drawing(fig_sanity_maps, page.sample.images01[0], result.maps,
                                ["trained", *result.steps]),
                "The first image's true-class map for each method (rows) on the trained "
                "model (first column) and after each step of the cascade (next columns), "
                "each map scaled to its own maximum. Maps should degrade into noise or "
                "nothing; a map that keeps the object's outline after the whole network "
                "is random shows the input, not the model. n=1 image.",
                "sanity maps",
            )
        return self.html("body", result=result, curves=curves, maps=maps)
