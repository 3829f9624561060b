"""Audit a trained classifier: explanations, faithfulness, localisation, sanity and bias.

    python audit.py --ckpt runs/quickstart/version_0/checkpoints/last.ckpt
    python audit.py --ckpt RESNET.ckpt --ckpt VGG.ckpt --methods gradcam,scorecam
    python audit.py --help

The model and the data are rebuilt from the config.yaml that train.py saved beside the
checkpoint. The report (``report.html``, ``metrics.json``, ``figures/``) is written to a
temporary folder and moved into place only when complete, so an interrupted audit leaves
no half-written report.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import os
import pickle
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

import explain
from explain import measures as M
from explain import report
from explain.records import load_monitor_records
from lit_modules.data.sampling import dataset_labels, sample_batch, stratified_indices
from lit_modules.loading import (
    CheckpointError,
    LoadedRun,
    counterfactual_images,
    evaluate,
    load_run,
)

SCHEMA_VERSION = 1
EXPENSIVE_OPTIONS = ("batch_size",)  # engine options that only trade memory for speed


# -- command line -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The audit's command line (every option documented in ``--help``)."""
    p = argparse.ArgumentParser(
        prog="audit.py",
        description=(
            "Write an audit report for trained checkpoints: every selected explanation\n"
            "method on a seeded, class-stratified sample, with localisation, faithfulness,\n"
            "sanity and bias measures. The model and data are rebuilt from the config.yaml\n"
            "that train.py saved in the checkpoint's log directory."
        ),
        epilog=(
            "examples:\n"
            "  python audit.py --ckpt runs/quickstart/version_0/checkpoints/last.ckpt\n"
            "  python audit.py --ckpt R18.ckpt --ckpt VGG.ckpt --methods gradcam,gradcam_pp\n"
            "output: DIR/report.html (self-contained), DIR/metrics.json, DIR/figures/*.png"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--ckpt", action="append", required=True, metavar="PATH",
        help="checkpoint to audit (loaded with weights_only=True); give it twice to compare "
        "two models side by side, e.g. the ResNet-18 and the VGG16-GAP runs",
    )
    p.add_argument(
        "--compare", metavar="PATH",
        help="a second checkpoint to compare with (the same as a second --ckpt)",
    )
    p.add_argument(
        "--config", action="append", metavar="PATH",
        help="training config of each --ckpt, in order (default: config.yaml in the "
        "checkpoint's log directory, <ckpt dir>/../config.yaml)",
    )
    p.add_argument(
        "--methods", default="all", metavar="LIST",
        help="comma-separated explanation methods, or 'all' (registered: "
        f"{', '.join(explain.available())})",
    )
    p.add_argument(
        "--num-images", type=int, default=64, metavar="N",
        help="images to explain: a seeded sample stratified over classes (default 64)",
    )
    p.add_argument(
        "--split", choices=("val", "test"), default="test",
        help="data split the sample and the accuracy come from (default test)",
    )
    p.add_argument(
        "--out", metavar="DIR",
        help="report directory (default: <log dir of the first checkpoint>/audit); an "
        "earlier report there is replaced once the new one is complete",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="where to run the models (default cpu)"
    )
    p.add_argument(
        "--seed", type=int, default=0,
        help="seed of the sample, the randomisation test, tie-breaking and stochastic "
        "methods (default 0)",
    )
    p.add_argument(
        "--steps", type=int, default=16,
        help="deletion/insertion steps; each removes or inserts 1/steps of the pixels (default 16)",
    )
    p.add_argument(
        "--threshold", type=float, default=0.2,
        help="share of a map's maximum kept for localisation boxes and region IoU (default 0.2)",
    )
    p.add_argument(
        "--sanity-images", type=int, default=8, metavar="N",
        help="images in the cascading randomisation test, the first N of the sample (default "
        "8: the test re-runs every method once per cascade step)",
    )
    p.add_argument(
        "--counterfactual-images", type=int, default=100, metavar="N",
        help="images per class in the with/without-cue test, when the data declares a cue "
        "(default 100)",
    )
    p.add_argument(
        "--batch-size", type=int, default=256,
        help="images per model call in the perturbation measures and the perturbation "
        "methods (scorecam, occlusion, lime, ...); default 256",
    )
    p.add_argument(
        "--method-options", default="{}", metavar="JSON",
        help='engine options per method as JSON, e.g. \'{"integrated_gradients": {"steps": '
        '16}, "lime": {"samples": 128}}\' (default: the engine\'s defaults)',
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (errors exit with status 2 and a message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        args.ckpt.append(args.compare)
    if len(args.ckpt) > 2:
        parser.error("at most two checkpoints can be compared")
    if args.config and len(args.config) > len(args.ckpt):
        parser.error("more --config than --ckpt options")
    requested = [m.strip() for m in args.methods.split(",") if m.strip()]
    if requested == ["all"]:
        requested = explain.available()
    unknown = [m for m in requested if m not in explain.available()]
    if unknown or not requested:
        parser.error(
            f"unknown method(s) {unknown or args.methods!r}; available: "
            f"{', '.join(explain.available())} (or 'all')"
        )
    args.methods = list(dict.fromkeys(requested))
    try:
        options = json.loads(args.method_options)
    except json.JSONDecodeError as exc:
        parser.error(f"--method-options is not valid JSON: {exc}")
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        parser.error('--method-options must map method names to option objects: {"m": {...}}')
    unknown = [m for m in options if m not in explain.available()]
    if unknown:
        parser.error(f"--method-options names unknown method(s) {unknown}")
    args.method_options = options
    for name, low in (("num_images", 1), ("steps", 1), ("sanity_images", 1),
                      ("counterfactual_images", 1), ("batch_size", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}")
    if not 0.0 < args.threshold < 1.0:
        parser.error("--threshold must lie strictly between 0 and 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA device")
    return args


# -- the sample -------------------------------------------------------------------------


@dataclass
class Sample:
    """The explained images and what is known about them."""

    split: str
    indices: list[int]
    images: Tensor  # normalised, [N, 3, H, W]
    images01: Tensor  # for display
    labels: Tensor
    object_masks: Tensor | None  # ground truth where the data has it
    cue_masks: Tensor | None  # where a cue was stamped on this image (empty if none)
    cue_regions: Tensor | None  # where the cue would sit on each image
    class_names: list[str]
    show: int  # images shown in the grids (one per class, in class order)


def make_sample(run: LoadedRun, split: str, n: int, seed: int) -> Sample:
    """A seeded, class-stratified sample of ``split`` from the run's datamodule."""
    dm = run.datamodule
    dataset = dm.dataset(split)
    indices = stratified_indices(dataset_labels(dataset), n, seed)
    batch = sample_batch(dataset, indices)
    images = batch["image"].float()
    h, w = images.shape[-2:]
    class_names = list(getattr(dm, "class_names", None) or [])
    labels = batch["label"].long()
    if not class_names:
        class_names = [str(c) for c in range(int(labels.max()) + 1)]
    masks = batch.get("object_mask") if getattr(dm, "has_object_masks", False) else None
    cue = getattr(dm, "cue", None)
    cue_masks = batch.get("cue_mask") if cue is not None else None
    regions = None
    if cue is not None:
        regions = torch.stack([cue.mask(h, w, i, split) for i in indices])
    images01 = dm.denormalize(images).clamp(0, 1) if hasattr(dm, "denormalize") else images
    # stratified_indices takes one image per class first, in class order: those are shown.
    show = min(len(indices), len(class_names), 10)
    return Sample(split, indices, images, images01, labels, masks, cue_masks, regions,
                  class_names, show)


# -- per-model audit --------------------------------------------------------------------


def _method_options(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """The user's options for ``method``, plus a batch size for perturbation methods.

    Gradient methods keep the engine's default batch: their batches also hold a backward
    graph for every class, so a large batch costs memory rather than saving time.
    """
    info = explain.get(method)
    options: dict[str, Any] = {}
    if info.family == "perturbation":
        params = inspect.signature(info.fn).parameters
        options = {k: args.batch_size for k in EXPENSIVE_OPTIONS if k in params}
    options.update(args.method_options.get(method, {}))
    return options


class AuditError(RuntimeError):
    """The audit can not run as asked (output folder, incompatible models)."""


class Audit:
    """Runs every section for one model on the shared sample.

    Returns a JSON-ready result (the model's part of ``metrics.json``) and the tensors the
    report's figures need. The measures live in :mod:`explain.measures`, the words and
    figures in :mod:`explain.report`; this class only decides what runs on what.
    """

    def __init__(self, args: argparse.Namespace, sample: Sample, progress: tqdm) -> None:
        self.args = args
        self.sample = sample
        self.progress = progress

    def step(self, what: str, n: int = 1) -> None:
        self.progress.set_postfix_str(what[:40], refresh=False)
        self.progress.update(n)

    def units(self, run: LoadedRun) -> int:
        """Progress units of one model (for the bar's total)."""
        # accuracy, 4 per method, CAM, trained + each cascade step, counterfactual, evolution
        return 4 + 4 * len(self.args.methods) + len(M.cascade_steps(run.model)) + 1

    def run(self, label: str, run: LoadedRun, data_run: LoadedRun) -> tuple[dict, dict]:
        args, s = self.args, self.sample
        model, names = run.model, s.class_names
        n = len(s.labels)
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        ev = evaluate(model, data_run.datamodule.dataset(s.split), len(names), args.batch_size)
        timing["evaluate"] = time.perf_counter() - t0
        self.step("accuracy")
        probs = M.predict_proba(model, s.images, args.batch_size).cpu()
        preds = probs.argmax(1)
        result: dict[str, Any] = {
            "label": label,
            "name": run.name,
            "checkpoint": str(run.ckpt_path),
            "sha256": run.sha256,
            "config_path": str(run.config_path),
            "config": run.config,
            "meta": run.meta,
            "summary": M.accuracy_summary(ev["labels"], ev["preds"], names, ev["confusion"]),
            "images_classes": {
                "method": "gradcam",
                "target": "every class",
                "indices": s.indices[: s.show],
                "labels": s.labels[: s.show].tolist(),
                "probabilities": probs[: s.show].tolist(),
            },
        }
        visual: dict[str, Any] = {"label": label, "name": run.name, "probs": probs,
                                  "confusion": ev["confusion"], "maps_true": {}, "boxes": {},
                                  "gt_boxes": None, "curves": {}}
        status, loc, faith, energy = {}, {}, {}, {}
        for method in args.methods:
            info = explain.get(method)
            entry: dict[str, Any] = {"family": info.family, "class_specific": info.class_specific}
            status[method] = entry
            try:
                torch.manual_seed(args.seed)  # stochastic methods repeat run to run
                t = time.perf_counter()
                maps = explain.run(model, s.images, method,
                                   **_method_options(method, args)).cpu()
                entry["seconds"] = time.perf_counter() - t
            except Exception as exc:  # one broken method must not sink the whole report
                entry.update(status="error", error=f"{type(exc).__name__}: {exc}")
                self.step(f"{method} failed", 4)
                continue
            if not torch.isfinite(maps).all():
                entry.update(status="error", error="the maps contain non-finite values")
                self.step(f"{method} non-finite", 4)
                continue
            entry["status"] = "ok"
            self.step(f"explain {method}")
            rows = torch.arange(n)
            true_maps, pred_maps = maps[rows, s.labels], maps[rows, preds]
            visual["maps_true"][method] = true_maps
            if method == "gradcam":
                visual["gradcam_all"] = maps[: s.show]

            t = time.perf_counter()
            loc[method], per_image = M.localisation_summary(true_maps, s.object_masks,
                                                            args.threshold)
            visual["boxes"][method] = per_image["boxes"]
            visual["gt_boxes"] = per_image.get("gt_boxes")
            entry["seconds_localisation"] = time.perf_counter() - t
            self.step(f"localise {method}")

            t = time.perf_counter()
            faith[method], visual["curves"][method] = M.faithfulness_summary(
                model, s.images, pred_maps, preds, steps=args.steps,
                batch_size=args.batch_size, seed=args.seed,
            )
            entry["seconds_faithfulness"] = time.perf_counter() - t
            self.step(f"faithfulness {method}")

            energy[method] = M.energy_by_class(true_maps, s.labels, names, s.cue_masks,
                                               s.cue_regions)
            self.step(f"bias {method}")

        if "gradcam_all" not in visual:  # section 2 shows Grad-CAM even when not selected
            visual["gradcam_all"] = explain.run(model, s.images[: s.show], "gradcam").cpu()
        result["methods_classes"] = status

        t = time.perf_counter()
        result["cam_vs_gradcam"], visual["cam_pair"] = self._cam_vs_gradcam(model)
        timing["cam_vs_gradcam"] = time.perf_counter() - t
        self.step("CAM vs Grad-CAM")
        result["localisation"] = {
            "threshold": args.threshold, "ground_truth": s.object_masks is not None,
            "target": "true class", "n_images": n, "methods": loc,
        }
        result["faithfulness"] = {
            "steps": args.steps, "deletion_fill": "mean", "insertion_start": "blur",
            "target": "predicted class", "n_images": n, "methods": faith,
        }
        t = time.perf_counter()
        result["sanity"], visual["sanity"] = self._sanity(model, list(visual["maps_true"]))
        timing["sanity"] = time.perf_counter() - t
        t = time.perf_counter()
        result["bias"] = self._bias(model, data_run, energy)
        timing["bias"] = time.perf_counter() - t
        self.step("counterfactual")
        result["evolution"], visual["evolution"] = self._evolution(run)
        self.step("evolution")
        result["findings"] = report.findings(result)
        timing["total"] = time.perf_counter() - t0
        result["timing"] = timing
        return result, visual

    def _cam_vs_gradcam(self, model: torch.nn.Module) -> tuple[dict[str, Any], Any]:
        s = self.sample
        if "cam" not in explain.available():
            return {"skipped": "the engine has no 'cam' method"}, None
        try:
            cam = explain.run(model, s.images, "cam", targets=s.labels).cpu()
        except explain.ExplainError as exc:
            return {"skipped": f"CAM does not apply to this model: {exc}"}, None
        grad = explain.run(model, s.images, "gradcam", targets=s.labels).cpu()
        out = M.agreement_summary(cam, grad, self.args.threshold)
        out.update(target="true class", threshold=self.args.threshold)
        return out, (cam[: s.show], grad[: s.show])

    def _sanity(self, model: torch.nn.Module, methods: list[str]) -> tuple[dict, dict]:
        s, args = self.sample, self.args
        m = min(args.sanity_images, len(s.labels))
        images, targets = s.images[:m], s.labels[:m]

        def explainer(method: str):
            opts = _method_options(method, args)

            def explain_with(net: torch.nn.Module) -> Tensor:
                torch.manual_seed(args.seed)
                return explain.run(net, images, method, targets=targets, **opts)

            return explain_with

        res = M.cascading_randomization(
            model, {meth: explainer(meth) for meth in methods}, seed=args.seed, keep=1,
            on_step=lambda label: self.step(f"randomise {label}"),
        )
        threshold = 0.5
        summary = {
            "steps": res["steps"],
            "n_images": m,
            "target": "true class",
            "flag_threshold": threshold,
            "methods": {
                meth: {**M.sanity_summary(res["spearman"][meth], threshold),
                       "seconds": res["seconds"][meth]}
                for meth in methods
            },
        }
        return summary, res

    def _bias(self, model: torch.nn.Module, data_run: LoadedRun, energy: dict) -> dict:
        s, args = self.sample, self.args
        dm = data_run.datamodule
        cue = getattr(dm, "cue", None)
        h, w = s.images.shape[-2:]
        width = max(1, round(0.1 * min(h, w)))
        out: dict[str, Any] = {
            "target": "true class",
            "border_width": width,
            "border_area": float(M.border_mask(h, w, width).float().mean()),
            "cue": cue.as_dict() if cue is not None else None,
            "cue_description": cue.describe() if cue is not None else None,
            "cue_area": float(cue.size**2 / (h * w)) if cue is not None else None,
            "methods": energy,
            "counterfactual": None,
            "flagged": [],
        }
        if cue is None:
            out["counterfactual_skipped"] = "the data declares no spurious cue"
            return out
        labels = dataset_labels(dm.dataset(s.split))
        idx = stratified_indices(labels, args.counterfactual_images * len(s.class_names),
                                 args.seed + 1)
        data = counterfactual_images(dm, s.split, idx)
        if data is None:
            out["counterfactual_skipped"] = "the data keeps no raw images to remove the cue from"
            return out
        clean, stamped, cf_labels = data
        cf = M.counterfactual(model, clean, stamped, cf_labels, cue.classes,
                              len(s.class_names), args.batch_size)
        summary = M.counterfactual_summary(cf, cf_labels, s.class_names, cue.classes)
        out["counterfactual"] = summary
        lead = "gradcam" if "gradcam" in energy else next(iter(energy), None)
        for c in summary["flagged"]:
            name = s.class_names[c]
            cue_energy = (energy.get(lead) or {}).get("cue_energy", {}).get(name)
            evidence = report.flag_evidence(name, summary["classes"][name], cue_energy, lead,
                                            out["cue_area"], summary["threshold"])
            out["flagged"].append({"class": name, "index": c, "evidence": evidence})
        return out

    def _evolution(self, run: LoadedRun) -> tuple[dict[str, Any], Any]:
        try:
            found = load_monitor_records(run.log_dir)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
            return {"skipped": f"the monitor's files are unreadable: {exc}"}, None
        if found is None or not found[1]:
            folder = run.log_dir / "explanations"
            return {"skipped": f"no ExplanationMonitor maps under {folder}"}, None
        return report.evolution_data(*found)


# -- output -----------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("torch", "torchvision", "lightning", "torchmetrics", "numpy", "matplotlib",
                 "camlight"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier audit report."""
    if out.exists():
        if not out.is_dir():
            raise AuditError(f"--out {str(out)!r} exists and is not a directory")
        if any(out.iterdir()) and not (out / "metrics.json").is_file():
            raise AuditError(
                f"--out {str(out)!r} exists and does not hold an earlier audit report; "
                "choose an empty or new directory"
            )


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished report into place; an earlier report is swapped out, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:  # put the earlier report back rather than leave nothing
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_audit(args: argparse.Namespace) -> Path:
    """Everything after argument parsing; returns the report directory."""
    started = time.perf_counter()
    configs = list(args.config or [])
    configs += [None] * (len(args.ckpt) - len(configs))
    runs = [load_run(c, cfg, args.device) for c, cfg in zip(args.ckpt, configs, strict=True)]
    out = Path(args.out).expanduser() if args.out else runs[0].log_dir / "audit"
    out = out.resolve()
    _check_out(out)
    torch.manual_seed(args.seed)
    data_run = runs[0]
    sample = make_sample(data_run, args.split, args.num_images, args.seed)
    k = len(sample.class_names)
    for run in runs:
        if run.model.hparams.get("num_classes", k) != k:
            raise AuditError(
                f"{run.ckpt_path} predicts {run.model.hparams['num_classes']} classes, but the "
                f"data has {k}: the models can not be audited on the same images"
            )
    with tqdm(total=1, desc="audit", unit="step", disable=args.no_progress or None,
              dynamic_ncols=True) as bar:
        audit = Audit(args, sample, bar)
        bar.total = sum(audit.units(r) for r in runs) + 1
        bar.refresh()
        models, visuals = [], []
        for label, run in zip("AB", runs, strict=False):
            res, vis = audit.run(label, run, data_run)
            models.append(res)
            visuals.append(vis)
        results = {
            "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": getattr(args, "argv", None) or ["audit.py", *sys.argv[1:]],
            "seed": args.seed,
            "device": args.device,
            "versions": versions(),
            "settings": {
                "methods": args.methods,
                "num_images": len(sample.indices),
                "split": args.split,
                "steps": args.steps,
                "threshold": args.threshold,
                "sanity_images": args.sanity_images,
                "counterfactual_images_per_class": args.counterfactual_images,
                "batch_size": args.batch_size,
                "method_options": {m: _method_options(m, args) for m in args.methods},
            },
            "data": {
                "from_checkpoint": "A",
                "config": data_run.config["data"],
                "class_names": sample.class_names,
                "object_masks": sample.object_masks is not None,
                "cue": models[0]["bias"]["cue"],
                "same_for_all_models": all(
                    r.config["data"] == data_run.config["data"] for r in runs
                ),
            },
            "sample": {"indices": sample.indices, "labels": sample.labels.tolist()},
            "measures": {name: M.get_measure(name).as_dict() for name in M.available_measures()},
            "methods": {m: {"family": explain.get(m).family} for m in args.methods},
            "models": models,
            "side_by_side": (
                M.compare_models(models, args.methods) if len(models) > 1
                else {"skipped": "one checkpoint was given; pass --ckpt twice to compare"}
            ),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a report is shared
            bar.set_postfix_str("writing report", refresh=False)
            results["audit_seconds"] = time.perf_counter() - started
            report.write_report(tmp, results, {"sample": sample, "models": visuals})
            report.write_metrics(tmp / "metrics.json", results)
            bar.update(1)
            _publish(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    """Entry point: parse, audit, print where the report went."""
    args = parse_args(argv)
    args.argv = None if argv is None else ["audit.py", *argv]
    try:
        out = run_audit(args)
    except (CheckpointError, AuditError) as exc:
        print(f"audit.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("audit.py: interrupted; no report was written", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"Audit report: {out / 'report.html'}\nNumbers:      {out / 'metrics.json'}")
    return out


if __name__ == "__main__":
    main()
