"""explain.render: the turbo table against matplotlib, overlays, and the TensorBoard grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explain import render


def test_turbo_table_is_matplotlibs_turbo():
    matplotlib = pytest.importorskip("matplotlib")
    theirs = matplotlib.colormaps["turbo"](np.arange(256))[:, :3]
    diff = np.abs(render.TURBO.double().numpy() - theirs).max()
    assert render.TURBO.shape == (256, 3)
    assert diff < 0.5 / 255 + 1e-9  # one byte a channel, rounded to nearest


def test_colorize_looks_up_as_matplotlib_does():
    matplotlib = pytest.importorskip("matplotlib")
    values = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(0)).double()
    values[0, 0, :4] = torch.tensor([0.0, 1.0, 255.5 / 256, 1 / 256], dtype=torch.float64)
    rgb = render.colorize(values.float())
    assert rgb.shape == (4, 3, 5, 6)
    theirs = matplotlib.colormaps["turbo"](values.numpy())[..., :3]  # [4, 5, 6, 3]
    diff = np.abs(rgb.movedim(1, -1).double().numpy() - theirs).max()
    assert diff < 0.5 / 255 + 1e-6
    # Out-of-range values clamp to the ends; a custom table is honoured row by row.
    ends = render.colorize(torch.tensor([[-3.0, 7.0]]))
    torch.testing.assert_close(ends[:, :, 0], render.TURBO[0][:, None])
    torch.testing.assert_close(ends[:, :, 1], render.TURBO[-1][:, None])
    grey = torch.linspace(0, 1, 4)[:, None].expand(4, 3)
    out = render.colorize(torch.tensor([[0.0, 0.3, 0.6, 1.0]]), grey)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))


def test_overlay_blends_with_alpha():
    images = torch.full((1, 3, 2, 2), 0.2)
    maps = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])
    out = render.overlay(images, maps, alpha=0.25)
    expected = 0.75 * 0.2 + 0.25 * render.colorize(maps)
    torch.testing.assert_close(out, expected)
    assert out.shape == (1, 3, 2, 2)


def _hand_grid(tiles: torch.Tensor, ncol: int, pad: int, fill: float) -> torch.Tensor:
    """The hand-written layout render.grid had before it used make_grid."""
    n, c, h, w = tiles.shape
    nrow = -(-n // ncol)
    out = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), fill)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[:, y : y + h, x : x + w] = tiles[i]
    return out


@pytest.mark.parametrize(("n", "ncol", "pad"), [(6, 3, 2), (5, 3, 1), (2, 4, 2), (1, 1, 2),
                                                 (1, 3, 0), (7, 1, 3)])
def test_grid_keeps_the_old_layout(n, ncol, pad):
    tiles = torch.rand(n, 3, 4, 5, generator=torch.Generator().manual_seed(n))
    out = render.grid(tiles, ncol=ncol, pad=pad, fill=0.7)
    assert torch.equal(out, _hand_grid(tiles, ncol, pad, 0.7))
