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

import dataclasses
import gc
import inspect
import re
import sys
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from jsonargparse.typing import restricted_string_type

import explain
from audit_report import SCHEMA_VERSION, AuditError, AuditSettings, run_audit
from audit_report.findings import AuditResult
from audit_report.settings import (
    DEVICE_CHOICES,
    DEVICE_PATTERN,
    FAST_FAITHFULNESS_IMAGES,
    FAST_OPTIONS,
    SANITY_FINAL_ONLY,
)
from audit_report.settings import METHOD_PRESETS as PRESETS
from lit_modules.exit_status import HelpFormatter, exit_status_help
from lit_modules.loading import CheckpointError, check_trusted

__all__ = ["SCHEMA_VERSION", "build_parser", "main", "parse_args"]

# Exit status of --fail_on_findings when the report flags a class; the table of all of
# them (lit_modules.exit_status) ends --help.
FLAGGED_EXIT_STATUS = 3
FAILURE_EXIT_STATUS = 1
# Spellings of earlier versions, refused with the new form.
RENAMED = {
    "--num-images": "--num_images N",
    "--sanity-images": "--sanity_images N",
    "--counterfactual-images": "--counterfactual_images N",
    "--batch-size": "--batch_size N",
    "--method-options": "--method_options '{lime: {samples: 128}}' (YAML, not JSON-only)",
    "--no-progress": "--progress false",
    "--compare": "a second --ckpt PATH (or --ckpt '[A.ckpt, B.ckpt]')",
    "--trust-module": "--trust_module NAME",
}
# The options are AuditSettings' fields, described by its docstring, in these groups of
# --help (a field in none is a programming error build_parser reports).
GROUPS: dict[str, tuple[str, ...]] = {
    "what to audit": ("ckpt", "train_config", "trust_module", "split", "num_images"),
    "explanation methods": ("methods", "method_options", "layer", "exact"),
    "measures": ("steps", "threshold", "sanity_images", "counterfactual_images",
                 "discovery_images", "seed"),
    "output and runtime": ("out", "device", "batch_size", "progress", "cache",
                           "fail_on_findings"),
}
NOT_OPTIONS = ("command",)  # filled in by the command line itself
Device = restricted_string_type("|".join(DEVICE_CHOICES), rf"^({DEVICE_PATTERN})$")
# Where the command line takes more than the field's type: one path or a list, a preset.
CLI_TYPES: dict[str, Any] = {
    "ckpt": str | list[str], "train_config": str | list[str] | None,
    "methods": str | list[str], "device": Device,
}


def _cli_extra(name: str) -> str:
    """What --help adds to a field's description: what only the command line knows."""
    if name == "ckpt":
        return ": --ckpt A.ckpt --ckpt B.ckpt (or --ckpt '[A.ckpt, B.ckpt]')"
    if name == "methods":
        return (": a list such as '[gradcam, occlusion]', one name, or a preset: default = "
                + ", ".join(PRESETS["default"] or []) + " (about a minute on a CPU); all = "
                f"every registered method ({', '.join(explain.available())})")
    if name == "exact":
        return (" (" + "; ".join(f"{m} {', '.join(f'{k} {v}' for k, v in o.items())}"
                                 for m, o in FAST_OPTIONS.items())
                + "; the sanity check of " + ", ".join(SANITY_FINAL_ONLY)
                + " on the fully randomised model only; faithfulness on the first "
                f"{FAST_FAITHFULNESS_IMAGES} images: BENCHMARKS.md, 'An audit in a minute')")
    if name == "trust_module":
        return "; repeat it for several"
    return ""


def field_help(cls: type = AuditSettings) -> dict[str, str]:
    """Each field's description from the class docstring's ``Attributes:`` list, as one
    line of plain text (reST markup dropped)."""
    helps: dict[str, str] = {}
    name = None
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.strip() == "Attributes:"),
                 len(lines))
    for line in lines[start:]:
        if not line.strip():
            name = None
            continue
        entry = re.fullmatch(r" {4}(\w+): (.*)", line)
        if entry:
            name, text = entry.groups()
            helps[name] = text
        elif name is not None and line.startswith(" " * 8):
            helps[name] += " " + line.strip()
        else:
            break
    return {k: re.sub(r":\w+:`~?([^`]+)`|``([^`]+)``", lambda m: m.group(1) or m.group(2),
                      v).rstrip(".") for k, v in helps.items()}


def build_parser() -> ArgumentParser:
    """The audit's command line: AuditSettings' fields as options, their types, defaults
    and descriptions taken from the dataclass, in groups; every option documented in
    ``--help``, no abbreviation taken."""
    p = ArgumentParser(
        prog="audit.py",
        allow_abbrev=False,  # a typo such as --num_image must fail, not guess
        formatter_class=HelpFormatter,
        description=(
            "Write an audit report for trained checkpoints: the selected explanation methods "
            "on a seeded, class-stratified sample, with localisation, faithfulness, sanity "
            "and bias measures. The model and data are rebuilt from the config.yaml that "
            "train.py saved in the checkpoint's log directory. Output: OUT/report.html "
            "(self-contained), OUT/metrics.json, OUT/figures/*.png. Examples: "
            "'python audit.py --ckpt runs/quickstart/version_0/checkpoints/last.ckpt'; "
            "'python audit.py --ckpt R18.ckpt --ckpt VGG.ckpt --methods \"[gradcam, cam]\"'; "
            "'python audit.py --config audit.yaml' (the same options as YAML; "
            "--print_config shows one)."
        ),
        epilog=exit_status_help(),
    )
    p.add_argument("--config", action=ActionConfigFile,
                   help="a YAML file of these options (an audit config, not the training "
                   "config: that one is --train_config)")
    helps = field_help()
    hints = get_type_hints(AuditSettings)
    fields = {f.name: f for f in dataclasses.fields(AuditSettings) if f.name not in NOT_OPTIONS}
    placed = [name for names in GROUPS.values() for name in names]
    if sorted(placed) != sorted(fields) or set(fields) - set(helps):
        raise RuntimeError("audit.py: every AuditSettings field needs one GROUPS entry and a "
                           f"docstring line; fields {sorted(fields)}, grouped {sorted(placed)}")
    for title, names in GROUPS.items():
        group = p.add_argument_group(title)
        for name in names:
            f = fields[name]
            kwargs: dict[str, Any] = {"required": True}
            if f.default is not dataclasses.MISSING:
                kwargs = {"default": f.default}
            elif f.default_factory is not dataclasses.MISSING:
                kwargs = {"default": f.default_factory()}
            group.add_argument(f"--{name}", type=CLI_TYPES.get(name, hints[name]),
                               help=helps[name] + _cli_extra(name), **kwargs)
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
    """``--trust_module A --trust_module B`` appends: each plain name becomes
    ``--trust_module+ NAME``; a YAML list (``'[A, B]'``) is passed as it is."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name == "--trust_module":
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
    names = [f.name for f in dataclasses.fields(AuditSettings) if f.name not in NOT_OPTIONS]
    return AuditSettings(**{
        **{name: getattr(args, name) for name in names},
        "ckpt": ckpts, "train_config": train_configs or None,
        "methods": list(dict.fromkeys(methods)), "method_options": dict(args.method_options),
        "device": str(args.device), "trust_module": trusted, "command": ["audit.py", *argv],
    })


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
    if settings.fail_on_findings and verdict.status == "findings":
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
