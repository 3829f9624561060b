"""Sanity: cascading model-parameter randomisation (Adebayo et al. 2018)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from explain.base import find_split

from .agreement import pearson
from .inference import model_device
from .statistics import summarize


def average_ranks(x: Tensor) -> Tensor:
    """Ranks ``[N, D]`` of each row (0-based), ties sharing their average rank."""
    flat = x.detach().double().flatten(1)
    srt = flat.sort(1).values.contiguous()
    lo = torch.searchsorted(srt, flat.contiguous(), right=False)
    hi = torch.searchsorted(srt, flat.contiguous(), right=True)
    return (lo + hi - 1).double() / 2


def spearman(a: Tensor, b: Tensor, absolute: bool = True) -> Tensor:
    """Spearman rank correlation of paired maps ``[N, ...]`` (ties get average ranks).

    ``absolute`` ranks ``|map|`` (Adebayo et al.'s ABS variant), so a sign flip of a signed
    gradient map is not counted as a change. NaN where either map is constant.
    """
    if absolute:
        a, b = a.abs(), b.abs()
    return pearson(average_ranks(a), average_ranks(b))


def _varies(maps: Tensor) -> Tensor:
    flat = maps.flatten(1)
    return flat.amax(1) > flat.amin(1)


def cascade_steps(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The cascading-randomisation order: ``(step label, module names)``, head first.

    With a declared features/head split: the backbone's own order where it declares one
    (``cascade_blocks()``: ``(label, names)`` head first, names relative to the backbone;
    the torchvision backbones do), else the classifier, then the trunk's top-level blocks
    from the last to the first. Plain layers of a flat trunk (VGG) are grouped into stages
    of consecutive convolutions of the same width, each with the layers that follow it.
    Without a split: the model's top-level children with parameters, last first.
    """
    found = find_split(model)
    if found is None:
        children = [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
        return [(n, [n]) for n, _ in reversed(children)]
    backbone, prefix = found
    declared = getattr(backbone, "cascade_blocks", None)
    if callable(declared):  # the backbone knows its blocks (torchvision models: head, stages)
        return [(label, [prefix + n for n in names]) for label, names in declared()]
    steps: list[tuple[str, list[str]]] = []
    for name in ("classifier", "fc", "head_linear"):
        if isinstance(getattr(backbone, name, None), nn.Module):
            steps.append((name, [prefix + name]))
            break
    trunk = getattr(backbone, "trunk", None)
    if not isinstance(trunk, nn.Module):
        return steps
    blocks: list[tuple[str, list[str]]] = []
    stage: list[str] = []
    width: int | None = None
    for name, child in trunk.named_children():
        full = f"{prefix}trunk.{name}"
        if any(True for _ in child.children()):  # a container block (ResNet layerN)
            if stage:
                blocks.append(("", stage))
                stage, width = [], None
            blocks.append((name, [full]))
            continue
        if isinstance(child, nn.Conv2d):
            if stage and child.out_channels != width:
                blocks.append(("", stage))
                stage = []
            width = child.out_channels
        stage.append(full)
    if stage:
        blocks.append(("", stage))
    for label, names in reversed(blocks):
        has_params = any(
            any(True for _ in model.get_submodule(n).parameters()) for n in names
        )
        if not has_params:
            continue
        if not label:
            first, last = names[0].split(".")[-1], names[-1].split(".")[-1]
            label = f"trunk.{first}-{last}" if first != last else f"trunk.{first}"
        steps.append((label, names))
    return steps


def reinitialize(model: nn.Module, names: list[str], seed: int) -> None:
    """Re-initialise (``reset_parameters``) every submodule of the named modules, seeded.

    BatchNorm layers get their default affine parameters and fresh running statistics.
    The global RNG stream is left as it was.
    """
    device = model_device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name in names:
            for sub in model.get_submodule(name).modules():
                # nn.MultiheadAttention (ViT, Swin blocks) spells it with an underscore.
                reset = getattr(sub, "reset_parameters", None) or getattr(
                    sub, "_reset_parameters", None)
                if callable(reset):
                    reset()


def cascading_randomization(
    model: nn.Module,
    explain_fns: Mapping[str, Callable[[nn.Module], Tensor]],
    *,
    seed: int = 0,
    keep: int = 4,
    on_step: Callable[[str], None] | None = None,
    reference: Mapping[str, Tensor] | None = None,
) -> dict[str, object]:
    """Model-parameter randomisation test (Adebayo et al. 2018), cascading from the head.

    A deep copy of ``model`` has its modules re-initialised step by step (see
    :func:`cascade_steps`); after each step every function in ``explain_fns`` (a model ->
    maps ``[N, H, W]``) is re-run and compared with its maps on the trained model.
    ``model`` itself is not modified.

    A randomised map that is constant while the trained one is not counts as correlation
    0; a constant trained map gives NaN (nothing to compare). Returns ``steps`` (labels),
    ``spearman`` ``{method: [S, N]}``, ``seconds`` per method and ``maps``
    ``{method: [S + 1, keep, H, W]}`` (trained first) for figures. ``reference`` holds
    maps of the trained model already computed for some methods (not run again).
    """
    steps = cascade_steps(model)
    seconds = dict.fromkeys(explain_fns, 0.0)

    def timed(method: str, net: nn.Module) -> Tensor:
        t = time.perf_counter()
        maps = explain_fns[method](net).detach().float().cpu()
        seconds[method] += time.perf_counter() - t
        return maps

    known = dict(reference or {})
    reference = {m: known[m].detach().float().cpu() if m in known else timed(m, model)
                 for m in explain_fns}
    if on_step is not None:
        on_step("trained")
    copy_model = copy.deepcopy(model)
    corr: dict[str, list[Tensor]] = {m: [] for m in explain_fns}
    kept: dict[str, list[Tensor]] = {m: [r[:keep]] for m, r in reference.items()}
    for i, (label, names) in enumerate(steps):
        reinitialize(copy_model, names, seed + 1000 * (i + 1))
        for method in explain_fns:
            maps = timed(method, copy_model)
            rho = spearman(reference[method], maps)
            # A randomised map that went flat (e.g. all zero after a ReLU) shares no ranking
            # with a structured reference: count it as 0 rather than dropping the image.
            flat = maps.flatten(1).amax(1) == maps.flatten(1).amin(1)
            rho = torch.where(flat & _varies(reference[method]), torch.zeros_like(rho), rho)
            corr[method].append(rho)
            kept[method].append(maps[:keep])
        if on_step is not None:
            on_step(label)
    return {
        "steps": [label for label, _ in steps],
        "spearman": {m: torch.stack(v) if v else torch.empty(0) for m, v in corr.items()},
        "maps": {m: torch.stack(v) for m, v in kept.items()},
        "seconds": seconds,
    }


def sanity_summary(spearman_by_step: Tensor, threshold: float = 0.5) -> dict[str, Any]:
    """Per-step summaries of a method's ``[S, N]`` correlations and its verdict.

    The method is flagged when, with every block re-initialised (the last step), its
    maps still keep a mean rank correlation of at least ``threshold`` with the trained
    model's: they do not depend on what the model learned. ``uncertain`` marks a verdict
    whose 95% interval spans the threshold.
    """
    per_step = [summarize(r, "sanity_spearman") for r in spearman_by_step]
    final = per_step[-1] if per_step else summarize([], "sanity_spearman")
    mean = final["mean"]
    lo, hi = final["ci95"]
    finite = all(isinstance(v, float) and math.isfinite(v) for v in (mean, lo, hi))
    return {
        "spearman": per_step,
        "head": per_step[0] if per_step else final,
        "final": final,
        "flagged": bool(isinstance(mean, float) and math.isfinite(mean) and mean >= threshold),
        # The verdict could flip with another sample: the interval spans the threshold.
        "uncertain": bool(finite and lo < threshold <= hi),
    }
