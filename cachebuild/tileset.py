"""The tile set of a build: which tiles were planned, which are present, by hash.

Written by the tiles phase, read by every later phase.  Three files in the
build directory:

``tiles.npy``
    numpy structured array of dtype :data:`TILE_DTYPE`, the present tiles,
    sorted by tile id: ``id`` (see :func:`cachebuild.tilemath.tile_id`) and the
    raw 32-byte SHA-256 of the tile's image in the store.
``missing.npy``
    int64 ids of planned tiles the provider has no image for, sorted.
``tileset.json``
    the summary: counts, zooms, bbox, provider identity, aggregate hash.
    Small, so the warm no-op and the coverage check never read per-tile data.

numpy is imported inside the functions that need it: this module is
imported on the no-op path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_save_npy, atomic_write

__all__ = [
    "TILES_FILE",
    "MISSING_FILE",
    "SUMMARY_FILE",
    "tile_dtype",
    "aggregate_sha256",
    "write_tileset",
    "read_tiles",
    "read_missing",
    "read_summary",
    "hex_digests",
]

TILES_FILE = "tiles.npy"
MISSING_FILE = "missing.npy"
SUMMARY_FILE = "tileset.json"


def tile_dtype() -> Any:
    """The structured dtype of ``tiles.npy``: ``id`` <i8, ``sha256`` S32."""
    import numpy as np

    return np.dtype([("id", "<i8"), ("sha256", "S32")])


def hex_digests(tiles: Any) -> list[str]:
    """The hex SHA-256 of every row of a ``tiles.npy`` array.

    Reading an ``S32`` item one by one drops trailing NUL bytes (numpy
    strips them), so go through the raw bytes.
    """
    import numpy as np

    raw = np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(len(tiles), 32)
    return [row.tobytes().hex() for row in raw]


def aggregate_sha256(tiles: Any, missing: Any) -> str:
    """One hash over every (tile id, content hash) and every missing id.

    Two tile sets hash alike exactly when they hold the same tiles with the
    same images and miss the same tiles.
    """
    import numpy as np

    h = hashlib.sha256(b"cachebuild-tileset-v1\0present\0")
    h.update(np.ascontiguousarray(tiles, dtype=tile_dtype()).tobytes())
    h.update(b"\0missing\0")
    h.update(np.ascontiguousarray(missing, dtype="<i8").tobytes())
    return h.hexdigest()


def write_tileset(
    out_dir: Path, tiles: Any, missing: Any, summary: dict[str, Any]
) -> dict[str, Any]:
    """Write the three files atomically; returns the summary as written.

    ``tiles`` and ``missing`` are sorted here; ``summary`` gains
    ``planned``, ``present``, ``missing`` and ``aggregate_sha256``.
    """
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles = np.sort(np.asarray(tiles, dtype=tile_dtype()), order="id")
    missing = np.sort(np.asarray(missing, dtype="<i8"))
    full = dict(summary)
    full.update(
        planned=int(len(tiles) + len(missing)),
        present=int(len(tiles)),
        missing=int(len(missing)),
        aggregate_sha256=aggregate_sha256(tiles, missing),
    )
    atomic_save_npy(out_dir / TILES_FILE, tiles)
    atomic_save_npy(out_dir / MISSING_FILE, missing)
    # the summary last: its presence means the set is complete
    atomic_write(
        out_dir / SUMMARY_FILE, json.dumps(full, indent=1, sort_keys=True).encode(), durable=False
    )
    return full


def read_tiles(out_dir: Path) -> Any:
    import numpy as np

    return np.load(Path(out_dir) / TILES_FILE, allow_pickle=False)


def read_missing(out_dir: Path) -> Any:
    import numpy as np

    return np.load(Path(out_dir) / MISSING_FILE, allow_pickle=False)


def read_summary(out_dir: Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / SUMMARY_FILE).read_text())
