"""Tests for cachebuild.localize.places and selftest_score: where a result is, and is it a hit."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cachebuild.localize import places, selftest_score
from cachebuild.localize.places import (
    POSITIONS_FILE,
    metres_per_unit,
    positions,
    write_positions,
)
from cachebuild.localize.selftest_score import score
from cachebuild.store.windowkeys import tile_place_ids
from cachebuild.tilemath import Tile, tile_id
from cachebuild.tilemath import bounds as tile_bounds
from tests._harness.surface import assert_public_surface

Z = 17
STILL = (0.0, 0.0, 0.0, 1.0, 1.0, 0.0)  # no shift, turn, scale or light change


def tid(x: int, y: int, z: int = Z) -> int:
    """The place id of a tile (its own window)."""
    return int(tile_place_ids([tile_id(Tile(x, y, z))])[0])


def test_positions_are_the_tile_centres_and_footprints() -> None:
    t = Tile(68640, 45890, Z)
    rec = positions(tile_place_ids([tile_id(t)]))[0]
    b = tile_bounds(t)
    assert math.isclose(rec["west"], b.west) and math.isclose(rec["east"], b.east)
    assert math.isclose(rec["south"], b.south) and math.isclose(rec["north"], b.north)
    assert b.west < rec["lon"] < b.east and b.south < rec["lat"] < b.north
    assert math.isclose(rec["lon"], (b.west + b.east) / 2)


def test_written_positions_are_a_plain_npy_sorted_by_id(tmp_path: Path) -> None:
    ids = [tid(5, 6), tid(1, 2), tid(3, 4)]
    write_positions(tmp_path / POSITIONS_FILE, ids)
    rec = np.load(tmp_path / POSITIONS_FILE, allow_pickle=False)
    assert rec.dtype == places.positions_dtype() and rec["id"].tolist() == sorted(ids)


def test_a_tile_is_about_306_m_at_z17_on_the_equator() -> None:
    assert math.isclose(float(metres_per_unit(0.0, Z)), 305.748, rel_tol=1e-4)
    assert float(metres_per_unit(60.0, Z)) < 0.51 * float(metres_per_unit(0.0, Z))


def _one(found: list[int], params: tuple[float, ...], x: int = 100, y: int = 45890) -> dict:
    return score(np.array([found + [-1] * (5 - len(found))]), [x], [y], [Z], [params])


def test_a_centred_frame_is_found_by_its_tile_with_no_error() -> None:
    r = _one([tid(100, 45890)], STILL)
    assert r["recall_at_1"] == 1.0 and r["median_error_m"] == 0.0 and r["frames"] == 1


def test_a_frame_on_a_tile_corner_overlaps_no_tile_by_half() -> None:
    corner = (0.5, 0.5, 0.0, 1.0, 1.0, 0.0)
    r = _one([tid(100, 45890), tid(101, 45890), tid(100, 45891), tid(101, 45891)], corner)
    assert r["recall_at_1"] == 0.0 and r["recall_at_5"] == 0.0
    # the corner is half a diagonal from each centre
    want = math.hypot(0.5, 0.5) * float(metres_per_unit(_lat(101.0, 45891.0), Z))
    assert math.isclose(r["median_error_m"], want, abs_tol=0.06)


def _lat(x: float, y: float) -> float:
    return float(places.unit_to_lonlat(x, y, Z)[1])


def test_a_quarter_shift_still_overlaps_the_tile_by_half() -> None:
    r = _one([tid(100, 45890)], (0.25, 0.0, 0.0, 1.0, 1.0, 0.0))
    assert r["recall_at_1"] == 1.0
    r = _one([tid(100, 45890)], (0.3, 0.3, 0.0, 1.0, 1.0, 0.0))  # 0.7 x 0.7 < half
    assert r["recall_at_1"] == 0.0


def test_a_wrong_neighbour_is_a_miss_at_recall_1_and_a_hit_at_5() -> None:
    r = _one([tid(101, 45890), tid(100, 45890)], STILL)
    assert r["recall_at_1"] == 0.0 and r["recall_at_5"] == 1.0
    assert math.isclose(
        r["median_error_m"], float(metres_per_unit(_lat(100.5, 45890.5), Z)), abs_tol=0.06
    )


def test_no_result_is_a_miss_infinitely_far() -> None:
    r = _one([], STILL)
    assert r["recall_at_1"] == 0.0 and r["median_error_m"] is None


def test_a_frame_across_the_antimeridian_is_found() -> None:
    side = 2**Z
    r = _one([tid(side - 1, 45890)], (0.3, 0.0, 0.0, 1.0, 1.0, 0.0), x=side - 1)
    assert r["recall_at_1"] == 1.0


def test_a_frame_on_a_tile_corner_is_found_by_the_window_centred_there() -> None:
    """A frame centred on a tile corner: the window half a tile on is a hit with no error, the tile is not."""
    shifted = (0.5, 0.5, 0.0, 1.0, 1.0, 0.0)
    window = tid(100, 45890) + (4 << 29) + 4  # X and Y in eighths of a tile: half a tile on
    r = _one([window], shifted)
    assert r["recall_at_1"] == 1.0 and r["median_error_m"] == 0.0
    assert _one([tid(100, 45890)], shifted)["recall_at_1"] == 0.0


def test_public_surface() -> None:
    assert_public_surface(places)
    assert_public_surface(selftest_score)


def test_engine_json_documents_exactly_the_preparation_the_build_uses() -> None:
    """A frame prepared from engine.json's words equals what describe feeds the engine."""
    from cachebuild.engine.interface import INPUT_PREPARATION as spec
    from cachebuild.localize.decode import _preprocess_into

    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    ours = np.empty((3, 8, 8), np.float32)
    _preprocess_into(rgb, ours, np.empty((3, 8, 8), np.uint8))
    assert spec["channel_order"] == "RGB" and spec["layout"] == "NCHW"
    theirs = rgb.transpose(2, 0, 1).astype(np.float32) * np.float32(spec["scale"])
    np.testing.assert_allclose(ours, theirs + np.float32(spec["offset"]), atol=1e-6)
