"""Describing overlapping windows: an anchor tile's ``stride * stride`` windows from the tiles they cover.

Names and keys of windows: :mod:`cachebuild.store.windowkeys`.  Two ways to
describe a block (one anchor's windows), the same for every backend:

- ``pooled`` (a poolable network, :mod:`cachebuild.engine.features`): the
  feature engine runs once per covered tile; each window's descriptor is
  the network's head applied to its crop of the 2 x 2 tiles' feature maps,
  here in numpy.  Equal, to float rounding, to running the whole network
  on the window's pixels as cut from the tiles' feature maps;
- ``engine`` (any other network, a black box): each valid window is cut
  from the 2 x 2 tiles' pixels and run through the engine.

A block is float32 ``[stride * stride * W]``, window ``k = oy * stride +
ox``; a window that covers an absent tile is left zero (never indexed).
``W`` is the descriptor's ``D``, and in ``pooled`` mode then the window's
cells for the second stage, packed (:mod:`cachebuild.localize.rerank`):
:func:`stored_dim`.

numpy is imported inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cachebuild.engine.cells import CELLS_HEAD, CELLS_MODEL, CHANNELS
from cachebuild.engine.compile import load_engine
from cachebuild.engine.features import (
    FEATURES_DIR,
    HEAD_FILE,
    HEAD_MODEL,
    load_head_model,
    matmul_runner,
    read_head,
)
from cachebuild.engine.interface import read_engine_json
from cachebuild.errors import BuildError
from cachebuild.localize.rerank import CANDIDATES, CELLS_FILE, OFFSETS, pack, packed_width, quantise
from cachebuild.store.windowkeys import window_valid

__all__ = [
    "WindowDescriber",
    "describer_dir",
    "pooled_blocks",
    "engine_blocks",
    "window_record",
    "stored_dim",
]

_PHASE = "describe"
#: Tiles and anchors per matrix product: always this many rows (padded), so a
#: block's bits do not depend on the batch that described it.
_CHUNK = 8


def describer_dir(engine_dir: str | os.PathLike[str]) -> tuple[Path, str]:
    """``(directory of the engine that describes windows, mode)``: the feature engine when compiled."""
    features = Path(engine_dir) / FEATURES_DIR
    done = all((features / n).is_file() for n in ("engine.json", HEAD_FILE, CELLS_HEAD))
    if done:
        return features, "pooled"
    return Path(engine_dir), "engine"


def _shifted(pool: Any, stride: int) -> tuple[Any, Any]:
    """``(first, second)`` ``[n, stride * g]``: ``pool`` ``[n, g]`` for each offset's part in the first and second tile.

    Offset ``o`` (steps of ``n / stride`` cells) pools cells ``o * step..n`` of
    the first tile with the pool's first rows and cells ``0..o * step`` of
    the second with its last ones.
    """
    import numpy as np

    n, g = pool.shape
    step = n // stride
    first = np.zeros((n, stride, g), dtype=np.float32)
    second = np.zeros((n, stride, g), dtype=np.float32)
    for o in range(stride):
        cut = o * step
        first[cut:, o] = pool[: n - cut]
        second[:cut, o] = pool[n - cut :]
    return first.reshape(n, -1), second.reshape(n, -1)


_MM: list[Any] = []


def _mm() -> Any:
    """This process's one-thread matrix product (:func:`~cachebuild.engine.features.matmul_runner`)."""
    if not _MM:
        _MM.append(matmul_runner(1))
    return _MM[0]


def pooled_blocks(
    features: Any, cover: Any, stride: int, head: dict[str, Any], run_head: Any, run_cells: Any
) -> Any:
    """Blocks ``[k, stride**2 * (D + P)]`` from tile feature maps ``[m, C, h, w]`` and ``cover`` ``[k, 4]``.

    ``cover[i]``: rows of ``features`` of anchor i, its right, lower and
    lower-right neighbour (-1: absent, zeros; such windows are zeroed).
    ``head``: the pooling weights (:func:`~cachebuild.engine.features.read_head`);
    ``run_head``: the network after its pooling, grids ``[n, C, g, g]`` to
    descriptors (:func:`~cachebuild.engine.features.load_head_model`);
    ``run_cells``: grids to cells (the cells head, loaded the same way),
    kept quantised and packed in ``P`` columns after each descriptor.
    Pooling is linear, so each tile's columns are pooled once for every
    offset, as the left and as the right part of a window (one matrix
    product), and each anchor's windows add up their tiles' parts.

    The products are ONNX Runtime's, not numpy's BLAS (whose kernels follow
    ``OPENBLAS_CORETYPE`` and friends: a companion's shell made other
    bits); every one has the same shape whatever the batch
    (:data:`_CHUNK` tiles or anchors, padded): BLAS may round a row
    differently in a product of another height, and a block must have the
    same bits whichever batch described it (a stored block is reused by
    later builds, which must equal a clean one).
    """
    import numpy as np

    m, c, h, w = features.shape
    s = stride
    g = head["pool.cols"].shape[1]
    mm = _mm()
    cols = np.concatenate(_shifted(head["pool.cols"], s), axis=1)  # [w, 2 * s * g]
    top, bottom = _shifted(np.ascontiguousarray(head["pool.rows"].T), s)  # [h, s * g]
    rows = np.concatenate([top, bottom], axis=0)  # [(2 h), (oy a)]
    # each tile's column pools as a window's left (0) and right (1) part: [tile, l/r, ox, C, b, row]
    part = np.empty((m + 1, 2, s, c, g, h), dtype=np.float32)
    part[m] = 0.0  # cover -1: an absent tile
    maps = np.zeros((_CHUNK, c * h, w), dtype=np.float32)
    for t0 in range(0, m, _CHUNK):  # fixed-size products (the last chunk padded with zeros)
        n = min(_CHUNK, m - t0)
        maps[:n] = np.asarray(features[t0 : t0 + n], dtype=np.float32).reshape(n, c * h, w)
        maps[n:] = 0.0
        res = mm(maps.reshape(-1, w), cols).reshape(_CHUNK, c, h, 2, s, g)
        part[t0 : t0 + n] = res[:n].transpose(0, 3, 4, 1, 5, 2)
    cover = np.asarray(cover, dtype=np.int64)
    d = int(head["proj.w"].shape[1])
    out = np.empty((len(cover), s, s, d + packed_width(CHANNELS * g * g)), dtype=np.float32)
    both = np.zeros((_CHUNK, s, c, g, 2 * h), dtype=np.float32)
    for a0 in range(0, len(cover), _CHUNK):
        cv = cover[a0 : a0 + _CHUNK]
        n = len(cv)
        np.add(part[cv[:, 0], 0], part[cv[:, 1], 1], out=both[:n, ..., :h])  # upper tiles
        np.add(part[cv[:, 2], 0], part[cv[:, 3], 1], out=both[:n, ..., h:])  # lower tiles
        both[n:] = 0.0
        grid = mm(both.reshape(-1, 2 * h), rows).reshape(
            _CHUNK, s, c, g, s, g
        )  # [k, ox, C, b, oy, a]
        grids = np.ascontiguousarray(grid[:n].transpose(0, 4, 1, 2, 5, 3))  # [k, oy, ox, C, a, b]
        flat = grids.reshape(n * s * s, c, g, g)
        out[a0 : a0 + n, ..., :d] = run_head(flat).reshape(n, s, s, d)
        out[a0 : a0 + n, ..., d:] = pack(quantise(run_cells(flat))).reshape(n, s, s, -1)
    valid = window_valid(cover, s).reshape(len(cover), s, s)
    out[~valid] = 0.0
    return out.reshape(len(cover), -1)


def engine_blocks(runner: Any, pixels: Any, cover: Any, stride: int, batch: int = 64) -> Any:
    """Blocks ``[k, stride**2 * D]``: each valid window cut from the prepared pixels and run.

    ``pixels``: the engine's inputs of the covered tiles, float32 ``[m, 3, H, W]``.
    """
    import numpy as np

    m, ch, h, w = pixels.shape
    cover = np.asarray(cover, dtype=np.int64)
    valid = window_valid(cover, stride)
    dim = int(runner.descriptor_dim)
    out = np.zeros((len(cover), stride * stride, dim), dtype=np.float32)
    jobs = np.argwhere(valid)  # (anchor, window) pairs
    sy, sx = h // stride, w // stride
    buf = np.empty((min(batch, max(len(jobs), 1)), ch, h, w), dtype=np.float32)
    for s in range(0, len(jobs), batch):
        part = jobs[s : s + batch]
        for j, (a, k) in enumerate(part.tolist()):
            oy, ox = divmod(k, stride)
            _cut(pixels, cover[a], ox * sx, oy * sy, buf[j])
        d = np.asarray(runner.run(buf[: len(part)]), dtype=np.float32)
        out[part[:, 0], part[:, 1]] = d / np.maximum(
            np.linalg.norm(d, axis=1, keepdims=True), 1e-12
        )
    return out.reshape(len(cover), -1)


def _cut(pixels: Any, cover: Any, x: int, y: int, dst: Any) -> None:
    """Copy the window at pixel offset ``(x, y)`` of a 2 x 2 mosaic of ``pixels[cover]`` into ``dst``."""
    _, _, h, w = pixels.shape
    for q, p in enumerate(cover.tolist()):
        qy, qx = divmod(q, 2)
        # the part of quadrant q inside the window, in window and in tile coordinates
        wy0, wy1 = max(qy * h - y, 0), min(qy * h + h - y, h)
        wx0, wx1 = max(qx * w - x, 0), min(qx * w + w - x, w)
        if wy0 >= wy1 or wx0 >= wx1:
            continue
        ty0, tx0 = wy0 + y - qy * h, wx0 + x - qx * w
        if p < 0:
            dst[:, wy0:wy1, wx0:wx1] = 0.0
        else:
            dst[:, wy0:wy1, wx0:wx1] = pixels[p, :, ty0 : ty0 + wy1 - wy0, tx0 : tx0 + wx1 - wx0]


class WindowDescriber:
    """Describes blocks of windows with an engine directory's describer (see :func:`describer_dir`).

    ``runner`` is what the tiles' prepared pixels are run through once
    (the feature engine, or for ``engine`` mode nothing: the pixels are
    kept); :meth:`blocks` turns its output into blocks.
    """

    def __init__(self, engine_dir: str | os.PathLike[str], stride: int, threads: int | None):
        self.dir, self.mode = describer_dir(engine_dir)
        self.stride = int(stride)
        self._engine = load_engine(self.dir, threads=threads)
        self.input_hw = self._engine.input_hw
        if self.mode == "pooled":
            self.head = read_head(self.dir / HEAD_FILE)
            # one thread, as the pooling's products: the feature engine is what runs wide
            self.run_head = load_head_model(self.dir / HEAD_MODEL, 1)
            self.run_cells = load_head_model(self.dir / CELLS_HEAD, 1)
            self.dim = int(self.head["proj.w"].shape[1])
        else:
            self.head = {}
            self.dim = int(self._engine.descriptor_dim)

    def run(self, batch: Any) -> Any:
        """The per-tile stage: feature maps (pooled), or the pixels themselves (engine)."""
        if self.mode == "engine":
            return batch.copy()
        try:
            return self._engine.run(batch)
        except Exception as exc:
            raise BuildError(
                f"the feature engine failed on {len(batch)} tiles: {type(exc).__name__}: {exc}",
                remedy="recompile the engine (delete the engine directory) and retry",
                phase=_PHASE,
            ) from exc

    def blocks(self, per_tile: Any, cover: Any) -> Any:
        """Blocks ``[k, stride**2 * D]`` of the anchors ``cover`` from :meth:`run`'s output."""
        import numpy as np

        if self.mode == "engine":
            return engine_blocks(self._engine, per_tile, cover, self.stride)
        c = int(self.head["pool.rows"].shape[1])  # the maps are square: rows pool h cells
        maps = np.asarray(per_tile, dtype=np.float32).reshape(len(per_tile), -1, c, c)
        return pooled_blocks(maps, cover, self.stride, self.head, self.run_head, self.run_cells)


def window_record(engine_dir: str | os.PathLike[str], stride: int) -> dict[str, Any]:
    """What ``windows.json`` says: the stride, the mode, the per-window descriptor size, the cells.

    ``mode``: ``tile`` (stride 1: the engine's descriptor of each tile),
    ``pooled`` or ``engine`` (see the module's text).  ``cells``: the
    second stage (``pooled`` only, else None): the cells' shape and the
    files and settings an onboard client's re-ranking uses.
    """
    if stride == 1:
        return {
            "stride": 1,
            "mode": "tile",
            "descriptor_dim": int(read_engine_json(engine_dir)["descriptor_dim"]),
            "cells": None,
        }
    d, mode = describer_dir(engine_dir)
    cells = None
    if mode == "pooled":
        head = read_head(d / HEAD_FILE)
        dim = int(head["proj.w"].shape[1])
        g = int(head["pool.rows"].shape[0])
        cells = {
            "file": CELLS_FILE,
            "model": f"engine/{CELLS_MODEL}",
            "shape": [CHANNELS, g, g],
            "dtype": "int8",
            "candidates": CANDIDATES,
            "offsets": OFFSETS,
        }
    else:
        dim = int(read_engine_json(d)["descriptor_dim"])
    return {"stride": int(stride), "mode": mode, "descriptor_dim": dim, "cells": cells}


def stored_dim(record: dict[str, Any]) -> int:
    """Float32 columns a window takes in a stored block: its descriptor, then its packed cells."""
    cells = record.get("cells")
    extra = 0
    if cells:
        k, g, h = cells["shape"]
        extra = packed_width(int(k) * int(g) * int(h))
    return int(record["descriptor_dim"]) + extra
