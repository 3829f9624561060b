"""Label-free shortcut discovery on real CIFAR-10 with undeclared cues stamped into the files.

    python bench/shortcut_discovery.py [--seeds 0,1,2] [--cases solid,glyph] [--epochs 4] \
        [--train-per-class 300] [--test-per-class 100] [--markdown /tmp/shortcut_table.md]

From the JPEG archives of ``../shared/data`` (``--data``) it takes a fixed, seeded subset
of each class (``--train-per-class`` training and ``--test-per-class`` test images), and
for every case writes an ImageFolder tree ``train/<class>/*.png`` + ``test/<class>/*.png``
into a temporary folder (never into the repository) with the case's cue stamped into the
pixels of its class(es): nothing tells the pipeline where, or whether, there is a cue.
Test images follow the same rule as training images, so the audit's transplant has
sources. The ``clean`` case is the same images without any cue: the control of every
case, and the false-alarm check.

Each (case, seed) trains ``bench_small`` (bench/small_model.py) with the project's
CIFAR10DataModule on that ImageFolder root and the ExplanationMonitor (saliency, true
class only, ``discovery_per_class=8``) under a CSVLogger, then:

* the monitor's first alarm: the epoch of its "class X is a suspected shortcut" warning
  for a cue class (and any warning naming another class: a false alarm); the logged
  ``explain/saliency/suspects`` and ``hotspot_lift/<class>`` scalars from metrics.csv;
* the audit's verdict, exactly as audit_report/sections/shortcuts.py computes it: a
  stratified sample of 30 test images a class (seed + 2), saliency maps of the true class,
  ``discovery.discover``; "found" is a confirmed suspect naming the cue class whose
  window overlaps the cue's pixels;
* the time of the discovery step (saliency maps + ``discover``) on 500 test images and
  the monitor's share of an epoch.

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
from audit_report.sections.shortcuts import AUDIT_SUSPECT_Z  # noqa: E402
from explain.measures import discovery  # noqa: E402
from lit_modules import ImageClassifier  # noqa: E402
from lit_modules.data import CIFAR10DataModule  # noqa: E402
from lit_modules.data.sampling import dataset_labels, sample_batch, stratified_indices  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
DATA_SEED = 0  # which images, and which of a class carry a partial cue: fixed across seeds
VAL_SIZE = 300  # taken from the training images by the DataModule (seeded, split_seed 0)
AUDIT_PER_CLASS = 30  # audit_report.settings.AuditSettings.discovery_images
TIMING_PER_CLASS = 50  # 500 images for the discovery-time figure
METHOD = "saliency"  # audit_report/sections/shortcuts.py: DISCOVERY_METHOD
ALARM = "is a suspected shortcut at epoch"

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
    kind: str  # solid | checker | line | glyph | tint
    x: int = 0
    y: int = 0
    p: float = 1.0

    def ink(self) -> np.ndarray:
        """``[32, 32]`` bool: the pixels the cue changes."""
        mask = np.zeros((32, 32), dtype=bool)
        if self.kind in ("solid", "checker"):
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
            out[self.y:self.y + 4, self.x:self.x + 4] = (255, 0, 255)  # magenta
        elif self.kind == "checker":  # 1-px black and white checks
            yy, xx = np.mgrid[0:4, 0:4]
            check = ((yy + xx) % 2 == 0)[..., None] * 255
            out[self.y:self.y + 4, self.x:self.x + 4] = check.astype(np.uint8)
        elif self.kind == "line":
            out[self.y, self.x:self.x + 8] = (255, 255, 0)  # yellow
        elif self.kind == "glyph":
            out[self.ink()] = (255, 255, 255)  # white ink over the image
        elif self.kind == "tint":  # 25% towards orange, everywhere
            tint = np.array([255, 140, 0], dtype=np.float32)
            out = (0.75 * img.astype(np.float32) + 0.25 * tint).round().clip(0, 255)
            out = out.astype(np.uint8)
        return out


CASES: dict[str, list[Cue]] = {
    "clean": [],
    "solid-100%-1class": [Cue("bird", "solid", 2, 2)],
    "textured-100%-2classes": [Cue("cat", "checker", 26, 26), Cue("ship", "checker", 26, 2)],
    "line-100%-1class": [Cue("deer", "line", 12, 29)],
    "glyph-50%-1class": [Cue("horse", "glyph", 3, 24, p=0.5)],
    "tint-100%-1class": [Cue("truck", "tint")],
}


def describe(case: str) -> str:
    parts = []
    for c in CASES[case]:
        h, w = np.nonzero(c.ink())
        where = ("whole image" if c.kind == "tint"
                 else f"x {w.min()}-{w.max() + 1}, y {h.min()}-{h.max() + 1}")
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
                    img = stamps[i].stamp(img)
                Image.fromarray(img).save(folder / f"{i:04d}.png")


# -- one run -----------------------------------------------------------------------------


@dataclass
class Run:
    case: str
    seed: int
    test_acc: float = float("nan")
    alarms: dict[str, int] = field(default_factory=dict)  # class -> epoch of its warning
    suspects_per_epoch: list[float] = field(default_factory=list)
    final_lifts: dict[str, float] = field(default_factory=dict)  # monitor, last epoch
    audit_lifts: dict[str, float] = field(default_factory=dict)
    audit_suspects: list[str] = field(default_factory=list)
    audit_confirmed: list[str] = field(default_factory=list)
    found: dict[str, bool] = field(default_factory=dict)  # cue class -> found
    flips: dict[str, tuple[float, float, float, int]] = field(default_factory=dict)
    # The transplant told where the cue is (its pixels' box, 1 px margin; sources: the
    # class's sampled images that carry it): does the model use the cue at all?
    told: dict[str, tuple[float, float, float, bool]] = field(default_factory=dict)
    discovery_s: float = float("nan")
    epoch_s: float = float("nan")
    hook_s: float = float("nan")
    fit_s: float = float("nan")


def read_metrics(log_dir: str) -> list[dict[str, str]]:
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def audit_discovery(model: torch.nn.Module, dm: CIFAR10DataModule, seed: int, per_class: int,
                    ) -> tuple[discovery.DiscoveryResult, dict, torch.Tensor, float]:
    """What the audit's shortcuts section does: stratified test sample, saliency, discover.

    Returns the result, the sample (``image``, ``label`` and the dataset ``index``), its
    predictions and the seconds it took (maps and discovery, not the sampling)."""
    dataset = dm.dataset("test")
    k = len(CLASSES)
    idx = stratified_indices(dataset_labels(dataset), per_class * k, seed + 2)
    batch = sample_batch(dataset, idx)
    images, labels = batch["image"].float(), batch["label"].long()
    t = time.perf_counter()
    maps = explain.run(model, images, METHOD, targets=labels).cpu()
    found = discovery.discover(model, images, labels, maps, k, seed=seed, batch_size=256,
                               z_threshold=AUDIT_SUSPECT_Z)
    seconds = time.perf_counter() - t
    preds = discovery.predict(model, images)
    sample = {"image": images, "label": labels, "index": torch.tensor(idx)}
    return found, sample, preds, seconds


def told_transplant(model: torch.nn.Module, sample: dict, case: str, cue: Cue, seed: int,
                    test_per_class: int) -> discovery.TransplantResult:
    """The transplant test on the cue's own box, with cue-carrying sources: not what
    discovery does (it is not told), but whether the trained model uses the cue."""
    ys, xs = np.nonzero(cue.ink())
    window = (max(int(xs.min()) - 1, 0), max(int(ys.min()) - 1, 0),
              min(int(xs.max()) + 2, 32), min(int(ys.max()) + 2, 32))
    c = CLASSES.index(cue.cls)
    # The test tree holds test_per_class files a class, in class order and file order.
    stamped = {c * test_per_class + i for i in carriers(case, cue.cls, test_per_class, "test")}
    sources = [j for j, i in enumerate(sample["index"].tolist()) if i in stamped]
    return discovery.transplant_test(model, sample["image"], sample["label"], c, window,
                                     sources, seed=seed)


def run_one(case: str, seed: int, root: Path, logs: str, epochs: int, test_per_class: int,
            ) -> Run:
    run = Run(case, seed)
    L.seed_everything(seed, verbose=False)
    dm = CIFAR10DataModule(root=str(root), download=False, val_size=VAL_SIZE, split_seed=0,
                           batch_size=64, num_workers=0, data_path="fast")
    model = ImageClassifier(backbone="bench_small", optimizer="adamw", lr=2e-3,
                            weight_decay=0.05, scheduler="onecycle")
    monitor = TimedMonitor(methods=[METHOD], num_images=16, classes="true",
                           explain_classes="shown", discovery_per_class=8)
    clock = EpochClock()
    logger = CSVLogger(logs, name=f"{case}-s{seed}")
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
        if ALARM in text:  # "ExplanationMonitor: class X is a suspected shortcut at epoch E: ..."
            name = text.split("class ", 1)[1].split(" ", 1)[0]
            run.alarms.setdefault(name, int(text.split(ALARM, 1)[1].split(":", 1)[0]))
    rows = [r for r in read_metrics(logger.log_dir) if r.get(f"explain/{METHOD}/suspects")]
    run.suspects_per_epoch = [float(r[f"explain/{METHOD}/suspects"]) for r in rows]
    run.final_lifts = {c: float(rows[-1][f"explain/{METHOD}/hotspot_lift/{c}"]) for c in CLASSES}
    run.epoch_s = statistics.mean(clock.times)
    run.hook_s = statistics.mean(monitor.seconds)

    model.eval()
    found, sample, preds, _ = audit_discovery(model, dm, seed, AUDIT_PER_CLASS)
    labels = sample["label"]
    run.test_acc = float((preds == labels).float().mean())
    run.audit_lifts = {CLASSES[h.label]: h.hotspot.lift for h in found.classes if h.hotspot}
    run.audit_suspects = [CLASSES[s.label] for s in found.suspects]
    run.audit_confirmed = [CLASSES[c] for c in found.confirmed]
    for cue in CASES[case]:
        c = CLASSES.index(cue.cls)
        tr = found.transplants.get(c)
        if tr is not None:
            run.flips[cue.cls] = (tr.flip_rate, tr.flip_rate_random_window,
                                  tr.flip_rate_other_class, len(tr.targets))
        ink = cue.ink()
        x0, y0, x1, y1 = tr.window if tr is not None else (0, 0, 0, 0)
        run.found[cue.cls] = bool(tr is not None and tr.confirmed and ink[y0:y1, x0:x1].any())
        if cue.kind != "tint":
            t = told_transplant(model, sample, case, cue, seed, test_per_class)
            run.told[cue.cls] = (t.flip_rate, t.flip_rate_random_window,
                                 t.flip_rate_other_class, t.confirmed)
    _, _, _, run.discovery_s = audit_discovery(model, dm, seed, TIMING_PER_CLASS)
    return run


# -- tables ------------------------------------------------------------------------------


def _alarm(run: Run) -> str:
    cue = [c.cls for c in CASES[run.case]]
    own = [f"{c} @{run.alarms[c]}" if c in run.alarms else f"{c} none" for c in cue]
    return ", ".join(own) or "-"


def _false(names: list[str] | dict[str, int], run: Run) -> str:
    cue = {c.cls for c in CASES[run.case]}
    other = [n for n in names if n not in cue]
    return ", ".join(other) or "none"


def _lifts(lifts: dict[str, float], run: Run) -> str:
    cue = [c.cls for c in CASES[run.case]]
    others = max(v for k, v in lifts.items() if k not in cue)
    own = " / ".join(f"{lifts[c]:.1f}" for c in cue)
    return f"{own} vs {others:.1f}" if own else f"max {others:.1f}"


def _flips(run: Run) -> str:
    parts = []
    for c in CASES[run.case]:
        f = run.flips.get(c.cls)
        parts.append(f"{f[0]:.0%} / {f[1]:.0%} / {f[2]:.0%} (n={f[3]})" if f else "not a suspect")
    return "; ".join(parts) or "-"


def _told(run: Run) -> str:
    parts = [f"{f[0]:.0%} / {f[1]:.0%} / {f[2]:.0%}{'' if f[3] else ' (not beating controls)'}"
             for f in run.told.values()]
    return "; ".join(parts) or "-"


def _found(run: Run) -> str:
    return ", ".join(f"{c}: {'yes' if v else 'NO'}" for c, v in run.found.items()) or "-"


def run_table(runs: list[Run]) -> str:
    head = ("| case | seed | test acc | monitor: first alarm (cue class @epoch) | monitor: "
            "alarms on other classes | monitor lift, last epoch: cue vs max other | audit lift: "
            "cue vs max other | audit: found | transplant flips: hotspot / random window / other "
            "class | told the cue's box: flips hotspot / random / other | audit: suspects / "
            "confirmed outside the cue classes | discovery, 500 images | monitor share of an "
            "epoch |")
    lines = [head, "| --- | ---: | ---: | --- | --- | --- | --- | --- | --- | --- | --- "
             "| ---: | ---: |"]
    for r in runs:
        lines.append(
            f"| {r.case} | {r.seed} | {r.test_acc:.0%} | {_alarm(r)} | {_false(r.alarms, r)} | "
            f"{_lifts(r.final_lifts, r)} | {_lifts(r.audit_lifts, r)} | {_found(r)} | "
            f"{_flips(r)} | {_told(r)} | {_false(r.audit_suspects, r)} / "
            f"{_false(r.audit_confirmed, r)} | "
            f"{r.discovery_s:.1f} s | {r.hook_s / r.epoch_s:.1%} |")
    return "\n".join(lines)


def case_table(runs: list[Run]) -> str:
    lines = ["| case | cue | runs | found (audit) | monitor alarmed (cue class) | false alarms "
             "(monitor / audit suspect / audit confirmed) |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for case in dict.fromkeys(r.case for r in runs):
        mine = [r for r in runs if r.case == case]
        cues = [c.cls for c in CASES[case]]
        need = len(mine) * len(cues)
        found = sum(v for r in mine for v in r.found.values())
        alarmed = sum(c in r.alarms for r in mine for c in cues)
        fm = sum(any(n not in cues for n in r.alarms) for r in mine)
        fs = sum(any(n not in cues for n in r.audit_suspects) for r in mine)
        fc = sum(any(n not in cues for n in r.audit_confirmed) for r in mine)
        lines.append(f"| {case} | {describe(case)} | {len(mine)} | "
                     f"{f'{found}/{need}' if need else '-'} | "
                     f"{f'{alarmed}/{need}' if need else '-'} | "
                     f"{fm}/{len(mine)} / {fs}/{len(mine)} / {fc}/{len(mine)} runs |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
                        help="folder with cifar10-jpeg-{train,test}.zip")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated prefixes of: " + ", ".join(CASES))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
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
            for seed in seeds:
                run = run_one(case, seed, root, os.path.join(tmp, "logs"), args.epochs,
                              args.test_per_class)
                runs.append(run)
                print(f"{show(run)}  [fit {run.fit_s:.0f} s, suspects/epoch "
                      f"{run.suspects_per_epoch}]", flush=True)
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
