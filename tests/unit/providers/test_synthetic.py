"""Tests for cachebuild.providers.synthetic: deterministic, seamless, varied imagery."""

from __future__ import annotations

import doctest
import io

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cachebuild.providers import synthetic
from cachebuild.providers.synthetic import render_tile, synthetic_tile_bytes
from cachebuild.tilemath import Tile
from tests._harness.surface import own_public_names

ZURICH = Tile(68645, 45903, 17)


def col_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_all_is_complete() -> None:
    assert set(synthetic.__all__) == own_public_names(synthetic)


def test_doctests() -> None:
    assert doctest.testmod(synthetic).failed == 0


def test_render_is_deterministic() -> None:
    a = render_tile(ZURICH)
    b = render_tile(Tile(*ZURICH))
    assert a.dtype == np.uint8 and a.shape == (256, 256, 3)
    assert np.array_equal(a, b)


def test_bytes_are_deterministic_jpeg_256() -> None:
    data = synthetic_tile_bytes(ZURICH)
    assert data == synthetic_tile_bytes(ZURICH)
    assert data[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG"
        assert im.size == (256, 256)
        assert im.mode == "RGB"
        decoded = np.asarray(im)
    # quality 90: close to the rendered array
    assert col_diff(decoded, render_tile(ZURICH)) < 4.0


def test_quality_changes_bytes() -> None:
    assert len(synthetic_tile_bytes(ZURICH, quality=50)) < len(
        synthetic_tile_bytes(ZURICH, quality=95)
    )


def test_image_has_texture_and_colour() -> None:
    img = render_tile(ZURICH).astype(np.float64)
    assert img.std() > 15
    # not grey: channels differ
    assert np.abs(img[..., 1] - img[..., 2]).mean() > 5
    # detail at the finest scale too (what descriptors match on)
    assert np.abs(np.diff(img, axis=1)).mean() > 1.0


@pytest.mark.parametrize("dx, dy", [(1, 0), (0, 1), (1, 1), (7, 3)])
def test_neighbours_differ_strongly(dx: int, dy: int) -> None:
    a = render_tile(ZURICH)
    b = render_tile(Tile(ZURICH.x + dx, ZURICH.y + dy, ZURICH.z))
    assert col_diff(a, b) > 20


def test_far_tiles_do_not_repeat() -> None:
    base = render_tile(ZURICH)
    for k in (1, 2, 4, 8, 16, 32, 64, 128, 1024):
        assert col_diff(base, render_tile(Tile(ZURICH.x + k, ZURICH.y, ZURICH.z))) > 20, k
        assert col_diff(base, render_tile(Tile(ZURICH.x, ZURICH.y + k, ZURICH.z))) > 20, k


def test_zoom_levels_differ() -> None:
    parent = Tile(ZURICH.x // 2, ZURICH.y // 2, ZURICH.z - 1)
    assert col_diff(render_tile(ZURICH), render_tile(parent)) > 20


def border_ratio(t: Tile, size: int = 256) -> tuple[float, float, float]:
    """Mean abs differences between columns.

    Returns (across the east border, the largest between neighbouring
    columns inside either tile, between unrelated columns).  A seam makes
    the first the largest; a road edge along the border is no seam, and
    its other edge shows inside.
    """
    a = render_tile(t, size).astype(np.int16)
    b = render_tile(Tile((t.x + 1) % (1 << t.z), t.y, t.z), size).astype(np.int16)
    across = col_diff(a[:, -1], b[:, 0])
    inside = max(float(np.abs(np.diff(img, axis=1)).mean(axis=(0, 2)).max()) for img in (a, b))
    unrelated = float(
        np.mean(
            [col_diff(a[:, i], b[:, j]) for i, j in ((3, 200 % size), (100, 30), (250 % size, 5))]
        )
    )
    return across, inside, unrelated


def test_continuous_across_the_east_border() -> None:
    across, inside, unrelated = border_ratio(ZURICH)
    assert across < 0.2 * unrelated
    assert across <= inside + 0.5


def test_continuous_across_the_south_border() -> None:
    a = render_tile(ZURICH)
    b = render_tile(Tile(ZURICH.x, ZURICH.y + 1, ZURICH.z))
    across = col_diff(a[-1], b[0])
    assert across < 0.2 * col_diff(a[5], b[180])
    assert across < 3 * col_diff(a[100], a[101]) + 1


def test_borders_are_like_any_other_neighbouring_columns() -> None:
    """On average over a row of tiles: no seam (a jump) and no flat line."""
    row = [render_tile(Tile(ZURICH.x + i, ZURICH.y, ZURICH.z)).astype(np.int16) for i in range(12)]
    across = np.mean([col_diff(a[:, -1], b[:, 0]) for a, b in zip(row, row[1:])])
    inside = np.mean([np.abs(np.diff(img, axis=1)).mean() for img in row])
    assert 0.5 * inside < across < 1.5 * inside


def test_the_world_wraps_at_the_antimeridian() -> None:
    z = 10
    across, inside, unrelated = border_ratio(Tile((1 << z) - 1, 300, z))
    assert across < 0.2 * unrelated
    assert across <= inside + 0.5


@settings(max_examples=15, deadline=None)
@given(
    z=st.integers(1, 20), fx=st.floats(0, 1, exclude_max=True), fy=st.floats(0, 1, exclude_max=True)
)
@example(z=1, fx=0.0, fy=0.0)
@example(z=9, fx=0.390625, fy=0.39453125)  # a road along the border
def test_continuity_holds_everywhere(z: int, fx: float, fy: float) -> None:
    # A road may run along the border (then every column there differs a
    # lot), so compare the border with the columns right beside it: a seam
    # stands out from its neighbours, a road edge does not.
    n = 1 << z
    t = Tile(int(fx * n), int(fy * n), z)
    a = render_tile(t).astype(np.int16)
    b = render_tile(Tile((t.x + 1) % n, t.y, z)).astype(np.int16)
    d = np.abs(np.diff(np.concatenate([a[:, -3:], b[:, :3]], axis=1), axis=1)).mean(axis=(0, 2))
    across, beside = d[2], max(d[1], d[3])
    assert across < 1.5 * beside + 2


@pytest.mark.parametrize("size", [512, 200])
def test_other_tile_sizes_are_seamless(size: int) -> None:
    img = render_tile(ZURICH, size)
    assert img.shape == (size, size, 3)
    across, inside, unrelated = border_ratio(ZURICH, size)
    assert across < 0.2 * unrelated
    assert across <= inside + 0.5


def test_bad_size_is_refused() -> None:
    with pytest.raises(ValueError, match="size"):
        render_tile(ZURICH, 0)


def test_zoom_zero_renders() -> None:
    img = render_tile(Tile(0, 0, 0))
    assert img.shape == (256, 256, 3)
    assert img.std() > 10
