"""The cache's tiles as one MBTiles 1.3 file, and reading tiles back.

MBTiles (https://github.com/mapbox/mbtiles-spec, 1.3) is SQLite with a
``metadata(name, value)`` table and ``tiles(zoom_level, tile_column,
tile_row, tile_data)`` in TMS rows: ``tile_row = 2**z - 1 - y``.  GDAL, QGIS
and most map tools read it, which makes ``gdalinfo`` an independent check of
what we write.

The file is written to a temporary name beside its destination and renamed
onto it, so a reader sees the old file or the new one, never half of one.
Tile bytes stream from the store one at a time.

sqlite3 and numpy are imported inside the functions.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BuildError
from .tiles import LngLatBbox, Tile

if TYPE_CHECKING:
    import sqlite3

__all__ = [
    "MBTILES_APPLICATION_ID",
    "detect_format",
    "write_mbtiles",
    "connect_readonly",
    "read_tile",
    "read_mbtiles_tile",
]

#: ``PRAGMA application_id`` of an MBTiles file: ASCII "MPBX", from SQLite's
#: registry of magic numbers (magic.txt), which the spec points to.
MBTILES_APPLICATION_ID = 0x4D504258

_SCHEMA = """
CREATE TABLE metadata (name text, value text);
CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob);
"""
# Built after the inserts: faster than keeping it up to date row by row.
_INDEXES = """
CREATE UNIQUE INDEX name ON metadata (name);
CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row);
"""
_FORMATS = ("jpg", "png", "webp")


def detect_format(data: bytes) -> str | None:
    """The MBTiles ``format`` of image bytes, from their magic number.

    >>> detect_format(b"\\xff\\xd8\\xff\\xe0 rest of a JPEG")
    'jpg'
    >>> detect_format(b"<html>") is None
    True
    """
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _fmt(v: float) -> str:
    return f"{v:.8f}".rstrip("0").rstrip(".")


def _bounds_and_center(bbox: LngLatBbox, zoom: int) -> tuple[str, str]:
    """``bounds`` and ``center`` metadata values for a box.

    A box crossing the antimeridian cannot be written as left < right, so
    its bounds span every longitude; its centre is the middle of the box
    across the antimeridian.
    """
    from .tiles import MAX_LAT

    west, south, east, north = bbox
    south, north = max(south, -MAX_LAT), min(north, MAX_LAT)
    if west > east:
        left, right = -180.0, 180.0
        mid = (west + east + 360.0) / 2.0
        lon = mid - 360.0 if mid > 180.0 else mid
    else:
        left, right = west, east
        lon = (west + east) / 2.0
    bounds = ",".join(_fmt(v) for v in (left, south, right, north))
    center = f"{_fmt(lon)},{_fmt((south + north) / 2.0)},{zoom}"
    return bounds, center


def write_mbtiles(
    *,
    tileset_dir: Path,
    store_root: Path,
    out_path: Path,
    name: str,
    bbox: LngLatBbox,
    zooms: Sequence[int],
    image_format: str | None = None,
) -> dict[str, int]:
    """Write the tile set's tiles, from the store, as an MBTiles 1.3 file.

    Parameters
    ----------
    tileset_dir
        Holds ``tiles.npy`` (see :mod:`cachebuild.tileset`).
    store_root
        The tile store the images are read from (their hashes are checked).
    out_path
        The file to write; replaced atomically.
    name
        The tileset's ``name`` metadata.
    bbox, zooms
        The area and zoom levels, for ``bounds``, ``center``, ``minzoom``
        and ``maxzoom``.
    image_format
        ``jpg``, ``png`` or ``webp``; by default the first tile's format.

    Returns
    -------
    dict
        ``{"tiles": n, "bytes": file size}``.

    Raises
    ------
    BuildError
        When a tile's object is missing from the store or corrupt, or the
        tiles do not all have the one format.
    """
    import sqlite3

    from .store import TileStore
    from .tileset import read_tiles

    fmt = image_format
    if fmt is not None and fmt not in _FORMATS:
        raise BuildError(f"image format {fmt!r} is not one of {', '.join(_FORMATS)}")
    zooms = sorted({int(z) for z in zooms})
    if not zooms:
        raise BuildError("no zoom levels to write an MBTiles file for")
    tiles = read_tiles(tileset_dir)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    with TileStore(store_root) as store:
        rows = _tile_rows(tiles, store)
        first = next(rows, None)
        if fmt is None:
            fmt = "jpg" if first is None else detect_format(first[3])
            if fmt is None:
                z, x, row, _ = first  # type: ignore[misc]
                raise BuildError(f"tile {z}/{x}/{(1 << z) - 1 - row} is not a JPEG, PNG or WebP image")
        bounds, center = _bounds_and_center(bbox, zooms[0])
        metadata = {
            "name": name,
            "format": fmt,
            "bounds": bounds,
            "center": center,
            "minzoom": str(zooms[0]),
            "maxzoom": str(zooms[-1]),
            "type": "baselayer",
            # the spec: "the version of the tileset [...] not of the MBTiles
            # specification"
            "version": "1",
            "scheme": "tms",
            "description": "satellite tiles of a cachebuild map cache",
        }
        count = 0
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute(f"PRAGMA application_id = {MBTILES_APPLICATION_ID}")
                # a temp file: a crash loses it, never a published one
                conn.execute("PRAGMA journal_mode = OFF")
                conn.execute("PRAGMA synchronous = OFF")
                conn.execute("BEGIN")
                _execute_all(conn, _SCHEMA)
                conn.executemany("INSERT INTO metadata (name, value) VALUES (?, ?)", sorted(metadata.items()))

                def checked() -> Iterator[tuple[int, int, int, bytes]]:
                    nonlocal count
                    if first is None:
                        return
                    for row in _chain(first, rows):
                        got = detect_format(row[3])
                        if got != fmt:
                            z, x, tms, _ = row
                            raise BuildError(
                                f"tile {z}/{x}/{(1 << z) - 1 - tms} is {got or 'not an image'}, "
                                f"the MBTiles file is {fmt}",
                                remedy="use a provider that serves one image format",
                            )
                        count += 1
                        yield row

                conn.executemany(
                    "INSERT INTO tiles (zoom_level, tile_column, tile_row, tile_data) VALUES (?, ?, ?, ?)",
                    checked(),
                )
                _execute_all(conn, _INDEXES)
                conn.execute("COMMIT")
            finally:
                conn.close()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, out_path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    return {"tiles": count, "bytes": out_path.stat().st_size}


def _execute_all(conn: sqlite3.Connection, script: str) -> None:
    """Run each statement of ``script`` (``executescript`` would COMMIT first)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _tile_rows(tiles: Any, store: Any) -> Iterator[tuple[int, int, int, bytes]]:
    """``(zoom_level, tile_column, tile_row, data)`` per tile, read one at a time."""
    from .tiles import tile_from_id
    from .tileset import hex_digests

    for tid, hexdigest in zip(tiles["id"].tolist(), hex_digests(tiles)):
        t = tile_from_id(tid)
        # a missing or corrupt object raises StoreObjectError: the build fetches it again
        data = store.get_checked(hexdigest, what=f"tile {t.z}/{t.x}/{t.y}")
        yield (t.z, t.x, (1 << t.z) - 1 - t.y, data)


def connect_readonly(path: str | os.PathLike[str], *, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open an SQLite file read-only (``mode=ro``): it cannot be changed through this."""
    import sqlite3

    uri = Path(path).absolute().as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True, check_same_thread=check_same_thread)


def read_tile(conn: sqlite3.Connection, tile: Tile) -> bytes | None:
    """The bytes of XYZ ``tile`` from an open MBTiles file, or None if it has none.

    The XYZ row is flipped to the file's TMS row.
    """
    row = conn.execute(
        "SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
        (tile.z, tile.x, (1 << tile.z) - 1 - tile.y),
    ).fetchone()
    if row is None or row[0] is None:
        return None
    data = row[0]
    return data.encode() if isinstance(data, str) else bytes(data)


def read_mbtiles_tile(path: str | os.PathLike[str], tile: Tile) -> bytes | None:
    """The bytes of XYZ ``tile`` in the MBTiles file at ``path``, or None.

    Opens and closes the file; for many tiles, use :func:`connect_readonly`
    and :func:`read_tile`.
    """
    conn = connect_readonly(path)
    try:
        return read_tile(conn, tile)
    finally:
        conn.close()
