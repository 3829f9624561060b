"""Running an audit: load the models, explain the sample once, compute every section,
write the report folder.

The explanation maps of each method are computed once per model (:class:`MethodMaps`)
and every section reads them from there.
"""

from __future__ import annotations

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
from lit_modules.loading import load_run

from . import files
from .cache import ResultCache
from .estimate import estimate_seconds
from .page import Page
from .sample import make_sample
from .sections import SECTIONS, Section
from .settings import AuditSettings, method_options
from .state import AuditRun, MethodMaps, ModelAudit


def explain_methods(audit: AuditRun, model: ModelAudit) -> None:
    """Run every selected method once on the sample (all classes) and keep what sections need.

    One broken method must not sink the whole report: its error is recorded and shown.
    """
    sample, settings = audit.sample, audit.settings
    rows = torch.arange(len(sample.labels))
    for method in settings.methods:
        info = explain.get(method)
        entry = MethodMaps(method, info.family, info.class_specific)
        model.methods[method] = entry
        parts = audit.cache_parts(model, method)
        hit = audit.cached("maps", parts)
        if hit is not None:
            maps, entry.seconds, entry.cached = hit["maps"], hit["seconds"], True
        else:
            try:
                torch.manual_seed(settings.seed)  # stochastic methods repeat run to run
                start = time.perf_counter()
                maps = explain.run(model.model, sample.images, method,
                                   **method_options(method, settings)).cpu()
                entry.seconds = time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001  (reported in the page, per method)
                entry.status, entry.error = "error", f"{type(exc).__name__}: {exc}"
                audit.step(f"{method} failed")
                continue
            if torch.isfinite(maps).all():
                audit.keep("maps", parts, {"maps": maps, "seconds": entry.seconds})
        if not torch.isfinite(maps).all():
            entry.status, entry.error = "error", "the maps contain non-finite values"
            audit.step(f"{method} non-finite")
            continue
        entry.true_maps = maps[rows, sample.labels]
        entry.pred_maps = maps[rows, model.preds]
        entry.shown_all = maps[: sample.show]
        audit.step(f"explain {method}")


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
        "checkpoint": str(run.ckpt_path),
        "sha256": run.sha256,
        "config_path": str(run.config_path),
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
    if hasattr(datamodule, "mean") and hasattr(datamodule, "std"):
        return {"mean": list(datamodule.mean), "std": list(datamodule.std)}
    return None


def metrics_json(audit: AuditRun, sections: list[Section]) -> dict[str, Any]:
    """The whole ``metrics.json``: provenance, settings, data, measures, models."""
    settings, sample, data_run = audit.settings, audit.sample, audit.data_run
    bias = audit.models[0].results.get("bias")
    return {
        "schema_version": audit.schema_version,
        "created": audit.created,
        "command": audit.command,
        "seed": settings.seed,
        "device": settings.device,
        "versions": audit.versions,
        "settings": {
            "methods": settings.methods,
            "num_images": len(sample.indices),
            "split": settings.split,
            "steps": settings.steps,
            "threshold": settings.threshold,
            "sanity_images": settings.sanity_images,
            "counterfactual_images_per_class": settings.counterfactual_images,
            "discovery_images_per_class": settings.discovery_images,
            "batch_size": settings.batch_size,
            "method_options": {m: method_options(m, settings) for m in settings.methods},
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


def run_audit(settings: AuditSettings, sections: list[Section] | None = None) -> Path:
    """Audit the checkpoints in ``settings`` and return the report directory.

    The report is built in a temporary folder beside ``out`` and swapped in only when
    complete, so an interrupted audit leaves no half-written report.
    """
    started = time.perf_counter()
    sections = list(SECTIONS if sections is None else sections)
    configs = list(settings.train_config or [])
    configs += [None] * (len(settings.ckpt) - len(configs))
    runs = [load_run(c, cfg, settings.device)
            for c, cfg in zip(settings.ckpt, configs, strict=True)]
    out = Path(settings.out).expanduser() if settings.out else runs[0].log_dir / "audit"
    out = out.resolve()
    files.check_out(out)
    torch.manual_seed(settings.seed)
    data_run = runs[0]
    sample = make_sample(data_run, settings.split, settings.num_images, settings.seed)
    k = len(sample.class_names)
    for run in runs:
        if run.model.hparams.get("num_classes", k) != k:
            raise files.AuditError(
                f"{run.ckpt_path} predicts {run.model.hparams['num_classes']} classes, but the "
                f"data has {k}: the models can not be audited on the same images"
            )
    split_size = len(data_run.datamodule.dataset(settings.split))
    seconds = sum(estimate_seconds(settings, run.model, sample.images, k, split_size)
                  for run in runs)
    say(f"audit: {len(settings.methods)} methods ({', '.join(settings.methods)}) on "
        f"{len(sample.indices)} {settings.split} images, {len(runs)} checkpoint(s), every "
        f"section; estimated {seconds:.0f} s on this machine (earlier results in the "
        "report's cache make it faster)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~files.umask())  # mkdtemp makes it private; a report is shared
        earlier = out if (out / "metrics.json").is_file() and settings.cache else None
        cache = ResultCache(earlier, tmp) if settings.cache else None
        with tqdm(total=1, desc="audit", unit="step", disable=not settings.progress or None,
                  dynamic_ncols=True) as bar:
            models = [
                ModelAudit(label, run, predict_proba(run.model, sample.images,
                                                     settings.batch_size).cpu())
                for label, run in zip("AB", runs, strict=False)
            ]
            audit = AuditRun(
                settings, sample, data_run, models, bar,
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                command=settings.command or ["audit.py"],
                versions=files.versions(), cache=cache,
            )
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
            bar.set_postfix_str("writing report", refresh=False)
            audit.seconds = time.perf_counter() - started
            write_report(tmp, audit, sections)
            files.write_metrics(tmp / "metrics.json", metrics_json(audit, sections))
            bar.update(1)
        files.publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
