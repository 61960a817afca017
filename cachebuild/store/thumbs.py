"""Tile thumbnails kept in the shared store, keyed by the tile image's SHA-256.

The coverage map (:mod:`cachebuild.tiles.preview`) of a large cache draws each tile
in a few pixels: 10k tiles fit 1024 px at about 10 px a tile.  Decoding 10k
JPEGs for that, even at 1/8 scale, costs seconds (the header parse and the
entropy decode do not shrink with the scale).  A thumbnail is a pure
function of the image bytes, so, like a descriptor (:mod:`cachebuild.store.descriptors`),
it is made once per image and reused by every later preview, whichever
flight, bbox or cache shows that image.

Where it is made: the describe stage decodes every image the descriptor
store lacks, to run the engine, and keeps the thumbnail of those pixels
(:func:`thumbnail_of`, a box average of pixels already in memory); so the
preview stage of a build finds them all.  An image whose descriptor was
reused but that has no thumbnail (a store from before thumbnails, or one
``store/thumbs/`` was deleted from) is decoded by the preview at 1/8 scale
(:func:`make_thumbnail`) and kept.  With ``STORE=s3://...`` they travel in
per-cell batches in the bucket (:mod:`cachebuild.localize.s3desc`)::

    <store>/thumbs/thumbs.sqlite    sha256 BLOB -> THUMB_PX x THUMB_PX x 3 uint8 RGB

3 KiB a tile (about a seventh of a 20 KiB JPEG tile).  SQLite in WAL mode:
two builds may add thumbnails at once, ``INSERT OR IGNORE`` keeps the first
of two made for the same image (they are equal anyway).

numpy and Pillow are imported inside the functions.
"""

from __future__ import annotations

import io
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "THUMB_PX",
    "THUMB_BYTES",
    "THUMBS_DIR",
    "ThumbStore",
    "make_thumbnail",
    "thumbnail_of",
    "downsample",
]

#: Side of a stored thumbnail in pixels: 1/8 of a 256-px tile, what a JPEG
#: decodes to with DCT scaling (no resize needed).
THUMB_PX = 32
#: Bytes of one stored thumbnail (raw RGB).
THUMB_BYTES = THUMB_PX * THUMB_PX * 3
THUMBS_DIR = "thumbs"
#: Keys looked up per query (below SQLite's host-parameter limit).
_LOOKUP_CHUNK = 900

# a rowid table with 16 KiB pages: a 3 KiB thumbnail then sits in its leaf
# page (no overflow chain), which made 10k lookups about 2x faster than 4 KiB
# pages or a WITHOUT ROWID table
_PAGE_SIZE = 16384
_SCHEMA = """
CREATE TABLE IF NOT EXISTS thumbs (
    id INTEGER PRIMARY KEY,
    sha256 BLOB NOT NULL UNIQUE,
    px BLOB NOT NULL
);
"""


def make_thumbnail(data: bytes) -> Any:
    """The ``THUMB_PX``-square uint8 RGB thumbnail of one tile image.

    JPEG tiles are decoded at reduced scale by libjpeg (DCT scaling); other
    formats are decoded and box-filtered.

    Raises
    ------
    OSError, ValueError
        ``data`` is not an image Pillow can read.
    """
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (THUMB_PX, THUMB_PX))
        rgb = im.convert("RGB")
    if rgb.size != (THUMB_PX, THUMB_PX):
        rgb = rgb.resize((THUMB_PX, THUMB_PX), Image.Resampling.BOX)
    return np.asarray(rgb, dtype=np.uint8)


def thumbnail_of(rgb: Any) -> Any:
    """The thumbnail of a tile image already decoded (uint8 RGB ``[H, W, 3]``, or a Pillow RGB image), box-averaged.

    What the describe stage calls on the pixels it decoded for the engine
    (:mod:`cachebuild.localize.describe`), so a new image costs no second decode.
    For a 256-px tile, an 8x8 box average (Pillow's ``reduce``): 70-150 us
    on this (loaded, 2-core) machine, against ~450 us to decode the JPEG;
    given the Pillow image describe decoded, no copy is made.  Other sizes are
    box-resized.  It differs from :func:`make_thumbnail` of the same JPEG
    (DCT-scaled decode: each 8x8 block's DC term) by rounding and chroma
    upsampling only: measured on synthetic tiles, 0.3-0.7 levels on average,
    at most 2-7 of 255 (tests/unit/localize/test_describe.py holds them to 1.5 and 12).

    >>> import numpy as np
    >>> thumbnail_of(np.full((256, 256, 3), 9, np.uint8)).shape
    (32, 32, 3)
    """
    import numpy as np
    from PIL import Image

    img = (
        rgb
        if isinstance(rgb, Image.Image)
        else Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    )
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if (w, h) == (THUMB_PX, THUMB_PX):
        return np.asarray(img)
    if h % THUMB_PX == 0 and w % THUMB_PX == 0:
        out = img.reduce((w // THUMB_PX, h // THUMB_PX))
    else:
        out = img.resize((THUMB_PX, THUMB_PX), Image.Resampling.BOX)
    return np.asarray(out)


def downsample(thumbs: Any, px: int) -> Any:
    """``[n, THUMB_PX, THUMB_PX, 3]`` thumbnails box-averaged to ``[n, px, px, 3]``.

    ``px`` must divide :data:`THUMB_PX`.  Pillow's ``reduce`` over the
    thumbnails stacked in one column: its boxes never straddle two
    thumbnails, and it is ~30x faster than a numpy mean over the blocks.

    >>> import numpy as np
    >>> downsample(np.full((2, THUMB_PX, THUMB_PX, 3), 7, np.uint8), 4).shape
    (2, 4, 4, 3)
    """
    import numpy as np
    from PIL import Image

    if px == THUMB_PX:
        return thumbs
    if px < 1 or THUMB_PX % px:
        raise ValueError(f"thumbnail size {px} does not divide {THUMB_PX}")
    n = len(thumbs)
    if n == 0:
        return np.zeros((0, px, px, 3), dtype=np.uint8)
    column = Image.fromarray(np.ascontiguousarray(thumbs).reshape(n * THUMB_PX, THUMB_PX, 3))
    return np.asarray(column.reduce(THUMB_PX // px)).reshape(n, px, px, 3)


class ThumbStore:
    """The thumbnails of a store (created if missing)."""

    def __init__(self, store_root: str | os.PathLike[str]):
        self.root = Path(store_root) / THUMBS_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "thumbs.sqlite"
        self._db: sqlite3.Connection | None = None

    def conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
            db.execute(f"PRAGMA page_size={_PAGE_SIZE}")  # takes effect only on a new file
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def lookup(self, digests: Iterable[bytes]) -> dict[bytes, bytes]:
        """The stored thumbnails (raw RGB bytes) of those ``digests`` it has."""
        return {
            bytes(sha): bytes(px)
            for sha, px in self._select("sha256, px", digests)
            if len(px) == THUMB_BYTES  # anything else is ignored and made again
        }

    def present(self, digests: Iterable[bytes]) -> set[bytes]:
        """Which of ``digests`` have a thumbnail (the keys only: no pixels read)."""
        return {
            bytes(sha) for sha, n in self._select("sha256, length(px)", digests) if n == THUMB_BYTES
        }

    def _select(self, columns: str, digests: Iterable[bytes]) -> Iterable[tuple[Any, ...]]:
        keys = list(dict.fromkeys(bytes(d) for d in digests))
        db = self.conn()
        for s in range(0, len(keys), _LOOKUP_CHUNK):
            part = keys[s : s + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(part))
            yield from db.execute(f"SELECT {columns} FROM thumbs WHERE sha256 IN ({marks})", part)

    def put(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Keep ``(digest, raw RGB)`` thumbnails; returns how many were given."""
        rows = [(bytes(d), bytes(px)) for d, px in items]
        self._write("INSERT OR IGNORE INTO thumbs (sha256, px) VALUES (?, ?)", rows)
        return len(rows)

    def drop(self, digests: Iterable[bytes], *, vacuum: bool = True) -> int:
        """Forget the thumbnails of ``digests`` (images gone from the store); returns how many.

        With ``vacuum``, the file then shrinks by what they took.
        """
        keys = [(bytes(d),) for d in digests]
        if not keys:
            return 0
        before = self.count()
        self._write("DELETE FROM thumbs WHERE sha256 = ?", keys)
        dropped = before - self.count()
        if dropped and vacuum:
            db = self.conn()
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return dropped

    def _write(self, sql: str, rows: Sequence[tuple[bytes, ...]]) -> None:
        """``sql`` over ``rows`` in one write transaction (all or nothing)."""
        if not rows:
            return
        db = self.conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def count(self) -> int:
        return int(self.conn().execute("SELECT COUNT(*) FROM thumbs").fetchone()[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> ThumbStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
