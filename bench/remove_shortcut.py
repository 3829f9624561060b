"""Removing a shortcut by fine-tuning, on real CIFAR-10 with cues stamped into the files.

    python bench/remove_shortcut.py [--seeds 0,1,2] [--cases strong,part,two,nocue,tint] \
        [--backbones bench_small,resnet18_cifar] [--epochs 8] [--fix-epochs 2] \
        [--methods none,augment,penalty,both] [--fix-lr 2e-3] [--train-per-class 200] \
        [--markdown out.md]

For each case it writes an ImageFolder tree of a fixed subset of ``../shared/data`` with
the case's cue stamped into the pixels (bench/shortcut_discovery.py's cues and trees),
and the same images without any cue (the *clean* tree). Per (case, backbone, seed):

1. the shortcut model: trained ``--epochs`` on the cue tree (the project's recipe: AdamW,
   one-cycle, the fast data path);
2. from its weights, ``--fix-epochs`` of fine-tuning per counter-measure (``--methods``;
   ``none`` is the same fine-tuning without one: the fair baseline), each cue's declared box
   (its pixels + 1) given as the shortcut, pixels cut from the class's carriers in the
   training tree (``shortcut_pixels.pt``, as the audit writes it);
3. the ceiling: the same recipe on the clean tree.

Every model is measured on the test split: the transplant (the box cut from the class's
cue-carrying test images, pasted onto other classes' test images, against the audit's
controls), the cue class's accuracy on its *clean* test images (the same images without
the cue: what the shortcut was hiding), accuracy on the clean test tree, and the seconds
of each fine-tuning. ``nocue``: a model trained without any cue, "fixed" for a box that
holds none: the fix must not cost clean accuracy. ``tint``: a shortcut with no place (every
truck blended towards orange), handed to the fix as a filter and measured by the range
test (``reliance.measure_filter``) where a box is measured by its transplant.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import shortcut_discovery as sd  # noqa: E402  (cues, subsets, trees)
import small_model  # noqa: E402,F401  (registers bench_small)

from explain.measures import reliance  # noqa: E402
from lit_modules import ImageClassifier  # noqa: E402
from lit_modules.data import CIFAR10DataModule  # noqa: E402
from lit_modules.data.sampling import sample_batch  # noqa: E402
from lit_modules.shortcut_projection import fit_projection, fold_projection  # noqa: E402
from lit_modules.shortcut_removal import ShortcutBox, load_pixels, save_pixels  # noqa: E402

Cue = sd.Cue
CASES: dict[str, list[Cue]] = {
    # A strong patch on every image of one class.
    "strong": [Cue("bird", "solid", 2, 2)],
    # A weaker cue (black and white checks, no saturated colour) on half of a class.
    "part": [Cue("cat", "checker", 26, 26, p=0.5)],
    # Two classes, each its own cue.
    "two": [Cue("bird", "solid", 2, 2), Cue("ship", "checker", 26, 2)],
    # No cue at all; the "shortcut" handed to the fix is bird's corner box, which holds
    # nothing: the fix must not harm a model without a shortcut.
    "nocue": [],
    # A shortcut with no place: every truck blended 25% towards orange, handed to the fix
    # as a filter (model.shortcut_removal.filters), measured by the range test.
    "tint": [Cue("truck", "tint")],
}
NOCUE_BOX = ("bird", (1, 1, 7, 7))
# The tree writer reads its cues by case name.
sd.CASES.update({f"remove-{k}": v for k, v in CASES.items()})
METHODS = {
    "none": None,
    "augment": {"method": "augment"},
    "penalty": {"method": "penalty", "penalty_weight": 1.0},
    "penalty-x10": {"method": "penalty", "penalty_weight": 10.0},
    "both": {"method": "both"},
    # Every image of the class covered (the class learned from its content alone); the
    # penalty, not the data, keeps the pasted cue from mattering.
    "both-cover-all": {"method": "both", "p_cover": 1.0, "p_paste": 0.0},
    "augment-cover-all": {"method": "augment", "p_cover": 1.0},
    # The shortcut class's images weighted x4 in the loss: a class the model knew only by
    # its cue is learned from its content during the fix.
    "augment-w4": {"method": "augment", "class_weight": 4.0},
    "augment-w2": {"method": "augment", "class_weight": 2.0},
    # The backbone frozen, the head re-fitted by L-BFGS on the epoch's decorrelated
    # features (lit_modules/head_refit.py); "refit-none" is the same re-fit on the batches
    # as they are: the fair baseline, since a converged head alone may change accuracy.
    "refit": {"method": "refit"},
    "refit-none": {"method": "refit", "p_paste": 0.0, "p_cover": 0.0},
    # No training: P-ClArC, the cue's direction projected out of the head's input
    # (lit_modules/shortcut_projection.py), fitted on the validation split.
    "p-clarc": "projection",
}
CLASSES = sd.CLASSES


def declared_box(cue: Cue) -> tuple[int, int, int, int]:
    """The cue's pixels plus one pixel around (as bench/shortcut_discovery.py tells it)."""
    ys, xs = np.nonzero(cue.ink())
    return (max(int(xs.min()) - 1, 0), max(int(ys.min()) - 1, 0),
            min(int(xs.max()) + 2, 32), min(int(ys.max()) + 2, 32))


def shortcuts_of(case: str) -> list[tuple[str, tuple[int, int, int, int] | None]]:
    """Each shortcut class of ``case`` with its box (None: a filter, no place)."""
    if case == "nocue":
        return [NOCUE_BOX]
    return [(c.cls, None if c.kind == "tint" else declared_box(c)) for c in CASES[case]]


def removal_spec(case: str, pixels: str | None, seed: int, spec: dict) -> dict:
    """``model.shortcut_removal`` for the case's shortcuts: boxes, and filters for tints."""
    found = shortcuts_of(case)
    return {"shortcuts": [{"class_index": CLASSES.index(cls), "box": list(box),
                           "class_name": cls} for cls, box in found if box is not None],
            "filters": [{"class_index": CLASSES.index(cls), "class_name": cls}
                        for cls, box in found if box is None],
            "pixels": pixels, "seed": seed, **spec}


@dataclass
class Measured:
    """One model on the test split: per shortcut class, the transplant and clean accuracy."""

    flips: dict[str, float] = field(default_factory=dict)
    control: dict[str, float] = field(default_factory=dict)  # the strongest control
    margin: dict[str, float] = field(default_factory=dict)
    verdict: dict[str, str] = field(default_factory=dict)
    class_clean_acc: dict[str, float] = field(default_factory=dict)
    clean_acc: float = float("nan")
    seconds: float = float("nan")  # training or fine-tuning


def datamodule(root: Path) -> CIFAR10DataModule:
    return CIFAR10DataModule(root=str(root), download=False, val_size=sd.VAL_SIZE,
                             split_seed=0, batch_size=64, num_workers=0, data_path="fast")


def split_tensors(dm: CIFAR10DataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = dm.dataset(split)
    batch = sample_batch(dataset, list(range(len(dataset))))
    return batch["image"].float(), batch["label"].long()


def train(model: ImageClassifier, root: Path, epochs: int, seed: int) -> float:
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=datamodule(root))
    return time.perf_counter() - t


def recipe(backbone: str, lr: float = 2e-3, **kw) -> ImageClassifier:
    return ImageClassifier(backbone=backbone, optimizer="adamw", lr=lr, weight_decay=0.05,
                           scheduler="onecycle", channels_last=backbone != "bench_small", **kw)


def measure(model: ImageClassifier, case: str, cue_test: tuple, clean_test: tuple,
            test_per_class: int, seed: int) -> Measured:
    model.eval()
    x, y = cue_test
    cx, cy = clean_test
    out = Measured()
    with torch.no_grad():
        preds = torch.cat([model(cx[i:i + 256]).argmax(1) for i in range(0, len(cx), 256)])
    out.clean_acc = float((preds == cy).float().mean())
    cues = {c.cls: c for c in CASES[case]}
    for cls, box in shortcuts_of(case):
        c = CLASSES.index(cls)
        cue = cues.get(cls)
        own = torch.nonzero(y == c).flatten()
        if cue is not None:  # the class's cue-carrying test images are the sources
            stamped = sd.carriers(f"remove-{case}", cls, test_per_class, "test")
            sources = [int(own[i]) for i in sorted(stamped)]
        else:
            sources = own.tolist()
        r = (reliance.measure_filter(model, x, y, c, seed=seed) if box is None else
             reliance.measure(model, x, y, c, box, seed=seed, sources=sources))
        t = r.transplant
        out.flips[cls] = t.flip_rate
        out.control[cls] = t.strongest_control
        out.margin[cls] = t.margin.mean
        out.verdict[cls] = r.verdict
        out.class_clean_acc[cls] = float((preds[cy == c] == c).float().mean())
    return out


def pixels_file(folder: Path, case: str, data: dict, dm: CIFAR10DataModule) -> str | None:
    """The box contents cut from each shortcut class's training images as stamped (its
    carriers; every image of the class for ``nocue``), up to 64 a class; None without a
    box (a filter needs no pixels)."""
    patches, boxes = {}, {}
    cues = {c.cls: c for c in CASES[case]}
    for cls, box in shortcuts_of(case):
        if box is None:
            continue
        images = data["train"][cls]
        if cls in cues:
            stamped = sd.carriers(f"remove-{case}", cls, len(images), "train")
            images = [stamped[i].at(i, "train").stamp(images[i]) for i in sorted(stamped)]
        x0, y0, x1, y1 = box
        cut = torch.from_numpy(np.stack(images[:64])[:, y0:y1, x0:x1]).permute(0, 3, 1, 2)
        c = CLASSES.index(cls)
        patches[c] = dm.normalize(cut.float() / 255.0)
        boxes[c] = box
    if not patches:
        return None
    path = folder / f"pixels-{case}.pt"
    save_pixels(path, patches, boxes)
    return str(path)


@dataclass
class Row:
    case: str
    backbone: str
    seed: int
    method: str
    m: Measured
    epoch_s: float  # one epoch of the shortcut model's training


def run_case(case: str, backbone: str, seed: int, roots: dict[str, Path], data: dict, args,
             tmp: Path, ceilings: dict) -> list[Row]:
    dm = datamodule(roots[case])
    cue_test = split_tensors(dm, "test")
    clean_test = split_tensors(datamodule(roots["nocue"]), "test")
    torch.manual_seed(seed)
    base = recipe(backbone)
    seconds = train(base, roots[case], args.epochs, seed)
    ckpt = tmp / f"{case}-{backbone}-{seed}.ckpt"
    torch.save({"state_dict": base.state_dict()}, ckpt)
    rows = []
    m = measure(base, case, cue_test, clean_test, args.test_per_class, seed)
    m.seconds = seconds
    epoch_s = seconds / args.epochs
    rows.append(Row(case, backbone, seed, "shortcut model", m, epoch_s))
    pixels = pixels_file(tmp, case, data, dm)
    for name in args.methods:
        spec = METHODS[name]
        if spec == "projection":
            if pixels is None or any(box is None for _, box in shortcuts_of(case)):
                print(f"{case}: {name} skipped (P-ClArC here needs a box)", flush=True)
                continue
            rows.append(Row(case, backbone, seed, name, projected(
                backbone, ckpt, case, dm, pixels, cue_test, clean_test, args, seed), epoch_s))
            continue
        removal = None if spec is None else removal_spec(case, pixels, seed, spec)
        torch.manual_seed(seed)
        model = recipe(backbone, lr=args.fix_lr, init_weights=str(ckpt),
                       shortcut_removal=removal)
        s = train(model, roots[case], args.fix_epochs, seed)
        m = measure(model, case, cue_test, clean_test, args.test_per_class, seed)
        m.seconds = s
        rows.append(Row(case, backbone, seed, name, m, epoch_s))
    if case == "nocue" or args.no_ceiling:
        return rows  # nocue: its shortcut model is the ceiling already
    key = (backbone, seed)
    if key not in ceilings:
        torch.manual_seed(seed)
        clean = recipe(backbone)
        s = train(clean, roots["nocue"], args.epochs, seed)
        ceilings[key] = (clean, s)
    clean, s = ceilings[key]
    m = measure(clean, case, cue_test, clean_test, args.test_per_class, seed)
    m.seconds = s
    rows.append(Row(case, backbone, seed, "ceiling (no cue in training)", m, epoch_s))
    return rows


def projected(backbone: str, ckpt: Path, case: str, dm: CIFAR10DataModule, pixels: str,
              cue_test: tuple, clean_test: tuple, args, seed: int) -> Measured:
    """The shortcut model corrected by P-ClArC (no training), fitted on the validation split
    with the same pixels file as the fine-tuning counter-measures."""
    model = recipe(backbone)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    model.eval()
    x, y = split_tensors(dm, "val")
    bank = {c: pix for c, (_, pix) in load_pixels(pixels).items()}
    boxes = [ShortcutBox(CLASSES.index(cls), box, cls) for cls, box in shortcuts_of(case)]
    t = time.perf_counter()
    fold_projection(model, fit_projection(model, x, y, boxes, bank, seed=seed))
    seconds = time.perf_counter() - t
    m = measure(model, case, cue_test, clean_test, args.test_per_class, seed)
    m.seconds = seconds
    return m


def _fmt(row: Row) -> str:
    m = row.m
    cells = []
    for cls in m.flips:
        cells.append(f"{cls}: {m.flips[cls]:.0%} vs {m.control[cls]:.0%} "
                     f"({m.margin[cls]:+.2f}, {m.verdict[cls]}); clean {cls} "
                     f"{m.class_clean_acc[cls]:.0%}")
    return (f"| {row.case} | {row.backbone} | {row.seed} | {row.method} | "
            f"{'; '.join(cells)} | {m.clean_acc:.1%} | {m.seconds:.0f} s |")


def summary(rows: list[Row]) -> list[str]:
    """Mean over seeds per (case, backbone, method)."""
    out = ["| case | model | fine-tuning | margin over controls (mean of seeds; range) | "
           "cue class, clean images | clean accuracy | seconds | seeds gone |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = list(dict.fromkeys((r.case, r.backbone, r.method) for r in rows))
    for case, backbone, method in keys:
        group = [r for r in rows if (r.case, r.backbone, r.method) == (case, backbone, method)]
        margins = [v for r in group for v in r.m.margin.values()]
        cls_acc = [v for r in group for v in r.m.class_clean_acc.values()]
        gone = sum(all(v == "gone" for v in r.m.verdict.values()) for r in group)
        out.append(
            f"| {case} | {backbone} | {method} | {statistics.mean(margins):+.2f} "
            f"[{min(margins):+.2f}, {max(margins):+.2f}] | {statistics.mean(cls_acc):.0%} | "
            f"{statistics.mean(r.m.clean_acc for r in group):.1%} | "
            f"{statistics.mean(r.m.seconds for r in group):.0f} | {gone}/{len(group)} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--backbones", default="bench_small")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--fix-epochs", type=int, default=2)
    parser.add_argument("--fix-lr", type=float, default=2e-3,
                        help="peak learning rate of the fine-tuning (the recipe's: 2e-3)")
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the clean-data model (measured once, it repeats: seeded)")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    cases = [c.strip() for c in args.cases.split(",")]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data_dir = Path(args.data)
    data = {"train": sd.load_subset(data_dir / "cifar10-jpeg-train.zip", "train",
                                    args.train_per_class),
            "test": sd.load_subset(data_dir / "cifar10-jpeg-test.zip", "test",
                                   args.test_per_class)}
    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="remove_bench_") as name:
        tmp = Path(name)
        roots = {}
        for case in set(cases) | {"nocue"}:
            roots[case] = tmp / case
            sd.write_tree(roots[case], f"remove-{case}", data)
        ceilings: dict = {}
        for backbone in args.backbones.split(","):
            for seed in seeds:
                for case in cases:
                    new = run_case(case, backbone, seed, roots, data, args, tmp, ceilings)
                    for row in new:
                        print(_fmt(row), flush=True)
                    rows += new
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{time.perf_counter() - started:.0f} s in all.",
        f"Command: python bench/remove_shortcut.py --seeds {args.seeds} --cases "
        f"{','.join(cases)} --backbones {args.backbones} --epochs {args.epochs} "
        f"--fix-epochs {args.fix_epochs} --fix-lr {args.fix_lr} --train-per-class "
        f"{args.train_per_class} --methods {','.join(args.methods)}",
        "", *summary(rows), "",
        "| case | model | seed | model or fine-tuning | per shortcut: flips vs strongest "
        "control (margin, verdict); its class on clean images | clean accuracy | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(_fmt(r) for r in rows)]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
