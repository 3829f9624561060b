"""Text strips above the monitor's grid tiles: class, probability, right or wrong.

PIL draws the text with matplotlib's copy of DejaVu Sans (no font to install). It lives
with the callbacks, not in :mod:`explain.render`: the engine stays torch-only.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

#: Strip colours: dark green (the image was classified right), dark red (wrong), dark grey
#: (no verdict). White text on them stays legible when TensorBoard shrinks the grid.
CAPTION_RIGHT = (0.05, 0.45, 0.12)
CAPTION_WRONG = (0.62, 0.06, 0.06)
CAPTION_NEUTRAL = (0.25, 0.25, 0.25)


@functools.lru_cache(maxsize=32)
def caption_font(size: int) -> tuple[Any, bool]:
    """``(font, unicode)``: DejaVu Sans Bold at ``size`` px (matplotlib's own copy, so no
    font needs installing), or PIL's built-in font when it is missing; ``unicode`` says
    whether the font has the check and cross marks (:func:`caption_marks`)."""
    from PIL import ImageFont

    try:
        import matplotlib

        path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf")
        return ImageFont.truetype(path, size), True
    except (ImportError, OSError):
        return ImageFont.load_default(size), False


def caption_marks(size: int = 16) -> tuple[str, str]:
    """The right/wrong marks the caption font can draw: ``("✓", "✗")``, or ``("ok", "x")``."""
    return ("\u2713", "\u2717") if caption_font(size)[1] else ("ok", "x")


def caption_size(tile_width: int) -> int:
    """Caption font size in px for tiles ``tile_width`` wide: a quarter of the width (32 px
    on the monitor's 128-px tiles: about 10 px on screen when TensorBoard fits a grid of 8
    such tiles a row into its default card, some 330 px wide), never under 10 px."""
    return max(10, round(tile_width / 4))


def _fit(draw: Any, text: str, size: int, width: int) -> tuple[Any, str]:
    """The largest font <= ``size`` (down to 3/5 of it) at which ``text`` fits ``width``;
    past that the text is cut and ends in an ellipsis."""
    for s in range(size, max(1, (3 * size) // 5) - 1, -1):
        font = caption_font(s)[0]
        if draw.textlength(text, font=font) <= width:
            return font, text
    while len(text) > 1 and draw.textlength(text + "\u2026", font=font) > width:
        text = text[:-1]
    return font, text + "\u2026"


def caption(
    tiles: torch.Tensor,
    texts: list[list[str]],
    colours: torch.Tensor | None = None,
    size: int | None = None,
) -> torch.Tensor:
    """Put a strip of text lines above each ``[N, 3, H, W]`` tile -> ``[N, 3, H + S, W]``.

    ``texts[i]``: tile ``i``'s lines (every tile gets as many lines as the longest list),
    drawn white, left-aligned, on ``colours[i]`` (``[N, 3]`` in ``[0, 1]``; default dark
    grey). ``size``: font size in px (default :func:`caption_size` of the tile width); a
    line too long for the tile is drawn smaller, then cut with an ellipsis.
    """
    from PIL import Image, ImageDraw

    n, _, _, w = tiles.shape
    if len(texts) != n:
        raise ValueError(f"{n} tiles but {len(texts)} captions")
    size = size or caption_size(w)
    rows = max((len(t) for t in texts), default=0)
    if rows == 0:
        return tiles
    line = round(size * 1.2)
    height = rows * line + max(2, size // 5)
    margin = max(2, size // 6)
    if colours is None:
        colours = torch.tensor(CAPTION_NEUTRAL).expand(n, 3)
    strips = []
    for lines, colour in zip(texts, colours.tolist(), strict=True):
        fill = tuple(round(255 * c) for c in colour)
        strip = Image.new("RGB", (w, height), fill)
        draw = ImageDraw.Draw(strip)
        for r, text in enumerate(lines):
            font, text = _fit(draw, text, size, w - 2 * margin)
            draw.text((margin, r * line + margin // 2), text, fill=(255, 255, 255), font=font)
        strips.append(torch.frombuffer(bytearray(strip.tobytes()), dtype=torch.uint8)
                      .view(height, w, 3).permute(2, 0, 1))
    top = torch.stack(strips).to(tiles.device, tiles.dtype) / 255
    return torch.cat([top, tiles], dim=-2)
