"""Web-Mercator (XYZ) tile math over small typed values.

Pure functions over :class:`typing.NamedTuple` values, in the style of
mercantile: :func:`tile` finds the tile under a point, :func:`bounds` the box
of a tile, :func:`tiles` lazily lists the tiles a box touches and
:func:`count_tiles` counts them without listing.  :func:`tile` and
:func:`tiles` agree with ``mercantile.tile`` and ``mercantile.tiles``
(tests/unit/tiles/test_tiles.py uses mercantile as the oracle); where mercantile returns
an impossible tile or nothing at all, this module says so and does better.

Longitudes are degrees in [-180, 180], latitudes degrees in [-90, 90].  A box
with ``west > east`` crosses the antimeridian: it runs east from ``west`` to
180 and on from -180 to ``east``.  Latitudes beyond :data:`MAX_LAT` are
valid input; the map ends there, so they are clamped.

Only the standard library is imported: this module is on the no-op path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

__all__ = [
    "MAX_LAT",
    "MAX_ZOOM",
    "EARTH_RADIUS_M",
    "TILE_SIZE_PX",
    "Tile",
    "LngLat",
    "LngLatBbox",
    "LatLonAlt",
    "tile",
    "ul",
    "bounds",
    "tile_ranges",
    "tiles",
    "count_tiles",
    "bbox_of_points",
    "buffer_bbox",
    "bbox_contains",
    "tile_id",
    "tile_from_id",
    "quadkey",
    "ground_resolution_m",
]

MAX_LAT = 85.0511287798066
"""Latitude of the top edge of tile (0, 0, 0); Web Mercator ends here."""

MAX_ZOOM = 29
"""Largest zoom :func:`tile_id` can encode (x and y take 29 bits each)."""

EARTH_RADIUS_M = 6378137.0
"""WGS 84 semi-major axis, the sphere Web Mercator projects."""

TILE_SIZE_PX = 256

# mercantile's nudges, kept identical so the results agree: a point within
# _EPSILON (in unit-square coordinates) of a tile's right or bottom edge
# counts in the next tile; a box's east and south edges are pulled in by
# _LL_EPSILON degrees so an edge lying on a tile edge does not pull in the
# neighbour.
_EPSILON = 1e-14
_LL_EPSILON = 1e-11

_ID_BITS = 29
_ID_MASK = (1 << _ID_BITS) - 1


class Tile(NamedTuple):
    """An XYZ tile: column ``x`` (eastward), row ``y`` (southward), zoom ``z``."""

    x: int
    y: int
    z: int


class LngLat(NamedTuple):
    """A point as (longitude, latitude) in degrees, mercantile's order."""

    lng: float
    lat: float


class LngLatBbox(NamedTuple):
    """A geographic box in degrees; ``west > east`` crosses the antimeridian."""

    west: float
    south: float
    east: float
    north: float


class LatLonAlt(NamedTuple):
    """A flight point: latitude and longitude in degrees, altitude in metres."""

    lat: float
    lon: float
    alt_m: float


def _check_zoom(z: int) -> None:
    if isinstance(z, bool) or not isinstance(z, int) or not 0 <= z <= MAX_ZOOM:
        raise ValueError(f"zoom {z!r} is not an integer in 0..{MAX_ZOOM}")


def _clamp_lat(lat: float) -> float:
    return min(max(lat, -MAX_LAT), MAX_LAT)


def tile(lon: float, lat: float, z: int) -> Tile:
    """The tile at zoom ``z`` that contains a point.

    Latitude is clamped to ±:data:`MAX_LAT` (so ±90 gives the first or last
    row instead of mercantile's ``InvalidLatitudeError``); a longitude of 180
    or more gives the last column, -180 or less the first.  A point on a
    tile edge belongs to the tile east of it (or south of it).

    Parameters
    ----------
    lon, lat
        The point in degrees.
    z
        Zoom level, 0..:data:`MAX_ZOOM`.

    Returns
    -------
    Tile

    Raises
    ------
    ValueError
        If ``z`` is out of range or ``lon``/``lat`` is not finite.

    Notes
    -----
    Same arithmetic as ``mercantile.tile``, so the two agree bit for bit,
    except within 1e-14 of the east or south edge of the world where
    mercantile returns column or row ``2**z`` (a tile that does not exist);
    here it is clamped to ``2**z - 1``.

    Examples
    --------
    >>> tile(8.54, 47.37, 17)
    Tile(x=68645, y=45903, z=17)
    >>> tile(180.0, 90.0, 2)
    Tile(x=3, y=0, z=2)
    """
    _check_zoom(z)
    if not (math.isfinite(lon) and math.isfinite(lat)):
        raise ValueError(f"point ({lon!r}, {lat!r}) is not finite")
    lat = _clamp_lat(lat)
    x = lon / 360.0 + 0.5
    sinlat = math.sin(math.radians(lat))
    y = 0.5 - 0.25 * math.log((1.0 + sinlat) / (1.0 - sinlat)) / math.pi
    n = 1 << z
    z2 = float(n)
    last = n - 1
    if x <= 0:
        xt = 0
    elif x >= 1:
        xt = last
    else:
        xt = min(int(math.floor((x + _EPSILON) * z2)), last)
    if y <= 0:
        yt = 0
    elif y >= 1:
        yt = last
    else:
        yt = min(int(math.floor((y + _EPSILON) * z2)), last)
    return Tile(xt, yt, z)


def _lat_of_row_edge(y: int, z2: float) -> float:
    return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * y / z2))))


def ul(t: Tile) -> LngLat:
    """The upper-left (north-west) corner of a tile.

    Examples
    --------
    >>> ul(Tile(x=0, y=0, z=1))
    LngLat(lng=-180.0, lat=85.0511287798066)
    >>> ul(Tile(1, 1, 1))
    LngLat(lng=0.0, lat=0.0)
    """
    x, y, z = t
    z2 = math.pow(2, z)
    return LngLat(x / z2 * 360.0 - 180.0, _lat_of_row_edge(y, z2))


def bounds(t: Tile) -> LngLatBbox:
    """The geographic box of a tile (same arithmetic as ``mercantile.bounds``).

    Examples
    --------
    >>> bounds(Tile(1, 0, 1))
    LngLatBbox(west=0.0, south=0.0, east=180.0, north=85.0511287798066)
    """
    x, y, z = t
    z2 = math.pow(2, z)
    return LngLatBbox(
        x / z2 * 360.0 - 180.0,
        _lat_of_row_edge(y + 1, z2),
        (x + 1) / z2 * 360.0 - 180.0,
        _lat_of_row_edge(y, z2),
    )


def _check_bbox(bbox: LngLatBbox) -> LngLatBbox:
    west, south, east, north = bbox
    if not all(math.isfinite(v) for v in (west, south, east, north)):
        raise ValueError(f"bbox {tuple(bbox)!r} is not finite")
    if not (-180.0 <= west <= 180.0 and -180.0 <= east <= 180.0):
        raise ValueError(f"bbox {tuple(bbox)!r}: longitudes must lie in -180..180")
    if not (-90.0 <= south <= north <= 90.0):
        raise ValueError(f"bbox {tuple(bbox)!r}: need -90 <= south <= north <= 90")
    return LngLatBbox(west, south, east, north)


def tile_ranges(bbox: LngLatBbox, z: int) -> list[tuple[range, range]]:
    """The columns and rows of the tiles a box touches at zoom ``z``.

    A tile is included when it overlaps the box.  An east or south box edge
    lying exactly on a tile edge does not pull in the neighbouring tile, as
    in ``mercantile.tiles``.  Latitudes are clamped to ±:data:`MAX_LAT`.

    Parameters
    ----------
    bbox
        The box; ``west > east`` crosses the antimeridian.
    z
        Zoom level.

    Returns
    -------
    list of (range, range)
        One ``(x_range, y_range)`` per part: two parts for a box crossing
        the antimeridian (west part first: the columns from ``west`` to 180,
        then those from -180 to ``east``), one otherwise, or one when the two
        parts would share or abut columns (at low zooms), so no tile is
        listed twice.  Never empty ranges.

    Raises
    ------
    ValueError
        If the box is not finite, a longitude lies outside -180..180, or
        ``south > north``; or ``z`` is out of range.

    Notes
    -----
    Where mercantile yields nothing, for a box narrower than 1e-11 degrees
    lying on a tile edge (a point box, say), this returns the one tile
    :func:`tile` gives for its north-west corner.

    Examples
    --------
    >>> tile_ranges(LngLatBbox(179.0, -18.0, -179.0, -16.0), 8)
    [(range(255, 256), range(139, 142)), (range(0, 1), range(139, 142))]
    """
    _check_zoom(z)
    west, south, east, north = _check_bbox(bbox)
    s, n = _clamp_lat(south), _clamp_lat(north)
    if west <= east:
        parts = [(west, east)]
    else:
        parts = [(west, 180.0), (-180.0, east)]
    top = tile(0.0, n, z).y
    bottom = max(tile(0.0, s + _LL_EPSILON, z).y, top)
    rows = range(top, bottom + 1)
    cols: list[range] = []
    for w, e in parts:
        left = tile(w, 0.0, z).x
        right = max(tile(e - _LL_EPSILON, 0.0, z).x, left)
        cols.append(range(left, right + 1))
    if len(cols) == 2 and cols[0].start <= cols[1].stop:
        cols = [range(0, 1 << z)]
    return [(c, rows) for c in cols]


def tiles(bbox: LngLatBbox, zooms: Iterable[int]) -> Iterator[Tile]:
    """Lazily yield the tiles a box touches at each zoom in ``zooms``.

    The box is checked at once; tiles are made as they are consumed, zoom by
    zoom, column by column, row by row (mercantile's order).  See
    :func:`tile_ranges` for which tiles are included.

    Examples
    --------
    >>> list(tiles(LngLatBbox(-1.0, -1.0, 1.0, 1.0), [1]))
    [Tile(x=0, y=0, z=1), Tile(x=0, y=1, z=1), Tile(x=1, y=0, z=1), Tile(x=1, y=1, z=1)]
    """
    box = _check_bbox(bbox)

    def generate() -> Iterator[Tile]:
        for z in zooms:
            for xs, ys in tile_ranges(box, z):
                for x in xs:
                    for y in ys:
                        yield Tile(x, y, z)

    return generate()


def count_tiles(bbox: LngLatBbox, zooms: Iterable[int]) -> int:
    """How many tiles :func:`tiles` yields, in O(1) per zoom.

    Examples
    --------
    >>> count_tiles(LngLatBbox(-1.0, -1.0, 1.0, 1.0), [0, 1, 2])
    9
    """
    return sum(len(xs) * len(ys) for z in zooms for xs, ys in tile_ranges(bbox, z))


def bbox_of_points(points: Iterable[tuple[float, float]]) -> LngLatBbox:
    """The smallest box holding every ``(lat, lon)`` point.

    Antimeridian-aware: of the two ways round the globe, the longitude
    interval is the shorter one that covers every point.  It leaves out the
    largest gap between consecutive longitudes (sorted, counting the gap
    that wraps from the largest back to the smallest).  When that largest
    gap is the wrapping one (or ties with it) the box is an ordinary
    ``west <= east`` box; otherwise it crosses the antimeridian and
    ``west > east``.  A crossing box that would end exactly on ±180 is
    returned as the equivalent ordinary box.

    Parameters
    ----------
    points
        ``(lat, lon)`` pairs in degrees, lat in -90..90, lon in -180..180.

    Raises
    ------
    ValueError
        If there are no points or a coordinate is out of range or not
        finite.

    Examples
    --------
    >>> bbox_of_points([(-17.0, 179.9), (-17.1, -179.8)])
    LngLatBbox(west=179.9, south=-17.1, east=-179.8, north=-17.0)
    """
    lats: list[float] = []
    lons: list[float] = []
    for lat, lon in points:
        if not (
            math.isfinite(lat)
            and math.isfinite(lon)
            and -90.0 <= lat <= 90.0
            and -180.0 <= lon <= 180.0
        ):
            raise ValueError(f"point (lat={lat!r}, lon={lon!r}) is out of range")
        lats.append(float(lat))
        lons.append(float(lon))
    if not lats:
        raise ValueError("no points to bound")
    south, north = min(lats), max(lats)
    lons.sort()
    wrap_gap = lons[0] + 360.0 - lons[-1]
    best_gap, best_i = wrap_gap, -1
    for i in range(len(lons) - 1):
        gap = lons[i + 1] - lons[i]
        if gap > best_gap:
            best_gap, best_i = gap, i
    if best_i < 0:
        return LngLatBbox(lons[0], south, lons[-1], north)
    west, east = lons[best_i + 1], lons[best_i]
    if east == -180.0:
        return LngLatBbox(west, south, 180.0, north)
    if west == 180.0:
        return LngLatBbox(-180.0, south, east, north)
    return LngLatBbox(west, south, east, north)


def _wrap_lon(lon: float) -> float:
    """``lon`` (within one turn of -180..180) moved by a turn into -180..180."""
    if lon > 180.0:
        return lon - 360.0
    if lon < -180.0:
        return lon + 360.0
    return lon


def buffer_bbox(bbox: LngLatBbox, metres: float) -> LngLatBbox:
    """Grow a box by at least ``metres`` on every side.

    Every point of the map (``|lat| <= MAX_LAT``) whose great-circle
    distance to the box is at most ``metres`` lies in the result.

    * Latitude: ``dlat = degrees(metres / EARTH_RADIUS_M)`` (about
      ``metres / 111_320``) south and north; the results are clamped to
      ±:data:`MAX_LAT`.
    * Longitude: ``dlon = degrees(asin(sin(metres / R) / cos(lat_far)))``
      west and east, where ``lat_far`` is the box's latitude farthest from
      the equator, capped at ``MAX_LAT + dlat`` (points farther out are more
      than ``metres`` from the map).  This is ``dlat / cos(lat_far)`` to
      first order and never less: the exact angle at which the meridian is
      ``metres`` away from a point at ``lat_far``, so the buffer is at least
      ``metres`` everywhere along the east and west edges.
    * The longitudes are wrapped into -180..180; a result that crosses the
      antimeridian has ``west > east`` (an east edge landing exactly on 180
      stays 180).  When the grown longitude span reaches 360 degrees, or no
      angle is wide enough (at the poles), the result spans -180..180.

    Parameters
    ----------
    bbox
        The box; ``west > east`` crosses the antimeridian.
    metres
        The buffer, finite and >= 0.

    Raises
    ------
    ValueError
        If the box is invalid (see :func:`tile_ranges`) or ``metres`` is
        negative or not finite.

    Examples
    --------
    >>> b = buffer_bbox(LngLatBbox(179.99, -17.01, 179.995, -17.0), 1000.0)
    >>> b.west > b.east
    True
    """
    west, south, east, north = _check_bbox(bbox)
    if not (math.isfinite(metres) and metres >= 0):
        raise ValueError(f"buffer {metres!r} m is not a finite number >= 0")
    ang = metres / EARTH_RADIUS_M
    dlat = math.degrees(ang)
    new_south = _clamp_lat(south - dlat)
    new_north = _clamp_lat(north + dlat)
    lat_far = min(max(abs(south), abs(north)), MAX_LAT + dlat)
    span = east - west if west <= east else east + 360.0 - west
    full = LngLatBbox(-180.0, new_south, 180.0, new_north)
    if lat_far >= 90.0:
        return full
    ratio = math.sin(ang) / math.cos(math.radians(lat_far))
    if ang >= math.pi / 2 or ratio >= 1.0:
        return full
    dlon = math.degrees(math.asin(ratio))
    if span + 2.0 * dlon >= 360.0:
        return full
    new_west = _wrap_lon(west - dlon)
    new_east = _wrap_lon(east + dlon)
    return LngLatBbox(new_west, new_south, new_east, new_north)


def bbox_contains(bbox: LngLatBbox, lat: float, lon: float) -> bool:
    """Whether a point lies in a box (edges included), antimeridian-aware.

    Longitudes 180 and -180 are the same meridian.

    Examples
    --------
    >>> bbox_contains(LngLatBbox(179.0, -18.0, -179.0, -16.0), -17.0, -179.5)
    True
    >>> bbox_contains(LngLatBbox(179.0, -18.0, -179.0, -16.0), -17.0, 0.0)
    False
    """
    west, south, east, north = bbox
    if not south <= lat <= north:
        return False
    candidates = (lon, 180.0) if lon == -180.0 else (lon, -180.0) if lon == 180.0 else (lon,)
    for c in candidates:
        if west <= east:
            if west <= c <= east:
                return True
        elif c >= west or c <= east:
            return True
    return False


def _check_tile(t: Tile) -> None:
    x, y, z = t
    _check_zoom(z)
    n = 1 << z
    if not (0 <= x < n and 0 <= y < n):
        raise ValueError(f"{tuple(t)!r} is not a tile: x and y must lie in 0..{n - 1}")


def tile_id(t: Tile) -> int:
    """One integer naming a tile: ``(z << 58) | (x << 29) | y``.

    Fits a signed 64-bit integer; ids sort by zoom, then column, then row.

    Raises
    ------
    ValueError
        If the tile does not exist or ``z > MAX_ZOOM``.

    Examples
    --------
    >>> tile_id(Tile(3, 5, 4))
    1152921506217459717
    >>> tile_from_id(1152921506217459717)
    Tile(x=3, y=5, z=4)
    """
    _check_tile(t)
    x, y, z = t
    return (z << (2 * _ID_BITS)) | (x << _ID_BITS) | y


def tile_from_id(i: int) -> Tile:
    """The tile named by a :func:`tile_id`.

    Raises
    ------
    ValueError
        If ``i`` names no tile.
    """
    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
        raise ValueError(f"tile id {i!r} is not a non-negative integer")
    t = Tile((i >> _ID_BITS) & _ID_MASK, i & _ID_MASK, i >> (2 * _ID_BITS))
    try:
        _check_tile(t)
    except ValueError:
        raise ValueError(f"tile id {i!r} names no tile") from None
    return t


def quadkey(t: Tile) -> str:
    """The Bing-style quadkey of a tile (``""`` at zoom 0).

    Examples
    --------
    >>> quadkey(Tile(3, 5, 3))
    '213'
    """
    x, y, z = t
    digits = []
    for bit in range(z - 1, -1, -1):
        digits.append("0123"[((x >> bit) & 1) | (((y >> bit) & 1) << 1)])
    return "".join(digits)


def ground_resolution_m(lat: float, z: int) -> float:
    """Metres per pixel of a 256-pixel tile at latitude ``lat`` and zoom ``z``.

    Latitude is clamped to ±:data:`MAX_LAT`.

    Examples
    --------
    >>> round(ground_resolution_m(0.0, 17), 3)
    1.194
    """
    _check_zoom(z)
    circumference = 2.0 * math.pi * EARTH_RADIUS_M
    return math.cos(math.radians(_clamp_lat(lat))) * circumference / (TILE_SIZE_PX * (1 << z))
