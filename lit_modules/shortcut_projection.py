"""Remove a shortcut without training: project its direction out of the head's input.

Projective Class Artifact Compensation (P-ClArC, Anders et al. 2022) in the form this
project can ship as a plain checkpoint. For each shortcut (a class and a box):

1. the head's input features (the input of the model's last ``nn.Linear``: the pooled
   features of a CNN, the class token of a ViT) are taken on images with the box's content
   pasted in (the cue present) and on the same images with the box covered by another
   image's content at the same place (the cue absent);
2. the cue's direction ``v`` is the difference of the two means, normalised (the
   "pattern" direction, which Pahde et al. 2023 found to localise artifacts better than a
   classifier's weight vector); ``z`` is the mean projection of the cue-free features on it;
3. every feature vector's component along ``v`` is set to ``z``: ``h' = h - (h.v - z) v``.

Step 3 is affine, so it folds into the last layer: with the directions orthonormal
(``V``, one column per shortcut) ``W' = W (I - V V^T)`` and ``b' = b + W V z``. The corrected
model is the same architecture with a new head: a normal checkpoint that ``audit.py``
audits, which fine-tuning counter-measures (``lit_modules.shortcut_removal``) can be compared
against. It takes a few forward passes.

What it cannot do: the cue's effect before the head (a cue read by early layers that
changes many features non-linearly) is only removed where it shows as one direction of
the features; a class the model never learned is not learned. ``bench/remove_shortcut.py``
measures both against fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .shortcut_removal import Remover, ShortcutBox, ShortcutRemoval


@dataclass(frozen=True)
class Projection:
    """The directions projected out (``[D, S]`` orthonormal columns) and their cue-free
    levels (``[S]``), for the head ``layer`` (a module name)."""

    layer: str
    directions: Tensor
    levels: Tensor


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last ``nn.Linear`` (its classification head) and its name."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear head to fold a projection into")
    return linears[-1]


@contextmanager
def recording_head_inputs(model: nn.Module) -> Iterator[tuple[nn.Linear, list[Tensor]]]:
    """Within the block, every input of ``model``'s last ``nn.Linear`` is appended to the
    yielded list (as the head received it); yields the head too. Run the model eagerly
    inside: a compiled graph may skip the hook."""
    _, head = last_linear(model)
    seen: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        yield head, seen
    finally:
        handle.remove()


@torch.no_grad()
def head_inputs(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """The inputs of the model's last ``nn.Linear`` for ``images``, ``[N, D]`` float32."""
    with recording_head_inputs(model) as (_, seen):
        for lo in range(0, len(images), batch_size):
            model(images[lo:lo + batch_size])
    return torch.cat([t.detach().flatten(1).float() for t in seen])


def fit_projection(model: nn.Module, images: Tensor, labels: Tensor,
                   shortcuts: Sequence[ShortcutBox], pixels: dict[int, Tensor] | None = None,
                   seed: int = 0) -> Projection:
    """The cue directions of ``shortcuts`` in ``model``'s head input, from ``images``.

    ``images``/``labels``: images of several classes in the model's input space (a
    validation split: no test image should shape the fix). ``pixels``: class -> box
    contents ``[n, 3, h, w]`` (the file ``audit.py`` writes, see
    :func:`lit_modules.shortcut_removal.load_pixels`); without them the box is cut from the
    class's own images among ``images``.
    """
    if len(images) != len(labels) or len(images) < 2:
        raise ValueError(f"need at least 2 images with a label each, got {len(images)} "
                         f"images and {len(labels)} labels")
    model.eval()
    g = torch.Generator().manual_seed(seed)
    directions, levels = [], []
    for s in shortcuts:
        one = Remover(ShortcutRemoval(shortcuts=[s], seed=seed),
                      {} if pixels is None or s.class_index not in pixels
                      else {s.class_index: pixels[s.class_index]})
        # The cue present: pasted onto every image of another class. Absent: those same
        # images as they are, and the class's own images with the box covered.
        present = one.swap(images, labels, g, p_paste=1.0, p_cover=0.0)
        absent = one.swap(images, labels, g, p_paste=0.0, p_cover=1.0)
        others = labels.cpu() != s.class_index
        if not others.any():
            raise ValueError(f"no image of another class than {s.describe()} to paste onto")
        h_with = head_inputs(model, present[others.to(present.device)])
        h_without = head_inputs(model, absent)
        v = h_with.mean(0) - h_without.mean(0)
        directions.append(v)
        levels.append(h_without)
    # Orthonormal columns (several shortcuts at once); the levels are re-read on them.
    basis, _ = torch.linalg.qr(torch.stack(directions, 1))
    # QR can flip a column's sign; a level is a projection, so it follows the column.
    z = torch.stack([(h @ basis[:, i]).mean() for i, h in enumerate(levels)])
    name, _ = last_linear(model)
    return Projection(name, basis, z)


@torch.no_grad()
def fold_projection(model: nn.Module, projection: Projection) -> nn.Module:
    """Fold ``projection`` into ``model``'s head in place (and return the model):
    ``W' = W (I - V V^T)``, ``b' = b + W V z``. The model's outputs then equal those of
    projecting the head's input (``h - V (V^T h - z)``) before the old head."""
    name, head = last_linear(model)
    if name != projection.layer:
        raise ValueError(f"the projection was fitted on layer {projection.layer!r}, the "
                         f"model's head is {name!r}")
    v = projection.directions.to(head.weight)
    z = projection.levels.to(head.weight)
    w = head.weight.clone()
    head.weight.copy_(w - (w @ v) @ v.T)
    shift = w @ (v @ z)
    if head.bias is None:
        head.bias = nn.Parameter(shift)
    else:
        head.bias.add_(shift)
    return model
