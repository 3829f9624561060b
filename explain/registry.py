"""Name registry for explanation methods: one name per method, everywhere.

The registry key is also the TensorBoard tag part, the report key and the test id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    """What the rest of the project needs to know about a registered method."""

    name: str
    fn: Callable
    family: str  # "cam", "gradient" or "perturbation"
    needs_layer: bool  # reads a conv layer's activations
    class_specific: bool = True  # False for class-agnostic maps (eigencam)
    stochastic: bool = False  # draws random numbers: maps repeat only under the same seed


_METHODS: dict[str, MethodInfo] = {}


def register(
    name: str, *, family: str, needs_layer: bool, class_specific: bool = True,
    stochastic: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator that registers an explanation function under ``name``.

    The function's signature is ``fn(ctx, **options) -> Tensor[B, C, H, W]`` where ``ctx``
    is an :class:`explain.base.ExplainContext`; see :func:`explain.run`.
    """
    if family not in ("cam", "gradient", "perturbation"):
        raise ValueError(f"unknown family {family!r}")

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
