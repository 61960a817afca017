"""The cache's tiles as one MBTiles 1.3 file, and reading tiles back.

MBTiles (https://github.com/mapbox/mbtiles-spec, 1.3) is SQLite with a
``metadata(name, value)`` table and ``tiles(zoom_level, tile_column,
tile_row, tile_data)`` in TMS rows: ``tile_row = 2**z - 1 - y``.  GDAL, QGIS
and most map tools read it, which makes ``gdalinfo`` an independent check of
what we write.

The file is written to a temporary name beside its destination and renamed
onto it, so a reader sees the old file or the new one, never half of one.
Tile bytes stream from the store one at a time.

A rebuild after a small change (a shifted bbox) does not write every tile
again: a record beside the file (``.tiles.mbtiles.rows``: each row's tile id
and image hash, the file's identity and SHA-256) says what the last file
holds, so the new one is a copy of it with only the changed rows deleted
and inserted (see :func:`write_mbtiles`).  Anything that does not match the
record means a write in full.  Why, with figures: docs/design/mbtiles-update.md.

sqlite3 and numpy are imported inside the functions.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachebuild._util.fileio import copy_file, start_writeback_of
from cachebuild._util.fs import atomic_write, temp_name
from cachebuild._util.hashing import sha256_file
from cachebuild._util.statcache import HashCache
from cachebuild.errors import BuildError, CacheBuildWarning
from cachebuild.store.objects import TileStore
from cachebuild.tilemath import MAX_LAT, LngLatBbox, tile_from_id
from cachebuild.tileset import hex_digests, read_tiles, tile_dtype

if TYPE_CHECKING:
    import sqlite3

__all__ = [
    "MBTILES_APPLICATION_ID",
    "detect_format",
    "write_mbtiles",
    "ROWS_SUFFIX",
    "MAX_UPDATE_SHARE",
    "MAX_FREE_SHARE",
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
    incremental: bool = True,
    hash_cache: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write the tile set's tiles, from the store, as an MBTiles 1.3 file.

    When ``out_path`` is the file this function wrote last time, the new
    file is that one updated (:func:`_update_copy` says when and how), else
    it is written in full; either way at a temporary name, then renamed.
    Neither is fsynced here: as for every staged artifact, ``publish``
    fsyncs each file of a release before it becomes current; the kernel is
    asked to start writing the file back at once, so that fsync has little
    left to do.  The old file is never modified: a published release
    hard-links it.

    Parameters
    ----------
    tileset_dir, store_root
        Holds ``tiles.npy`` (:mod:`cachebuild.tileset`); the tile store the
        images are read from (their hashes are checked).
    out_path
        The file to write; replaced atomically.
    name, bbox, zooms
        The tileset's ``name`` metadata; the area and zoom levels, for
        ``bounds``, ``center``, ``minzoom`` and ``maxzoom``.
    image_format
        ``jpg``, ``png`` or ``webp``; by default the first tile's format.
    incremental
        Update the previous file when possible (the default); False always
        writes in full.  The record is written either way.
    hash_cache
        A :class:`cachebuild.release.manifest.HashCache` file: the new file's
        SHA-256, computed here anyway, is remembered there for the manifest.

    Returns ``{"tiles": n, "bytes": file size, "sha256": hex digest,
    "mode": "full" or "updated", "inserted": rows inserted, "deleted": rows
    deleted}`` (a full write inserts every row and deletes none).  Raises
    :class:`BuildError` when a tile's object is missing from the store or
    corrupt, or the tiles do not all have the one format.
    """
    if image_format is not None and image_format not in _FORMATS:
        raise BuildError(f"image format {image_format!r} is not one of {', '.join(_FORMATS)}")
    zooms = sorted({int(z) for z in zooms})
    if not zooms:
        raise BuildError("no zoom levels to write an MBTiles file for")
    tiles = read_tiles(tileset_dir)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = functools.partial(_metadata, name, bbox, zooms)
    with TileStore(store_root) as store:
        fmt, inserted, deleted, pages, free, digest = _write_and_rename(
            out_path, tiles, store, image_format, metadata, incremental
        )
    st = out_path.stat()
    mode = "full" if deleted is None else "updated"
    # after the rename: the record names the file as it now is
    how = {"mode": mode, "inserted": inserted, "deleted": deleted or 0}
    _write_record(out_path, tiles, fmt, st, digest, pages, free, how)
    if hash_cache is not None:
        cache = HashCache(hash_cache)
        cache.remember(out_path, digest, st)
        cache.save()
    return {
        "tiles": len(tiles),
        "bytes": st.st_size,
        "sha256": digest,
        "mode": mode,
        "inserted": inserted,
        "deleted": deleted or 0,
    }


def _metadata(name: str, bbox: LngLatBbox, zooms: Sequence[int], fmt: str) -> dict[str, str]:
    """The ``metadata`` table of the file (``zooms`` sorted)."""
    bounds, center = _bounds_and_center(bbox, zooms[0])
    return {
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


def _write_and_rename(
    out_path: Path,
    tiles: Any,
    store: TileStore,
    image_format: str | None,
    metadata: Callable[[str], dict[str, str]],
    incremental: bool,
) -> tuple[str, int, int | None, int, int, str]:
    """Update or write the file at a temporary name, hash it, rename it onto ``out_path``.

    Returns :data:`_Written` and the file's SHA-256; the temporary file is
    removed on any failure.
    """
    tmp = temp_name(out_path)
    try:
        done = None
        if incremental:
            done = _update_copy(out_path, tmp, tiles, store, image_format, metadata)
        if done is None:
            done = _write_full(tmp, tiles, store, image_format, metadata)
        digest = _hash_and_write_back(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return (*done, digest)


#: The record of what an MBTiles file written here holds: ``.<name>.rows``
#: beside it (``.tiles.mbtiles.rows``); never published.
ROWS_SUFFIX = ".rows"
_ROWS_FORMAT = "cachebuild/mbtiles-rows-v1"
#: Above this share of new tiles the file is written in full (cheaper than
#: copying it and replacing most rows).
MAX_UPDATE_SHARE = 0.5
#: An update that would leave more than this share of the file's pages free
#: is dropped and the file written in full (SQLite reuses free pages for
#: later inserts, so a shifted area keeps the share near 0; an area that
#: shrank would otherwise keep its old size).
MAX_FREE_SHARE = 0.1

# (format, rows inserted, rows deleted or None for a full write, pages, free pages)
_Written = tuple[str, int, "int | None", int, int]


#: Bytes read at a time when the file is hashed, or copied through Python: memory stays flat.
_CHUNK = 1 << 17


class _WriteInFull(Exception):
    """The update cannot give the file a full write would: write it in full."""


def _record_path(out_path: Path) -> Path:
    return out_path.with_name(f".{out_path.name}{ROWS_SUFFIX}")


def _open_tmp(tmp: Path) -> sqlite3.Connection:
    import sqlite3

    conn = sqlite3.connect(tmp, isolation_level=None)
    # a temp file: a crash loses it, never a published one
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    return conn


def _pages(conn: sqlite3.Connection) -> tuple[int, int]:
    return conn.execute("PRAGMA page_count").fetchone()[0], conn.execute(
        "PRAGMA freelist_count"
    ).fetchone()[0]


def _write_full(
    tmp: Path, tiles: Any, store: Any, image_format: str | None, metadata: Any
) -> _Written:
    """Write every tile into a new file at ``tmp``."""
    fmt = image_format
    rows = _tile_rows(tiles, store)
    first = next(rows, None)
    if fmt is None:
        fmt = "jpg" if first is None else detect_format(first[3])
        if fmt is None:
            z, x, row, _ = first  # type: ignore[misc]
            raise BuildError(f"tile {z}/{x}/{(1 << z) - 1 - row} is not a JPEG, PNG or WebP image")
    conn = _open_tmp(tmp)
    try:
        conn.execute(f"PRAGMA application_id = {MBTILES_APPLICATION_ID}")
        conn.execute("BEGIN")
        _execute_all(conn, _SCHEMA)
        conn.executemany(
            "INSERT INTO metadata (name, value) VALUES (?, ?)", sorted(metadata(fmt).items())
        )
        if first is not None:
            conn.executemany(
                "INSERT INTO tiles (zoom_level, tile_column, tile_row, tile_data) VALUES (?, ?, ?, ?)",
                _checked(_chain(first, rows), fmt, strict=True),
            )
        _execute_all(conn, _INDEXES)
        conn.execute("COMMIT")
        pages, free = _pages(conn)
    finally:
        conn.close()
    return fmt, len(tiles), None, pages, free


def _checked(
    rows: Iterator[tuple[int, int, int, bytes]], fmt: str, *, strict: bool
) -> Iterator[tuple[int, int, int, bytes]]:
    """``rows``, each checked to be a ``fmt`` image; ``strict``: else a BuildError, or _WriteInFull."""
    for row in rows:
        got = detect_format(row[3])
        if got != fmt:
            if not strict:
                raise _WriteInFull
            z, x, tms, _ = row
            raise BuildError(
                f"tile {z}/{x}/{(1 << z) - 1 - tms} is {got or 'not an image'}, the MBTiles file is {fmt}",
                remedy="use a provider that serves one image format",
            )
        yield row


def _read_record(out_path: Path) -> tuple[dict[str, Any], Any] | None:
    """The record's header and rows, or None when there is none or it is damaged."""
    import hashlib
    import json

    import numpy as np

    try:
        raw = _record_path(out_path).read_bytes()
        line, rows = raw.split(b"\n", 1)
        head = json.loads(line)
        if not isinstance(head, dict) or head.get("format") != _ROWS_FORMAT:
            return None
        if (
            hashlib.sha256(rows).hexdigest() != head["rows_sha256"]
            or len(rows) != head["rows"] * tile_dtype().itemsize
        ):
            return None
        if head["image_format"] not in _FORMATS or not isinstance(head["file"], dict):
            return None
        return head, np.frombuffer(rows, dtype=tile_dtype())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_record(
    out_path: Path,
    tiles: Any,
    fmt: str,
    st: os.stat_result,
    digest: str,
    pages: int,
    free: int,
    how: dict[str, Any],
) -> None:
    """Record which tiles the file at ``out_path`` holds, its identity and hash, and how it was written."""
    import hashlib
    import json

    import numpy as np

    rows = np.ascontiguousarray(tiles, dtype=tile_dtype()).tobytes()
    head = {
        "format": _ROWS_FORMAT,
        "image_format": fmt,
        "rows": len(tiles),
        "rows_sha256": hashlib.sha256(rows).hexdigest(),
        "file": {
            "dev": st.st_dev,
            "ino": st.st_ino,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": digest,
        },
        "pages": pages,
        "free_pages": free,
        "written": how,
    }
    atomic_write(
        _record_path(out_path),
        json.dumps(head, sort_keys=True).encode() + b"\n" + rows,
        durable=False,
    )


def _diff(old: Any, new: Any) -> tuple[Any, Any] | None:
    """``(old rows to delete, new rows to insert)``, or None unless both are sorted by unique id."""
    import numpy as np

    old_ids, new_ids = old["id"], new["id"]
    if any(len(ids) > 1 and not (np.diff(ids) > 0).all() for ids in (old_ids, new_ids)):
        return None
    if len(old) == 0:  # the last build had no tile (all missing): every row is new
        return old, new
    at = np.searchsorted(old_ids, new_ids)
    inside = at < len(old_ids)
    at_c = np.where(inside, at, 0)
    old_sha = np.ascontiguousarray(old["sha256"]).view(np.uint8).reshape(len(old), 32)
    new_sha = np.ascontiguousarray(new["sha256"]).view(np.uint8).reshape(len(new), 32)
    same = inside & (old_ids[at_c] == new_ids) & (old_sha[at_c] == new_sha).all(axis=1)
    keep_old = np.zeros(len(old), dtype=bool)
    keep_old[at_c[same]] = True
    return old[~keep_old], new[~same]


def _update_copy(
    out_path: Path, tmp: Path, tiles: Any, store: Any, image_format: str | None, metadata: Any
) -> _Written | None:
    """Write at ``tmp`` the previous file updated to ``tiles``; None when it must be written in full.

    The previous file's record (:data:`ROWS_SUFFIX`) says which tiles it
    holds and what it hashes to.  The file is copied to ``tmp`` (the old
    file is hashed meanwhile: one that does not hash to the record drops
    the update, and the file is written in full), the rows no longer in the
    tile set or whose image changed deleted, the new ones inserted from the
    store, the metadata written again.  The result holds the same rows and
    metadata as a file written from scratch.  None (write in full) when
    there is no usable record, when more than half the tiles are new
    (:data:`MAX_UPDATE_SHARE`), when an inserted tile has another format, or
    when the update would leave more than :data:`MAX_FREE_SHARE` of the
    file's pages free (an area that shrank: the file would stay large).
    """
    import warnings

    if len(tiles) == 0:
        return None
    record = _read_record(out_path)
    if record is None:
        return None
    head, old = record
    fmt = head["image_format"]
    if image_format is not None and image_format != fmt:
        return None
    want = head["file"]
    try:
        st = out_path.stat()
    except OSError:
        return None
    if [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns] != [
        want.get(k) for k in ("dev", "ino", "size", "mtime_ns")
    ]:
        return None  # another file (written in full elsewhere, restored, truncated): not the one recorded
    diff = _diff(old, tiles)
    if diff is None:
        return None
    gone, new = diff
    if len(new) > MAX_UPDATE_SHARE * len(tiles):
        return None
    # The kernel copies the file (copy_file_range: no pass through Python,
    # a shared extent where the filesystem can); while it copies and the rows
    # are updated, one thread hashes the old file (bytes that changed under
    # an unchanged stat are caught: the update is dropped) and another has
    # the kernel start writing the copy to disk, for publish's fsync to find done.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="mbtiles-update") as pool:
        old_hash = pool.submit(sha256_file, out_path, _CHUNK)
        failure: Exception | None = None
        queued = None
        try:
            copy_file(out_path, tmp, _CHUNK)
            # queueing 300 MB for writeback blocks for a while (~0.08 s): not on this thread
            queued = pool.submit(start_writeback_of, tmp)
            done = _update_rows(tmp, new, gone, store, fmt, metadata)
        except Exception as exc:  # noqa: BLE001  judged after the hash: a damaged copy can fail the update itself
            done, failure = None, exc
        finally:
            if queued is not None:
                queued.result()
            digest = old_hash.result()[0]
    if digest != want.get("sha256"):
        tmp.unlink(missing_ok=True)  # a copy that failed may have made none
        warnings.warn(
            f"{out_path} does not hash to what was written there (sha256 {digest[:12]}…, "
            f"recorded {str(want.get('sha256'))[:12]}…): it is written again in full",
            CacheBuildWarning,
            stacklevel=2,
        )
        return None
    if failure is not None:
        raise failure
    if done is None:
        os.unlink(tmp)
    return done


def _update_rows(
    tmp: Path, new: Any, gone: Any, store: Any, fmt: str, metadata: Any
) -> _Written | None:
    """Delete ``gone``'s rows from the copy at ``tmp``, insert ``new``'s; None when it must be written in full."""

    def deleted() -> Iterator[tuple[int, int, int]]:
        for tid in gone["id"].tolist():
            t = tile_from_id(tid)
            yield (t.z, t.x, (1 << t.z) - 1 - t.y)

    try:
        conn = _open_tmp(tmp)
        try:
            conn.execute("BEGIN")
            conn.executemany(
                "DELETE FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
                deleted(),
            )
            conn.executemany(
                "INSERT INTO tiles (zoom_level, tile_column, tile_row, tile_data) VALUES (?, ?, ?, ?)",
                _checked(_tile_rows(new, store), fmt, strict=False),
            )
            conn.execute("DELETE FROM metadata")
            conn.executemany(
                "INSERT INTO metadata (name, value) VALUES (?, ?)", sorted(metadata(fmt).items())
            )
            conn.execute("COMMIT")
            pages, free = _pages(conn)
        finally:
            conn.close()
    except _WriteInFull:
        return None
    if free > MAX_FREE_SHARE * pages:
        return None
    return fmt, len(new), len(gone), pages, free


def _hash_and_write_back(path: Path) -> str:
    """The SHA-256 of the file at ``path`` (one read, from the page cache); its writeback is started, not awaited.

    Not fsynced here: like every staged artifact, the file becomes durable
    when ``publish`` fsyncs each file of the release before it becomes
    current (:mod:`cachebuild.release.publish`); asking the kernel to start writing
    it now means that fsync finds little left to write.
    """

    digest = sha256_file(path, _CHUNK)[0]
    start_writeback_of(path)
    return digest


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

    for tid, hexdigest in zip(tiles["id"].tolist(), hex_digests(tiles)):
        t = tile_from_id(tid)
        # a missing or corrupt object raises StoreObjectError: the build fetches it again
        data = store.get_checked(hexdigest, what=f"tile {t.z}/{t.x}/{t.y}")
        yield (t.z, t.x, (1 << t.z) - 1 - t.y, data)
