"""Synthetic shapes: an offline dataset whose ground truth localisation is known exactly.

Ten shape classes at random positions, scales and colours on textured backgrounds. Each
item comes with the exact pixel mask of its shape, so "a good explanation of a shape lies on
the shape" can be measured. Everything is generated at construction from ``(seed, split)``
with vectorised torch ops (2,000 images at 32x32 take a few tens of milliseconds).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .cue import check_split, derive_seed

SHAPE_CLASSES = [
    "circle",
    "square",
    "triangle",
    "plus",
    "ring",
    "diamond",
    "hbar",
    "vbar",
    "x_cross",
    "l_shape",
]

# Each shape is a predicate on coordinates (u, v) in units of the shape's half-extent,
# centred on the shape (v points down). All fit the square [-1, 1]^2.
_ShapeFn = Callable[[Tensor, Tensor], Tensor]


def _circle(u: Tensor, v: Tensor) -> Tensor:
    return u * u + v * v <= 1.0


def _square(u: Tensor, v: Tensor) -> Tensor:
    # Slightly smaller than the box, so a square's area is close to a circle's and size
    # alone does not give the class away.
    return torch.maximum(u.abs(), v.abs()) <= 0.85


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    # Apex up; the half-width grows linearly from the apex (v = -0.95) to the base (v = 0.9).
    return (v <= 0.9) & (u.abs() <= (v + 0.95) / 1.85)


def _plus(u: Tensor, v: Tensor) -> Tensor:
    inside = torch.maximum(u.abs(), v.abs()) <= 1.0
    return inside & ((u.abs() <= 0.3) | (v.abs() <= 0.3))


def _ring(u: Tensor, v: Tensor) -> Tensor:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def _diamond(u: Tensor, v: Tensor) -> Tensor:
    return u.abs() + v.abs() <= 1.0


def _hbar(u: Tensor, v: Tensor) -> Tensor:
    return (u.abs() <= 1.0) & (v.abs() <= 0.35)


def _vbar(u: Tensor, v: Tensor) -> Tensor:
    return (v.abs() <= 1.0) & (u.abs() <= 0.35)


def _x_cross(u: Tensor, v: Tensor) -> Tensor:
    inside = torch.maximum(u.abs(), v.abs()) <= 0.9
    return inside & (((u - v).abs() <= 0.4) | ((u + v).abs() <= 0.4))


def _l_shape(u: Tensor, v: Tensor) -> Tensor:
    # A box minus its top-right part: a left column and a bottom row, each 0.6 thick.
    inside = torch.maximum(u.abs(), v.abs()) <= 0.9
    return inside & ~((u > -0.3) & (v < 0.3))


_SHAPE_FNS: list[_ShapeFn] = [
    _circle,
    _square,
    _triangle,
    _plus,
    _ring,
    _diamond,
    _hbar,
    _vbar,
    _x_cross,
    _l_shape,
]


def generate_shapes(
    num_samples: int, image_size: int = 32, seed: int = 0, split: str = "train"
) -> tuple[Tensor, Tensor, Tensor]:
    """Generate ``(images uint8 [N,3,S,S], object masks bool [N,S,S], labels int64 [N])``."""
    n, s = num_samples, image_size
    g = torch.Generator().manual_seed(derive_seed("shapes", seed, split))
    num_classes = len(SHAPE_CLASSES)
    # Round-robin then shuffled: class counts differ by at most one.
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]

    # Geometry: the shape's full extent is 30-50% of the image side, fully inside the image.
    half = s * (0.15 + 0.10 * torch.rand(n, generator=g))
    cx = half + (s - 2 * half) * torch.rand(n, generator=g)
    cy = half + (s - 2 * half) * torch.rand(n, generator=g)
    pix = torch.arange(s, dtype=torch.float32) + 0.5  # pixel centres
    masks = torch.empty(n, s, s, dtype=torch.bool)
    for c, fn in enumerate(_SHAPE_FNS):
        sel = (labels == c).nonzero().squeeze(1)
        if sel.numel():
            # u is [k,1,S] and v is [k,S,1]: the predicates broadcast them to [k,S,S], which
            # is cheaper than materialising both coordinate grids for every image.
            hk = half[sel].view(-1, 1, 1)
            u = (pix.view(1, 1, s) - cx[sel].view(-1, 1, 1)) / hk
            v = (pix.view(1, s, 1) - cy[sel].view(-1, 1, 1)) / hk
            masks[sel] = fn(u, v)

    # Colours: every background channel sits 0.35-0.65 away from the object's channel
    # (circular offset), and the texture below moves it by at most 0.12, so the object
    # always contrasts with its background while both hues stay random.
    obj = torch.rand(n, 3, generator=g)
    bg = (obj + 0.5 + 0.3 * (torch.rand(n, 3, generator=g) - 0.5)) % 1.0

    # Texture: low-frequency colour noise plus faint stripes at a random angle and frequency.
    low = F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=(s, s), mode="bilinear")
    theta = torch.pi * torch.rand(n, 1, 1, generator=g)
    freq = (1.5 + 2.5 * torch.rand(n, 1, 1, generator=g)) / s  # cycles per pixel
    phase = 2 * torch.pi * torch.rand(n, 1, 1, generator=g)
    along = pix.view(1, 1, s) * torch.cos(theta) + pix.view(1, s, 1) * torch.sin(theta)
    stripes = torch.sin(2 * torch.pi * freq * along + phase).unsqueeze(1)
    background = (bg.view(n, 3, 1, 1) + 0.08 * low + 0.04 * stripes).clamp(0.0, 1.0)

    images = torch.where(masks.unsqueeze(1), obj.view(n, 3, 1, 1), background)
    images = (images * 255).round().to(torch.uint8)
    return images, masks, labels


class SyntheticShapes(Dataset):
    """Ten shape classes on textured backgrounds, with exact object masks.

    Items follow the project's batch format, except that ``image`` is the raw ``[0, 1]``
    image (the datamodule normalises): ``image`` float32 ``[3,S,S]``, ``label`` int64,
    ``object_mask`` bool ``[S,S]``, ``cue_mask`` bool ``[S,S]`` (all False), ``index`` int64.

    Args:
        num_samples: number of images.
        image_size: side of the square images in pixels (at least 16).
        seed: generation seed; with ``split`` it fixes every pixel.
        split: ``train``, ``val`` or ``test``; each split draws different images.
    """

    class_names = SHAPE_CLASSES

    def __init__(
        self, num_samples: int, image_size: int = 32, seed: int = 0, split: str = "train"
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if image_size < 16:
            raise ValueError(
                f"image_size must be at least 16 for recognisable shapes, got {image_size}"
            )
        self.split = check_split(split)
        self.seed = seed
        self.image_size = image_size
        self.images, self.masks, self.labels = generate_shapes(num_samples, image_size, seed, split)

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "image": self.images[index].float() / 255.0,
            "label": self.labels[index].clone(),
            "object_mask": self.masks[index].clone(),
            "cue_mask": torch.zeros(self.image_size, self.image_size, dtype=torch.bool),
            "index": torch.tensor(index, dtype=torch.long),
        }
