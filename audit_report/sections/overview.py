"""The overview sections: summary, images x classes, methods x classes, models side by side."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import explain
from explain.measures import get_measure
from explain.measures.comparison import compare_models
from explain.measures.statistics import accuracy_summary
from lit_modules.loading import evaluate

from ..figures import fig_confusion, fig_images_classes, fig_methods, fig_side_by_side
from ..findings import Finding, lead_method
from ..page import Drawing, esc, finite, fmt_prop, not_run
from ..sample import explained_classes
from ..settings import method_options
from .base import VISUAL, Section

if TYPE_CHECKING:
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


def _source_rows(model: ModelAudit) -> str:
    """Where the model came from: checkpoint, hash, config (or that it was given from Python)."""
    run = model.run
    if run.ckpt_path is None:  # audit_report.audit(model, data): no file, no config
        return ("<tr><td>checkpoint</td><td>none: the model was given from Python "
                "(audit_report.audit)</td></tr>"
                f"<tr><td>SHA-256</td><td><code>{esc(run.sha256)}</code> "
                '<span class="muted">(of the weights)</span></td></tr>'
                "<tr><td>training config</td><td>none</td></tr>")
    meta = run.meta
    return (f"<tr><td>checkpoint</td><td><code>{esc(run.ckpt_path)}</code> (epoch "
            f"{esc(meta.get('epoch', '?'))}, step {esc(meta.get('global_step', '?'))})</td></tr>"
            f"<tr><td>SHA-256</td><td><code>{esc(run.sha256)}</code></td></tr>"
            f"<tr><td>config</td><td><code>{esc(run.config_path)}</code></td></tr>")


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

    def intro(self, page: Page) -> str:
        audit = page.audit
        data_cfg = audit.data_run.config["data"]
        init = data_cfg.get("init_args", {})
        keys = ", ".join(f"{k}={v}" for k, v in init.items() if not k.startswith("cue"))
        bias = audit.models[0].results.get("bias")
        cue = getattr(bias, "cue_description", None) or "none declared"
        same_data = all(m.run.config["data"] == data_cfg for m in audit.models)
        out = (
            '<table class="facts">'
            f"<tr><td>data</td><td><code>{esc(data_cfg.get('class_path'))}</code> "
            f'<span class="muted">{esc(keys)}</span></td></tr>'
            f"<tr><td>classes</td><td>{esc(', '.join(page.names))}</td></tr>"
            f"<tr><td>spurious cue</td><td>{esc(cue)}</td></tr>"
            f"<tr><td>split audited</td><td>{esc(audit.settings.split)} "
            f"({len(page.sample.indices)} images explained, stratified over classes, seed "
            f"{audit.settings.seed})</td></tr>"
            f"<tr><td>classes explained</td><td>{esc(explained_classes(len(page.names)))}"
            "</td></tr>"
            "<tr><td>ground-truth masks</td><td>"
            f"{'yes' if page.sample.object_masks is not None else 'no'}</td></tr></table>"
        )
        if not same_data:
            out += ('<p class="note">The models were trained on different data configs; both '
                    "are audited on model A's data so they see the same images.</p>")
        return out

    def render(self, page: Page, model: ModelAudit, result: AccuracyResult) -> str:
        hp = model.run.config.get("model", {})
        hp_text = ", ".join(f"{k}={v}" for k, v in hp.items())
        out = [
            '<table class="facts">'
            f"<tr><td>model</td><td>{esc(model.name)}<br><span class=\"muted\">"
            f"{esc(hp_text)}</span></td></tr>{_source_rows(model)}"
            f"<tr><td>accuracy ({esc(page.audit.settings.split)}) "
            '<span class="dir">\u2191</span></td>'
            f"<td>{fmt_prop(result.accuracy)}</td></tr></table>"
        ]
        flag = ' class="flag"'
        items = "".join(f"<li{flag if f.flag else ''}>{esc(f.text)}</li>"
                        for f in model.findings)
        out.append(f'<div class="findings"><b>Headline findings</b><ul>{items}</ul></div>')
        rows = "".join(
            f"<tr><td>{esc(name)}</td><td class=\"num\">{fmt_prop(p)}</td></tr>"
            for name, p in result.per_class.items()
        )
        out.append(
            '<div class="pair"><div><h3>Accuracy per class <span class="dir">\u2191</span>'
            f"</h3><table><tr><th>class</th><th class=\"num\">accuracy (recall)</th></tr>"
            f"{rows}</table></div><div>"
        )
        out.append(page.figures.add(
            f"confusion{page.tag(model)}",
            Drawing(fig_confusion, torch.tensor(result.confusion_matrix), page.names),
            "Confusion matrix on the whole split (torchmetrics). Rows are the true class, "
            "columns the predicted class; each cell shows the count, and its colour the "
            "share of the row, so a dark diagonal is good and a dark off-diagonal cell is "
            "a frequent confusion.",
            "confusion matrix",
        ))
        out.append("</div></div>")
        return "".join(out)


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
            method = "gradcam"  # shown even when not selected: every CNN has it
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

    def intro(self, page: Page) -> str:
        return ("<p>What the model sees for each class it could predict. A trustworthy model "
                "shows strong maps on the object in the true-class column and weak maps "
                "elsewhere.</p>")

    def render(self, page: Page, model: ModelAudit, result: ImagesClassesResult) -> str:
        n = page.sample.show
        probs = model.probs[:n, : result.maps.shape[1]]
        fig = Drawing(fig_images_classes, page.sample.images01[:n], result.maps[:n], probs,
                                 page.sample.labels[:n], page.names)
        note = f'<p class="note">{esc(result.columns_note)}</p>' if result.columns_note else ""
        return note + page.figures.add(
            f"images_classes{page.tag(model)}", fig,
            f"{result.method} map of every class (columns) for one image of each class "
            "(rows), with the model's probability for that class above each tile. The framed "
            "diagonal is the true class. Maps are scaled by each image's largest value over "
            "all classes, so a faint map means weak evidence for that class, not a rendering "
            f"choice. n={n} images.",
            f"{result.method} per class",
        )


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

    def render(self, page: Page, model: ModelAudit, result: MethodsResult) -> str:
        out, rows = [], []
        for name, entry in result.methods.items():
            status = (
                '<span class="badge ok">ok</span>' if entry["status"] == "ok"
                else f'<span class="badge bad">failed</span> <span class="error">'
                f"{esc(entry.get('error', ''))}</span>"
            )
            secs = entry.get("seconds")
            rows.append(
                f"<tr><td>{esc(name)}</td><td>{esc(entry['family'])}</td><td>{status}</td>"
                f'<td class="num">{f"{secs:.2f} s" if secs is not None else "-"}</td></tr>'
            )
        ok = model.ok_maps()
        if ok:
            n = page.sample.show
            fig = Drawing(fig_methods, page.sample.images01[:n],
                              {m: mm.true_maps[:n] for m, mm in ok.items()},
                              page.column_labels(n))
            out.append(page.figures.add(
                f"methods_classes{page.tag(model)}", fig,
                "Every method (rows) on the same images (columns, one per class, true class "
                "named on top), explaining the true class. Each map is scaled to its own "
                "maximum: compare where the evidence lies, not how strong it is. Warm = "
                f"more evidence. n={n} images.",
                "methods by image",
            ))
        out.append(
            "<table><tr><th>method</th><th>family</th><th>status</th><th class=\"num\">"
            f"time for {len(page.sample.indices)} images, all classes</th></tr>"
            + "".join(rows) + "</table>"
        )
        return "".join(out)


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

    def render_all(self, page: Page) -> str:
        result: SideBySideResult = page.audit.results[self.id]
        if result.skipped:
            return not_run(result.skipped)
        models = page.audit.models
        methods = [m for m in page.audit.settings.methods
                   if all(m in model.ok_maps() for model in models)]
        acc = " vs ".join(f"{esc(lbl)} {a:.1%}"
                          for lbl, a in zip(result.models, result.accuracy, strict=True))
        n_acc = models[0].results["summary"].accuracy["n"]
        out = [f"<p>Accuracy: {acc} (n={n_acc}).</p>"]
        if methods:
            n = page.sample.show
            fig = Drawing(
                fig_side_by_side,
                page.sample.images01[:n],
                [{m: model.methods[m].true_maps[:n] for m in methods} for model in models],
                [model.label for model in models], methods, page.column_labels(n))
            out.append(page.figures.add(
                "side_by_side", fig,
                "The same images (columns) explained by each method for model A and model B "
                "(alternating rows), true class, each map scaled to its own maximum. Where the "
                f"two rows differ, the models use different evidence. n={n} images.",
                "side by side",
            ))
        head = "".join(f"<th class=\"num\">model {esc(lbl)}</th>" for lbl in result.models)
        rows = []
        for method, measures in result.methods.items():
            for name, cmp in measures.items():
                info = get_measure(name)
                cells = []
                for i, mean in enumerate(cmp["means"]):
                    txt = "n/a" if not finite(mean) else (
                        f"{mean:.1f}%" if info.unit == "%" else f"{mean:.3f}")
                    if cmp["better"] == i:
                        txt = f"<b>{txt}</b>"
                    cells.append(f'<td class="num">{txt} <span class="n">n={cmp["n"][i]}</span>'
                                 "</td>")
                rows.append(f"<tr><td>{esc(method)}</td><td>{esc(info.label)} "
                            f'<span class="dir">{info.arrow}</span></td>{"".join(cells)}</tr>')
        out.append(
            "<p>Means per method and measure; the better value in the measure's direction is "
            "bold (no significance test: read the intervals in the sections below).</p>"
            f"<table><tr><th>method</th><th>measure</th>{head}</tr>{''.join(rows)}</table>"
        )
        return "".join(out)
