"""The engine's two hot paths, each timed the ways it could run.

Graph-free forwards (Score-CAM, occlusion and LIME run thousands): the model as given,
with eval BatchNorm folded into the convs (``explain.fold``), and folded with the input in
channels_last memory format (what ``ExplainContext.logits`` does on a CPU).

Input gradients for every class (integrated_gradients, saliency, guided backprop): one
forward of a chunk, then one vector-Jacobian product per class back to the input, either
as one batched backward (``is_grads_batched``, torch's vmap) or as a loop over the classes
on the same graph (``retain_graph``), each on the model as given and folded.

Every way is run on the same chunk, interleaved over ``--repeats`` rounds (median).

    python bench/engine_paths.py                   # resnet18_cifar, chunks of 32
    python bench/engine_paths.py --chunk 64 --backbone vgg16_gap
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from explain.fold import fold_batchnorm  # noqa: E402
from lit_modules.backbones import build_backbone  # noqa: E402

NUM_CLASSES = 10


def class_gradients(model: torch.nn.Module, x: torch.Tensor, batched: bool) -> torch.Tensor:
    """``[K, *x.shape]``: d logit_k / d x for every class, batched or looped."""
    z = x.clone().requires_grad_(True)
    out = model(z)
    eye = torch.eye(out.shape[1])[:, None, :].expand(-1, x.shape[0], -1)
    if batched:
        return torch.autograd.grad(out, z, grad_outputs=eye, is_grads_batched=True)[0]
    last = out.shape[1] - 1
    return torch.stack(
        [
            torch.autograd.grad(out, z, grad_outputs=e, retain_graph=k < last)[0]
            for k, e in enumerate(eye)
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18_cifar")
    parser.add_argument("--chunk", type=int, default=32, help="images in one forward")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_backbone(args.backbone, num_classes=NUM_CLASSES).eval()
    folded, pairs = fold_batchnorm(model)
    x = torch.randn(args.chunk, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def forward(net: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(inputs)

    forwards = {
        "as given": lambda: forward(model, x),
        "folded": lambda: forward(folded, x),
        "folded, channels_last": lambda: forward(folded, x_cl),
    }
    gradients = {
        "batched": lambda: class_gradients(model, x, batched=True),
        "loop": lambda: class_gradients(model, x, batched=False),
        "folded batched": lambda: class_gradients(folded, x, batched=True),
        "folded loop": lambda: class_gradients(folded, x, batched=False),
    }
    # Every way computes the same numbers (a check that equal work is timed, not a test).
    for ways in (forwards, gradients):
        reference = next(iter(ways.values()))()
        for name, fn in ways.items():
            err = float((fn() - reference).abs().max() / reference.abs().max())
            print(f"{name:22s} max difference: {err:.1e} of the largest value")

    print(
        f"\n{args.backbone}, {args.chunk} images, {NUM_CLASSES} classes, {pairs} conv-BN pairs "
        f"folded, {torch.get_num_threads()} threads, median of {args.repeats} interleaved runs:"
    )
    medians: dict[str, float] = {}
    for title, ways in (("forward, no graph", forwards), ("gradients of every class", gradients)):
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, fn in ways.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        first = None
        print(f"{title}:")
        for name, t in times.items():
            medians[name] = statistics.median(t)
            first = first or medians[name]
            print(f"  {name:22s} {medians[name]:7.3f} s   {first / medians[name]:4.2f}x the first")
    return medians


if __name__ == "__main__":
    main()
