"""A spurious cue: a small coloured patch stamped on chosen classes.

A model that learns the patch instead of the object is what the monitor and the audit must
catch. The patch is stamped on the unnormalised ``[0, 1]`` image after augmentation (so it
stays at a fixed place in the image, which is what makes it a shortcut) and before
normalisation.

Whether an item carries the cue depends only on ``(seed, split, index)``, drawn from a
private ``torch.Generator``: the global RNG stream is never touched, so the same items carry
the cue in every epoch, in every worker and after a resume.

``CueConfig`` is the option as written in a config (``data.init_args.cue``, one typed
object taken by every datamodule); ``SpuriousCue`` is the same fields with the behaviour,
what a datamodule exposes as ``dm.cue``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ..options import options_from

#: Where the patch sits (a ``Literal``: a wrong value fails when the config is parsed).
CuePosition = Literal["top_left", "top_right", "bottom_left", "bottom_right", "center", "random"]
POSITIONS: tuple[str, ...] = get_args(CuePosition)
SPLITS = ("train", "val", "test")

_COLOR_NAMES = {
    (1.0, 0.0, 1.0): "magenta",
    (1.0, 0.0, 0.0): "red",
    (0.0, 1.0, 0.0): "green",
    (0.0, 0.0, 1.0): "blue",
    (1.0, 1.0, 0.0): "yellow",
    (0.0, 1.0, 1.0): "cyan",
    (1.0, 1.0, 1.0): "white",
    (0.0, 0.0, 0.0): "black",
}


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, stable across processes and platforms.

    Python's ``hash()`` is salted per process, so a cryptographic digest is used instead.
    """
    text = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def check_split(split: str) -> str:
    """Return ``split`` if it is one of ``train``/``val``/``test``, else raise."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    return split


# The flat datamodule options of earlier versions, and the field each one became. Kept
# only so that a new config still using them fails with the new spelling (``train.py``)
# and a config saved by an old run can still be read back (``nest_flat_keys``).
FLAT_KEYS = {
    "cue_classes": "classes",
    "cue_size": "size",
    "cue_color": "color",
    "cue_position": "position",
    "cue_p_train": "p_train",
    "cue_p_eval": "p_eval",
    "cue_seed": "seed",
}


def _yaml_value(value: object) -> str:
    """``value`` as it would be written in a YAML flow mapping (``...`` when unknown)."""
    if value is Ellipsis:
        return "..."
    if isinstance(value, str):
        return value
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def flat_keys_hint(values: Mapping[str, object]) -> str:
    """How to write the old flat options in ``values`` today, with their values.

    ``values`` maps old keys (``cue_classes``, ...) to their values, or to ``...`` where
    unknown. For example ``{"cue_classes": [0, 1]}`` gives "cue_classes is now
    cue.classes: write `cue: {classes: [0, 1]}` under data.init_args ...".
    """
    keys = [k for k in FLAT_KEYS if k in values]
    if not keys:
        raise ValueError(f"none of {sorted(values)} is an old flat cue option")
    old = ", ".join(keys)
    new = ", ".join(f"cue.{FLAT_KEYS[k]}" for k in keys)
    fields = ", ".join(f"{FLAT_KEYS[k]}: {_yaml_value(values[k])}" for k in keys)
    flags = " ".join(
        f"--data.init_args.cue.{FLAT_KEYS[k]} {_yaml_value(values[k]).replace(' ', '')}"
        for k in keys
    )
    return (
        f"{old} {'is' if len(keys) == 1 else 'are'} now {new} (the cue options are one "
        f"`cue:` object): write `cue: {{{fields}}}` under data.init_args in a YAML config, "
        f"or {flags} on the command line"
    )


def nest_flat_keys(init_args: Mapping[str, Any]) -> dict[str, Any]:
    """A datamodule's ``init_args`` with old flat cue options turned into ``cue``.

    For reading configs that runs saved before ``cue:`` existed (an audit of an old
    checkpoint), not for new configs, which must use ``cue:``. ``cue_classes: null`` (or
    no ``cue_classes``) meant no cue, whatever the other flat options said.
    """
    out = {k: v for k, v in init_args.items() if k not in FLAT_KEYS}
    flat = {FLAT_KEYS[k]: v for k, v in init_args.items() if k in FLAT_KEYS}
    if flat:
        if "cue" in init_args:
            raise ValueError(f"both cue and the old flat options {sorted(flat)} are given")
        out["cue"] = flat if flat.get("classes") is not None else None
    return out


@dataclass(frozen=True)
class CueConfig:
    """The spurious-cue option of every datamodule (``data.init_args.cue`` in a config).

    Validated on construction, so a bad value fails when the config is parsed, before any
    data is built.

    Args:
        classes: class indices whose items may carry the cue (at least one).
        size: side of the square patch in pixels.
        color: RGB colour of the patch in ``[0, 1]`` (before normalisation).
        position: ``top_left``, ``top_right``, ``bottom_left``, ``bottom_right``,
            ``center`` or ``random`` (a seeded location per item).
        p_train: probability that a train item of a cue class carries the patch.
        p_eval: the same for validation and test items.
        seed: seed of the per-item draws (presence and, if random, location).
    """

    classes: list[int]
    size: int = 4
    color: tuple[float, float, float] = (1.0, 0.0, 1.0)
    position: CuePosition = "top_left"
    p_train: float = 0.95
    p_eval: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        classes = list(self.classes)
        if not classes:
            raise ValueError("a cue needs at least one class in cue.classes (or no cue at all)")
        if any(
            isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0 for c in classes
        ):
            raise ValueError(f"cue classes must be non-negative ints, got {classes}")
        size = self.size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"cue size must be a positive int (pixels), got {size!r}")
        color = tuple(float(c) for c in self.color)
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise ValueError(f"cue color must be 3 values in [0, 1] (RGB), got {color}")
        if self.position not in POSITIONS:
            raise ValueError(
                f"unknown cue position {self.position!r}; choose one of {list(POSITIONS)}"
            )
        for name in ("p_train", "p_eval"):
            p = getattr(self, name)
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"cue {name} must be a probability in [0, 1], got {p}")
        # Normalised in place (the dataclass is frozen, hence object.__setattr__) so that
        # equal settings compare and print equal whatever sequence types were passed.
        for name, value in (
            ("classes", sorted({int(c) for c in classes})),
            ("size", int(size)),
            ("color", color),
            ("p_train", float(self.p_train)),
            ("p_eval", float(self.p_eval)),
            ("seed", int(self.seed)),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def coerce(cls, value: CueConfig | Mapping[str, Any] | None) -> CueConfig | None:
        """A ``CueConfig`` from itself, a plain mapping (a config read back with
        ``yaml.safe_load``, as ``audit.py`` does) or None; the error lists the fields."""
        return options_from(cls, value, "cue")

    def as_dict(self) -> dict[str, object]:
        """The fields as primitives (``color`` a tuple), e.g. for a report or a config."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class SpuriousCue(CueConfig):
    """A ``size`` x ``size`` patch of one colour, stamped on items of ``classes``.

    The behaviour behind a :class:`CueConfig` (same fields, same validation): which items
    carry the patch, where it goes, stamping and masks. Datamodules expose one as ``cue``.
    """

    @classmethod
    def from_config(cls, config: CueConfig) -> SpuriousCue:
        """The cue a ``CueConfig`` describes."""
        return cls(**config.as_dict())

    def describe(self) -> str:
        """One line for humans, e.g. ``4x4 magenta patch at top_left on classes [0, 1] ...``."""
        name = _COLOR_NAMES.get(self.color) or "rgb({:.2f}, {:.2f}, {:.2f})".format(*self.color)
        return (
            f"{self.size}x{self.size} {name} patch at {self.position} on classes "
            f"{self.classes} (p={self.p_train:g} train, {self.p_eval:g} eval)"
        )

    def check_fits(self, h: int, w: int) -> None:
        """Raise a ``ValueError`` if the patch does not fit an ``h`` x ``w`` image."""
        if self.size > min(h, w):
            raise ValueError(f"cue size {self.size} does not fit a {h}x{w} image")

    def probability(self, split: str) -> float:
        """The stamping probability for a cue class in ``split``."""
        return self.p_train if check_split(split) == "train" else self.p_eval

    def _generator(self, split: str, index: int) -> torch.Generator:
        """The private generator of one item; its first draw decides presence."""
        return torch.Generator().manual_seed(derive_seed("cue", self.seed, split, int(index)))

    def has_cue(self, label: int | Tensor, index: int | Tensor, split: str) -> bool:
        """Whether item ``index`` of ``split`` with class ``label`` carries the cue."""
        p = self.probability(split)
        if int(label) not in self.classes or p <= 0.0:
            return False
        # The draw does not depend on p, so the items stamped at a lower p are a subset of
        # those stamped at a higher one: sweeping p changes only how many carry the cue.
        u = torch.rand((), generator=self._generator(split, int(index))).item()
        return u < p

    def corner(
        self, h: int, w: int, index: int | Tensor | None = None, split: str = "train"
    ) -> tuple[int, int]:
        """Top-left pixel ``(top, left)`` of the patch in an ``h`` x ``w`` image."""
        self.check_fits(h, w)
        s = self.size
        fixed = {
            "top_left": (0, 0),
            "top_right": (0, w - s),
            "bottom_left": (h - s, 0),
            "bottom_right": (h - s, w - s),
            "center": ((h - s) // 2, (w - s) // 2),
        }
        if self.position in fixed:
            return fixed[self.position]
        if index is None:
            raise ValueError("a cue at position 'random' needs the item index to place the patch")
        g = self._generator(check_split(split), int(index))
        torch.rand((), generator=g)  # skip the presence draw, so location and presence differ
        top = int(torch.randint(0, h - s + 1, (), generator=g))
        left = int(torch.randint(0, w - s + 1, (), generator=g))
        return top, left

    def mask(
        self, h: int, w: int, index: int | Tensor | None = None, split: str = "train"
    ) -> Tensor:
        """Boolean ``[h, w]`` mask of where the patch goes (for item ``index`` if random)."""
        top, left = self.corner(h, w, index, split)
        out = torch.zeros(h, w, dtype=torch.bool)
        out[top : top + self.size, left : left + self.size] = True
        return out

    def _paint(self, image01: Tensor, top: int, left: int) -> None:
        """Write the colour into ``image01[..., 3, H, W]`` in place."""
        color = torch.tensor(self.color, dtype=image01.dtype, device=image01.device)
        s = self.size
        image01[..., top : top + s, left : left + s] = color.view(3, 1, 1)

    def apply(
        self, image01: Tensor, label: int | Tensor, index: int | Tensor, split: str
    ) -> tuple[Tensor, Tensor]:
        """Stamp one ``[3, H, W]`` image in ``[0, 1]`` if this item carries the cue.

        Returns the (possibly new) image and the boolean ``[H, W]`` cue mask (all False when
        nothing was stamped). The input tensor is never modified.
        """
        h, w = image01.shape[-2:]
        if not self.has_cue(label, index, split):
            return image01, torch.zeros(h, w, dtype=torch.bool)
        top, left = self.corner(h, w, index, split)
        image01 = image01.clone()
        self._paint(image01, top, left)
        return image01, self.mask(h, w, index, split)

    def stamp(
        self, images01: Tensor, indices: Tensor | Sequence[int] | None = None, split: str = "test"
    ) -> tuple[Tensor, Tensor]:
        """Stamp every image of a ``[B, 3, H, W]`` batch, whatever its class.

        Meant for counterfactual tests (does the prediction follow the patch?). For a
        ``random`` position, ``indices`` and ``split`` place each patch where that item's
        patch would go (default indices ``0..B-1``). Returns new images and ``[B, H, W]``
        masks; the input is not modified.
        """
        b, _, h, w = images01.shape
        if indices is None:
            indices = range(b)
        indices = [int(i) for i in indices]
        if len(indices) != b:
            raise ValueError(f"got {len(indices)} indices for a batch of {b} images")
        out = images01.clone()
        masks = torch.zeros(b, h, w, dtype=torch.bool, device=images01.device)
        for i, index in enumerate(indices):
            top, left = self.corner(h, w, index, split)
            self._paint(out[i], top, left)
            masks[i, top : top + self.size, left : left + self.size] = True
        return out, masks
