"""Shortcut discovery on real CIFAR-10 with undeclared cues stamped into the files.

    python bench/shortcut_discovery.py [--seeds 0,1,2] [--cases solid,glyph] [--epochs 8] \
        [--train-per-class 300] [--test-per-class 100] [--backbones bench_small,resnet18_cifar] \
        [--monitor-tests box] [--markdown /tmp/shortcut_table.md]

From the JPEG archives of ``../shared/data`` (``--data``) it takes a fixed, seeded subset
of each class and, for every case, writes an ImageFolder tree ``train/<class>/*.png`` +
``test/<class>/*.png`` into a temporary folder (never into the repository) with the case's
cue stamped into the pixels of its class(es): nothing tells the pipeline where, or
whether, there is a cue. Test images follow the same rule as training images, so the
tests have sources. ``clean`` is the same images without any cue: the false-alarm check.
Cases include a cue on half of a class, a cue on five of the ten classes (each its own),
a tint, and a patch that moves to a new place in every image.

Each (case, backbone, seed) trains with the project's CIFAR10DataModule on that root and
the ExplanationMonitor (saliency, true class only, ``discovery_per_class=8``,
``shortcut_tests`` from ``--monitor-tests``) under a CSVLogger, then:

* the monitor's verdicts: the epoch of its "class X relies on a shortcut" line, its "no
  longer relies" lines, the logged ``explain/shortcuts/is_confirmed/<class>`` per epoch
  (is a shortcut confirmed at every epoch after its first confirmation?) and any NaN scalar;
* the audit's search, as audit_report/sections/shortcuts.py runs it: a stratified sample
  of 100 test images a class (seed + 2), saliency maps of the true class (and Grad-CAM's,
  for recurring peaks), every class's box, cluster and moving tests
  (explain.measures.tracking.search_class) and the colour move;
  "found" is a confirmed test of the cue class (for a fixed cue, with a box that touches
  the cue's pixels);
* the *told* test: the same experiment on the cue itself (its box, each carrier's own
  patch for a moving cue, the colour move for a tint), which says whether the model uses
  the cue at all: the bar a discovery can be held to.

Prints one row per run and one per case (markdown).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import small_model  # noqa: E402,F401  (registers bench_small)
from monitor_cost import EpochClock, TimedMonitor  # noqa: E402

import explain  # noqa: E402
from audit_report.sections.shortcuts import AUDIT_TESTS, peak_maps  # noqa: E402
from explain.measures import causal, discovery, tracking  # noqa: E402
from lit_modules import ImageClassifier  # noqa: E402
from lit_modules.data import CIFAR10DataModule  # noqa: E402
from lit_modules.data.sampling import dataset_labels, sample_batch, stratified_indices  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
DATA_SEED = 0  # which images, and which of a class carry a partial cue: fixed across seeds
VAL_SIZE = 300  # taken from the training images by the DataModule (seeded, split_seed 0)
AUDIT_PER_CLASS = 100  # audit_report.settings.AuditSettings.discovery_images
METHOD = explain.DISCOVERY_METHOD  # what the audit's and the monitor's discovery use
CONFIRMED = "relies on a shortcut at epoch "
GONE = "no longer relies on"

# -- cues --------------------------------------------------------------------------------

Pixels = np.ndarray  # uint8 [32, 32, 3]


def _glyph() -> np.ndarray:
    """A 5 x 3 letter "A" (rows top to bottom): a text-like mark, True where inked."""
    rows = ["###", "#.#", "###", "#.#", "#.#"]
    return np.array([[c == "#" for c in r] for r in rows])


@dataclass(frozen=True)
class Cue:
    """One cue on one class: ``kind`` at ``(x, y)`` (its top-left pixel) on a share ``p``
    of the class's images (the same share of its training and of its test images)."""

    cls: str
    kind: str  # solid | checker | line | glyph | tint | moving
    x: int = 0
    y: int = 0
    p: float = 1.0
    colour: tuple[int, int, int] = (255, 0, 255)  # solid and moving patches
    strength: float = 0.25  # a tint: the share of orange blended into every pixel

    def at(self, index: int, part: str) -> Cue:
        """Where this cue sits in image ``index`` of ``part``: a moving patch's top-left is
        drawn per image (seeded by the data seed, the part and the index) anywhere in the
        image; every other cue stays put."""
        if self.kind != "moving":
            return self
        g = np.random.default_rng([DATA_SEED, 7, 0 if part == "train" else 1, index])
        x, y = (int(v) for v in g.integers(0, 32 - 4 + 1, 2))
        return Cue(self.cls, "solid", x, y, self.p, self.colour)

    def ink(self) -> np.ndarray:
        """``[32, 32]`` bool: the pixels the cue changes."""
        mask = np.zeros((32, 32), dtype=bool)
        if self.kind in ("solid", "checker", "moving"):
            mask[self.y:self.y + 4, self.x:self.x + 4] = True
        elif self.kind == "line":  # 1 px high, 8 px wide
            mask[self.y, self.x:self.x + 8] = True
        elif self.kind == "glyph":
            g = _glyph()
            mask[self.y:self.y + g.shape[0], self.x:self.x + g.shape[1]] = g
        elif self.kind == "tint":
            mask[:] = True
        else:
            raise ValueError(f"unknown cue kind {self.kind!r}")
        return mask

    def stamp(self, img: Pixels) -> Pixels:
        out = img.copy()
        if self.kind == "solid":
            out[self.y:self.y + 4, self.x:self.x + 4] = self.colour  # magenta by default
        elif self.kind == "checker":  # 1-px black and white checks
            yy, xx = np.mgrid[0:4, 0:4]
            check = ((yy + xx) % 2 == 0)[..., None] * 255
            out[self.y:self.y + 4, self.x:self.x + 4] = check.astype(np.uint8)
        elif self.kind == "line":
            out[self.y, self.x:self.x + 8] = (255, 255, 0)  # yellow
        elif self.kind == "glyph":
            out[self.ink()] = (255, 255, 255)  # white ink over the image
        elif self.kind == "tint":  # towards orange by `strength` (25%), everywhere
            tint = np.array([255, 140, 0], dtype=np.float32)
            out = ((1 - self.strength) * img.astype(np.float32)
                   + self.strength * tint).round().clip(0, 255)
            out = out.astype(np.uint8)
        return out


CASES: dict[str, list[Cue]] = {
    "clean": [],
    "solid-100%-1class": [Cue("bird", "solid", 2, 2)],
    "textured-100%-2classes": [Cue("cat", "checker", 26, 26), Cue("ship", "checker", 26, 2)],
    "line-100%-1class": [Cue("deer", "line", 12, 29)],
    "glyph-50%-1class": [Cue("horse", "glyph", 3, 24, p=0.5)],
    "tint-100%-1class": [Cue("truck", "tint")],
    # A faint tint (12%) on a class whose natural colours are already brownish.
    "faint-tint-100%-1class": [Cue("deer", "tint", strength=0.12)],
    # Half of the classes, each with a cue of its own: the classes are no longer mostly
    # clean, so nothing may rest on comparing a class with the others.
    "five-100%-5classes": [Cue("airplane", "solid", 2, 2), Cue("automobile", "checker", 26, 2),
                           Cue("bird", "line", 12, 29), Cue("cat", "solid", 26, 26, colour=(0, 255, 255)),
                           Cue("deer", "glyph", 3, 24)],
    # One patch, one place, on two classes that look alike: to the model it says "cat or
    # dog", the rest of the image picks one, and each class's own share of the flips is
    # noise around half (the quickstart's circle and square, on real images).
    "shared-100%-2classes": [Cue("cat", "solid", 2, 2), Cue("dog", "solid", 2, 2)],
    # A 4x4 green patch anywhere in the image, a new place in every image of the class.
    "moving-100%-1class": [Cue("frog", "moving", colour=(0, 255, 0))],
}


def describe(case: str) -> str:
    parts = []
    for c in CASES[case]:
        h, w = np.nonzero(c.ink())
        where = (f"whole image, {c.strength:.0%} orange" if c.kind == "tint" else "anywhere, a new place per image"
                 if c.kind == "moving" else f"x {w.min()}-{w.max() + 1}, y {h.min()}-{h.max() + 1}")
        parts.append(f"{c.kind} on {c.cls} ({c.p:.0%}, {where})")
    return "; ".join(parts) or "no cue"


# -- data --------------------------------------------------------------------------------


def load_subset(zip_path: Path, part: str, per_class: int) -> dict[str, list[Pixels]]:
    """``per_class`` seeded images of each class, decoded from the archive (no extraction)."""
    g = np.random.default_rng(DATA_SEED)
    out: dict[str, list[Pixels]] = {}
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.lower().endswith(".jpg")]
        for cls in CLASSES:
            mine = sorted(n for n in names if n.startswith(f"{part}/{cls}/"))
            pick = sorted(g.choice(len(mine), per_class, replace=False).tolist())
            out[cls] = [np.asarray(Image.open(io.BytesIO(zf.read(mine[i]))).convert("RGB"))
                        for i in pick]
    return out


def carriers(case: str, cls: str, n: int, part: str) -> dict[int, Cue]:
    """Which of a class's ``n`` images carry which cue (seeded by the data seed only)."""
    out: dict[int, Cue] = {}
    for k, cue in enumerate(CASES[case]):
        if cue.cls != cls:
            continue
        g = np.random.default_rng([DATA_SEED, k, 0 if part == "train" else 1])
        chosen = g.permutation(n)[: round(cue.p * n)]
        out.update({int(i): cue for i in chosen})
    return out


def write_tree(root: Path, case: str, data: dict[str, dict[str, list[Pixels]]]) -> None:
    """``root/{train,test}/<class>/NNNN.png`` with the case's cue stamped in (PNG: exact)."""
    for part, by_class in data.items():
        for cls, images in by_class.items():
            folder = root / part / cls
            folder.mkdir(parents=True, exist_ok=True)
            stamps = carriers(case, cls, len(images), part)
            for i, img in enumerate(images):
                if i in stamps:
                    img = stamps[i].at(i, part).stamp(img)
                Image.fromarray(img).save(folder / f"{i:04d}.png")


# -- one run -----------------------------------------------------------------------------


@dataclass
class Run:
    case: str
    seed: int
    backbone: str = "bench_small"
    test_acc: float = float("nan")
    first_confirmed: dict[str, int] = field(default_factory=dict)  # monitor: class -> epoch
    gone: list[tuple[str, int]] = field(default_factory=list)  # monitor: "no longer relies"
    confirmed_per_epoch: list[list[str]] = field(default_factory=list)  # from metrics.csv
    nan_scalars: int = 0  # monitor scalars logged as NaN (none expected)
    audit_confirmed: dict[str, str] = field(default_factory=dict)  # class -> "kind where"
    audit_suspects: list[str] = field(default_factory=list)  # tested, flips >= 10%
    colour_relies: dict[str, float] = field(default_factory=dict)  # class -> colour margin
    found: dict[str, bool] = field(default_factory=dict)  # cue class -> found by the audit
    margin: dict[str, float] = field(default_factory=dict)  # cue class -> audit's best margin
    # The test told where the cue is (its box with 1 px, the colour move for a tint, each
    # source's own patch for a moving cue; sources: carriers): does the model use it at all?
    told: dict[str, tuple[float, float]] = field(default_factory=dict)  # flips, margin
    discovery_s: float = float("nan")
    audit_images: int = 0  # the audit search's sample: --audit-per-class a class
    epoch_s: float = float("nan")
    hook_s: float = float("nan")
    fit_s: float = float("nan")


def read_metrics(log_dir: str) -> list[dict[str, str]]:
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def audit_search(model: torch.nn.Module, dm: CIFAR10DataModule, seed: int, per_class: int,
                 ) -> tuple[dict[int, list[causal.CausalTest]], dict, torch.Tensor, float]:
    """What the audit's shortcuts section does: a stratified test sample, saliency maps,
    every candidate class's tests (box, cluster, moving, colour).

    Returns the tests per candidate class, the sample (``image``, ``label``, dataset
    ``index``, ``norm`` maps, ``usable``), its predictions and the seconds (maps + tests)."""
    dataset = dm.dataset("test")
    k = len(CLASSES)
    idx = stratified_indices(dataset_labels(dataset), per_class * k, seed + 2)
    batch = sample_batch(dataset, idx)
    images, labels = batch["image"].float(), batch["label"].long()
    t = time.perf_counter()
    maps = explain.run(model, images, METHOD, targets=labels).cpu()
    norm, usable = discovery.normalise_maps(maps)
    hotspots = discovery.class_hotspots(maps, labels, k, cluster=True, seed=seed)
    preds = discovery.predict(model, images)
    cam = peak_maps(model, images, labels)
    tests = {} if causal.collapsed(preds) else {
        c: tracking.search_class(model, images, labels, preds, norm, usable, c, AUDIT_TESTS,
                                 hotspots[c].clusters, seed=seed, maps_method=METHOD,
                                 peak_maps=cam)
        for c in tracking.candidates(hotspots, k)}
    # The audit's filter test (a tint or cast), on every class not confirmed otherwise.
    done = [c for c, ts in tests.items() if any(t.confirmed for t in ts)]
    for c, test in tracking.filter_tests(model, images, labels, preds, k, done, seed).items():
        tests.setdefault(c, []).append(test)
    colour = {} if causal.collapsed(preds) else {
        c: causal.colour_test(model, images, labels, preds, c, seed, screen=True)
        for c in range(k)}
    seconds = time.perf_counter() - t
    sample = {"colour": colour, "image": images, "label": labels, "index": torch.tensor(idx), "norm": norm,
              "usable": usable}
    return tests, sample, preds, seconds


def told_test(model: torch.nn.Module, sample: dict, preds: torch.Tensor, case: str, cue: Cue,
              seed: int, test_per_class: int) -> causal.CausalTest:
    """The test on the cue itself, with cue-carrying sources: not what discovery does (it
    is not told), but whether the trained model uses the cue at all."""
    c = CLASSES.index(cue.cls)
    images, labels = sample["image"], sample["label"]
    if cue.kind == "tint":
        return causal.colour_test(model, images, labels, preds, c, seed)
    # The test tree holds test_per_class files a class, in class order and file order.
    stamped = carriers(case, cue.cls, test_per_class, "test")
    first = c * test_per_class
    sources = {j: i - first for j, i in enumerate(sample["index"].tolist())
               if i - first in stamped and 0 <= i - first < test_per_class}
    if cue.kind == "moving":
        windows = {}
        for j, i in sources.items():
            where = cue.at(i, "test")
            windows[j] = (where.x, where.y, where.x + 4, where.y + 4)
        return causal.moving_test(model, images, labels, preds, c, windows, seed,
                                  norm_maps=sample["norm"])
    ys, xs = np.nonzero(cue.ink())
    box = (max(int(xs.min()) - 1, 0), max(int(ys.min()) - 1, 0),
           min(int(xs.max()) + 2, 32), min(int(ys.max()) + 2, 32))
    return causal.box_test(model, images, labels, preds, c, box, sorted(sources), seed=seed,
                           norm_maps=sample["norm"])


def _where(t: causal.CausalTest) -> str:
    return (causal.box_label(t.box) if t.box is not None else
            "own hotspots" if t.kind == "moving" else "range" if t.kind == "filter"
            else "colour")


def run_one(case: str, seed: int, root: Path, logs: str, epochs: int, test_per_class: int,
            backbone: str, monitor_tests: list[str], audit_per_class: int = AUDIT_PER_CLASS,
            ) -> Run:
    run = Run(case, seed, backbone)
    L.seed_everything(seed, verbose=False)
    dm = CIFAR10DataModule(root=str(root), download=False, val_size=VAL_SIZE, split_seed=0,
                           batch_size=64, num_workers=0, data_path="fast")
    model = ImageClassifier(backbone=backbone, optimizer="adamw", lr=2e-3,
                            weight_decay=0.05, scheduler="onecycle",
                            channels_last=backbone != "bench_small")
    monitor = TimedMonitor(methods=[METHOD], num_images=16, classes="true",
                           explain_classes="shown", discovery_per_class=8,
                           shortcut_tests=monitor_tests)
    clock = EpochClock()
    logger = CSVLogger(logs, name=f"{case}-{backbone}-s{seed}")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs,
                        callbacks=[monitor, clock], logger=logger, log_every_n_steps=10,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    run.fit_s = time.perf_counter() - t
    for w in caught:
        text = str(w.message)
        if CONFIRMED in text:  # "ExplanationMonitor: class X relies on a shortcut at epoch E: ..."
            name = text.split("class ", 1)[1].split(" relies", 1)[0]
            run.first_confirmed.setdefault(name, int(text.split(CONFIRMED, 1)[1].split(":")[0]))
        elif GONE in text:
            name = text.split("class ", 1)[1].split(" no longer", 1)[0]
            run.gone.append((name, int(text.rsplit(" at epoch ", 1)[1].split(":")[0])))
    rows = [r for r in read_metrics(logger.log_dir) if r.get("explain/shortcuts/confirmed")]
    run.confirmed_per_epoch = [
        [c for c in CLASSES if float(r.get(f"explain/shortcuts/is_confirmed/{c}") or 0) == 1]
        for r in rows]
    run.nan_scalars = sum(1 for r in rows for k, v in r.items()
                          if k.startswith("explain/") and v == "nan")
    run.epoch_s = statistics.mean(clock.times)
    run.hook_s = statistics.mean(monitor.seconds)

    model.eval()
    tests, sample, preds, run.discovery_s = audit_search(model, dm, seed, audit_per_class)
    labels = sample["label"]
    run.audit_images = len(labels)
    run.test_acc = float((preds == labels).float().mean())
    for c, ts in tests.items():
        hit = next((t for t in ts if t.confirmed), None)
        if hit is not None:
            run.audit_confirmed[CLASSES[c]] = (f"{hit.kind}"
                                               + (f" {_where(hit)}" if hit.kind != "colour" else "")
                                               + f", margin {hit.margin.mean:+.2f}")
        # As the audit: a filter test is shown only when confirmed.
        if any(not t.screened and t.n and (t.kind != "filter" or t.confirmed) for t in ts):
            run.audit_suspects.append(CLASSES[c])
    run.colour_relies = {CLASSES[c]: t.margin.mean for c, t in sample["colour"].items()
                         if t.confirmed}
    for cue in CASES[case]:
        c = CLASSES.index(cue.cls)
        ts = tests.get(c, [])
        hit = next((t for t in ts if t.confirmed), None)
        full = [t for t in ts if t.intervals]
        run.margin[cue.cls] = max((t.margin.mean for t in full), default=float("nan"))
        if hit is None:
            run.found[cue.cls] = False
        elif cue.kind in ("tint", "moving") or hit.box is None:
            run.found[cue.cls] = True  # a confirmed test of the cue class, of any kind
        else:
            x0, y0, x1, y1 = hit.box
            run.found[cue.cls] = bool(cue.ink()[y0:y1, x0:x1].any())
        told = told_test(model, sample, preds, case, cue, seed, test_per_class)
        run.told[cue.cls] = (told.flip_rate, told.margin.mean)
    return run


# -- tables ------------------------------------------------------------------------------


def _cues(run: Run) -> list[str]:
    return [c.cls for c in CASES[run.case]]


def _monitor(run: Run) -> str:
    parts = []
    for c in _cues(run):
        if c not in run.first_confirmed:
            parts.append(f"{c} never")
            continue
        first = run.first_confirmed[c]
        kept = all(c in e for e in run.confirmed_per_epoch[first:])
        parts.append(f"{c} @{first}, " + ("every epoch after" if kept else "NOT kept"))
    return "; ".join(parts) or "-"


def _false(names: list[str] | dict[str, Any], run: Run) -> str:
    other = [n + (f" ({names[n]})" if isinstance(names, dict) and isinstance(names[n], str)
                  else "") for n in names if n not in _cues(run)]
    return ", ".join(other) or "none"


def _audit(run: Run) -> str:
    return "; ".join(f"{c}: {'yes' if v else 'NO'}"
                     + (f" ({run.audit_confirmed[c]})" if c in run.audit_confirmed else "")
                     for c, v in run.found.items()) or "-"


def _told(run: Run) -> str:
    return "; ".join(f"{c}: {f:.0%}, margin {m:+.2f}" for c, (f, m) in run.told.items()) or "-"


def run_table(runs: list[Run]) -> str:
    head = ("| case | model | seed | test acc | monitor: confirmed (cue class @epoch) | monitor: "
            "confirmed elsewhere | NaN scalars | audit: found (test, place) | audit: best "
            "margin of the cue class | told the cue: flips, margin | audit: confirmed "
            "outside the cue classes | colour reliance (class, margin) | audit search (images) | "
            "monitor share of an epoch |")
    lines = [head, "| --- | --- | ---: | ---: | --- | --- | ---: | --- | --- | --- | --- | "
             "--- | ---: | ---: |"]
    for r in runs:
        margins = "; ".join(f"{c}: {m:+.2f}" for c, m in r.margin.items()) or "-"
        lines.append(
            f"| {r.case} | {r.backbone} | {r.seed} | {r.test_acc:.0%} | {_monitor(r)} | "
            f"{_false(r.first_confirmed, r)} | {r.nan_scalars} | {_audit(r)} | {margins} | "
            f"{_told(r)} | {_false(r.audit_confirmed, r)} | "
            + (", ".join(f"{c} {m:+.2f}" for c, m in r.colour_relies.items()) or "none")
            + f" | {r.discovery_s:.1f} s ({r.audit_images}) | "
            f"{r.hook_s / r.epoch_s:.1%} ({r.hook_s:.1f} of {r.epoch_s:.0f} s) |")
    return "\n".join(lines)


def case_table(runs: list[Run]) -> str:
    lines = ["| case | cue | model | runs | found (audit) | found where the told test beats "
             "the controls by >= 10 / 30 points | monitor confirmed and kept | false alarms "
             "(monitor / audit) |",
             "| --- | --- | --- | ---: | ---: | --- | ---: | --- |"]
    for case, backbone in dict.fromkeys((r.case, r.backbone) for r in runs):
        mine = [r for r in runs if r.case == case and r.backbone == backbone]
        cues = [c.cls for c in CASES[case]]
        need = len(mine) * len(cues)
        found = sum(v for r in mine for v in r.found.values())
        bars = []
        for bar in (0.1, 0.3):
            able = [(r, c) for r in mine for c in cues if r.told[c][1] >= bar]
            bars.append(f"{sum(r.found[c] for r, c in able)}/{len(able)}")
        kept = sum(c in r.first_confirmed and all(c in e for e in
                   r.confirmed_per_epoch[r.first_confirmed[c]:]) for r in mine for c in cues)
        fm = sum(any(n not in cues for n in r.first_confirmed) for r in mine)
        fa = sum(any(n not in cues for n in r.audit_confirmed) for r in mine)
        lines.append(f"| {case} | {describe(case)} | {backbone} | {len(mine)} | "
                     f"{f'{found}/{need}' if need else '-'} | {' / '.join(bars) if need else '-'} "
                     f"| {f'{kept}/{need}' if need else '-'} | {fm}/{len(mine)} / "
                     f"{fa}/{len(mine)} runs |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
                        help="folder with cifar10-jpeg-{train,test}.zip")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated prefixes of: " + ", ".join(CASES).replace("%", "%%"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbones", default="bench_small",
                        help="comma-separated: bench_small, resnet18_cifar")
    parser.add_argument("--monitor-tests", default="box",
                        help="the monitor's shortcut_tests (comma-separated)")
    parser.add_argument("--audit-per-class", type=int, default=AUDIT_PER_CLASS,
                        help="test images a class in the audit's search (the audit's "
                             "--discovery-images; at most --test-per-class)")
    parser.add_argument("--markdown", default=None, help="also write the tables here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = args.cases.split(",")
    cases = [c for c in CASES if any(c.startswith(w) for w in wanted)]
    data_dir = Path(args.data)
    t0 = time.perf_counter()
    data = {"train": load_subset(data_dir / "cifar10-jpeg-train.zip", "train",
                                 args.train_per_class),
            "test": load_subset(data_dir / "cifar10-jpeg-test.zip", "test", args.test_per_class)}
    print(f"decoded {args.train_per_class} train + {args.test_per_class} test images a class "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    runs: list[Run] = []
    show: Callable[[Run], str] = lambda r: run_table([r]).splitlines()[-1]  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="shortcut_bench_") as tmp:
        for case in cases:
            root = Path(tmp) / case
            write_tree(root, case, data)
            for backbone in args.backbones.split(","):
                for seed in seeds:
                    run = run_one(case, seed, root, os.path.join(tmp, "logs"), args.epochs,
                                  args.test_per_class, backbone, args.monitor_tests.split(","),
                                  args.audit_per_class)
                    runs.append(run)
                    print(f"{show(run)}  [fit {run.fit_s:.0f} s, confirmed/epoch "
                          f"{run.confirmed_per_epoch}, gone {run.gone}]", flush=True)
    total = time.perf_counter() - t0
    header = (f"torch {torch.__version__}, lightning {L.__version__}, Python "
              f"{platform.python_version()}, {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs; seeds {seeds}; {args.epochs} epochs; "
              f"{args.train_per_class} train + {args.test_per_class} test images a class "
              f"({VAL_SIZE} of the training images held out for validation); "
              f"{total / 60:.1f} min in all")
    tables = f"{header}\n\n{case_table(runs)}\n\n{run_table(runs)}\n"
    print("\n" + tables)
    if args.markdown:
        Path(args.markdown).write_text(tables)


if __name__ == "__main__":
    main()
