"""Explanation speed: this engine against pytorch-grad-cam and captum, in one run.

Same model (ResNet-18-CIFAR, random weights, eval mode), same inputs, every class (10).
The engine explains all classes in one call; the peers are looped over the classes, as
their APIs require. Each time is the median of ``--repeats`` runs after one warm-up.

The slow peers (Score-CAM, Ablation-CAM, occlusion, Integrated Gradients) take tens of
seconds a class on a small CPU: by default they are timed on ``--peer-classes`` classes
and ``--peer-repeats`` runs, and their all-class time is extrapolated per class; the
table marks those rows ``extrapolated``. ``--full-peers`` times every peer on all classes.

    python bench/explain_speed.py                      # the BENCHMARKS.md table
    python bench/explain_speed.py --quick              # a smoke run (about a minute)
    python bench/explain_speed.py --markdown out.md    # also write the table as markdown
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam draws progress bars

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_name, package_version  # noqa: E402

import explain  # noqa: E402
from lit_modules.backbones import resnet18_cifar  # noqa: E402

NUM_CLASSES = 10
METHODS = ("gradcam", "scorecam", "ablationcam", "occlusion", "integrated_gradients")


@dataclass
class Row:
    work: str
    ours: float
    peer: str
    peer_time: float
    how: str  # "full" or "extrapolated from ..."
    target: str
    ratio: float  # peer / ours (or ours / peer for the forward-pass row)
    met: bool | None  # None: a reference row without a target


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peer_time(
    per_class: Callable[[int], object], classes: int, repeats: int, warmup: int
) -> tuple[float, str]:
    """All-class time of a peer looped over classes; extrapolated when ``classes`` < 10."""
    classes = min(classes, NUM_CLASSES)

    def loop() -> None:
        for c in range(classes):
            per_class(c)

    t = timed(loop, repeats, warmup)
    if classes == NUM_CLASSES:
        return t, f"full: 10 classes, median of {repeats}"
    return (
        t * NUM_CLASSES / classes,
        f"extrapolated: {classes} class(es) x 10/{classes}, median of {repeats}",
    )


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 repeat, 1 peer class, fewer images and steps",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the engine")
    parser.add_argument(
        "--peer-repeats",
        type=int,
        default=1,
        help="timed runs of the slow peers (fast peers use --repeats)",
    )
    parser.add_argument(
        "--peer-classes",
        type=int,
        default=2,
        help="classes the slow peers are timed on before extrapolation",
    )
    parser.add_argument(
        "--full-peers",
        action="store_true",
        help="time every peer on all 10 classes with --repeats runs",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="time only these methods' rows (default: all)",
    )
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = parser.parse_args(argv)

    try:
        import captum
        from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion
        from pytorch_grad_cam import AblationCAM, GradCAM, ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as exc:
        raise SystemExit(
            f"the peers are in the dev extra (pip install -e '.[dev]'): {exc}"
        ) from exc
    import warnings

    warnings.filterwarnings("ignore", module="captum")

    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    only = set(args.only)
    repeats = 1 if quick else args.repeats
    warmup = 0 if quick else 1
    slow_classes = NUM_CLASSES if args.full_peers else (1 if quick else args.peer_classes)
    slow_repeats = repeats if args.full_peers else (1 if quick else args.peer_repeats)
    n_cam = 8 if quick else 32  # Grad-CAM batch
    n_pert = 2 if quick else 4  # perturbation batch
    steps = 8 if quick else 50
    window, stride = (8, 4) if quick else (4, 2)

    torch.manual_seed(0)
    model = resnet18_cifar().eval()
    layer = model.trunk.layer4
    gen = torch.Generator().manual_seed(1)
    x_cam = torch.randn(n_cam, 3, 32, 32, generator=gen)
    x_pert = torch.randn(n_pert, 3, 32, 32, generator=gen)
    rows: list[Row] = []
    started = time.perf_counter()
    load0 = os.getloadavg()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    # -- Grad-CAM, all classes ------------------------------------------------------------
    if "gradcam" in only:
        def forward() -> None:
            with torch.no_grad():
                model(x_cam)

        t_fwd = timed(forward, repeats, warmup)
        t_gc = timed(lambda: explain.run(model, x_cam, "gradcam"), repeats, warmup)
        say(f"forward {t_fwd:.3f}s, gradcam (ours) {t_gc:.3f}s")
        rows.append(
            Row(
                f"gradcam, all classes, {n_cam} images",
                t_gc,
                "one plain forward (no grad)",
                t_fwd,
                f"median of {repeats}",
                "at most 1.5x its time",
                t_gc / t_fwd,
                t_gc / t_fwd <= 1.5,
            )
        )

        pgc_gradcam = GradCAM(model=model, target_layers=[layer])
        t_peer, how = peer_time(
            lambda c: pgc_gradcam(input_tensor=x_cam, targets=[ClassifierOutputTarget(c)] * n_cam),
            NUM_CLASSES,
            repeats,
            warmup,
        )
        pgc_gradcam.activations_and_grads.release()
        say(f"pytorch-grad-cam GradCAM {t_peer:.3f}s")
        rows.append(
            Row(
                f"gradcam, all classes, {n_cam} images",
                t_gc,
                "pytorch-grad-cam GradCAM",
                t_peer,
                how,
                "20x faster",
                t_peer / t_gc,
                t_peer / t_gc >= 20,
            )
        )

        lgc = LayerGradCam(model, layer)

        def captum_gradcam(c: int) -> None:
            a = lgc.attribute(x_cam, target=c, relu_attributions=True)
            LayerAttribution.interpolate(a, (32, 32), interpolate_mode="bilinear")

        t_peer, how = peer_time(captum_gradcam, NUM_CLASSES, repeats, warmup)
        say(f"captum LayerGradCam {t_peer:.3f}s")
        rows.append(
            Row(
                f"gradcam, all classes, {n_cam} images",
                t_gc,
                "captum LayerGradCam",
                t_peer,
                how,
                "8x faster",
                t_peer / t_gc,
                t_peer / t_gc >= 8,
            )
        )

    # -- Score-CAM ------------------------------------------------------------------------
    if "scorecam" in only:
        t_ours = timed(
            lambda: explain.run(model, x_pert, "scorecam", score="channel_softmax", align_corners=True),
            repeats,
            warmup,
        )
        say(f"scorecam (ours) {t_ours:.3f}s")
        pgc_score = ScoreCAM(model=model, target_layers=[layer])
        t_peer, how = peer_time(
            lambda c: pgc_score(input_tensor=x_pert, targets=[ClassifierOutputTarget(c)] * n_pert),
            slow_classes,
            slow_repeats,
            0,
        )
        pgc_score.activations_and_grads.release()
        say(f"pytorch-grad-cam ScoreCAM {t_peer:.3f}s ({how})")
        rows.append(
            Row(
                f"scorecam, all classes, {n_pert} images",
                t_ours,
                "pytorch-grad-cam ScoreCAM (batch 16)",
                t_peer,
                how,
                "10x faster",
                t_peer / t_ours,
                t_peer / t_ours >= 10,
            )
        )

    # -- Ablation-CAM ---------------------------------------------------------------------
    if "ablationcam" in only:
        t_ours = timed(lambda: explain.run(model, x_pert, "ablationcam"), repeats, warmup)
        say(f"ablationcam (ours) {t_ours:.3f}s")
        pgc_abl = AblationCAM(model=model, target_layers=[layer])
        t_peer, how = peer_time(
            lambda c: pgc_abl(input_tensor=x_pert, targets=[ClassifierOutputTarget(c)] * n_pert),
            slow_classes,
            slow_repeats,
            0,
        )
        pgc_abl.activations_and_grads.release()
        say(f"pytorch-grad-cam AblationCAM {t_peer:.3f}s ({how})")
        rows.append(
            Row(
                f"ablationcam, all classes, {n_pert} images",
                t_ours,
                "pytorch-grad-cam AblationCAM (batch 32)",
                t_peer,
                how,
                "20x faster",
                t_peer / t_ours,
                t_peer / t_ours >= 20,
            )
        )

    # -- Occlusion ------------------------------------------------------------------------
    if "occlusion" in only:
        t_ours = timed(
            lambda: explain.run(model, x_pert, "occlusion", window=window, stride=stride, fill=0.0),
            repeats,
            warmup,
        )
        say(f"occlusion (ours) {t_ours:.3f}s")
        occ = Occlusion(model)
        t_peer, how = peer_time(
            lambda c: occ.attribute(
                x_pert,
                target=c,
                sliding_window_shapes=(3, window, window),
                strides=(3, stride, stride),
                baselines=0.0,
                perturbations_per_eval=16,
            ),
            slow_classes,
            slow_repeats,
            0,
        )
        say(f"captum Occlusion {t_peer:.3f}s ({how})")
        rows.append(
            Row(
                f"occlusion {window}x{window} stride {stride}, all classes, {n_pert} images",
                t_ours,
                "captum Occlusion (16 windows a pass)",
                t_peer,
                how,
                "5x faster",
                t_peer / t_ours,
                t_peer / t_ours >= 5,
            )
        )

    # -- Integrated Gradients -------------------------------------------------------------
    if "integrated_gradients" in only:
        t_ours = timed(
            lambda: explain.run(model, x_pert, "integrated_gradients", steps=steps), repeats, warmup
        )
        say(f"integrated_gradients (ours) {t_ours:.3f}s")
        ig = IntegratedGradients(model)
        t_peer, how = peer_time(
            lambda c: ig.attribute(x_pert, target=c, n_steps=steps),
            slow_classes,
            slow_repeats,
            0,
        )
        say(f"captum IntegratedGradients {t_peer:.3f}s ({how})")
        rows.append(
            Row(
                f"integrated_gradients, {steps} steps, all classes, {n_pert} images",
                t_ours,
                "captum IntegratedGradients",
                t_peer,
                how,
                "3x faster",
                t_peer / t_ours,
                t_peer / t_ours >= 3,
            )
        )
        # captum's default runs all steps x images in one batch; in the engine's chunk size it
        # is faster on a CPU (cache), so this row shows how much of the ratio is not batching.
        chunk = _default_option("integrated_gradients", "batch_size")
        t_peer, how = peer_time(
            lambda c: ig.attribute(x_pert, target=c, n_steps=steps, internal_batch_size=chunk),
            slow_classes,
            slow_repeats,
            0,
        )
        say(f"captum IntegratedGradients, internal_batch_size={chunk}: {t_peer:.3f}s ({how})")
        rows.append(
            Row(
                f"integrated_gradients, {steps} steps, all classes, {n_pert} images",
                t_ours,
                f"captum IntegratedGradients (internal_batch_size={chunk}, as the engine)",
                t_peer,
                how,
                "reference, no target",
                t_peer / t_ours,
                None,
            )
        )

    load1 = os.getloadavg()
    meta = {
        "command": "python bench/explain_speed.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end",
        "versions": f"torch {torch.__version__}, grad-cam {package_version('grad-cam')}, "
        f"captum {captum.__version__}, python {platform.python_version()}",
        "model": "resnet18_cifar, random weights (seed 0), eval mode, float32, 32x32 inputs",
        "total": f"{time.perf_counter() - started:.0f} s",
    }
    table = render(rows, meta)
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return rows


def _default_option(method: str, option: str) -> object:
    """A method's default for one option, read from its signature."""
    import inspect

    return inspect.signature(explain.get(method).fn).parameters[option].default


def render(rows: list[Row], meta: dict[str, str]) -> str:
    """The results as a markdown table (also readable as plain text)."""
    lines = [
        "| work | this engine | peer | peer time | peer timing | ratio | target | met |",
        "| --- | ---: | --- | ---: | --- | ---: | --- | --- |",
    ]
    for r in rows:
        if r.peer.startswith("one plain forward"):
            ratio = f"{r.ratio:.2f}x the forward"
        else:
            ratio = f"{r.ratio:.1f}x faster"
        lines.append(
            f"| {r.work} | {r.ours:.3f} s | {r.peer} | {r.peer_time:.3f} s | {r.how} | "
            f"{ratio} | {r.target} | {'-' if r.met is None else 'yes' if r.met else 'NO'} |"
        )
    lines.append("")
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
