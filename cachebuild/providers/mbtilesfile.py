"""An MBTiles file read as a tile source: opened read-only and immutable, XYZ rows flipped to TMS.

The provider (``PROVIDER=file.mbtiles``) and every reader of a published
cache's ``tiles.mbtiles`` open it here, so no journal beside the file is
ever replayed (:mod:`cachebuild._util.sqliteuri`).
"""

from __future__ import annotations

import os
import sqlite3

from cachebuild._util.sqliteuri import connect_immutable
from cachebuild.tilemath import Tile

__all__ = ["connect_readonly", "read_mbtiles_tile", "read_tile", "tile_length"]


def connect_readonly(
    path: str | os.PathLike[str], *, check_same_thread: bool = True
) -> sqlite3.Connection:
    """Open an MBTiles file read-only and immutable: no journal beside it is ever replayed (:mod:`.sqliteuri`)."""
    return connect_immutable(path, check_same_thread=check_same_thread)


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


def tile_length(conn: sqlite3.Connection, tile: Tile) -> int | None:
    """The byte length of XYZ ``tile``'s data, without reading it (None: no such tile)."""
    row = conn.execute(
        "SELECT length(tile_data) FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
        (tile.z, tile.x, (1 << tile.z) - 1 - tile.y),
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


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
