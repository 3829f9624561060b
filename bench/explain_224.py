"""Grad-CAM at 224x224 on ImageNet-sized models: this engine against pytorch-grad-cam and captum.

Models: torchvision ResNet-50 (``tv:resnet50``) and ViT-B/16 (``tv:vit_b_16``), random
weights (seed 0), eval mode, float32, 1,000 classes (the ImageNet head), one batch of seeded
``randn`` 224x224 inputs. Work timed, for each model:

* (a) one map an image, for its top class: ``explain.run(..., targets=[B])`` against one
  call of each peer (the same work: one forward, one backward);
* (b) ten maps an image, for its ten top classes: ``targets=[B, 10]`` in one call against
  ten peer calls (their APIs take one class an image a call).

Each result is also checked against the peer's: Pearson r per map (mean, min), so the
times compare equal work. The layer is the backbone's declared default, and the peers get
the same module: ResNet ``layer4``; ViT ``encoder.layers[-1].ln_1`` with pytorch-grad-cam's
documented ViT reshape (drop the class token, 14x14 grid, channels first). captum's
LayerGradCam is not run on ViT (see ``CAPTUM_VIT``).

``--memory`` measures instead the peak resident memory of ``targets=None`` (all 1,000
classes) in a fresh subprocess per setting, at the default class chunk and at a smaller one.

    python bench/explain_224.py --markdown /tmp/speed224.md          # the speed table
    python bench/explain_224.py --memory --markdown /tmp/mem224.md   # the memory table
    python bench/explain_224.py --batch 1 --repeats 1 --peer-repeats 1 --models resnet50  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam draws progress bars

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_name, package_version  # noqa: E402

import explain  # noqa: E402
from explain.measures.agreement import pearson  # noqa: E402
from lit_modules.backbones import TorchvisionBackbone, build_backbone  # noqa: E402

MODELS = {"resnet50": "tv:resnet50", "vit_b_16": "tv:vit_b_16"}
NUM_CLASSES = 1000
SIZE = 224
TOP = 10  # classes an image in work (b)
CAPTUM_VIT = (
    "captum's LayerGradCam averages the layer's gradient over every dimension after the "
    "second and has no reshape hook: a ViT token layer [B, 197, 768] would be read as 197 "
    "channels of a 768-long signal, not 768 channels on a 14x14 grid, so its maps would "
    "not be Grad-CAM"
)


def median_time(fn: Callable[[], object], repeats: int, warmup: int) -> tuple[float, list[float]]:
    """Median wall time of ``repeats`` calls after ``warmup`` untimed ones, and all the times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def build(key: str) -> TorchvisionBackbone:
    """A model of :data:`MODELS` with random weights (seed 0), eval mode, 1,000 classes."""
    torch.manual_seed(0)
    model = build_backbone(MODELS[key], num_classes=NUM_CLASSES).eval()
    # torchvision zero-initialises ViT's head, and at 1,000 classes the backbone keeps the
    # model's own head: every logit would be 0 and every gradient below it too. Give it
    # PyTorch's default Linear init, as the backbone does for any other class count.
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    if not bool(head.weight.any()):
        head.reset_parameters()
    return model


def vit_tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's documented ViT reshape: ``[B, 1 + 196, D]`` -> ``[B, D, 14, 14]``."""
    b, n, d = tokens.shape
    side = int(round((n - 1) ** 0.5))
    return tokens[:, 1:, :].reshape(b, side, side, d).permute(0, 3, 1, 2)


def peer_layer(model: TorchvisionBackbone, key: str) -> nn.Module:
    """The module the peers hook, picked as a user would; checked to be our default layer."""
    layer = model.net.layer4 if key == "resnet50" else model.net.encoder.layers[-1].ln_1
    if model.get_submodule(model.default_layer) is not layer:
        raise SystemExit(f"{key}: the peers' layer is not the declared {model.default_layer}")
    return layer


def load() -> str:
    """The 1-, 5- and 15-minute load averages, as ``uptime`` prints them."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    """Pearson r per map: mean and min over the maps where both are non-constant."""
    r = pearson(ours.flatten(0, -3), theirs.flatten(0, -3))
    ok = r[torch.isfinite(r)]
    constant = int(r.numel() - ok.numel())
    if not ok.numel():
        return f"all {r.numel()} maps constant"
    text = f"{float(ok.mean()):.6f} / {float(ok.min()):.6f}"
    if constant:
        text += f" ({constant} of {r.numel()} constant, skipped)"
    return text


@dataclass
class Row:
    model: str
    work: str
    ours: float
    peer: str
    calls: str
    peer_time: float
    timing: str
    r: str


# -- speed ---------------------------------------------------------------------------------


def speed(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """Time work (a) and (b) for each model; returns the rows and per-model notes."""
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    x = torch.randn(args.batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    rows: list[Row] = []
    notes: list[str] = []
    for key in args.models:
        say(f"{key}: start, load {load()}")
        model_rows, model_notes = speed_model(key, x, args, say)
        rows += model_rows
        notes += model_notes
        say(f"{key}: done, load {load()}")
    return rows, notes


def speed_model(
    key: str, x: torch.Tensor, args: argparse.Namespace, say: Callable[[str], None]
) -> tuple[list[Row], list[str]]:
    """Work (a) and (b) on one model, ours and each peer that takes its layer."""
    try:
        from captum.attr import LayerAttribution, LayerGradCam
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as exc:
        raise SystemExit(f"the peers are in the dev extra (pip install -e '.[dev]'): {exc}") from exc
    warnings.filterwarnings("ignore", module="captum")

    model = build(key)
    layer = peer_layer(model, key)
    with torch.no_grad():
        logits = model(x)
    top = logits.topk(TOP, dim=1).indices  # [B, 10], best first
    top1 = top[:, 0]
    reshape = vit_tokens_to_map if key == "vit_b_16" else None
    rows: list[Row] = []
    notes: list[str] = []

    def ours_a() -> torch.Tensor:
        return explain.run(model, x, "gradcam", targets=top1)

    def ours_b() -> torch.Tensor:
        return explain.run(model, x, "gradcam", targets=top)

    pgc = GradCAM(model=model, target_layers=[layer], reshape_transform=reshape)

    def pgc_call(classes: torch.Tensor) -> torch.Tensor:
        targets = [ClassifierOutputTarget(int(c)) for c in classes]
        return torch.from_numpy(pgc(input_tensor=x, targets=targets))

    def pgc_b() -> torch.Tensor:
        # One call a class rank: call k explains each image's k-th top class.
        return torch.stack([pgc_call(top[:, k]) for k in range(TOP)], dim=1)

    peers: list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor]]] = [
        ("pytorch-grad-cam GradCAM", lambda: pgc_call(top1), pgc_b)
    ]
    if key == "resnet50":
        lgc = LayerGradCam(model, layer)

        def captum_call(classes: torch.Tensor) -> torch.Tensor:
            a = lgc.attribute(x, target=classes.tolist(), relu_attributions=True)
            up = LayerAttribution.interpolate(a, (SIZE, SIZE), interpolate_mode="bilinear")
            return up[:, 0].detach()

        def captum_b() -> torch.Tensor:
            return torch.stack([captum_call(top[:, k]) for k in range(TOP)], dim=1)

        peers.append(("captum LayerGradCam", lambda: captum_call(top1), captum_b))
    else:
        notes.append(f"{key}: captum LayerGradCam not run: {CAPTUM_VIT}.")

    if args.interleave:
        rows += interleaved(key, args, say, [
            (f"(a) top class, {args.batch} images", "1", ours_a,
             [(n, a) for n, a, _ in peers], args.repeats),
            (f"(b) top {TOP} classes, {args.batch} images", f"{TOP} (one a class)", ours_b,
             [(n, b) for n, _, b in peers], args.peer_b_repeats),
        ])
        pgc.activations_and_grads.release()
        return rows, notes

    # (a) one target an image: the same work for all (one forward, one backward).
    maps_a = ours_a()  # also the warm-up
    t_a, _ = median_time(ours_a, args.repeats, 0)
    say(f"{key} (a) ours {t_a:.3f}s")
    for name, call_a, _ in peers:
        theirs = call_a()  # also the warm-up
        t_peer, _ = median_time(call_a, args.peer_repeats, 0)
        say(f"{key} (a) {name} {t_peer:.3f}s")
        rows.append(Row(key, f"(a) top class, {args.batch} images", t_a, name, "1",
                        t_peer, f"median of {args.repeats} / {args.peer_repeats}",
                        agreement(maps_a, theirs)))

    # (b) ten targets an image: one call here, ten calls of each peer.
    maps_b = ours_b()
    t_b, _ = median_time(ours_b, args.repeats, 0)
    say(f"{key} (b) ours {t_b:.3f}s")
    for name, _, call_b in peers:
        # The peer was warmed up in (a), so every run is timed, the first included: ten
        # calls of a peer are the slowest part of this benchmark.
        times = []
        for _ in range(args.peer_b_repeats):
            start = time.perf_counter()
            theirs = call_b()
            times.append(time.perf_counter() - start)
        t_peer = statistics.median(times)
        say(f"{key} (b) {name} {t_peer:.3f}s ({', '.join(f'{t:.2f}' for t in times)})")
        rows.append(Row(key, f"(b) top {TOP} classes, {args.batch} images", t_b, name,
                        f"{TOP} (one a class)", t_peer,
                        f"median of {args.repeats} / {args.peer_b_repeats}",
                        agreement(maps_b, theirs)))
    pgc.activations_and_grads.release()
    return rows, notes


def interleaved(
    key: str,
    args: argparse.Namespace,
    say: Callable[[str], None],
    works: list[tuple[str, str, Callable[[], torch.Tensor],
                      list[tuple[str, Callable[[], torch.Tensor]]], int]],
) -> list[Row]:
    """Rounds of (engine, each peer), one after the other, for each work.

    On a machine shared with a job whose load comes and goes, timing the engine's runs as
    a block and then the peer's can put them under different loads; alternating them puts
    each round's engine and peer runs seconds apart. The ratio is the median of the
    rounds' own ratios. Every call is warmed up once first (and checked for agreement).
    """
    rows: list[Row] = []
    for work, calls, ours, peers, rounds in works:
        maps = ours()
        checks = {name: agreement(maps, call()) for name, call in peers}
        t_ours: list[float] = []
        t_peer: dict[str, list[float]] = {name: [] for name, _ in peers}
        for _ in range(rounds):
            for name, call in [("ours", ours), *peers]:
                start = time.perf_counter()
                call()
                (t_ours if name == "ours" else t_peer[name]).append(time.perf_counter() - start)
            say(f"{key} {work}: ours {t_ours[-1]:.2f}s, "
                + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in t_peer.items()))
        for name, times in t_peer.items():
            ratio = statistics.median(p / o for p, o in zip(times, t_ours, strict=True))
            rows.append(Row(key, work, statistics.median(t_ours), name, calls,
                            statistics.median(times),
                            f"interleaved, median of {rounds} rounds; ratio of medians "
                            f"{statistics.median(times) / statistics.median(t_ours):.2f}x, "
                            f"median of round ratios {ratio:.2f}x; engine "
                            + "/".join(f"{t:.2f}" for t in t_ours) + " s, peer "
                            + "/".join(f"{t:.2f}" for t in times) + " s",
                            checks[name]))
    return rows


def render_speed(rows: list[Row]) -> str:
    lines = [
        "| model | work | this engine (1 call) | peer | peer calls | peer time | ratio "
        "| timing (engine / peer) | Pearson r per map, mean / min |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        ratio = r.peer_time / r.ours
        lines.append(
            f"| {r.model} | {r.work} | {r.ours:.2f} s | {r.peer} | {r.calls} | "
            f"{r.peer_time:.2f} s | {ratio:.2f}x | {r.timing} | {r.r} |"
        )
    return "\n".join(lines)


# -- memory --------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(key: str, chunk: int | None, batch: int) -> None:
    """Run in a fresh process: one ``targets=None`` Grad-CAM; print its figures as JSON."""
    model = build(key)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x)  # what any use of the model costs: the baseline the call is compared with
    before = peak_rss_mib()
    start = time.perf_counter()
    maps = explain.run(model, x, "gradcam", class_chunk=chunk)
    seconds = time.perf_counter() - start
    result = {
        "model": key,
        "chunk": chunk if chunk is not None else explain.class_chunk_for(x),
        "chunk_given": chunk is not None,
        "shape": list(maps.shape),
        "output_mib": maps.numel() * maps.element_size() / 2**20,
        "peak_before_mib": before,
        "peak_mib": peak_rss_mib(),
        "seconds": seconds,
    }
    print("RESULT " + json.dumps(result), flush=True)


def memory(args: argparse.Namespace) -> list[dict]:
    """Each (model, chunk) in a fresh subprocess, so every peak is that setting's own."""
    results = []
    for key in args.models:
        for chunk in args.chunks:
            cmd = [sys.executable, __file__, "--memory-child", key, "--batch", str(args.batch),
                   "--threads", str(args.threads)]
            if chunk > 0:
                cmd += ["--chunk", str(chunk)]
            load0 = load()
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            load1 = load()
            line = next((s for s in out.stdout.splitlines() if s.startswith("RESULT ")), None)
            if out.returncode or line is None:
                print(out.stdout, out.stderr, file=sys.stderr)
                raise SystemExit(f"{key} chunk {chunk}: the child failed ({out.returncode})")
            result = json.loads(line.removeprefix("RESULT "))
            result["load"] = f"{load0} -> {load1}"
            print(result, flush=True)
            results.append(result)
    return results


def render_memory(results: list[dict]) -> str:
    lines = [
        "| model | class chunk | output `[B, K, H, W]` float32 | output size | peak RSS before "
        "the call (model + one forward) | peak RSS of the call | peak minus output | time "
        "| load average (1/5/15 min) before -> after |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        chunk = f"{r['chunk']}" + ("" if r["chunk_given"] else " (default)")
        lines.append(
            f"| {r['model']} | {chunk} | {r['shape']} | {r['output_mib']:.0f} MiB | "
            f"{r['peak_before_mib']:.0f} MiB | {r['peak_mib']:.0f} MiB | "
            f"{r['peak_mib'] - r['output_mib']:.0f} MiB | {r['seconds']:.1f} s | {r['load']} |"
        )
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the engine")
    parser.add_argument("--peer-repeats", type=int, default=3,
                        help="timed runs of a peer's single call, after one warm-up")
    parser.add_argument("--peer-b-repeats", type=int, default=1,
                        help="timed runs of a peer's ten calls (warmed up by the single call)")
    parser.add_argument("--interleave", action="store_true",
                        help="alternate engine and peer runs in rounds (for a shared machine); "
                        "(a) gets --repeats rounds, (b) --peer-b-repeats")
    parser.add_argument("--memory", action="store_true",
                        help="measure peak RSS of targets=None instead of speed")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 5],
                        help="class chunks for --memory (0: the engine's default)")
    parser.add_argument("--memory-child", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.chunk, args.batch)
        return

    started = time.perf_counter()
    load0 = load()
    notes: list[str] = []
    if args.memory:
        table = render_memory(memory(args))
    else:
        rows, notes = speed(args)
        table = render_speed(rows)
    meta = {
        "command": "python bench/explain_224.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} torch threads",
        "load average (1/5/15 min)": f"{load0} at start, {load()} at end",
        "versions": f"torch {torch.__version__}, grad-cam {package_version('grad-cam')}, "
        f"captum {package_version('captum')}, python {platform.python_version()}",
        "inputs": f"{args.batch} x 3 x {SIZE} x {SIZE}, torch.randn seeded 1; random weights "
        "(seed 0), eval mode, float32, 1,000 classes",
        "total": f"{time.perf_counter() - started:.0f} s",
    }
    text = "\n".join([table, "", *[f"- {k}: {v}" for k, v in meta.items()],
                      *[f"- {n}" for n in notes]])
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
