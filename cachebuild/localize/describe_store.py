"""What describe keeps in and reads back from the store.

The engine's key (the descriptor store's namespace), the thumbnails made
from the pixels decoded for the engine (:mod:`cachebuild.store.thumbs`),
and ``descriptors.npy`` assembled from the descriptor store in tile order.
Used by :mod:`cachebuild.localize.describe`.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cachebuild._util.npyio import NpyRowWriter
from cachebuild.engine.interface import read_engine_json
from cachebuild.errors import BuildError
from cachebuild.localize.decode import tile_zxy
from cachebuild.localize.rerank import packed_width, unpack
from cachebuild.store.descriptors import DescriptorStore
from cachebuild.store.thumbs import ThumbStore

__all__: list[str] = []

#: Rows assembled from the descriptor store per step.
_ASSEMBLE_ROWS = 16_384
_PHASE = "describe"


class _ThumbKeeper:
    """Thumbnails made in describe, written to the thumbnail store in a few transactions."""

    _ROWS = 2048

    def __init__(self, store_root: Path):

        self.store = ThumbStore(store_root)
        self.rows: list[tuple[bytes, bytes]] = []
        self.kept = 0

    def add(self, digests: Any, thumbs: Any) -> None:
        self.rows.extend((digests[i].tobytes(), thumbs[i].tobytes()) for i in range(len(digests)))
        if len(self.rows) >= self._ROWS:
            self.flush()

    def flush(self) -> None:
        self.kept += self.store.put(self.rows)
        self.rows = []

    def __enter__(self) -> _ThumbKeeper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def _engine_key(engine_dir: str | os.PathLike[str]) -> str:
    """The engine's key from its ``engine.json``: the descriptor store's namespace."""
    key = read_engine_json(engine_dir).get("key")
    if not isinstance(key, str):
        raise BuildError(
            f"{Path(engine_dir) / 'engine.json'} has no engine key",
            remedy="recompile the engine (delete the engine directory) and retry",
            phase=_PHASE,
        )
    return key


def _assemble(
    ds: DescriptorStore,
    shard: Any,
    row: Any,
    ids: Any,
    path: Path,
    dim: int,
    valid: Any = None,
    cells: tuple[Path, tuple[int, ...]] | None = None,
) -> int:
    """Write ``path`` (``descriptors.npy``) from the store, in tile order; refuse a non-finite row.

    A stored row holds blocks of windows of ``dim`` columns each, or with
    ``cells`` (``(cells.npy, per-window shape)``) of ``dim`` plus the packed
    cells, which go to that file (int8, the same rows);
    with ``valid`` (bool ``[N, windows a block]``) only those are written.
    Returns the rows written.
    """
    import numpy as np

    values = int(np.prod(cells[1])) if cells is not None else 0
    width = dim + (packed_width(values) if cells is not None else 0)
    n, per = len(ids), ds.dim // width
    chunk = max(1, _ASSEMBLE_ROWS // per)
    total = n * per if valid is None else int(valid.sum())
    with ExitStack() as stack:
        sink = stack.enter_context(NpyRowWriter(path, "<f4", (total, dim)))
        cell_sink = None
        if cells is not None:
            cell_sink = stack.enter_context(NpyRowWriter(cells[0], "|i1", (total, *cells[1])))
        buf = np.empty((min(chunk, max(n, 1)), ds.dim), dtype=np.float32)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            part = ds.read(shard[s:e], row[s:e], out=buf[: e - s]).reshape(e - s, per, width)
            rows = part.reshape(-1, width) if valid is None else part[valid[s:e]]
            if not bool(np.all(np.isfinite(rows))):
                bad = s + int(np.flatnonzero(~np.isfinite(part).all(axis=(1, 2)))[0])
                z, x, y = tile_zxy(ids[bad])
                raise BuildError(
                    f"the descriptor store {ds.root} holds a non-finite descriptor for tile "
                    f"z={z} x={x} y={y}",
                    remedy=f"delete {ds.root} (its descriptors are computed again)",
                    phase=_PHASE,
                )
            sink.write(np.ascontiguousarray(rows[:, :dim]))
            if cell_sink is not None and cells is not None:
                cell_sink.write(unpack(rows[:, dim:], values).reshape(len(rows), *cells[1]))
    return total
