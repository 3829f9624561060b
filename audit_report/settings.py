"""What an audit is asked to do: the settings ``audit.py`` parses and the report records."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

import explain

# Method presets (audit.py --methods, audit_report.audit(methods=...)): the default answers
# in about a minute on a CPU (one CAM, one gradient and one perturbation method:
# Ablation-CAM re-runs only the head), "all" is every method.
METHOD_PRESETS: dict[str, list[str] | None] = {
    "default": ["gradcam", "saliency", "ablationcam"],
    "all": None,  # every registered method
}

# Engine options that only trade memory for speed: perturbation methods get the audit's
# batch size.
EXPENSIVE_OPTIONS = ("batch_size",)

# The audit's own speed settings (``exact=False``, the default): each trades a measured,
# small change of the maps for a large saving (bench/audit_speed.py, BENCHMARKS.md "An
# audit in a minute"). ``--exact true`` drops them and runs the engine's defaults (IG 50
# nodes, Score-CAM on every channel, LIME 256 samples, SmoothGrad 16); an option given in
# ``method_options`` always wins.
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 8},
    # 48 channels: the true-class maps correlate 0.958 (Pearson, mean of 16 test images;
    # 0.963 at 64, 0.989 at 128) with Score-CAM on all 512 channels of the quickstart.
    "scorecam": {"top_k": 48},
    # 16 segments: 64 samples give a seed-to-seed rank correlation of 0.49, where 64
    # segments give 0.10 at 64 samples and 0.35 at the engine's 256 (quickstart, 8 images).
    # A fixed 4 x 4 at every image size (the engine's default grid grows with the area).
    "lime": {"cells": 4, "samples": 64},
    "smoothgrad": {"samples": 8},
}
# Methods the sanity cascade runs only on the trained and the fully randomised model
# (``exact=False``): the verdict reads only the last step, and these cost a forward per
# perturbation or per path node whatever the number of classes.
SANITY_FINAL_ONLY = ("integrated_gradients", "lime", "occlusion", "scorecam", "smoothgrad")
# Images in the faithfulness measures (``exact=False``): the first of the sample, which is
# class-stratified round robin, so 32 of 64 still hold every class alike. Deletion and
# insertion cost 2 * (steps + 1) forwards an image for every method.
FAST_FAITHFULNESS_IMAGES = 32
# Deletion/insertion curves when ``--steps`` is not given: 10 steps on a quadratic schedule
# (dense at the start, where the curves move) unless ``exact``, then 16 uniform steps as
# Petsiuk et al. On the quickstart's real test images the quadratic 10 came closer to a
# 64-step curve's mean areas than the uniform 16, at 18 model calls an image instead of 34
# (the curves' ends are shared by all methods; BENCHMARKS.md "An audit in a minute").
FAST_CURVE = (10, "quadratic")
EXACT_CURVE = (16, "uniform")


@dataclass
class AuditSettings:
    """Every choice behind a report (recorded in ``metrics.json`` under ``settings``).

    ``audit.py`` generates its options from these fields and this list (its ``--help``),
    so each is described once, here.

    Attributes:
        ckpt: checkpoint to audit (loaded with weights_only=True), or two to compare side
            by side, e.g. a model before and after a shortcut fix.
        train_config: the training config of each checkpoint, in order (None: the
            config.yaml in the checkpoint's log directory, <ckpt dir>/../config.yaml).
        methods: registered explanation methods to run.
        method_options: engine options per method, e.g.
            ``{integrated_gradients: {steps: 16}, lime: {samples: 128}}``.
        num_images: images to explain: a seeded sample stratified over classes.
        split: the data split the sample and the accuracy come from.
        out: report folder (None: ``<log dir of the first checkpoint>/audit``); an earlier
            report there is replaced once the new one is complete.
        device: where to run the models: auto (cuda when torch sees a GPU, else cpu),
            cpu, cuda, cuda:N (the N-th GPU) or mps (Apple silicon).
        seed: seed of the sample, the randomisation test, tie-breaking and stochastic
            methods.
        steps: deletion/insertion steps, each removing or inserting 1/steps of the pixels
            (None: :data:`FAST_CURVE`, 10 steps dense at the start; :data:`EXACT_CURVE`,
            16 uniform steps, when ``exact``).
        threshold: share of a map's maximum kept for localisation boxes and region IoU.
        sanity_images: images in the cascading randomisation test, the first N of the
            sample (the test re-runs every method once per cascade step).
        counterfactual_images: images per class in the with/without-cue test, when the
            data declares a cue.
        discovery_images: images per class in the label-free shortcut discovery
            (class-mean saliency maps, then transplant tests for suspects). 100: a cue on
            half of a class is confirmed through its cluster only with enough of the
            cluster's images as sources (30 missed it; BENCHMARKS.md); the search's cost
            is mostly its tests, not the maps (quickstart: 24 s at 100, 27 s at 30).
        batch_size: images per model call in the perturbation measures and methods
            (scorecam, occlusion, lime, ...; 128: as fast as 256 on a CPU, with a lower
            peak memory; BENCHMARKS.md).
        progress: show a progress bar.
        cache: reuse per-method results, the map-free ones and the figures kept in
            ``<out>/cache/`` by an earlier audit of the same checkpoint, data, images and
            options, and keep this audit's there; false recomputes and redraws all.
        exact: run every method with the engine's own defaults and the sanity cascade at
            every step for every method, without the audit's speed settings
            (:data:`FAST_OPTIONS`, :data:`SANITY_FINAL_ONLY`); an option in
            ``method_options`` always wins.
        command: the command line, for the report's footer.
        trust_module: a module or package (importable, e.g. on PYTHONPATH) whose classes
            the training config may name besides lit_modules, e.g. your own
            LightningDataModule or ImageClassifier subclass. Importing a class named in a
            config runs that module's code: trust only code you would run yourself.
        layer: the explanation layer (a module name, e.g. features.7) for the CAM family
            (None: the ExplanationMonitor's layer in the training config when it names
            one, else the model's declared layer).
        fail_on_findings: exit with status 3 (after writing the report) when the report
            flags a problem (a declared cue the model leans on, a confirmed shortcut), for
            CI gates.
    """

    ckpt: list[str]
    train_config: list[str] | None = None
    methods: list[str] = field(default_factory=lambda: list(METHOD_PRESETS["default"] or []))
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_images: int = 64
    split: Literal["val", "test"] = "test"
    out: str | None = None
    device: str = "auto"
    seed: int = 0
    steps: int | None = None
    threshold: float = 0.2
    sanity_images: int = 8
    counterfactual_images: int = 100
    discovery_images: int = 100
    batch_size: int = 128
    progress: bool = True
    cache: bool = True
    exact: bool = False
    command: list[str] = field(default_factory=list)
    trust_module: list[str] = field(default_factory=list)
    layer: str | None = None
    fail_on_findings: bool = False


def method_options(method: str, settings: AuditSettings) -> dict[str, Any]:
    """The user's options for ``method``, over the audit's speed settings and a batch size.

    Gradient methods keep the engine's default batch: their batches also hold a backward
    graph for every class, so a large batch costs memory rather than saving time. Unless
    ``settings.exact``, :data:`FAST_OPTIONS` come under the user's options.
    """
    info = explain.get(method)
    options: dict[str, Any] = {}
    if info.cost.batched_forwards:
        params = inspect.signature(info.fn).parameters
        options = {k: settings.batch_size for k in EXPENSIVE_OPTIONS if k in params}
    if not settings.exact:
        options.update(FAST_OPTIONS.get(method, {}))
    if settings.layer is not None and info.needs_layer:
        options["layer"] = settings.layer
    options.update(settings.method_options.get(method, {}))
    return options


def curve_schedule(settings: AuditSettings) -> tuple[int, str]:
    """Deletion/insertion ``(steps, schedule)``: the user's uniform steps, else the
    audit's fast or exact curve."""
    if settings.steps is not None:
        return settings.steps, "uniform"
    return EXACT_CURVE if settings.exact else FAST_CURVE


def faithfulness_images(settings: AuditSettings, available: int) -> int:
    """Images the faithfulness measures use: all, or :data:`FAST_FAITHFULNESS_IMAGES`."""
    return available if settings.exact else min(available, FAST_FAITHFULNESS_IMAGES)


# ``device`` choices: ``cuda:N`` stands for any GPU index (``cuda`` is ``cuda:0``).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DEVICE_PATTERN = r"auto|cpu|cuda|cuda:\d+|mps"


def resolve_device(device: str) -> str:
    """``auto`` as cuda when torch sees a GPU, else cpu; another choice as it is once
    torch can see it. A ValueError names the choices, or what torch sees."""
    if not isinstance(device, str) or re.fullmatch(DEVICE_PATTERN, device) is None:
        raise ValueError(f"device takes one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(device.partition(":")[2] or 0) >= count:
            seen = f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}" if count else \
                "no CUDA device"
            raise ValueError(f"device {device} was asked for, but torch sees {seen}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps was asked for, but torch sees no MPS device "
                         "(Apple silicon)")
    return device


def monitor_layer(config: Mapping[str, Any]) -> str | None:
    """The ``layer`` the training config gives its ExplanationMonitor
    (``trainer.callbacks``), or None when it has no monitor or names no layer."""
    trainer = config.get("trainer") if isinstance(config, Mapping) else None
    callbacks = trainer.get("callbacks") if isinstance(trainer, Mapping) else None
    if isinstance(callbacks, Mapping):  # one callback, given without a list
        callbacks = [callbacks]
    for callback in callbacks or []:
        if not isinstance(callback, Mapping):
            continue
        if str(callback.get("class_path", "")).rsplit(".", 1)[-1] != "ExplanationMonitor":
            continue
        layer = (callback.get("init_args") or {}).get("layer")
        if isinstance(layer, str) and layer:
            return layer
    return None
