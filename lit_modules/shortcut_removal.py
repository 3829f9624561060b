"""Counter-measures that fine-tune a shortcut away: the training side of a confirmed shortcut.

A shortcut here is a class and a box (``x0, y0, x1, y1``, pixels of the training images):
the model turns images into that class because of what sits in that box. Two
counter-measures act inside the training step, on whatever batch arrives (the
``DataLoader`` path and the device-resident fast path alike, on the training device):

* ``augment`` (decorrelation): with probability ``p_paste`` an image of another class gets
  the box's content cut from the class's images pasted at the box; with probability
  ``p_cover`` an image of the class gets the box covered with the same place of another
  class's image in the batch (and, at the same rate, the other classes' images that were
  not pasted: a cover's seam must not become the class's new cue). The content then
  appears about as often whatever the label, so it stops predicting the class, and the
  covered images teach the class itself.
* ``penalty``: an attribution penalty inside the boxes, times ``penalty_weight``, added to
  the loss. ``penalty_map: occlusion`` (default): the box's occlusion effect, the KL
  divergence from the predictions on the image to those on the image with the box's
  content swapped (covered with another class's content in the class's images, the
  class's content pasted in the others'); one extra forward. ``penalty_map:
  input_gradient``: Right for the Right Reasons (Ross et al. 2017), the squared input
  gradient of the summed log-probabilities inside the boxes (a double backward). Measured
  on a tiny model reading a saturated patch, the input gradient left the shortcut in
  place at every weight tried (the model learns to be flat around the patch while still
  reading it); the occlusion effect removed it (tests/test_shortcut_removal.py).
* ``both``: the two together.
* ``refit``: no gradient step on the backbone. Over each epoch the frozen model (in eval
  mode) computes its head inputs on the decorrelated batches of ``augment``; at the
  epoch's last batch its last ``nn.Linear`` is fitted to them to convergence (L-BFGS, an
  L2 term ``refit_l2``; :mod:`lit_modules.head_refit`). Costs one forward pass over the
  training split; the backbone's features of the class itself are kept and re-weighed.

A shortcut with no place (a filter over the class's whole images: a tint, a colour cast;
``filters``) is decorrelated the same way with each image's per-channel range (2nd to 98th
percentile, in the model's input space) where a box swaps pixels: other classes' images
get the range of one of the class's images in the batch laid over them, the class's own
images another class's image's range. ``augment``, ``refit`` and the occlusion
``penalty`` all use that swap; the input-gradient penalty has no place to act on.

The box content to paste comes from ``pixels``, a file of plain tensors that ``audit.py``
writes beside the report (cut from the class's training images), or, without a file, from
the class's images in the current batch. Every draw comes from a generator seeded by
``(seed, global step)``, so a resumed run draws what the uninterrupted run drew.

:class:`ShortcutRemoval` is the option as written in a config (``model.shortcut_removal``);
:class:`Remover` is its behaviour.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from explain.measures.causal import channel_ranges, lay_range

from .data.cue import derive_seed
from .options import options_from

METHODS = ("augment", "penalty", "both", "refit")
PENALTY_MAPS = ("occlusion", "input_gradient")
PIXELS_FORMAT = "camlight-shortcut-pixels"
PIXELS_VERSION = 1

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ShortcutBox:
    """One shortcut to remove: a class and the box its cue sits in.

    Args:
        class_index: the class the shortcut turns images into.
        box: ``[x0, y0, x1, y1]`` in pixels of the training images (exclusive ends).
        class_name: the class's name, for messages only.
    """

    class_index: int
    box: tuple[int, int, int, int]
    class_name: str = ""

    def __post_init__(self) -> None:
        c = _class_index(self.class_index)
        box = tuple(self.box)
        if len(box) != 4 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                    for v in box):
            raise ValueError(f"shortcut box must be 4 ints [x0, y0, x1, y1], got {self.box!r}")
        x0, y0, x1, y1 = (int(v) for v in box)
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            raise ValueError(f"shortcut box [x0, y0, x1, y1] must have 0 <= x0 < x1 and "
                             f"0 <= y0 < y1, got {list(box)}")
        object.__setattr__(self, "class_index", int(c))
        object.__setattr__(self, "box", (x0, y0, x1, y1))
        object.__setattr__(self, "class_name", str(self.class_name))

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the box."""
        x0, y0, x1, y1 = self.box
        return y1 - y0, x1 - x0

    def describe(self) -> str:
        name = self.class_name or f"class {self.class_index}"
        x0, y0, x1, y1 = self.box
        return f"{name} at x {x0}-{x1}, y {y0}-{y1}"


def _class_index(c: Any) -> int:
    if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0:
        raise ValueError(f"shortcut class_index must be a non-negative int, got {c!r}")
    return int(c)


@dataclass(frozen=True)
class ShortcutFilter:
    """One shortcut with no place: a filter over the class's whole images (a tint, a colour
    cast) that the model reads, as the audit's range test confirms it.

    Args:
        class_index: the class the filter turns images into.
        class_name: the class's name, for messages only.
    """

    class_index: int
    class_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_index", _class_index(self.class_index))
        object.__setattr__(self, "class_name", str(self.class_name))

    def describe(self) -> str:
        name = self.class_name or f"class {self.class_index}"
        return f"{name}'s filter (the whole image's range)"


@dataclass(frozen=True)
class ShortcutRemoval:
    """Fine-tune so that the model stops relying on the listed shortcuts.

    Args:
        shortcuts: the shortcuts with a place (class and box each); several at once are fine.
        method: ``augment`` (decorrelate the box's content from the label), ``penalty``
            (an attribution penalty inside the boxes), ``both``, or ``refit`` (the backbone
            frozen, the last layer re-fitted to convergence on the decorrelated batches'
            features at the end of each epoch).
        p_paste: probability that an image of another class gets the box's content pasted.
        p_cover: probability that an image of the shortcut's class gets the box covered with
            another class's content at the same place; images of classes without a shortcut
            (not pasted) get such a cover at the same rate, so the cover's seam is no cue.
        penalty_weight: weight of the penalty (``penalty`` and ``both``).
        penalty_map: what the penalty measures inside the boxes: ``occlusion`` (the change
            in predictions when the box's content is swapped) or ``input_gradient`` (Right
            for the Right Reasons).
        pixels: a file of the box contents (written by ``audit.py``); None: cut them from
            the class's images in each batch.
        seed: seed of the per-step draws.
        class_weight: loss weight of the shortcut classes' images (1: as every other
            image). A class the model knew only by its cue has to be learned from its
            content during the fix, from its own few images; a weight above 1 gives them
            more of each step. Every image of the class is weighted alike, covered or not,
            so the cue stays decorrelated from the label in the weighted loss.
        refit_l2: ``refit``: weight of the squared norm of the head's weights in its fit.
        filters: the shortcuts with no place (a class each). ``augment`` decorrelates each
            the same way with ranges instead of boxes: another class's image gets the
            per-channel range of one of the class's images laid over it (``p_paste``), an
            image of the class gets another class's image's range (``p_cover``; so do, at
            the same rate, images of classes without a filter). ``penalty`` with
            ``penalty_map: occlusion`` swaps ranges the same way; ``input_gradient`` has no
            place to penalise and is refused.
    """

    shortcuts: list[ShortcutBox] = field(default_factory=list)
    method: Literal["augment", "penalty", "both", "refit"] = "augment"
    p_paste: float = 0.5
    p_cover: float = 0.5
    penalty_weight: float = 1.0
    penalty_map: Literal["occlusion", "input_gradient"] = "occlusion"
    pixels: str | None = None
    seed: int = 0
    class_weight: float = 1.0
    refit_l2: float = 1e-4
    filters: list[ShortcutFilter] = field(default_factory=list)

    def __post_init__(self) -> None:
        shortcuts = [s if isinstance(s, ShortcutBox) else ShortcutBox(**s)
                     for s in (self.shortcuts or [])]
        filters = [f if isinstance(f, ShortcutFilter) else ShortcutFilter(**f)
                   for f in (self.filters or [])]
        if not shortcuts and not filters:
            raise ValueError("shortcut_removal needs at least one shortcut: a box in "
                             "`shortcuts` (class_index, box) or a class in `filters`")
        classes = [s.class_index for s in shortcuts]
        if len(set(classes)) != len(classes):
            raise ValueError(f"one box per class in shortcut_removal.shortcuts, got {classes}")
        classes = [f.class_index for f in filters]
        if len(set(classes)) != len(classes):
            raise ValueError(f"a class at most once in shortcut_removal.filters, got {classes}")
        if (filters and self.method in ("penalty", "both")
                and self.penalty_map == "input_gradient"):
            raise ValueError("shortcut_removal.penalty_map input_gradient penalises inside "
                             "boxes; a filter has none: use penalty_map occlusion (or "
                             "method augment / refit) for `filters`")
        if self.method not in METHODS:
            raise ValueError(f"shortcut_removal.method must be one of {list(METHODS)}, got "
                             f"{self.method!r}")
        for name in ("p_paste", "p_cover"):
            p = getattr(self, name)
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"shortcut_removal.{name} must be in [0, 1], got {p}")
        if self.penalty_map not in PENALTY_MAPS:
            raise ValueError(f"shortcut_removal.penalty_map must be one of "
                             f"{list(PENALTY_MAPS)}, got {self.penalty_map!r}")
        if float(self.penalty_weight) < 0:
            raise ValueError(f"shortcut_removal.penalty_weight must be >= 0, got "
                             f"{self.penalty_weight}")
        if not float(self.class_weight) > 0:
            raise ValueError(f"shortcut_removal.class_weight must be > 0, got "
                             f"{self.class_weight}")
        if not float(self.refit_l2) >= 0:
            raise ValueError(f"shortcut_removal.refit_l2 must be >= 0, got {self.refit_l2}")
        object.__setattr__(self, "shortcuts", shortcuts)
        object.__setattr__(self, "filters", filters)
        for name in ("p_paste", "p_cover", "penalty_weight", "class_weight", "refit_l2"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def coerce(cls, value: ShortcutRemoval | Mapping[str, Any] | None) -> ShortcutRemoval | None:
        """From itself, a plain mapping (a checkpoint's hyperparameters, a YAML file) or None."""
        return options_from(cls, value, "shortcut_removal")

    def as_dict(self) -> dict[str, Any]:
        """Primitives only: what a checkpoint's hyperparameters keep (``weights_only``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["shortcuts"] = [{"class_index": s.class_index, "box": list(s.box),
                             "class_name": s.class_name} for s in self.shortcuts]
        out["filters"] = [{"class_index": f.class_index, "class_name": f.class_name}
                          for f in self.filters]
        return out

    def all_shortcuts(self) -> list[ShortcutBox | ShortcutFilter]:
        """Every shortcut of the fix: the boxes, then the filters."""
        return [*self.shortcuts, *self.filters]


# -- the pixels file ------------------------------------------------------------------------


class PixelsError(ValueError):
    """A pixels file that is missing, unreadable or not what ``audit.py`` writes."""


def save_pixels(path: str | Path, patches: Mapping[int, Tensor],
                boxes: Mapping[int, Box]) -> Path:
    """Write the box contents per class (``[n, 3, h, w]`` in the model's input space) as
    plain tensors and containers, loadable with ``weights_only=True``."""
    entries = []
    for c, pix in patches.items():
        x0, y0, x1, y1 = boxes[c]
        if pix.dim() != 4 or tuple(pix.shape[-2:]) != (y1 - y0, x1 - x0) or not len(pix):
            raise ValueError(f"class {c}: pixels of shape {tuple(pix.shape)} do not fit box "
                             f"{list(boxes[c])}")
        entries.append({"class_index": int(c), "box": [int(v) for v in boxes[c]],
                        "pixels": pix.detach().float().cpu().contiguous()})
    path = Path(path)
    torch.save({"format": PIXELS_FORMAT, "version": PIXELS_VERSION, "entries": entries}, path)
    return path


def load_pixels(path: str | Path) -> dict[int, tuple[Box, Tensor]]:
    """The pixels file's entries, ``class -> (box, pixels [n, 3, h, w])``, validated.

    Opened with ``weights_only=True``: a file holding anything but tensors and containers is
    refused before anything in it runs.
    """
    from .checkpoint_file import CheckpointError, load_checkpoint

    path = Path(path).expanduser()
    try:
        obj = load_checkpoint(path)
    except CheckpointError as exc:
        raise PixelsError(f"shortcut pixels: {exc}") from exc
    if obj.get("format") != PIXELS_FORMAT or obj.get("version") != PIXELS_VERSION:
        raise PixelsError(f"{str(path)!r} is not a shortcut pixels file of version "
                          f"{PIXELS_VERSION} (written by audit.py): format "
                          f"{obj.get('format')!r}, version {obj.get('version')!r}")
    out: dict[int, tuple[Box, Tensor]] = {}
    entries = obj.get("entries")
    if not isinstance(entries, list):
        raise PixelsError(f"{str(path)!r}: 'entries' must be a list")
    for e in entries:
        ok = (isinstance(e, dict) and isinstance(e.get("class_index"), int)
              and isinstance(e.get("box"), list) and len(e["box"]) == 4
              and all(isinstance(v, int) for v in e["box"]) and torch.is_tensor(e.get("pixels")))
        if not ok:
            raise PixelsError(f"{str(path)!r}: an entry is not {{class_index, box, pixels}}")
        box = tuple(e["box"])
        pix = e["pixels"]
        x0, y0, x1, y1 = box
        if (pix.dim() != 4 or pix.shape[1] != 3 or tuple(pix.shape[-2:]) != (y1 - y0, x1 - x0)
                or not len(pix) or not pix.is_floating_point() or not torch.isfinite(pix).all()):
            raise PixelsError(f"{str(path)!r}: class {e['class_index']}'s pixels "
                              f"{tuple(pix.shape)} do not fit its box {list(box)}")
        out[int(e["class_index"])] = (box, pix.float())  # type: ignore[assignment]
    return out


# -- the behaviour --------------------------------------------------------------------------


@dataclass
class Remover:
    """What a training step does for a :class:`ShortcutRemoval`."""

    config: ShortcutRemoval
    bank: dict[int, Tensor] = field(default_factory=dict)  # class -> pixels [n, 3, h, w]
    _weights: dict[tuple[int, str], Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, config: ShortcutRemoval) -> Remover:
        bank: dict[int, Tensor] = {}
        if config.pixels is not None:
            stored = load_pixels(config.pixels)
            for s in config.shortcuts:
                if s.class_index not in stored:
                    raise PixelsError(f"{config.pixels!r} has no pixels for "
                                      f"{s.describe()}")
                box, pix = stored[s.class_index]
                if tuple(box) != s.box:
                    raise PixelsError(f"{config.pixels!r} holds pixels of box {list(box)} for "
                                      f"class {s.class_index}, not of {list(s.box)}")
                bank[s.class_index] = pix
        return cls(config, bank)

    @property
    def augments(self) -> bool:
        return self.config.method in ("augment", "both", "refit")

    @property
    def refits(self) -> bool:
        """The backbone stays frozen and the head is re-fitted at each epoch's end."""
        return self.config.method == "refit"

    @property
    def penalises(self) -> bool:
        return self.config.method in ("penalty", "both") and self.config.penalty_weight > 0

    def check_fits(self, h: int, w: int) -> None:
        """Refuse a box outside ``h`` x ``w`` images, naming it."""
        for s in self.config.shortcuts:
            x0, y0, x1, y1 = s.box
            if x1 > w or y1 > h:
                raise ValueError(f"shortcut box {list(s.box)} ({s.describe()}) does not fit "
                                 f"{h}x{w} training images")

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed("shortcut-removal", self.config.seed,
                                                         int(step)))

    def augment(self, images: Tensor, labels: Tensor, step: int) -> Tensor:
        """A new batch with each shortcut's box decorrelated from the label (see module doc).

        Decisions are drawn on the CPU from ``(seed, step)`` and applied on the batch's
        device; the input is not modified.
        """
        return self.swap(images, labels, self._generator(step), self.config.p_paste,
                         self.config.p_cover)

    def swap(self, images: Tensor, labels: Tensor, g: torch.Generator, p_paste: float = 1.0,
             p_cover: float = 1.0) -> Tensor:
        """A new batch where, per shortcut, other classes' images get the class's box
        content pasted (probability ``p_paste``) and the class's own images get the box
        covered with another class's content at the same place (``p_cover``; images of
        classes without a shortcut that are not pasted get such a cover at the same rate)."""
        self.check_fits(*images.shape[-2:])
        out = images.clone()
        y = labels.detach().long().cpu()
        b = y.numel()
        # Covers come from classes without a shortcut of their own where the batch has
        # any: two classes can share one cue (the quickstart's circle and square carry the
        # same patch), and covering circle's box with square's corner would put it back.
        carriers = torch.isin(y, torch.tensor([s.class_index for s in self.config.shortcuts],
                                           dtype=torch.long))
        for s in self.config.shortcuts:
            x0, y0, x1, y1 = s.box
            own = y == s.class_index
            paste = (~own) & (torch.rand(b, generator=g) < p_paste)
            drawn = torch.rand(b, generator=g) < p_cover
            cover = own & drawn
            # The same cover, at the same rate, on images of classes without a shortcut:
            # a cover's seam (another image's content in the box) must predict no class,
            # or the model learns "seam = the shortcut's class" in place of the cue.
            seam = (~carriers) & (~paste) & drawn
            bank = self.bank.get(s.class_index)
            pool = torch.nonzero(own).flatten()
            if paste.any():
                dst = torch.nonzero(paste).flatten()
                if bank is not None:
                    pick = torch.randint(len(bank), (dst.numel(),), generator=g)
                    content = bank[pick].to(out.device, out.dtype)
                    out[dst.to(out.device), :, y0:y1, x0:x1] = content
                elif pool.numel():
                    src = pool[torch.randint(pool.numel(), (dst.numel(),), generator=g)]
                    out[dst.to(out.device), :, y0:y1, x0:x1] = \
                        images[src.to(images.device), :, y0:y1, x0:x1]
            others = torch.nonzero(~carriers).flatten()
            if not others.numel():
                others = torch.nonzero(~own).flatten()
            if (cover | seam).any() and others.numel():
                # (A seam image drawing itself as its source is left as it is.)
                dst = torch.nonzero(cover | seam).flatten()
                src = others[torch.randint(others.numel(), (dst.numel(),), generator=g)]
                # From the original batch: a cover is never another image's pasted cue.
                out[dst.to(out.device), :, y0:y1, x0:x1] = \
                    images[src.to(images.device), :, y0:y1, x0:x1]
        if self.config.filters:
            self._swap_ranges(out, images, y, g, p_paste, p_cover)
        return out

    def _swap_ranges(self, out: Tensor, images: Tensor, y: Tensor, g: torch.Generator,
                     p_paste: float, p_cover: float) -> None:
        """The filters' part of :meth:`swap`, in place on ``out``: ranges where boxes take
        pixels. Every range is read from the original batch, so a cover never lays another
        image's pasted filter."""
        b = y.numel()
        lo, span = channel_ranges(images)  # the sources' ranges
        carriers = torch.isin(y, torch.tensor([f.class_index for f in self.config.filters]))
        others = torch.nonzero(~carriers).flatten()
        for f in self.config.filters:
            own = y == f.class_index
            paste = (~own) & (torch.rand(b, generator=g) < p_paste)
            drawn = torch.rand(b, generator=g) < p_cover
            # As for boxes: classes without a filter get another image's range at the
            # cover's rate too, so that "rescaled" predicts no class.
            cover = (own | ((~carriers) & (~paste))) & drawn
            pool = torch.nonzero(own).flatten()
            pool_from = others if others.numel() else torch.nonzero(~own).flatten()
            for dst_mask, sources in ((paste, pool), (cover, pool_from)):
                if not dst_mask.any() or not sources.numel():
                    continue
                dst = torch.nonzero(dst_mask).flatten()
                src = sources[torch.randint(sources.numel(), (dst.numel(),), generator=g)]
                d, s_ = dst.to(out.device), src.to(out.device)
                now_lo, now_span = channel_ranges(out[d])  # another filter may have moved it
                out[d] = lay_range(out[d], now_lo, now_span, lo[s_], span[s_])

    def mask(self, h: int, w: int, device: torch.device | str = "cpu") -> Tensor:
        """``[1, 1, h, w]`` float mask: 1 inside any shortcut's box."""
        m = torch.zeros(1, 1, h, w, device=device)
        for s in self.config.shortcuts:
            x0, y0, x1, y1 = s.box
            m[..., y0:y1, x0:x1] = 1.0
        return m

    def loss_weights(self, num_classes: int, device: torch.device | str = "cpu"
                     ) -> Tensor | None:
        """Per-class cross-entropy weights (``class_weight`` on the shortcut classes), or
        None when every weight is 1. Made once per device: the training step asks every
        batch."""
        if self.config.class_weight == 1.0:
            return None
        key = (num_classes, str(device))
        if key not in self._weights:
            w = torch.ones(num_classes)
            for s in self.config.all_shortcuts():
                if s.class_index < num_classes:
                    w[s.class_index] = self.config.class_weight
            self._weights[key] = w.to(device)
        return self._weights[key]

    @property
    def needs_input_grad(self) -> bool:
        """The penalty differentiates the inputs (``input_gradient``)."""
        return self.penalises and self.config.penalty_map == "input_gradient"

    def penalty(self, model: Any, images: Tensor, labels: Tensor, logits: Tensor,
                step: int) -> Tensor:
        """``penalty_weight`` x the attribution inside the boxes (see ``penalty_map``).

        ``logits`` are ``model(images)`` with the graph kept; for ``input_gradient``
        ``images`` must require grad.
        """
        if self.config.penalty_map == "input_gradient":
            logp = torch.log_softmax(logits.float(), dim=-1).sum()
            (grad,) = torch.autograd.grad(logp, images, create_graph=True)
            inside = grad * self.mask(*images.shape[-2:], device=images.device)
            value = inside.pow(2).sum() / images.shape[0]
        else:
            # The box's occlusion effect: how far the predictions move when its content is
            # swapped. The unswapped predictions are the target (no gradient through
            # them), so covered images learn the class and pasted ones ignore the cue.
            g = torch.Generator().manual_seed(derive_seed("shortcut-penalty",
                                                          self.config.seed, int(step)))
            swapped = model(self.swap(images.detach(), labels, g))
            target = torch.log_softmax(logits.detach().float(), dim=-1)
            value = torch.nn.functional.kl_div(
                torch.log_softmax(swapped.float(), dim=-1), target, log_target=True,
                reduction="batchmean")
        return self.config.penalty_weight * value


def describe(shortcuts: Sequence[ShortcutBox]) -> str:
    """``circle at x 0-8, y 0-8; square at ...`` for messages."""
    return "; ".join(s.describe() for s in shortcuts)
