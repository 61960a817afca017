"""Where each index entry lies on the ground, and how far a search result is from the truth.

An index id names a place: a tile-sized square of Web-Mercator ground whose
top-left corner is on the 1/8-tile grid (``z << 58 | X << 29 | Y``,
:mod:`cachebuild.store.windowkeys`): a tile, or an overlapping window.  Geometry is done in *tile units* at the place's zoom (``x`` and
``y`` as floats, one tile = 1), so it does not depend on the tile's pixel
size; :func:`metres_per_unit` turns a distance into metres at a latitude.

:data:`POSITIONS_FILE` (written beside the index, documented in
docs/cache-layout.md) gives an onboard client, for every id, the centre's
latitude and longitude and the footprint's west/south/east/north edges in
degrees, so it turns a search result into a position with the cache alone.

numpy is imported inside the functions.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_write
from cachebuild.store.windowkeys import PLACE_UNITS

__all__ = [
    "POSITIONS_FILE",
    "EARTH_RADIUS_M",
    "positions_dtype",
    "place_boxes",
    "unit_to_lonlat",
    "metres_per_unit",
    "positions",
    "write_positions",
]

POSITIONS_FILE = "positions.npy"
#: WGS 84 semi-major axis: the sphere Web Mercator projects.
EARTH_RADIUS_M = 6_378_137.0
_MASK = (1 << 29) - 1


def positions_dtype() -> Any:
    """The record of :data:`POSITIONS_FILE`: id, centre, footprint (degrees, float64)."""
    import numpy as np

    return np.dtype(
        [
            ("id", "<i8"),
            ("lat", "<f8"),
            ("lon", "<f8"),
            ("west", "<f8"),
            ("south", "<f8"),
            ("east", "<f8"),
            ("north", "<f8"),
        ]
    )


def place_boxes(ids: Any) -> tuple[Any, Any, Any]:
    """``(z, x0, y0)`` of each id's footprint: the unit square ``[x0, x0+1] x [y0, y0+1]``."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.int64)
    x0 = ((ids >> 29) & _MASK).astype(np.float64) / PLACE_UNITS
    return ids >> 58, x0, (ids & _MASK).astype(np.float64) / PLACE_UNITS


def unit_to_lonlat(x: Any, y: Any, z: Any) -> tuple[Any, Any]:
    """Longitude and latitude (degrees) of tile-unit coordinates at zoom ``z``."""
    import numpy as np

    n = np.power(2.0, np.asarray(z, dtype=np.float64))
    lon = np.asarray(x, dtype=np.float64) / n * 360.0 - 180.0
    with np.errstate(over="ignore"):  # an id off the map (no tile): +-90 degrees
        lat = np.degrees(np.arctan(np.sinh(math.pi * (1.0 - 2.0 * np.asarray(y) / n))))
    return lon, lat


def metres_per_unit(lat: Any, z: Any) -> Any:
    """Ground metres of one tile unit at latitude ``lat`` (degrees) and zoom ``z``."""
    import numpy as np

    circumference = 2 * math.pi * EARTH_RADIUS_M
    return circumference * np.cos(np.radians(lat)) / np.power(2.0, np.asarray(z, dtype=np.float64))


def positions(ids: Any) -> Any:
    """The :func:`positions_dtype` records of ``ids`` (in their order)."""
    import numpy as np

    z, x0, y0 = place_boxes(ids)
    out = np.empty(len(z), dtype=positions_dtype())
    out["id"] = np.asarray(ids, dtype=np.int64)
    out["lon"], out["lat"] = unit_to_lonlat(x0 + 0.5, y0 + 0.5, z)
    out["west"], out["north"] = unit_to_lonlat(x0, y0, z)
    out["east"], out["south"] = unit_to_lonlat(x0 + 1.0, y0 + 1.0, z)
    return out


def write_positions(path: str | os.PathLike[str], ids: Any) -> None:
    """Write :data:`POSITIONS_FILE` for ``ids`` atomically (sorted by id, a plain .npy)."""
    import io

    import numpy as np

    rec = positions(np.sort(np.asarray(ids, dtype=np.int64)))
    buf = io.BytesIO()
    np.save(buf, rec, allow_pickle=False)
    atomic_write(Path(path), buf.getvalue(), durable=False)
