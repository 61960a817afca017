"""Where the coverage map's pixels fall: the preview's geometry and its mosaic cells.

:class:`PreviewGeometry` places the world (a Web Mercator zoom, 256-px
tiles) in the preview; :func:`_geometry` fits an area into a preview size;
:func:`_tile_cells` finds each tile's cell in the mosaic.  Used by
:mod:`cachebuild.tiles.preview`, which draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cachebuild.tilemath import MAX_LAT, LngLatBbox, tile_ranges

__all__ = ["TILE_PX", "PreviewGeometry"]

TILE_PX = 256


@dataclass(frozen=True)
class PreviewGeometry:
    """Where the world lands in the preview: for drawing and for tests.

    ``x0``/``y0`` are the global pixel coordinates (at ``zoom``, 256-px
    tiles) of the mosaic's top-left corner, ``scale`` preview pixels per
    global pixel; ``west`` unwraps longitudes across the antimeridian.
    """

    zoom: int
    scale: float
    x0: int
    y0: int
    cols: int
    rows: int
    west: float
    crosses: bool

    @property
    def width(self) -> int:
        return max(1, round(self.cols * TILE_PX * self.scale))

    @property
    def height(self) -> int:
        return max(1, round(self.rows * TILE_PX * self.scale))

    def global_px(self, lat: float, lon: float) -> tuple[float, float]:
        if self.crosses and lon < self.west:
            lon += 360.0
        lat = max(-MAX_LAT, min(MAX_LAT, lat))
        world = TILE_PX * 2**self.zoom
        x = (lon + 180.0) / 360.0 * world
        s = math.sin(math.radians(lat))
        y = (0.5 - math.log((1 + s) / (1 - s)) / (4 * math.pi)) * world
        return x, y

    def project(self, lat: float, lon: float) -> tuple[float, float]:
        """Preview pixel (x, y) of a point."""
        x, y = self.global_px(lat, lon)
        return (x - self.x0) * self.scale, (y - self.y0) * self.scale

    def tile_box(self, x: int, y: int) -> tuple[int, int, int, int]:
        """Preview pixel box (left, top, right, bottom) of tile (x, y) at ``zoom``."""
        col = x - self.x0 // TILE_PX
        if col < 0:
            col += 2**self.zoom
        row = y - self.y0 // TILE_PX
        s = TILE_PX * self.scale
        return round(col * s), round(row * s), round((col + 1) * s), round((row + 1) * s)


def _geometry(bbox: LngLatBbox, zoom: int, size: int) -> PreviewGeometry:
    parts = tile_ranges(bbox, zoom)
    n = 2**zoom
    crosses = bbox.west > bbox.east
    xs_start = parts[0][0].start
    cols = sum(len(xr) for xr, _ in parts) if crosses else len(parts[0][0])
    ys = parts[0][1]
    rows = len(ys)
    scale = min(1.0, size / max(cols * TILE_PX, rows * TILE_PX))
    if crosses and len(parts) == 1:  # merged into one range at low zoom
        cols = min(cols, n)
    return PreviewGeometry(
        zoom=zoom,
        scale=scale,
        x0=xs_start * TILE_PX,
        y0=ys.start * TILE_PX,
        cols=cols,
        rows=rows,
        west=bbox.west,
        crosses=crosses,
    )


def _tile_cells(geo: PreviewGeometry, ids: Any) -> tuple[Any, Any, Any]:
    """Mosaic (row, col) of tile ids at ``geo.zoom``, and which fall inside it."""
    import numpy as np

    mask29 = (1 << 29) - 1
    x = (ids >> 29) & mask29
    y = ids & mask29
    col = x - geo.x0 // TILE_PX
    col = np.where(col < 0, col + 2**geo.zoom, col)
    row = y - geo.y0 // TILE_PX
    inside = (col >= 0) & (col < geo.cols) & (row >= 0) & (row < geo.rows)
    return row, col, inside
