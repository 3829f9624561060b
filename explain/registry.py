"""Name registry for explanation methods: one name per method, everywhere.

The registry key is also the TensorBoard tag part, the report key and the test id. Beside
each method's :class:`MethodInfo` (what it costs per class) lives the one rule for which
classes get explained (:data:`CLASS_SELECTION`): the monitor, the audit, its time estimate
and the records all ask these two, never a family name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Family = Literal["cam", "gradient", "perturbation"]


@dataclass(frozen=True)
class ClassCost:
    """How a method's work grows with the classes it explains (what callers plan by).

    Attributes:
        chunked: each class holds a backward pass's state, so explaining many classes goes
            chunk by chunk (memory bounded by the chunk; the forward is shared).
        backward_per_class: each class costs a backward through the whole network: ask it
            only for the classes that are read (the true and the predicted one), never for
            every class to slice two rows out.
        batched_forwards: the method scores perturbed copies of each image in batches of
            forwards; a larger batch (the caller's ``batch_size``) saves time.
        light: a forward and a backward through the head only: cheap enough to time on a
            whole calibration batch (the others are timed on two images).
    """

    chunked: bool
    backward_per_class: bool
    batched_forwards: bool
    light: bool


# Per family: CAMs backpropagate from each class to the layer only (the head); gradient
# methods through the whole network; perturbation methods score every class from each
# perturbed forward, and their per-class state is small.
FAMILY_COSTS: dict[str, ClassCost] = {
    "cam": ClassCost(chunked=True, backward_per_class=False, batched_forwards=False,
                     light=True),
    "gradient": ClassCost(chunked=True, backward_per_class=True, batched_forwards=False,
                          light=False),
    "perturbation": ClassCost(chunked=False, backward_per_class=False,
                              batched_forwards=True, light=False),
}


@dataclass(frozen=True)
class MethodInfo:
    """What the rest of the project needs to know about a registered method."""

    name: str
    fn: Callable
    family: Family
    needs_layer: bool  # reads a conv layer's activations
    class_specific: bool = True  # False for class-agnostic maps (eigencam)
    stochastic: bool = False  # draws random numbers: maps repeat only under the same seed

    @property
    def cost(self) -> ClassCost:
        """How this method's work grows with the classes explained."""
        return FAMILY_COSTS[self.family]


@dataclass(frozen=True)
class ClassSelection:
    """The ``auto`` rule for which classes get explained.

    Every class up to ``max_all`` classes, else only each image's true and predicted
    class: the maps of every class grow with the class count (64 images x 1,000 classes
    at 224 x 224 are 12 GB of float32) and so does the cost of per-class methods (saliency:
    one backward a class), while the grids and most scores read only those two classes.
    """

    max_all: int = 32

    def every_class(self, num_classes: int) -> bool:
        """Whether the rule explains every class of a ``num_classes``-class model."""
        return num_classes <= self.max_all

    def targets(self, labels: torch.Tensor, preds: torch.Tensor,
                num_classes: int) -> torch.Tensor | None:
        """``targets`` for :func:`explain.run`: None (every class), or ``[B, 2]``: each
        image's true and predicted class."""
        if self.every_class(num_classes):
            return None
        return torch.stack([torch.as_tensor(labels).long(), torch.as_tensor(preds).long()], 1)

    def describe(self, num_classes: int) -> str:
        """The rule's outcome for ``num_classes`` classes, in words (reports, records)."""
        if self.every_class(num_classes):
            return f"every class ({num_classes} classes, at most {self.max_all})"
        return (f"the true and the predicted class of each image only ({num_classes} "
                f"classes, more than {self.max_all})")


CLASS_SELECTION = ClassSelection()


_METHODS: dict[str, MethodInfo] = {}


def register(
    name: str, *, family: Family, needs_layer: bool, class_specific: bool = True,
    stochastic: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator that registers an explanation function under ``name``.

    The function's signature is ``fn(ctx, **options) -> Tensor[B, C, H, W]`` where ``ctx``
    is an :class:`explain.base.ExplainContext`; see :func:`explain.run`.
    """
    if family not in FAMILY_COSTS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILY_COSTS)}")

    def wrap(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"explanation method {name!r} is already registered")
        _METHODS[name] = MethodInfo(name, fn, family, needs_layer, class_specific, stochastic)
        return fn

    return wrap


def get(name: str) -> MethodInfo:
    """Look up a method; an unknown name raises an error listing every valid name."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(
            f"unknown explanation method {name!r}; available: {', '.join(available())}"
        ) from None


def available() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_METHODS)
