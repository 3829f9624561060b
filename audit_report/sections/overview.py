"""The overview sections: summary, images x classes, methods x classes, models side by side."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import explain
from explain.measures.comparison import compare_models
from explain.measures.statistics import accuracy_summary
from lit_modules.loading import evaluate

from ..figures import fig_confusion, fig_images_classes, fig_methods, fig_side_by_side
from ..findings import Finding, lead_method
from ..page import Drawing
from ..sample import explained_classes
from ..settings import method_options
from .base import VISUAL, Section

if TYPE_CHECKING:
    from markupsafe import Markup
    from torch import Tensor

    from ..page import Page
    from ..state import AuditRun, ModelAudit


@dataclass
class AccuracyResult:
    """Accuracy on the whole split, per class, and the confusion matrix."""

    accuracy: dict[str, Any]
    per_class: dict[str, dict[str, Any]]
    confusion_matrix: list[list[int]]
    class_names: list[str]
    higher_is_better: bool = True


class SummarySection(Section):
    """What was audited, the headline findings, accuracy per class and the confusion matrix."""

    id = "summary"
    title = "Summary"

    def compute(self, audit: AuditRun, model: ModelAudit) -> AccuracyResult:
        names = audit.sample.class_names

        def accuracy() -> AccuracyResult:
            ev = evaluate(model.model, audit.data_run.datamodule.dataset(audit.settings.split),
                          len(names), audit.settings.batch_size)
            return AccuracyResult(**accuracy_summary(ev["labels"], ev["preds"], names,
                                                     ev["confusion"]))

        return audit.reuse(model, "accuracy", accuracy, AccuracyResult)

    def findings(self, audit: AuditRun, model: ModelAudit,
                 result: AccuracyResult) -> list[Finding]:
        acc = result.accuracy
        lo, hi = acc["ci95"]
        out = [Finding(f"Accuracy: {acc['value']:.1%} (95% CI {lo:.1%}\u2013{hi:.1%}, "
                       f"n={acc['n']}, {len(result.class_names)} classes).")]
        per = [(v["value"], k, v["n"]) for k, v in result.per_class.items() if v["n"]]
        if per:
            worst = min(per)
            out.append(Finding(f"Weakest class: {worst[1]} at {worst[0]:.0%} (n={worst[2]})."))
        return out

    def intro(self, page: Page) -> Markup:
        audit = page.audit
        data_cfg = audit.data_run.config["data"]
        init = data_cfg.get("init_args", {})
        bias = audit.models[0].results.get("bias")
        return self.html(
            "intro", data_path=data_cfg.get("class_path"),
            settings=", ".join(f"{k}={v}" for k, v in init.items() if not k.startswith("cue")),
            classes=page.names, cue=getattr(bias, "cue_description", None) or "none declared",
            split=audit.settings.split, n_images=len(page.sample.indices),
            seed=audit.settings.seed, explained=explained_classes(len(page.names)),
            masks=page.sample.object_masks is not None,
            same_data=all(m.run.config["data"] == data_cfg for m in audit.models))

    def render(self, page: Page, model: ModelAudit, result: AccuracyResult) -> Markup:
        hp = model.run.config.get("model", {})
        confusion = page.figures.add(
            f"confusion{page.tag(model)}",
            Drawing(fig_confusion, torch.tensor(result.confusion_matrix), page.names),
            "Confusion matrix on the whole split (torchmetrics). Rows are the true class, "
            "columns the predicted class; each cell shows the count, and its colour the "
            "share of the row, so a dark diagonal is good and a dark off-diagonal cell is "
            "a frequent confusion.",
            "confusion matrix",
        )
        return self.html("body", model=model, result=result, split=page.audit.settings.split,
                         hyperparameters=", ".join(f"{k}={v}" for k, v in hp.items()),
                         confusion=confusion)


@dataclass
class ImagesClassesResult:
    """The lead method's map of every class for one image of each class."""

    method: str
    target: str
    indices: list[int]
    labels: list[int]
    probabilities: list[list[float]]
    maps: Tensor = field(metadata=VISUAL)  # [show, columns, H, W]
    # With more than explain.ALL_CLASSES_MAX classes the columns are the shown images'
    # classes only (the first ``show``); this says so in the report. None: every class.
    columns_note: str | None = None


class ImagesClassesSection(Section):
    """Images (rows) x classes (columns): what the model sees for each class."""

    id = "images-classes"
    title = "Images \u00d7 classes"

    def compute(self, audit: AuditRun, model: ModelAudit) -> ImagesClassesResult:
        sample = audit.sample
        ok = model.ok_maps()
        method = lead_method([m for m in ok if explain.get(m).class_specific])
        show, k = sample.show, len(sample.class_names)
        images, note, target = sample.images[:show], None, "every class"
        if k > explain.ALL_CLASSES_MAX:
            # Columns of every class would be unreadable and cost a map per class: the
            # rows' own classes (one image each, in class order) make a square grid.
            columns = torch.arange(show).expand(show, show)
            note = (f"{k} classes, more than {explain.ALL_CLASSES_MAX}: the columns are the "
                    f"first {show} classes, those of the rows; the maps of the other "
                    f"{k - show} classes were not computed.")
            target = f"classes 0-{show - 1} of {k}"
        if method is None or method not in ok:
            method = explain.DEFAULT_METHOD  # shown even when not selected: any CNN has it
        options = method_options(method, audit.settings)
        # None: not selected, or a per-class-cost method asked for two classes only.
        maps = ok[method].shown_all if method in ok else None
        if maps is None:
            torch.manual_seed(audit.settings.seed)  # as the method's own run (LIME, SmoothGrad)
            targets = None if note is None else columns
            maps = explain.run(model.model, images, method, targets=targets, **options).cpu()
        probs = model.probs[:show]
        if note is not None:
            probs = probs[:, :show]
        return ImagesClassesResult(
            method, target, sample.indices[:show], sample.labels[:show].tolist(),
            probs.tolist(), maps, note,
        )

    def intro(self, page: Page) -> Markup:
        return self.html("intro")

    def render(self, page: Page, model: ModelAudit, result: ImagesClassesResult) -> Markup:
        n = page.sample.show
        probs = model.probs[:n, : result.maps.shape[1]]
        fig = Drawing(fig_images_classes, page.sample.images01[:n], result.maps[:n], probs,
                                 page.sample.labels[:n], page.names)
        return self.html("body", note=result.columns_note, grid=page.figures.add(
            f"images_classes{page.tag(model)}", fig,
            f"{result.method} map of every class (columns) for one image of each class "
            "(rows), with the model's probability for that class above each tile. The framed "
            "diagonal is the true class. Maps are scaled by each image's largest value over "
            "all classes, so a faint map means weak evidence for that class, not a rendering "
            f"choice. n={n} images.",
            f"{result.method} per class",
        ))


@dataclass
class MethodsResult:
    """Each method's status and time (the maps themselves live in the model's cache)."""

    methods: dict[str, dict[str, Any]]


class MethodsClassesSection(Section):
    """Every method on the same images, and whether each ran."""

    id = "methods-classes"
    title = "Methods \u00d7 classes"

    def compute(self, audit: AuditRun, model: ModelAudit) -> MethodsResult:
        table = {}
        for name, maps in model.methods.items():
            entry: dict[str, Any] = {"family": maps.family,
                                     "class_specific": maps.class_specific,
                                     "status": maps.status}
            if maps.seconds is not None:
                entry["seconds"] = maps.seconds
            if maps.error is not None:
                entry["error"] = maps.error
            table[name] = entry
        return MethodsResult(table)

    def render(self, page: Page, model: ModelAudit, result: MethodsResult) -> Markup:
        ok = model.ok_maps()
        grid = None
        if ok:
            n = page.sample.show
            fig = Drawing(fig_methods, page.sample.images01[:n],
                              {m: mm.true_maps[:n] for m, mm in ok.items()},
                              page.column_labels(n))
            grid = page.figures.add(
                f"methods_classes{page.tag(model)}", fig,
                "Every method (rows) on the same images (columns, one per class, true class "
                "named on top), explaining the true class. Each map is scaled to its own "
                "maximum: compare where the evidence lies, not how strong it is. Warm = "
                f"more evidence. n={n} images.",
                "methods by image",
            )
        return self.html("body", result=result, n_images=len(page.sample.indices), grid=grid)


@dataclass
class SideBySideResult:
    """Per method and measure, each model's mean and the better one (two models), or why not."""

    skipped: str | None = None
    models: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)


class SideBySideSection(Section):
    """Two checkpoints on the same images and measures."""

    id = "side-by-side"
    title = "Models side by side"
    across_models = True

    def compute_across(self, audit: AuditRun) -> SideBySideResult:
        if len(audit.models) < 2:
            return SideBySideResult(skipped="one checkpoint was given; pass --ckpt twice to "
                                            "compare")
        per_model = [
            {"label": m.label, "name": m.name,
             "accuracy": m.results["summary"].accuracy["value"],
             "faithfulness": m.results["faithfulness"].methods,
             "localisation": m.results["localisation"].methods,
             "sanity": m.results["sanity"].methods}
            for m in audit.models
        ]
        table = compare_models(per_model, audit.settings.methods)
        return SideBySideResult(None, table["models"], table["names"], table["accuracy"],
                                table["methods"])

    def render_all(self, page: Page) -> Markup:
        result: SideBySideResult = page.audit.results[self.id]
        if result.skipped:
            return self.html("body", result=result)
        models = page.audit.models
        methods = [m for m in page.audit.settings.methods
                   if all(m in model.ok_maps() for model in models)]
        grid = None
        if methods:
            n = page.sample.show
            fig = Drawing(
                fig_side_by_side,
                page.sample.images01[:n],
                [{m: model.methods[m].true_maps[:n] for m in methods} for model in models],
                [model.label for model in models], methods, page.column_labels(n))
            grid = page.figures.add(
                "side_by_side", fig,
                "The same images (columns) explained by each method for model A and model B "
                "(alternating rows), true class, each map scaled to its own maximum. Where the "
                f"two rows differ, the models use different evidence. n={n} images.",
                "side by side",
            )
        return self.html("body", result=result,
                         n_accuracy=models[0].results["summary"].accuracy["n"], grid=grid)
