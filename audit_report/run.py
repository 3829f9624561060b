"""Running an audit: load the models, explain the sample once, compute every section,
write the report folder.

The explanation maps of each method are computed once per model (:class:`MethodMaps`)
and every section reads them from there.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import explain
from explain.measures import available_measures, get_measure
from explain.measures.inference import predict_proba
from lit_modules.loading import LoadedRun, load_run

from . import files
from .cache import ResultCache
from .estimate import estimate_seconds
from .findings import AuditResult, verdict_of
from .page import Page
from .removal import plan_removal, write_removal
from .sample import explained_classes, make_sample
from .sections import SECTIONS, Section
from .sections.bias import counterfactual_key
from .sections.removal import ShortcutRemovalSection, removal_spec
from .sections.shortcuts import discovery_key
from .settings import (
    AuditSettings,
    curve_schedule,
    method_options,
    monitor_layer,
    resolve_device,
)
from .state import AuditRun, MethodMaps, ModelAudit


def class_maps(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               preds: torch.Tensor, method: str, options: dict[str, Any],
               every_class: bool = True) -> dict[str, torch.Tensor | None]:
    """One method's maps of the true and the predicted class (``[N, H, W]`` each), and of
    every class where the audit wants them and they cost no more (``all``,
    ``[N, K, H, W]``, else None).

    A per-class-cost method (input gradients) runs once for the true classes and once more
    only on the images the model gets wrong: ~N + errors backward passes instead of N x K.
    Any other method explains every class at the cost of one (a CAM's head, a
    perturbation's forwards score all classes) and the rows are sliced from that, unless
    ``every_class`` is off (too many classes to hold): then one call with ``[N, 2]``
    targets shares the class-free work between the true and the predicted class.
    """
    rows = torch.arange(len(labels))
    if explain.get(method).cost.backward_per_class:
        true = explain.run(net, images, method, targets=labels, **options).cpu()
        pred = true.clone()
        wrong = (preds != labels).nonzero().flatten()
        if len(wrong):
            pred[wrong] = explain.run(net, images[wrong], method, targets=preds[wrong],
                                      **options).cpu()
        return {"true": true, "pred": pred, "all": None}
    if every_class:
        maps = explain.run(net, images, method, **options).cpu()
        return {"true": maps[rows, labels], "pred": maps[rows, preds], "all": maps}
    both = explain.run(net, images, method, targets=torch.stack([labels, preds], 1),
                       **options).cpu()
    return {"true": both[:, 0], "pred": both[:, 1], "all": None}


def maps_parts(audit: AuditRun, model: ModelAudit, method: str) -> dict[str, Any]:
    """The cache key's parts of one method's maps of the sample."""
    # The key says when the maps are true+predicted only; for few classes it is what it was.
    many = not explain.CLASS_SELECTION.every_class(len(audit.sample.class_names))
    return audit.cache_parts(model, method, **({"classes": "true+predicted"} if many else {}))


def from_cache(audit: AuditRun, model: ModelAudit) -> tuple[set[str], set[str]]:
    """What an earlier audit's cache already holds for ``model``: the methods whose maps it
    has, and which map-free results (``accuracy``, ``discovery``, ``counterfactual``)."""
    settings = audit.settings
    methods = {m for m in settings.methods
               if audit.has("explanations", maps_parts(audit, model, m))}
    keys = {"accuracy": ("accuracy", {}),
            "discovery": ("shortcuts", discovery_key(settings)),
            "counterfactual": ("counterfactual", counterfactual_key(settings))}
    reused = {name for name, (kind, extra) in keys.items()
              if audit.has(kind, audit.reuse_parts(model, **extra))}
    return methods, reused


def explain_methods(audit: AuditRun, model: ModelAudit) -> None:
    """Run every selected method once on the sample and keep what sections need: the maps
    of the true and the predicted class, and every class of the shown images where those
    come at no extra cost (see :func:`class_maps`).

    Every class is explained up to ``explain.ALL_CLASSES_MAX`` classes; beyond, only each
    image's true and predicted class, and ``shown_all`` stays None. One broken method must
    not sink the whole report: its error is recorded and shown.
    """
    sample, settings = audit.sample, audit.settings
    every_class = explain.CLASS_SELECTION.every_class(len(sample.class_names))
    for method in settings.methods:
        info = explain.get(method)
        entry = MethodMaps(method, info.family, info.class_specific)
        model.methods[method] = entry
        parts = maps_parts(audit, model, method)
        hit = audit.cached("explanations", parts, check=_maps_entry)
        if hit is not None:
            maps, entry.seconds, entry.cached = hit["maps"], hit["seconds"], True
        else:
            try:
                torch.manual_seed(settings.seed)  # stochastic methods repeat run to run
                start = time.perf_counter()
                maps = class_maps(model.model, sample.images, sample.labels, model.preds,
                                  method, method_options(method, settings), every_class)
                entry.seconds = time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001  (reported in the page, per method)
                entry.status, entry.error = "error", f"{type(exc).__name__}: {exc}"
                audit.step(f"{method} failed")
                continue
            if _finite(maps):
                audit.keep("explanations", parts, {"maps": maps, "seconds": entry.seconds})
        if not _finite(maps):
            entry.status, entry.error = "error", "the maps contain non-finite values"
            audit.step(f"{method} non-finite")
            continue
        entry.true_maps, entry.pred_maps = maps["true"], maps["pred"]
        entry.shown_all = None if maps["all"] is None else maps["all"][: sample.show]
        audit.step(f"explain {method}")


def _finite(maps: dict[str, torch.Tensor | None]) -> bool:
    return all(bool(torch.isfinite(m).all()) for m in maps.values() if m is not None)


def audit_model(audit: AuditRun, model: ModelAudit, sections: list[Section]) -> None:
    """Explain the sample, then compute every per-model section and collect its findings."""
    start = time.perf_counter()
    explain_methods(audit, model)
    model.timing["explain"] = time.perf_counter() - start
    for section in sections:
        if section.across_models:
            continue
        start = time.perf_counter()
        model.results[section.id] = section.compute(audit, model)
        model.timing[section.id] = time.perf_counter() - start
        audit.step(section.title.lower(), section.units(audit))
    # Problems first, then the sections' other findings in page order.
    found = [f for s in sections if not s.across_models
             for f in s.findings(audit, model, model.results[s.id])]
    model.findings = [f for f in found if f.flag] + [f for f in found if not f.flag]


def model_json(model: ModelAudit, sections: list[Section]) -> dict[str, Any]:
    """One model's part of ``metrics.json``."""
    run = model.run
    out: dict[str, Any] = {
        "label": model.label,
        "name": run.name,
        "checkpoint": None if run.ckpt_path is None else str(run.ckpt_path),
        "sha256": run.sha256,
        "config_path": None if run.config_path is None else str(run.config_path),
        "config": run.config,
        "meta": run.meta,
    }
    for section in sections:
        if not section.across_models:
            out[section.key] = files.jsonable(model.results[section.id])
    out["findings"] = [f.text for f in model.findings]
    out["timing"] = model.timing
    return out


def _normalization(datamodule: Any) -> dict[str, Any] | None:
    """The mean/std a datamodule normalises with (with their source where it says it)."""
    used = getattr(datamodule, "normalization_used", None)
    if used is not None:
        return dict(used)
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is None or std is None:
        return None  # e.g. the Python API given images already in [0, 1]
    return {"mean": list(mean), "std": list(std)}


def metrics_json(audit: AuditRun, sections: list[Section]) -> dict[str, Any]:
    """The whole ``metrics.json``: provenance, settings, data, measures, models."""
    settings, sample, data_run = audit.settings, audit.sample, audit.data_run
    bias = audit.models[0].results.get("bias")
    verdict, findings = verdict_of(audit)
    return {
        "schema_version": audit.schema_version,
        "verdict": files.jsonable(verdict),
        "findings": files.jsonable(findings),
        "created": audit.created,
        "command": audit.command,
        "seed": settings.seed,
        "device": settings.device,
        "versions": audit.versions,
        "settings": {
            "methods": settings.methods,
            "num_images": len(sample.indices),
            "split": settings.split,
            "steps": curve_schedule(settings)[0],
            "curve_schedule": curve_schedule(settings)[1],
            "threshold": settings.threshold,
            "sanity_images": settings.sanity_images,
            "counterfactual_images_per_class": settings.counterfactual_images,
            "discovery_images_per_class": settings.discovery_images,
            "batch_size": settings.batch_size,
            "method_options": {m: method_options(m, settings) for m in settings.methods},
            "classes_explained": explained_classes(len(sample.class_names)),
        },
        "data": {
            "from_checkpoint": "A",
            "config": data_run.config["data"],
            "class_names": sample.class_names,
            # The mean/std the images were normalised with (a checkpoint's own, where it has them).
            "normalization": _normalization(data_run.datamodule),
            "object_masks": sample.object_masks is not None,
            "cue": getattr(bias, "cue", None),
            "same_for_all_models": all(
                m.run.config["data"] == data_run.config["data"] for m in audit.models
            ),
        },
        "sample": {"indices": sample.indices, "labels": sample.labels.tolist()},
        "measures": {name: get_measure(name).as_dict() for name in available_measures()},
        "methods": {m: {"family": explain.get(m).family} for m in settings.methods},
        "models": [model_json(m, sections) for m in audit.models],
        "removal_plan": files.jsonable(audit.results.get("removal_plan")),
        **{s.key: files.jsonable(audit.results[s.id]) for s in sections if s.across_models},
        "audit_seconds": audit.seconds,
    }


def write_report(out_dir: Path, audit: AuditRun, sections: list[Section]) -> Path:
    """Draw every figure into ``out_dir/figures`` and write ``out_dir/report.html``.

    A section that found a problem (:meth:`Section.leads`) opens the page.
    """
    leading = [s for s in sections if s.leads(audit)]
    ordered = leading + [s for s in sections if s not in leading]
    return Page(audit, out_dir).write(ordered, out_dir / "report.html")


def say(text: str) -> None:
    """One line for the user on stderr (stdout stays for the report's path)."""
    print(text, file=sys.stderr, flush=True)


def run_audit(settings: AuditSettings, sections: list[Section] | None = None,
              ) -> AuditResult:
    """Audit the checkpoints in ``settings``; return where the report is, the verdict and
    the problems found (``result.path``, ``result.verdict``, ``result.findings``).

    The report is built in a temporary folder beside ``out`` and swapped in only when
    complete, so an interrupted audit leaves no half-written report.
    """
    started = time.perf_counter()
    try:
        settings = dataclasses.replace(settings, device=resolve_device(settings.device))
    except ValueError as exc:  # a GPU torch cannot see
        raise files.AuditError(str(exc)) from None
    configs = list(settings.train_config or [])
    configs += [None] * (len(settings.ckpt) - len(configs))
    runs = [load_run(c, cfg, settings.device, settings.trust_module)
            for c, cfg in zip(settings.ckpt, configs, strict=True)]
    layers = {monitor_layer(run.config) for run in runs}
    if settings.layer is None and len(layers) == 1 and None not in layers:
        # The layer the training run's monitor explained (when every model's agrees).
        settings = dataclasses.replace(settings, layer=layers.pop())
    out = Path(settings.out).expanduser() if settings.out else runs[0].log_dir / "audit"
    return audit_runs(settings, runs, out, sections, started)


def _maps_entry(value: Any) -> bool:
    """What an ``explanations`` cache entry holds: the maps by kind and the seconds."""
    maps = value.get("maps") if isinstance(value, dict) else None
    return (isinstance(maps, dict) and bool(maps)
            and all(isinstance(k, str) and torch.is_tensor(v) for k, v in maps.items())
            and isinstance(value.get("seconds"), float))


def audit_runs(settings: AuditSettings, runs: list[LoadedRun], out: Path,
               sections: list[Section] | None = None, started: float | None = None,
               ) -> AuditResult:
    """Audit loaded models on the first one's data and write the report folder ``out``.

    Everything after loading, shared by :func:`run_audit` (checkpoints) and
    :func:`audit_report.api.audit` (a model and a dataset from Python).
    """
    started = time.perf_counter() if started is None else started
    sections = list(SECTIONS if sections is None else sections)
    out = Path(out).expanduser().resolve()
    files.check_out(out)
    torch.manual_seed(settings.seed)
    data_run = runs[0]
    sample = make_sample(data_run, settings.split, settings.num_images, settings.seed)
    k = len(sample.class_names)
    for run in runs:
        hparams = getattr(run.model, "hparams", {})
        if hparams.get("num_classes", k) != k:
            raise files.AuditError(
                f"{run.ckpt_path} predicts {hparams['num_classes']} classes, but the "
                f"data has {k}: the models can not be audited on the same images"
            )
    split_size = len(data_run.datamodule.dataset(settings.split))
    out.parent.mkdir(parents=True, exist_ok=True)
    files.remove_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~files.umask())  # mkdtemp makes it private; a report is shared
        earlier = out if (out / "metrics.json").is_file() and settings.cache else None
        cache = ResultCache(earlier, tmp) if settings.cache else None
        models = [
            ModelAudit(label, run, predict_proba(run.model, sample.images,
                                                 settings.batch_size).cpu())
            for label, run in zip("AB", runs, strict=False)
        ]
        audit = AuditRun(
            settings, sample, data_run, models, None,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            command=settings.command or ["audit.py"],
            versions=files.versions(), cache=cache,
        )
        if removal_spec(audit) is not None and not any(
                isinstance(s, ShortcutRemovalSection) for s in sections):
            # A fine-tuned fix under audit: its before/after comes right after the search.
            at = next((i + 1 for i, s in enumerate(sections) if s.id == "shortcuts"), 1)
            sections.insert(at, ShortcutRemovalSection())
        seconds, reusing = 0.0, 0
        for model in models:
            cached, reused = from_cache(audit, model)
            reusing += len(cached)
            seconds += estimate_seconds(settings, model.model, sample.images, k, split_size,
                                        cached, reused)
        say(f"audit: {len(settings.methods)} methods ({', '.join(settings.methods)}) on "
            f"{len(sample.indices)} {settings.split} images, {len(runs)} checkpoint(s), every "
            f"section; estimated {seconds:.0f} s on this machine"
            + (f" ({reusing} method result(s) from the earlier report's cache)"
               if reusing else ""))
        with tqdm(total=1, desc="audit", unit="step", disable=not settings.progress or None,
                  dynamic_ncols=True) as bar:
            audit.progress = bar
            per_model = len(settings.methods) + sum(s.units(audit) for s in sections
                                                    if not s.across_models)
            bar.total = per_model * len(models) + sum(
                s.units(audit) for s in sections if s.across_models) + 1
            bar.refresh()
            for model in models:
                audit_model(audit, model, sections)
            for section in sections:
                if section.across_models:
                    audit.results[section.id] = section.compute_across(audit)
                    audit.step(section.title.lower(), section.units(audit))
            plan = plan_removal(audit, out)
            if plan is not None:
                write_removal(audit, plan, tmp)
                audit.results["removal_plan"] = plan
            bar.set_postfix_str("writing report", refresh=False)
            audit.seconds = time.perf_counter() - started
            write_report(tmp, audit, sections)
            files.write_metrics(tmp / "metrics.json", metrics_json(audit, sections))
            bar.update(1)
        files.publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    verdict, findings = verdict_of(audit)
    return AuditResult(out, verdict, findings)
