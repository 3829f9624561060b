"""Grid tiles carry a caption: class name, probability and right/wrong, drawn legibly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from callbacks import ExplanationMonitor, grid_captions

NAMES = ["cat", "dog", "automobile"]
RIGHT = torch.tensor([grid_captions.CAPTION_RIGHT])


def _white(strip: torch.Tensor) -> torch.Tensor:
    """Text pixels of a caption strip: near white in every channel."""
    return (strip > 0.9).all(0)


def test_a_caption_draws_its_text_above_the_tile() -> None:
    torch.manual_seed(0)
    tile = torch.rand(1, 3, 128, 128) * 0.5  # never white
    out = grid_captions.caption(tile, [["cat", "\u2713 0.82"]], RIGHT)
    strip_h = out.shape[-2] - 128
    assert out.shape == (1, 3, 128 + strip_h, 128) and strip_h >= 2 * grid_captions.caption_size(128)
    assert torch.equal(out[..., strip_h:, :], tile)  # the tile itself is untouched
    strip = out[0, :, :strip_h]
    blank = grid_captions.caption(tile, [["", ""]], RIGHT)[0, :, :strip_h]
    assert not _white(blank).any()  # no text: only the strip colour
    assert torch.allclose(blank, RIGHT[0][:, None, None].expand_as(blank), atol=1 / 255)
    text = _white(strip)
    assert text.sum() > 300  # letters of 32 px, not a speck
    # Each line sits in its own band: the name in the upper half, the verdict below.
    rows = text.any(1).nonzero().flatten()
    assert rows.min() < strip_h / 2 < rows.max()
    other = _white(grid_captions.caption(tile, [["dog", "\u2717 0.82"]], RIGHT)[0, :, :strip_h])
    assert (text != other).sum() > 50  # different words, different pixels


def test_a_long_line_shrinks_then_loses_its_end_but_stays_in_the_tile() -> None:
    tile = torch.zeros(1, 3, 128, 128)
    long = "\u2717 0.61 automobile_and_more"
    strip = grid_captions.caption(tile, [["cat", long]], RIGHT)[0, :, :-128]
    text = _white(strip)
    margin = max(2, grid_captions.caption_size(128) // 6)
    assert not text[:, -margin + 1:].any()  # nothing runs into the next tile
    assert text[strip.shape[1] // 2:, 128 // 2:].any()  # the line does reach the far half
    # The visible start of the line is the same as for the short "0.61" alone: the number
    # (drawn first) survives, the name loses its end.
    assert grid_captions._fit(_draw(), long, 32, 128 - 2 * margin)[1].startswith("\u2717 0.61 a")


def _draw():
    from PIL import Image, ImageDraw

    return ImageDraw.Draw(Image.new("RGB", (8, 8)))


def test_captions_name_class_probability_and_verdict_for_every_tile() -> None:
    labels, preds = torch.tensor([0, 1]), torch.tensor([0, 2])
    probs = torch.tensor([[0.82, 0.10, 0.08], [0.20, 0.19, 0.61]])
    marks = ("ok", "x")
    # classes: true -> each image, then its true class's map.
    true = ExplanationMonitor.captions(NAMES, labels, preds, probs, labels[:, None], marks)
    assert true == [["cat", "ok 0.82"], ["cat", "ok 0.82"],
                    ["dog", "x 0.61 automobile"], ["dog", "x 0.19"]]
    # classes: predicted -> the predicted class's map.
    pred = ExplanationMonitor.captions(NAMES, labels, preds, probs, preds[:, None], marks)
    assert pred[3] == ["automobile", "x 0.61"]
    # classes: all -> one tile per class.
    every = ExplanationMonitor.captions(NAMES, labels, preds, probs,
                                        torch.arange(3).expand(2, 3), marks)
    assert len(every) == 2 * 4 and every[4:] == [
        ["dog", "x 0.61 automobile"], ["cat", "x 0.20"], ["dog", "x 0.19"],
        ["automobile", "x 0.61"]]
    # Marks the font can draw: check and cross with DejaVu (matplotlib's copy).
    assert grid_captions.caption_marks() == ("\u2713", "\u2717")


@pytest.mark.parametrize("classes", [None, torch.tensor([[0, 0], [1, 2]])])
def test_the_all_classes_grid_captions_every_tile_with_its_images_verdict(classes) -> None:
    # classes=None: every class's map; a [N, T] tensor: only the explained maps (beyond
    # explain.ALL_CLASSES_MAX classes), true class first, then the predicted one.
    torch.manual_seed(0)
    monitor = ExplanationMonitor(classes="all", upscale=2)
    images, labels, preds = torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), torch.tensor([0, 2])
    probs = torch.tensor([[0.82, 0.10, 0.08], [0.20, 0.19, 0.61]])
    maps = torch.rand(2, 3 if classes is None else 2, 16, 16)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(class_names=NAMES))
    grid = monitor._grid(trainer, images, maps, classes, labels, preds, probs)
    cols = maps.shape[1] + 1  # the image, then each map
    strip = grid_captions.caption(torch.zeros(1, 3, 32, 32), [["a", "b"]]).shape[-2] - 32
    assert grid.shape == (3, 2 * (strip + 32 + 2) + 2, cols * 34 + 2)
    for row, colour in ((0, grid_captions.CAPTION_RIGHT), (1, grid_captions.CAPTION_WRONG)):
        y = 2 + row * (strip + 34) + 1
        for c in range(cols):
            assert grid[:, y, 2 + c * 34 + 30].tolist() == pytest.approx(list(colour), abs=1e-2)
        band = grid[:, y:y + strip - 1, 2:cols * 34]
        assert _white(band).any()  # every row's strips carry text
