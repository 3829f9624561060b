"""audit_report.overlay.show_overlay: a PNG whose colours follow the map, a raw-valued bar."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

from audit_report.overlay import show_overlay


def _hot_pixels(png: Path) -> torch.Tensor:
    """``[n, 2]`` (row, col) of the strongly red pixels of a saved PNG (turbo's top end)."""
    rgb = torch.from_numpy(imread(png)[..., :3].copy())
    red = (rgb[..., 0] > 0.4) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    return red.nonzero().float()


def test_the_png_is_red_where_the_map_is_hot_and_the_bar_reads_raw_values(tmp_path: Path) -> None:
    image = torch.full((3, 32, 32), 0.5)
    corners = {}
    for name, (rows, cols) in {"top_left": (slice(0, 8), slice(0, 8)),
                               "bottom_right": (slice(24, 32), slice(24, 32))}.items():
        heat = torch.full((32, 32), -2.0)
        heat[rows, cols] = 7.5  # any scale: negative floor, hot patch above 1
        path = tmp_path / f"{name}.png"
        fig = show_overlay(image, heat, path=path, title=name)
        assert path.is_file() and isinstance(fig, Figure)
        assert fig.axes[-1].get_ylim() == pytest.approx((-2.0, 7.5))  # the colour bar
        drawn = torch.from_numpy(fig.axes[0].images[0].get_array().copy())
        hot, cold = drawn[rows, cols].mean((0, 1)), drawn[16, 16]
        assert hot[0] > hot[1] + 0.2 and hot[0] > hot[2] + 0.2  # reddish
        assert cold[2] > cold[0]  # turbo's low end is bluish
        corners[name] = _hot_pixels(path).mean(0)
    # In the written PNG the red patch sits where the map is hot.
    assert (corners["top_left"] < corners["bottom_right"] - 20).all()


def test_into_given_axes_coarse_map_and_bad_input(tmp_path: Path) -> None:
    fig = Figure()
    ax = fig.add_subplot()
    coarse = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # a layer's 2 x 2 map, stretched
    assert show_overlay(torch.rand(3, 16, 16), coarse, ax=ax) is fig
    assert fig.axes[-1].get_ylim() == pytest.approx((0.0, 3.0))
    assert fig.axes[0].images[0].get_array().shape == (16, 16, 3)
    flat = show_overlay(torch.rand(3, 8, 8), torch.full((8, 8), 4.0))  # no range: no crash
    assert flat.axes[-1].get_ylim() == pytest.approx((4.0, 5.0))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        show_overlay(torch.rand(1, 8, 8), torch.rand(8, 8))
    with pytest.raises(ValueError, match="NaN"):
        show_overlay(torch.rand(3, 8, 8), torch.full((8, 8), float("nan")))
    with pytest.raises(ValueError, match="one map"):
        show_overlay(torch.rand(3, 8, 8), torch.rand(2, 8, 8))
