"""Tests for cachebuild.tilemath, with mercantile as the oracle."""

from __future__ import annotations

import math
import warnings

import mercantile
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cachebuild import tilemath as T
from cachebuild.tilemath import (
    EARTH_RADIUS_M,
    MAX_LAT,
    LngLat,
    LngLatBbox,
    Tile,
    bbox_contains,
    bbox_of_points,
    bounds,
    buffer_bbox,
    count_tiles,
    ground_resolution_m,
    quadkey,
    tile,
    tile_from_id,
    tile_id,
    tile_ranges,
    tiles,
    ul,
)

# ---------------------------------------------------------------- helpers


def mercantile_tile(lon: float, lat: float, z: int) -> Tile:
    """mercantile.tile, with its one impossible answer clamped.

    Within 1e-14 of the world's east or south edge mercantile returns
    column/row 2**z (and warns); cachebuild clamps to 2**z - 1
    (test_tile_clamps_where_mercantile_overflows pins this).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        t = mercantile.tile(lon, lat, z)
    last = 2**z - 1
    return Tile(min(t.x, last), min(t.y, last), t.z)


def mercantile_tiles(bbox: LngLatBbox, z: int) -> set[Tile]:
    """mercantile.tiles over the box, split by hand at the antimeridian."""
    w, s, e, n = bbox
    halves = [(w, s, e, n)] if w <= e else [(-180.0, s, e, n), (w, s, 180.0, n)]
    out: set[Tile] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for box in halves:
            out |= {Tile(*t) for t in mercantile.tiles(*box, [z])}
    return out


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def distance_to_meridian_m(
    lat: float, lon: float, meridian: float, lat_lo: float, lat_hi: float
) -> float:
    """Least haversine distance from a point to a meridian segment (ternary search).

    Independent of the formula buffer_bbox uses: distance along a meridian
    from a fixed point is unimodal in latitude.
    """
    lo, hi = lat_lo, lat_hi
    for _ in range(200):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if haversine_m(lat, lon, m1, meridian) < haversine_m(lat, lon, m2, meridian):
            hi = m2
        else:
            lo = m1
    return min(
        haversine_m(lat, lon, (lo + hi) / 2, meridian),
        haversine_m(lat, lon, lat_lo, meridian),
        haversine_m(lat, lon, lat_hi, meridian),
    )


def lon_span(b: LngLatBbox) -> float:
    return b.east - b.west if b.west <= b.east else b.east + 360.0 - b.west


# rounding in the last bit of a longitude near 180 is ~3e-9 m
TOL_M = 1e-6

zooms = st.integers(min_value=0, max_value=22)
lons = st.floats(min_value=-180.0, max_value=180.0)
# mercantile cannot compute y within ~1e-8 degrees of a pole (sin(lat) == 1);
# the poles are tested on their own (test_tile_clamps_poles)
lats_open = st.floats(min_value=-89.9, max_value=89.9)


@st.composite
def any_tile(draw: st.DrawFn, max_zoom: int = 22) -> Tile:
    z = draw(st.integers(min_value=0, max_value=max_zoom))
    n = 2**z
    return Tile(draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1)), z)


@st.composite
def small_box(draw: st.DrawFn) -> tuple[LngLatBbox, int]:
    """A box a few tiles across at a random zoom; sometimes across 180."""
    z = draw(st.integers(min_value=0, max_value=18))
    tile_deg = 360.0 / 2**z
    # at least 1e-9 degrees: mercantile yields nothing for boxes thinner
    # than its 1e-11 nudge lying on a tile edge (test_point_box_...)
    width = max(1e-9, draw(st.floats(min_value=0.0, max_value=3.0)) * min(tile_deg, 100.0))
    height = max(1e-9, draw(st.floats(min_value=0.0, max_value=3.0)) * min(tile_deg, 60.0) / 4)
    south = draw(st.floats(min_value=-89.0, max_value=89.0))
    north = min(90.0, south + height)
    if draw(st.booleans()):
        # across the antimeridian: west in (180 - width, 180], east beyond -180
        west = 180.0 - draw(st.floats(min_value=0.0, max_value=1.0)) * width
        if west > 180.0 - 1e-9:  # see test_tile_clamps_where_mercantile_overflows
            west = 180.0
        east = west + width - 360.0
        if not (east >= -180.0 and west > east):
            east = -180.0 + width / 2
    else:
        west = draw(st.floats(min_value=-180.0, max_value=180.0 - width if width < 360 else -180.0))
        east = min(180.0, west + width)
    return LngLatBbox(west, south, east, north), z


# ---------------------------------------------------------------- surface


def test_docstring_examples() -> None:
    import doctest

    result = doctest.testmod(T, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_all_is_complete() -> None:
    public = {
        n
        for n in dir(T)
        if not n.startswith("_") and getattr(getattr(T, n), "__module__", "") == T.__name__
    }
    assert public <= set(T.__all__)
    for name in T.__all__:
        assert hasattr(T, name)


def test_tile_fields_match_mercantile() -> None:
    assert Tile._fields == mercantile.Tile._fields
    assert LngLatBbox._fields == mercantile.LngLatBbox._fields
    assert T.LatLonAlt._fields == ("lat", "lon", "alt_m")


# ---------------------------------------------------------------- tile()


@settings(max_examples=300)
@given(lons, lats_open, zooms)
@example(180.0, 0.0, 0)
@example(180.0, 0.0, 17)
@example(-180.0, 0.0, 17)
@example(0.0, 0.0, 17)
@example(0.0, 0.0, 0)
@example(0.0, MAX_LAT, 17)
@example(0.0, -MAX_LAT, 17)
@example(0.0, 85.0511, 22)
@example(0.0, -85.0511, 22)
@example(180.0, 85.0511, 22)
@example(-180.0, -85.0511, 22)
@example(179.9999999999999, 0.0, 17)
@example(22.499999999999, 10.0, 4)  # within mercantile's EPSILON of an edge
@example(8.54, 47.37, 17)
def test_tile_matches_mercantile(lon: float, lat: float, z: int) -> None:
    assert tile(lon, lat, z) == mercantile_tile(lon, lat, z)


def test_tile_clamps_where_mercantile_overflows() -> None:
    with pytest.warns(FutureWarning):
        assert mercantile.tile(179.9999999999999, 0.0, 17).x == 2**17
    assert tile(179.9999999999999, 0.0, 17) == Tile(2**17 - 1, 2**16, 17)
    # so mercantile.tiles drops the last column for a box starting there
    sliver = LngLatBbox(179.999999999999, 0.0, -80.0, 1e-9)
    assert Tile(1, 0, 1) not in mercantile_tiles(sliver, 1)
    assert set(tiles(sliver, [1])) == {Tile(0, 0, 1), Tile(1, 0, 1)}


@pytest.mark.parametrize("z", [0, 1, 17, 29])
def test_tile_clamps_poles(z: int) -> None:
    # mercantile raises InvalidLatitudeError at +-90; the map ends at MAX_LAT
    assert tile(0.0, 90.0, z).y == 0
    assert tile(0.0, -90.0, z).y == 2**z - 1
    assert tile(0.0, 86.0, z).y == 0
    assert tile(-180.0, 0.0, z).x == 0
    assert tile(180.0, 0.0, z).x == 2**z - 1


@pytest.mark.parametrize(
    ("lon", "lat", "z"),
    [(math.nan, 0.0, 1), (0.0, math.inf, 1), (0.0, 0.0, -1), (0.0, 0.0, 30), (0.0, 0.0, True)],
)
def test_tile_rejects_bad_input(lon: float, lat: float, z: int) -> None:
    with pytest.raises(ValueError):
        tile(lon, lat, z)


# ---------------------------------------------------------------- bounds / ul


@given(any_tile())
@example(Tile(0, 0, 0))
@example(Tile(2**22 - 1, 2**22 - 1, 22))
def test_bounds_and_ul_match_mercantile(t: Tile) -> None:
    assert bounds(t) == tuple(mercantile.bounds(t))
    assert ul(t) == tuple(mercantile.ul(t))
    assert isinstance(ul(t), LngLat)


@given(any_tile())
@example(Tile(0, 0, 0))
@example(Tile(0, 0, 22))
@example(Tile(2**22 - 1, 2**22 - 1, 22))
def test_round_trip_centre_of_bounds(t: Tile) -> None:
    b = bounds(t)
    assert tile((b.west + b.east) / 2, (b.south + b.north) / 2, t.z) == t


@settings(max_examples=300)
@given(any_tile())
@example(Tile(1, 1, 1))
@example(Tile(2**22 - 1, 2**22 - 1, 22))
@example(Tile(486, 332, 10))
def test_round_trip_upper_left_corner(t: Tile) -> None:
    # a corner computed by ul() is off by rounding; the point belongs to t
    corner = ul(t)
    assert tile(corner.lng, corner.lat, t.z) == t


@given(any_tile(max_zoom=20))
@example(Tile(0, 0, 0))
@example(Tile(2**20 - 1, 2**20 - 1, 20))
def test_tiles_of_a_tiles_bounds_is_that_tile(t: Tile) -> None:
    # an edge lying exactly on a tile edge pulls in no neighbour
    assert list(tiles(bounds(t), [t.z])) == [t]


def test_block_of_tiles_edges_exactly() -> None:
    nw, se = bounds(Tile(10, 20, 6)), bounds(Tile(11, 21, 6))
    box = LngLatBbox(nw.west, se.south, se.east, nw.north)
    assert set(tiles(box, [6])) == {
        Tile(10, 20, 6),
        Tile(10, 21, 6),
        Tile(11, 20, 6),
        Tile(11, 21, 6),
    }


# ---------------------------------------------------------------- tiles / ranges


@settings(max_examples=200)
@given(small_box())
@example((LngLatBbox(179.0, -18.0, -179.0, -16.0), 8))
@example((LngLatBbox(179.0, -18.0, -179.0, -16.0), 0))
@example((LngLatBbox(179.0, -18.0, -179.0, -16.0), 1))
@example((LngLatBbox(-180.0, -90.0, 180.0, 90.0), 2))
@example((LngLatBbox(8.53, 47.36, 8.57, 47.39), 14))
@example((LngLatBbox(-1.0, 84.0, 1.0, 90.0), 5))
def test_tiles_match_mercantile(case: tuple[LngLatBbox, int]) -> None:
    bbox, z = case
    got = list(tiles(bbox, [z]))
    assert len(got) == len(set(got)), "a tile listed twice"
    assert set(got) == mercantile_tiles(bbox, z)
    assert count_tiles(bbox, [z]) == len(got)


@given(small_box(), st.lists(st.integers(0, 3), min_size=1, max_size=3))
def test_count_tiles_equals_enumeration(case: tuple[LngLatBbox, int], offsets: list[int]) -> None:
    bbox, z = case
    zs = sorted({min(z + o, 20) for o in offsets})
    assert count_tiles(bbox, zs) == len(list(tiles(bbox, zs)))


def test_count_tiles_does_not_enumerate() -> None:
    world = LngLatBbox(-180.0, -90.0, 180.0, 90.0)
    assert count_tiles(world, range(30)) == sum(4**z for z in range(30))


def test_tiles_is_lazy_and_checks_the_box_at_once() -> None:
    it = tiles(LngLatBbox(-180.0, -90.0, 180.0, 90.0), [29])
    assert next(it) == Tile(0, 0, 29)
    with pytest.raises(ValueError):
        tiles(LngLatBbox(0.0, 10.0, 1.0, 5.0), [1])  # before any iteration


def test_antimeridian_ranges_two_parts_then_one() -> None:
    fiji = LngLatBbox(179.0, -18.0, -179.0, -16.0)
    parts = tile_ranges(fiji, 8)
    assert [xs for xs, _ in parts] == [range(255, 256), range(0, 1)]
    # at zoom 0 and 1 the halves share or abut columns: one part, no duplicate
    assert tile_ranges(fiji, 0) == [(range(0, 1), range(0, 1))]
    assert [xs for xs, _ in tile_ranges(fiji, 1)] == [range(0, 2)]
    assert list(tiles(fiji, [0])) == [Tile(0, 0, 0)]
    wide = LngLatBbox(10.0, -1.0, 5.0, 1.0)  # wraps almost all the way round
    assert count_tiles(wide, [3]) == len(set(tiles(wide, [3]))) == 8 * 2


@given(lons, st.floats(min_value=-89.0, max_value=89.0), zooms)
@example(0.0, 0.0, 5)
@example(180.0, 0.0, 5)
@example(-180.0, 0.0, 5)
def test_point_box_is_the_tile_of_the_point(lon: float, lat: float, z: int) -> None:
    # mercantile yields nothing for a point on a tile edge; we yield its tile
    if (lon, lat) == (0.0, 0.0) and z > 0:
        assert list(mercantile.tiles(lon, lat, lon, lat, [z])) == []
    assert list(tiles(LngLatBbox(lon, lat, lon, lat), [z])) == [tile(lon, lat, z)]


@pytest.mark.parametrize(
    "bbox",
    [
        LngLatBbox(0.0, 10.0, 1.0, 5.0),
        LngLatBbox(-181.0, 0.0, 1.0, 1.0),
        LngLatBbox(0.0, 0.0, 190.0, 1.0),
        LngLatBbox(0.0, -91.0, 1.0, 1.0),
        LngLatBbox(math.nan, 0.0, 1.0, 1.0),
    ],
)
def test_bad_boxes_are_refused(bbox: LngLatBbox) -> None:
    with pytest.raises(ValueError):
        tile_ranges(bbox, 3)
    with pytest.raises(ValueError):
        count_tiles(bbox, [3])


# ---------------------------------------------------------------- ids, quadkeys, resolution


@settings(max_examples=300)
@given(any_tile(max_zoom=29))
@example(Tile(0, 0, 0))
@example(Tile(2**29 - 1, 2**29 - 1, 29))
def test_tile_id_round_trip(t: Tile) -> None:
    i = tile_id(t)
    assert 0 <= i < 2**63
    assert i == (t.z << 58) | (t.x << 29) | t.y
    assert tile_from_id(i) == t


@given(any_tile(max_zoom=29), any_tile(max_zoom=29))
def test_tile_ids_sort_by_zoom_column_row(a: Tile, b: Tile) -> None:
    assert (tile_id(a) < tile_id(b)) == ((a.z, a.x, a.y) < (b.z, b.x, b.y))


@pytest.mark.parametrize("t", [Tile(2, 0, 1), Tile(0, -1, 3), Tile(0, 0, 30)])
def test_tile_id_refuses_impossible_tiles(t: Tile) -> None:
    with pytest.raises(ValueError):
        tile_id(t)


@pytest.mark.parametrize("i", [-1, (1 << 58) | (2 << 29), 30 << 58, True])
def test_tile_from_id_refuses_bad_ids(i: int) -> None:
    with pytest.raises(ValueError):
        tile_from_id(i)


@given(any_tile())
@example(Tile(0, 0, 0))
@example(Tile(3, 5, 3))
def test_quadkey_matches_mercantile(t: Tile) -> None:
    assert quadkey(t) == mercantile.quadkey(t)


def test_ground_resolution() -> None:
    assert ground_resolution_m(0.0, 17) == pytest.approx(1.1943, abs=1e-4)
    assert ground_resolution_m(0.0, 18) == pytest.approx(0.5972, abs=1e-4)
    assert ground_resolution_m(60.0, 17) == pytest.approx(ground_resolution_m(0.0, 17) / 2)
    assert ground_resolution_m(90.0, 0) == ground_resolution_m(MAX_LAT, 0) > 0


# ---------------------------------------------------------------- bbox_of_points


def test_bbox_of_points_ordinary() -> None:
    assert bbox_of_points([(47.0, 8.5), (47.2, 8.4), (46.9, 8.6)]) == LngLatBbox(
        8.4, 46.9, 8.6, 47.2
    )


def test_bbox_of_points_straddling_180() -> None:
    b = bbox_of_points([(-17.0, 179.9), (-17.1, -179.8), (-16.9, 179.95)])
    assert b == LngLatBbox(179.9, -17.1, -179.8, -16.9)
    assert b.west > b.east


def test_bbox_of_points_on_the_antimeridian_is_ordinary() -> None:
    assert bbox_of_points([(0.0, 179.0), (0.0, -180.0)]) == LngLatBbox(179.0, 0.0, 180.0, 0.0)
    assert bbox_of_points([(0.0, 180.0), (0.0, -179.0)]) == LngLatBbox(-180.0, 0.0, -179.0, 0.0)


@pytest.mark.parametrize("points", [[], [(91.0, 0.0)], [(0.0, 181.0)], [(math.nan, 0.0)]])
def test_bbox_of_points_refuses_bad_points(points: list[tuple[float, float]]) -> None:
    with pytest.raises(ValueError):
        bbox_of_points(points)


@given(st.lists(st.tuples(st.floats(-90.0, 90.0), lons), min_size=1, max_size=12))
@example([(-17.0, 179.9), (-17.1, -179.8)])
@example([(0.0, -170.0), (0.0, -10.0), (0.0, 10.0), (0.0, 170.0)])
def test_bbox_of_points_is_the_smallest_cover(points: list[tuple[float, float]]) -> None:
    b = bbox_of_points(points)
    for lat, lon in points:
        assert bbox_contains(b, lat, lon)
    # brute force: the shortest eastward run from some point covering all
    best = min(max((lon - w) % 360.0 for _, lon in points) for _, w in points)
    assert lon_span(b) == pytest.approx(best, abs=1e-9)


# ---------------------------------------------------------------- buffer_bbox


def test_buffer_of_a_point_at_the_equator() -> None:
    b = buffer_bbox(LngLatBbox(0.0, 0.0, 0.0, 0.0), 500.0)
    dlat = math.degrees(500.0 / EARTH_RADIUS_M)
    assert b.north == pytest.approx(dlat) and b.south == pytest.approx(-dlat)
    assert b.east == pytest.approx(dlat, rel=1e-6) and b.west == pytest.approx(-dlat, rel=1e-6)
    assert haversine_m(0.0, b.west, 0.0, b.east) == pytest.approx(1000.0, rel=1e-6)


def test_buffer_zero_is_identity() -> None:
    box = LngLatBbox(8.5, 47.3, 8.6, 47.4)
    assert buffer_bbox(box, 0.0) == box


@settings(max_examples=150)
@given(
    st.floats(min_value=-84.0, max_value=84.0),
    st.floats(min_value=0.0, max_value=0.5),
    st.floats(min_value=-170.0, max_value=168.0),  # buffer stays off 180
    st.floats(min_value=0.0, max_value=1.0),
    st.floats(min_value=1.0, max_value=50_000.0),
)
@example(84.9, 0.1, 10.0, 0.1, 500.0)
@example(-84.0, 0.5, 0.0, 1.0, 50_000.0)
@example(0.0, 0.0, 0.0, 0.0, 1.0)
def test_buffer_is_at_least_the_distance(
    south: float, height: float, west: float, width: float, m: float
) -> None:
    box = LngLatBbox(west, south, west + width, south + height)
    b = buffer_bbox(box, m)
    assert b.west <= b.east  # nothing here reaches the antimeridian
    for lat in (box.south, box.north):
        # the east and west edges of the result are >= m from the box
        assert distance_to_meridian_m(lat, box.east, b.east, b.south, b.north) >= m - TOL_M
        assert distance_to_meridian_m(lat, box.west, b.west, b.south, b.north) >= m - TOL_M
    # south and north, unless clamped
    if b.north < MAX_LAT:
        assert haversine_m(box.north, west, b.north, west) == pytest.approx(m, abs=TOL_M)
    if b.south > -MAX_LAT:
        assert haversine_m(box.south, west, b.south, west) == pytest.approx(m, abs=TOL_M)
    # and not wastefully wide: along the farthest parallel, about m
    far = max(abs(box.south), abs(box.north))
    assert haversine_m(far, box.east, far, b.east) <= m * 1.01


def test_buffer_uses_the_edge_farthest_from_the_equator() -> None:
    box = LngLatBbox(10.0, 60.0, 10.1, 80.0)
    b = buffer_bbox(box, 1000.0)
    # at 80 deg the parallel is ~5.8x shorter than at the equator
    assert haversine_m(80.0, box.east, 80.0, b.east) >= 1000.0
    assert haversine_m(60.0, box.east, 60.0, b.east) > 1500.0


def test_buffer_at_high_latitude_clamps() -> None:
    box = LngLatBbox(10.0, 84.9, 10.1, 85.0)
    b = buffer_bbox(box, 20_000.0)
    assert b.north == MAX_LAT
    assert haversine_m(box.south, 10.0, b.south, 10.0) == pytest.approx(20_000.0, abs=TOL_M)
    assert distance_to_meridian_m(85.0, box.east, b.east, b.south, b.north) >= 20_000.0 - TOL_M
    beyond = buffer_bbox(LngLatBbox(0.0, 86.0, 0.0, 86.0), 500.0)
    assert beyond.south == beyond.north == MAX_LAT
    assert lon_span(beyond) < 1.0  # finite width, not the whole world
    south = buffer_bbox(LngLatBbox(0.0, -85.05, 0.0, -85.05), 5000.0)
    assert south.south == -MAX_LAT


def test_buffer_wraps_at_the_antimeridian() -> None:
    east_side = buffer_bbox(LngLatBbox(179.995, -17.01, 179.999, -17.0), 1000.0)
    assert east_side.west > east_side.east
    assert 179.98 < east_side.west < 179.995 and -180.0 < east_side.east < -179.99
    assert bbox_contains(east_side, -17.005, -179.999)
    west_side = buffer_bbox(LngLatBbox(-179.999, -17.01, -179.99, -17.0), 1000.0)
    assert west_side.west > west_side.east and west_side.west > 179.99
    crossing = buffer_bbox(LngLatBbox(179.99, -17.01, -179.99, -17.0), 1000.0)
    assert crossing.west < 179.99 and crossing.east > -179.99 and crossing.west > crossing.east
    assert lon_span(crossing) == pytest.approx(0.02 + 2 * (179.99 - crossing.west), rel=1e-9)


def test_buffer_reaching_round_the_world_is_full_width() -> None:
    assert buffer_bbox(LngLatBbox(-170.0, 0.0, 170.0, 1.0), 2_000_000.0)[::2] == (-180.0, 180.0)
    assert buffer_bbox(LngLatBbox(179.0, 0.0, 178.99999, 1.0), 10.0)[::2] == (-180.0, 180.0)
    assert buffer_bbox(LngLatBbox(179.0, 0.0, 178.99, 1.0), 10.0)[::2] != (-180.0, 180.0)
    assert buffer_bbox(LngLatBbox(0.0, 0.0, 1.0, 1.0), 30_000_000.0) == LngLatBbox(
        -180.0, -MAX_LAT, 180.0, MAX_LAT
    )


def test_buffer_east_edge_exactly_on_180_stays_ordinary() -> None:
    dlon = math.degrees(math.asin(math.sin(1000.0 / EARTH_RADIUS_M)))
    b = buffer_bbox(LngLatBbox(170.0, 0.0, 180.0 - dlon, 0.0), 1000.0)
    assert b.east in (180.0, pytest.approx(180.0))
    assert b.west < b.east


@pytest.mark.parametrize("m", [-1.0, math.nan, math.inf])
def test_buffer_refuses_bad_distance(m: float) -> None:
    with pytest.raises(ValueError):
        buffer_bbox(LngLatBbox(0.0, 0.0, 1.0, 1.0), m)


# ---------------------------------------------------------------- bbox_contains


def test_bbox_contains() -> None:
    fiji = LngLatBbox(179.0, -18.0, -179.0, -16.0)
    assert bbox_contains(fiji, -17.0, 179.5)
    assert bbox_contains(fiji, -17.0, -179.5)
    assert bbox_contains(fiji, -17.0, 180.0) and bbox_contains(fiji, -17.0, -180.0)
    assert bbox_contains(fiji, -18.0, 179.0)  # edges included
    assert not bbox_contains(fiji, -17.0, 0.0)
    assert not bbox_contains(fiji, -19.0, 179.5)
    to_180 = LngLatBbox(170.0, 0.0, 180.0, 1.0)
    assert bbox_contains(to_180, 0.5, -180.0)
    assert not bbox_contains(to_180, 0.5, -179.9)
