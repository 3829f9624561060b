"""Option records read back from plain mappings (a checkpoint's hyperparameters, a YAML file)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def options_from(cls: type[T], value: T | Mapping[str, Any] | None, name: str) -> T | None:
    """A ``cls`` dataclass from itself, a plain mapping or None.

    ``name`` is the option's name in a config: a value of another type, or a key that is
    not a field, is refused naming it and listing the fields.
    """
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a {cls.__name__}, a mapping or None, got {value!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; the fields are {fields}")
    return cls(**value)
