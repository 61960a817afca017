"""The second stage of a search: re-rank the index's first candidates by their cells.

Stage 1 searches ``index.faiss`` for a frame's descriptor and keeps the
first :data:`CANDIDATES` places.  Stage 2 compares the frame's *cells*
(:mod:`cachebuild.engine.cells`: the network's ``8 x 8`` grid, 8 channels)
with each candidate's, stored in ``cells.npy``: the cosine over the cells
both cover, with the frame's grid moved by up to :data:`OFFSETS` cell in
each direction (a coarse geometric check: the frame's layout must match
the place's, give or take a cell), best offset wins.  Candidates are
re-ordered by that score (ties keep the index's order).  The index finds
the neighbourhood; the cells tell the true place from look-alikes.

Cells are stored quantised: int8 per value, each place scaled so its
largest magnitude is 127 (the cosine ignores a place's scale, so the scale
is not kept).  In the descriptor store a block keeps them beside the
window descriptors, packed three bytes to a float32 (exact integers below
2**24, so they survive every float32 path unchanged): :func:`pack`,
:func:`unpack`.

numpy is imported inside the functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cachebuild.engine.cells import CELLS_MODEL
from cachebuild.engine.features import load_head_model

__all__ = [
    "CELLS_FILE",
    "CANDIDATES",
    "OFFSETS",
    "quantise",
    "packed_width",
    "pack",
    "unpack",
    "match",
    "rerank",
    "PlaceCells",
    "open_stage2",
]

#: Each place's cells, int8 ``[N, k, g, g]``, row i the place in row i of ``descriptor_ids.npy``.
CELLS_FILE = "cells.npy"
#: Stage-1 candidates re-ranked (measured: docs/design/rerank.md).
CANDIDATES = 50
#: Cell offsets tried in each direction (1: a 3 x 3 neighbourhood of shifts).
OFFSETS = 1


def quantise(cells: Any) -> Any:
    """int8 ``[n, ...]`` of float ``cells``: each row scaled so its largest magnitude is 127."""
    import numpy as np

    x = np.asarray(cells, dtype=np.float32)
    flat = x.reshape(len(x), -1)
    top = np.max(np.abs(flat), axis=1, keepdims=True) if flat.size else np.zeros((len(x), 1))
    scale = np.where(top > 0, top, np.float32(1.0)).astype(np.float32) / np.float32(127.0)
    q = np.clip(np.rint(flat / scale), -127, 127).astype(np.int8)
    return q.reshape(x.shape)


def packed_width(values: int) -> int:
    """float32 columns that hold ``values`` int8 values, three to a column."""
    return -(-int(values) // 3)


def pack(q: Any) -> Any:
    """float32 ``[n, packed_width(E)]`` holding int8 ``[n, E]``: three bytes (offset by 128) a column.

    Column j is ``b0 + 256 b1 + 65536 b2`` of its three offset bytes (0 past
    ``E``): an integer below 2**24, exact in float32.  Made through a
    little-endian int32 view of the bytes, with no wide temporaries.
    """
    import numpy as np

    q = np.asarray(q, dtype=np.int8).reshape(len(q), -1)
    n, values = q.shape
    width = packed_width(values)
    col = np.zeros((n, 3 * width), dtype=np.uint8)
    col[:, :values] = q.view(np.uint8) ^ np.uint8(0x80)  # v + 128: v's byte, top bit flipped
    b = np.zeros((n, width, 4), dtype=np.uint8)  # byte 3 stays 0
    b[..., :3] = col.reshape(n, width, 3)
    return b.view("<i4")[..., 0].astype(np.float32)


def unpack(packed: Any, values: int) -> Any:
    """int8 ``[n, values]`` from :func:`pack`'s float32 columns (a byte view, as :func:`pack`)."""
    import numpy as np

    v = np.asarray(packed, dtype=np.float32).astype("<i4")
    b = v.view(np.uint8).reshape(len(v), -1, 4)[:, :, :3].reshape(len(v), -1)[:, :values]
    return (b ^ np.uint8(0x80)).view(np.int8)


def _shift_masks(g: int, offsets: int) -> Any:
    """``[(2 o + 1)**2, g * g]`` bool: for each shift ``(dy, dx)``, the candidate's cells the frame covers."""
    import numpy as np

    masks = []
    for dy in range(-offsets, offsets + 1):
        for dx in range(-offsets, offsets + 1):
            m = np.zeros((g, g), dtype=bool)
            m[max(-dy, 0) : g + min(-dy, 0), max(-dx, 0) : g + min(-dx, 0)] = True
            masks.append(m.reshape(-1))
    return np.stack(masks)


def match(query: Any, places: Any, offsets: int = OFFSETS) -> Any:
    """``[n, K]`` scores: frames' cells ``[n, k, g, g]`` against candidates' ``[n, K, k, g, g]``.

    Cosine over the overlapping cells, the frame's grid moved by ``-offsets..offsets``
    cells on each axis; the best shift counts.  Every shift at once: the
    frame moved and zero-filled outside the overlap, one batched product
    with the candidates for the dot products, the candidates' squared cells
    summed over each overlap by a mask.
    """
    import numpy as np

    q = np.asarray(query, dtype=np.float32)
    p = np.asarray(places, dtype=np.float32)
    n, big_k, k, g = p.shape[0], p.shape[1], p.shape[2], p.shape[-1]
    masks = _shift_masks(g, offsets)
    moved = np.zeros((n, len(masks), k, g, g), dtype=np.float32)
    s = 0
    for dy in range(-offsets, offsets + 1):
        for dx in range(-offsets, offsets + 1):
            moved[:, s, :, max(-dy, 0) : g + min(-dy, 0), max(-dx, 0) : g + min(-dx, 0)] = q[
                ..., max(dy, 0) : g + min(dy, 0), max(dx, 0) : g + min(dx, 0)
            ]
            s += 1
    flat = p.reshape(n, big_k, k * g * g)
    num = np.matmul(flat, moved.reshape(n, len(masks), -1).transpose(0, 2, 1))  # [n, K, S]
    qq = np.square(moved).reshape(n, len(masks), -1).sum(axis=2)  # [n, S]
    pp = np.square(p).sum(axis=2).reshape(n, big_k, g * g) @ masks.T.astype(np.float32)
    den = np.sqrt(qq[:, None, :] * pp)
    return (num / np.maximum(den, np.float32(1e-12))).max(axis=2)


def rerank(found: Any, query: Any, places: Any, offsets: int = OFFSETS) -> Any:
    """``found`` ``[n, K]`` (ids, -1: none) re-ordered by :func:`match` of ``query`` against ``places``."""
    import numpy as np

    found = np.asarray(found, dtype=np.int64)
    s = np.where(found >= 0, match(query, places, offsets), -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(found, order, axis=1)


class PlaceCells:
    """A cache's ``cells.npy`` by place id (through ``descriptor_ids.npy``), read on demand."""

    def __init__(self, cache_dir: str | os.PathLike[str], ids_file: str = "descriptor_ids.npy"):
        import numpy as np

        d = Path(cache_dir)
        self.cells = np.load(d / CELLS_FILE, mmap_mode="r")
        ids = np.load(d / ids_file, mmap_mode="r")
        if self.cells.ndim != 4 or len(self.cells) != len(ids):
            raise ValueError(f"{d / CELLS_FILE} does not match {d / ids_file}")
        self.order = np.argsort(ids, kind="stable")
        self.sorted = np.asarray(ids)[self.order]

    def get(self, found: Any) -> Any:
        """int8 cells ``[*found.shape, k, g, g]`` of the ids ``found`` (zeros for -1 or an unknown id)."""
        import numpy as np

        found = np.asarray(found, dtype=np.int64)
        flat = found.ravel()
        pos = np.clip(np.searchsorted(self.sorted, flat), 0, max(len(self.sorted) - 1, 0))
        ok = (flat >= 0) & (len(self.sorted) > 0)
        ok &= self.sorted[pos] == flat if len(self.sorted) else ok
        rows = self.order[pos]
        out = np.zeros((len(flat), *self.cells.shape[1:]), dtype=np.int8)
        take = np.flatnonzero(ok)
        if len(take):
            srt = np.argsort(rows[take])  # memmap reads in file order
            out[take[srt]] = self.cells[rows[take][srt]]
        return out.reshape(*found.shape, *self.cells.shape[1:])


def open_stage2(
    cache_dir: str | os.PathLike[str], engine_dir: str | os.PathLike[str], threads: int | None
) -> tuple[Any, PlaceCells] | None:
    """``(frame-to-cells runner, the places' cells)`` when the cache has a second stage, else None.

    A second stage: ``windows.json`` names ``cells``, ``engine/cells.onnx``
    exists and ``cells.npy`` has rows.
    """
    try:
        rec = json.loads((Path(cache_dir) / "windows.json").read_text())
    except (OSError, ValueError):
        return None
    model = Path(engine_dir) / CELLS_MODEL
    if not isinstance(rec, dict) or not rec.get("cells") or not model.is_file():
        return None
    places = PlaceCells(cache_dir)
    return (load_head_model(model, threads), places) if len(places.cells) else None
