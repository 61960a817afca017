"""Names of overlapping windows: their place ids, and the content keys their descriptors are stored under.

A *window* is a tile-sized square of ground whose top-left corner lies on a
grid of ``stride`` steps per tile side (``WINDOW_STRIDE``): every present
tile *anchors* ``stride * stride`` windows, offset right and down from its
corner by whole steps, each covering parts of the anchor and of its right,
lower and lower-right neighbours.  A window is indexed only when every tile
it covers is present.

Place ids (what ``index.faiss`` returns, ``positions.npy`` maps to ground)
are ``(z << 58) | (X << 29) | Y`` with ``X``, ``Y`` the corner in
:data:`PLACE_UNITS` of a tile at zoom ``z``: a plain tile is ``X = 8 x``.

The descriptors of one anchor's windows are a *block*, stored in the
descriptor store under a content key: a hash of the four covered images
(an absent tile is 32 zero bytes), the stride and the way windows are
described, in a namespace of their own per engine (:func:`namespace`).  A
block is therefore reused whatever area it was first built for, and a
shifted area describes only the anchors whose four images are new to the
store.  gc-store derives the same keys from a cache's files
(:mod:`cachebuild.release.gcrefs`).

numpy is imported inside the functions.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = [
    "PLACE_UNITS",
    "STRIDES",
    "MODES",
    "namespace",
    "neighbours",
    "block_digests",
    "window_valid",
    "window_ids",
    "tile_place_ids",
    "tile_windows",
]

#: Place-id coordinates are in 1/8 tile: strides up to 8 steps a tile.
PLACE_UNITS = 8
#: ``WINDOW_STRIDE`` values: windows per tile side (1: the tile grid alone).
STRIDES = (1, 2, 4, 8)
#: How a block is described: pooled from shared feature maps, or one engine run per window.
MODES = ("pooled", "engine")
_MASK = (1 << 29) - 1
_ZERO = bytes(32)
_VERSION = 1
#: A store namespace's layout version by mode (pooled 2: a block keeps each window's cells too).
_LAYOUT = {"pooled": 2, "engine": 1}


def namespace(engine_key: str, stride: int, mode: str) -> str:
    """The descriptor store key of ``engine_key``'s window blocks (a SHA-256 hex, like an engine key)."""
    if stride not in STRIDES or mode not in MODES:
        raise ValueError(f"no windows for stride {stride!r}, mode {mode!r}")
    return hashlib.sha256(
        f"cachebuild-windows\0{_LAYOUT[mode]}\0{engine_key}\0{stride}\0{mode}".encode()
    ).hexdigest()


def neighbours(ids: Any) -> Any:
    """``[N, 4]`` positions in sorted tile ``ids`` of each tile, its right, lower and lower-right neighbour; -1: absent."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.int64)
    out = np.full((len(ids), 4), -1, dtype=np.int64)
    if not len(ids):
        return out
    out[:, 0] = np.arange(len(ids))
    z, x, y = ids >> 58, (ids >> 29) & _MASK, ids & _MASK
    side = np.left_shift(np.int64(1), z)
    for k, (dx, dy) in enumerate(((1, 0), (0, 1), (1, 1)), start=1):
        nx, ny = x + dx, y + dy
        ok = (nx < side) & (ny < side)
        nb = (z << 58) | (np.minimum(nx, side - 1) << 29) | np.minimum(ny, side - 1)
        pos = np.clip(np.searchsorted(ids, nb), 0, len(ids) - 1)
        found = ok & (ids[pos] == nb)
        out[:, k] = np.where(found, pos, -1)
    return out


def block_digests(digests: Any, nb: Any, stride: int, mode: str) -> Any:
    """uint8 ``[N, 32]``: each anchor's block key, from the images of the tiles it covers.

    ``digests``: uint8 ``[n, 32]`` image hashes of the sorted tiles;
    ``nb``: :func:`neighbours` of the anchors.
    """
    import numpy as np

    namespace(64 * "0", stride, mode)  # refuses a stride or mode it does not know
    raw = np.ascontiguousarray(digests, dtype=np.uint8).reshape(-1, 32)
    head = f"cachebuild-window-block\0{_VERSION}\0{stride}\0{mode}\0".encode()
    out = np.empty((len(nb), 32), dtype=np.uint8)
    for i, row in enumerate(np.asarray(nb, dtype=np.int64).tolist()):
        h = hashlib.sha256(head)
        for p in row:
            h.update(_ZERO if p < 0 else raw[p].tobytes())
        out[i] = np.frombuffer(h.digest(), dtype=np.uint8)
    return out


def window_valid(nb: Any, stride: int) -> Any:
    """bool ``[N, stride * stride]``: which of each anchor's windows cover present tiles only.

    Window ``k = oy * stride + ox`` is offset ``(ox, oy)`` steps; it needs the
    right neighbour when ``ox > 0``, the lower one when ``oy > 0``, both and
    the lower-right one when both are.
    """
    import numpy as np

    nb = np.asarray(nb, dtype=np.int64)
    o = np.arange(stride)
    ox, oy = (a.ravel() for a in np.meshgrid(o, o))  # k = oy * stride + ox
    right, down, diag = (nb[:, k : k + 1] >= 0 for k in (1, 2, 3))
    return (
        (nb[:, 0:1] >= 0)
        & ((ox == 0) | right)
        & ((oy == 0) | down)
        & (((ox == 0) | (oy == 0)) | diag)
    )


def window_ids(ids: Any, stride: int) -> Any:
    """int64 ``[N, stride * stride]``: the place id of every window of the anchors ``ids``."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.int64)
    step = PLACE_UNITS // stride
    o = np.arange(stride, dtype=np.int64) * step
    ox, oy = (a.ravel() for a in np.meshgrid(o, o))
    z, x, y = ids >> 58, (ids >> 29) & _MASK, ids & _MASK
    gx = x[:, None] * PLACE_UNITS + ox[None, :]
    gy = y[:, None] * PLACE_UNITS + oy[None, :]
    return (z[:, None] << 58) | (gx << 29) | gy


def tile_place_ids(ids: Any) -> Any:
    """The place id of each tile (its window at offset 0)."""
    return window_ids(ids, 1)[:, 0]


def tile_windows(places: Any) -> Any:
    """bool: which place ids are a tile's own window (offset 0): one per described tile."""
    import numpy as np

    p = np.asarray(places, dtype=np.int64)
    return (((p >> 29) & _MASK) % PLACE_UNITS == 0) & ((p & _MASK) % PLACE_UNITS == 0)
