"""The coverage map's kept cells: the last thumbnail mosaic, for the next map.

:func:`_keep_cells` writes the mosaic's cells and the image each shows to
:data:`CELLS_FILE` in the build directory (never published);
:func:`_reuse_cells` copies back each cell whose tile still shows the same
image, so a shifted area draws only its new cells.  Used by
:mod:`cachebuild.tiles.preview`.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_write
from cachebuild.tiles.preview_geometry import TILE_PX, PreviewGeometry, _tile_cells

__all__ = ["CELLS_FILE"]

#: The last thumbnail mosaic's cells and the image each shows, kept in the
#: build directory (never published) for the next map of an area that
#: overlaps: a shifted area draws only its new cells.
CELLS_FILE = ".preview-cells.npz"
_CELLS_FORMAT = 1


def _reuse_cells(
    cells_dir: Path,
    geo: PreviewGeometry,
    t: int,
    ids: Any,
    raw: Any,
    where: tuple[Any, Any, Any],
    cells: Any,
) -> Any:
    """Copy into ``cells`` what the kept mosaic drew for the same images; which tiles (a mask over ``ids``).

    ``where`` is ``_tile_cells(geo, ids)``.  A cell is taken only where the
    kept file is whole (its SHA-256 checks), of the same zoom and cell size,
    and drew the very image (SHA-256) the tile now has; anything else is
    drawn as if there were no file.
    """
    import dataclasses
    import zipfile

    import numpy as np

    row, col, inside = where
    none = np.zeros(len(ids), dtype=bool)
    try:
        with np.load(cells_dir / CELLS_FILE, allow_pickle=False) as kept:
            head = kept["head"]
            old_cells, old_digests, check = kept["cells"], kept["digests"], kept["sha256"]
    except (
        OSError,
        ValueError,
        KeyError,
        EOFError,
        zipfile.BadZipFile,
    ):  # missing, torn or damaged
        return none
    if head.shape != (5,) or [int(v) for v in head[:3]] != [_CELLS_FORMAT, geo.zoom, t]:
        return none
    rows, cols = old_digests.shape[:2] if old_digests.ndim == 3 else (0, 0)
    if (
        old_cells.shape != (rows, cols, t, t, 3)
        or old_digests.shape != (rows, cols, 32)
        or not rows * cols
    ):
        return none
    if check.tobytes() != _cells_sha256(head, old_cells, old_digests):
        return none
    # where each tile sat in the kept mosaic: the same placement, from its corner
    old_geo = dataclasses.replace(
        geo, x0=int(head[3]) * TILE_PX, y0=int(head[4]) * TILE_PX, cols=int(cols), rows=int(rows)
    )
    orow, ocol, there = _tile_cells(old_geo, ids)
    at = np.flatnonzero(inside & there)
    same = none.copy()
    same[at] = (old_digests[orow[at], ocol[at]] == raw[at]).all(axis=1)
    cells[row[same], col[same]] = old_cells[orow[same], ocol[same]]
    return same


def _cells_sha256(head: Any, cells: Any, digests: Any) -> bytes:
    """The checksum :data:`CELLS_FILE` carries over its arrays."""
    import hashlib

    h = hashlib.sha256(head.tobytes())
    h.update(cells.data)
    h.update(digests.data)
    return h.digest()


def _keep_cells(cells_dir: Path, geo: PreviewGeometry, t: int, cells: Any, digests: Any) -> None:
    """Keep the mosaic's cells for the next map (:data:`CELLS_FILE`); a failure only costs the next map time."""
    import numpy as np

    head = np.array(
        [_CELLS_FORMAT, geo.zoom, t, geo.x0 // TILE_PX, geo.y0 // TILE_PX], dtype=np.int64
    )
    check = np.frombuffer(_cells_sha256(head, cells, digests), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, head=head, cells=cells, digests=digests, sha256=check)
    try:
        atomic_write(cells_dir / CELLS_FILE, buf.getvalue(), durable=False)
    except OSError as exc:
        from cachebuild._util.diskspace import is_disk_full

        if is_disk_full(exc):
            raise  # exit 24, as any other write on a full disk
        with contextlib.suppress(OSError):
            (cells_dir / CELLS_FILE).unlink(missing_ok=True)
