"""Audit a trained classifier: explanations, faithfulness, localisation, sanity and bias.

    python audit.py --ckpt runs/quickstart/version_0/checkpoints/last.ckpt
    python audit.py --ckpt '[RESNET.ckpt, VGG.ckpt]' --methods '[gradcam, scorecam]'
    python audit.py --config audit.yaml --print_config
    python audit.py --help

A thin command line around :mod:`audit_report`, in ``train.py``'s dialect (jsonargparse:
underscores, lists as lists, nested options as YAML, ``--config`` and ``--print_config``).
The model and the data are rebuilt from the config.yaml that train.py saved beside the
checkpoint. The report (``report.html``, ``metrics.json``, ``figures/``) is written to a
temporary folder and moved into place only when complete.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

import explain
from audit_report import SCHEMA_VERSION, AuditError, AuditSettings, run_audit
from audit_report.findings import AuditResult
from audit_report.settings import FAST_FAITHFULNESS_IMAGES, FAST_OPTIONS, SANITY_FINAL_ONLY
from audit_report.settings import METHOD_PRESETS as PRESETS
from lit_modules.loading import CheckpointError, check_trusted

__all__ = ["SCHEMA_VERSION", "build_parser", "main", "parse_args"]

# Exit status of --fail_on_findings when the report flags a class (2 is a usage error).
FLAGGED_EXIT_STATUS = 3
FAILURE_EXIT_STATUS = 1  # 0: report written; 2: usage (argparse); 1: the audit failed
EXIT_CODES = ("exit status: 0 the report was written; 1 the audit failed (a checkpoint or "
              "config it cannot use, an --out it cannot write); 2 a usage error; 3 findings "
              "with --fail_on_findings true")
# Spellings of earlier versions, refused with the new form.
RENAMED = {
    "--num-images": "--num_images N",
    "--sanity-images": "--sanity_images N",
    "--counterfactual-images": "--counterfactual_images N",
    "--batch-size": "--batch_size N",
    "--method-options": "--method_options '{lime: {samples: 128}}' (YAML, not JSON-only)",
    "--no-progress": "--progress false",
    "--compare": "a second --ckpt PATH (or --ckpt '[A.ckpt, B.ckpt]')",
}


def build_parser() -> ArgumentParser:
    """The audit's command line (every option documented in ``--help``)."""
    p = ArgumentParser(
        prog="audit.py",
        description=(
            "Write an audit report for trained checkpoints: the selected explanation methods "
            "on a seeded, class-stratified sample, with localisation, faithfulness, sanity "
            "and bias measures. The model and data are rebuilt from the config.yaml that "
            "train.py saved in the checkpoint's log directory. Output: OUT/report.html "
            "(self-contained), OUT/metrics.json, OUT/figures/*.png. Examples: "
            "'python audit.py --ckpt runs/quickstart/version_0/checkpoints/last.ckpt'; "
            "'python audit.py --ckpt \"[R18.ckpt, VGG.ckpt]\" --methods \"[gradcam, cam]\"'; "
            "'python audit.py --config audit.yaml' (the same options as YAML; "
            "--print_config shows one). " + EXIT_CODES + "."
        ),
    )
    p.add_argument("--config", action=ActionConfigFile,
                   help="a YAML file of these options (an audit config, not the training "
                   "config: that one is --train_config)")
    p.add_argument("--ckpt", type=str | list[str], required=True,
                   help="checkpoint to audit (loaded with weights_only=True), or a list of two "
                   "to compare side by side: --ckpt A.ckpt --ckpt B.ckpt (or --ckpt "
                   "'[A.ckpt, B.ckpt]'), e.g. a model before and after a shortcut fix")
    p.add_argument("--train_config", type=str | list[str] | None, default=None,
                   help="training config of each checkpoint, in order (default: config.yaml "
                   "in the checkpoint's log directory, <ckpt dir>/../config.yaml)")
    p.add_argument("--methods", type=str | list[str], default="default",
                   help="explanation methods: a list such as '[gradcam, occlusion]', one "
                   "name, or a preset: default = " + ", ".join(PRESETS["default"])
                   + " (about a minute on a CPU); all = every registered method "
                   + f"({', '.join(explain.available())})")
    p.add_argument("--method_options", type=dict[str, dict[str, Any]], default={},
                   help="engine options per method as YAML, e.g. "
                   "'{integrated_gradients: {steps: 16}, lime: {samples: 128}}'")
    p.add_argument("--num_images", type=int, default=64,
                   help="images to explain: a seeded sample stratified over classes")
    p.add_argument("--split", type=Literal["val", "test"], default="test",
                   help="data split the sample and the accuracy come from")
    p.add_argument("--out", type=str | None, default=None,
                   help="report directory (default: <log dir of the first checkpoint>/audit); "
                   "an earlier report there is replaced once the new one is complete")
    p.add_argument("--device", type=Literal["auto", "cpu", "cuda"], default="auto",
                   help="where to run the models: auto = cuda when torch sees a GPU, else cpu")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sample, the randomisation test, tie-breaking and "
                   "stochastic methods")
    p.add_argument("--steps", type=int | None, default=None,
                   help="deletion/insertion steps, each removing or inserting 1/steps of the "
                   "pixels (default: 10 steps dense at the start, a quadratic schedule; 16 "
                   "uniform steps with --exact true)")
    p.add_argument("--threshold", type=float, default=0.2,
                   help="share of a map's maximum kept for localisation boxes and region IoU")
    p.add_argument("--sanity_images", type=int, default=8,
                   help="images in the cascading randomisation test, the first N of the sample "
                   "(the test re-runs every method once per cascade step)")
    p.add_argument("--counterfactual_images", type=int, default=100,
                   help="images per class in the with/without-cue test, when the data "
                   "declares a cue")
    p.add_argument("--discovery_images", type=int, default=30,
                   help="images per class in the label-free shortcut discovery (class-mean "
                   "saliency maps, then transplant tests for suspects)")
    p.add_argument("--batch_size", type=int, default=128,
                   help="images per model call in the perturbation measures and the "
                   "perturbation methods (scorecam, occlusion, lime, ...)")
    p.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    p.add_argument("--cache", type=bool, default=True,
                   help="reuse per-method results (maps, sanity, faithfulness), the map-free "
                   "ones (accuracy, shortcut discovery, the cue test) and the figures kept in "
                   "OUT/cache/ by an earlier audit of the same checkpoint, data, images and "
                   "options, and keep this audit's there; false recomputes and redraws all")
    p.add_argument("--exact", type=bool, default=False,
                   help="run every method with the engine's own defaults and the sanity "
                   "cascade at every step for every method, without the audit's speed "
                   "settings (" + "; ".join(
                       f"{m} {', '.join(f'{k} {v}' for k, v in o.items())}"
                       for m, o in FAST_OPTIONS.items())
                   + "; the sanity check of " + ", ".join(SANITY_FINAL_ONLY)
                   + " on the fully randomised model only; faithfulness on the first "
                   f"{FAST_FAITHFULNESS_IMAGES} images: BENCHMARKS.md, 'An audit in a "
                   "minute'); an option in --method_options always wins")
    p.add_argument("--trust_module", "--trust-module", type=list[str], default=[],
                   help="a module or package (importable, e.g. on PYTHONPATH) whose classes "
                   "the training config may name besides lit_modules, e.g. your own "
                   "LightningDataModule or ImageClassifier subclass; repeat it for several. "
                   "Default: lit_modules only, because importing a class named in a config "
                   "runs that module's code, and a config from someone else could run "
                   "anything: trust only code you would run yourself")
    p.add_argument("--fail_on_findings", type=bool, default=False,
                   help=f"exit with status {FLAGGED_EXIT_STATUS} (after writing the report) "
                   "when the report flags a class (a declared cue it leans on, or a "
                   "confirmed shortcut), for CI gates")
    return p


def _refuse_old_spellings(argv: list[str], parser: ArgumentParser) -> None:
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in RENAMED:
            parser.error(f"{name} is now {RENAMED[name]}")
    for i, arg in enumerate(argv):  # --config used to name the training config
        if arg.split("=", 1)[0] != "--config":
            continue
        path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
        try:
            content = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue  # jsonargparse reports a missing or broken file itself
        if isinstance(content, dict) and {"trainer", "model", "data"} & set(content):
            parser.error(f"--config {path} is a training config; pass it as --train_config "
                         f"{path} (--config takes an audit config of these options)")


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _repeatable_trust(argv: list[str]) -> list[str]:
    """``--trust_module A --trust_module B`` (or ``--trust-module``) appends: each plain name
    becomes ``--trust_module+ NAME``; a YAML list (``'[A, B]'``) is passed as it is."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in ("--trust_module", "--trust-module"):
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            flag = "--trust_module" if value.lstrip().startswith("[") else "--trust_module+"
            out += [flag, value]
        else:
            out.append(argv[i])
        i += 1
    return out


def _repeatable_paths(argv: list[str], names: tuple[str, ...] = ("--ckpt", "--train_config"),
                      ) -> list[str]:
    """``--ckpt A --ckpt B`` compares A and B (the parser alone would keep only B): every
    repeat of a plain path becomes ``--ckpt+ PATH``; the same for ``--train_config``."""
    out: list[str] = []
    seen: set[str] = set()
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in names and name in seen:
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            out += [f"{name}+", value]
        else:
            if name in names:
                seen.add(name)
            out.append(argv[i])
        i += 1
    return out


def parse_args(argv: list[str] | None = None) -> AuditSettings:
    """Parse and check the command line (errors exit with status 2 and a message)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_old_spellings(argv, parser)
    args: Namespace = parser.parse_args(_repeatable_paths(_repeatable_trust(argv)))
    ckpts = _as_list(args.ckpt)
    if not 1 <= len(ckpts) <= 2:
        parser.error(f"--ckpt takes one checkpoint or two to compare, got {len(ckpts)}")
    train_configs = _as_list(args.train_config)
    if len(train_configs) > len(ckpts):
        parser.error("more --train_config than --ckpt entries")
    methods = _as_list(args.methods)
    if len(methods) == 1 and "," in methods[0]:
        parser.error(f"--methods takes a list: --methods '[{methods[0].replace(',', ', ')}]'")
    if len(methods) == 1 and methods[0] in PRESETS:
        methods = PRESETS[methods[0]] or explain.available()
    unknown = [m for m in methods if m not in explain.available()]
    if unknown or not methods:
        parser.error(f"unknown method(s) {unknown or methods}; available: "
                     f"{', '.join(explain.available())} (or a preset: {', '.join(PRESETS)})")
    unknown = [m for m in args.method_options if m not in explain.available()]
    if unknown:
        parser.error(f"--method_options names unknown method(s) {unknown}")
    for name in ("num_images", "steps", "sanity_images", "counterfactual_images",
                 "discovery_images", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 0.0 < args.threshold < 1.0:
        parser.error("--threshold must lie strictly between 0 and 1")
    try:
        trusted = list(check_trusted(args.trust_module))
    except CheckpointError as exc:
        parser.error(str(exc))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA device")
    settings = AuditSettings(
        ckpt=ckpts, train_config=train_configs or None, methods=list(dict.fromkeys(methods)),
        method_options=dict(args.method_options), num_images=args.num_images,
        split=args.split, out=args.out, device=device, seed=args.seed, steps=args.steps,
        threshold=args.threshold, sanity_images=args.sanity_images,
        counterfactual_images=args.counterfactual_images,
        discovery_images=args.discovery_images, batch_size=args.batch_size,
        progress=args.progress, cache=args.cache, exact=args.exact,
        command=["audit.py", *argv], trust_module=trusted,
    )
    settings.fail_on_findings = args.fail_on_findings  # type: ignore[attr-defined]
    return settings


def main(argv: list[str] | None = None) -> AuditResult:
    """Entry point: parse, audit, print where the report went (and gate on findings)."""
    settings = parse_args(argv)
    try:
        out = run_audit(settings)
    except (CheckpointError, AuditError) as exc:
        print(f"audit.py: error: {exc}", file=sys.stderr)
        raise SystemExit(FAILURE_EXIT_STATUS) from None
    except OSError as exc:  # an unwritable --out, a full disk, a file that vanished
        where = f" {str(exc.filename)!r}" if exc.filename else ""
        print(f"audit.py: error: {exc.strerror or exc}:{where}", file=sys.stderr)
        raise SystemExit(FAILURE_EXIT_STATUS) from None
    except KeyboardInterrupt:
        print("audit.py: interrupted; no report was written", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"Audit report: {out / 'report.html'}\nNumbers:      {out / 'metrics.json'}")
    verdict = out.verdict
    if verdict.status == "findings":
        print(f"audit.py: {verdict.confirmed_shortcuts} confirmed shortcut(s), "
              f"{verdict.bias_findings} bias finding(s), {verdict.other_problems} other "
              f"problem(s); the worst: {verdict.worst}", file=sys.stderr)
    if getattr(settings, "fail_on_findings", False) and verdict.status == "findings":
        flagged = [f"{f['model']}: {f['class'] or f['kind']} ({f['kind']})"
                   for f in out.findings]
        print(f"audit.py: flagged {', '.join(flagged)} (--fail_on_findings)", file=sys.stderr)
        raise SystemExit(FLAGGED_EXIT_STATUS)
    return out


if __name__ == "__main__":
    # Torch, Lightning and matplotlib leave millions of objects that live until exit. Frozen,
    # they are out of the collector's reach: its full collections during the audit no longer
    # walk them, nor does its final sweep at exit (about 1 s of a short audit's wall time on
    # the 2-core VM; see BENCHMARKS.md). Nothing is lost: atexit handlers, finalizers and
    # the streams' flush run as before, and the memory goes back with the process.
    gc.freeze()
    try:
        main()
    finally:
        gc.freeze()
