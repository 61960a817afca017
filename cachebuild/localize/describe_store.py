"""What describe keeps in and reads back from the store.

The engine's key (the descriptor store's namespace), the thumbnails made
from the pixels decoded for the engine (:mod:`cachebuild.store.thumbs`),
and ``descriptors.npy`` (and ``cells.npy``) assembled from the descriptor
store in tile order.  Each assembled file is written, and hashed, by a
thread of its own while the next rows are read and unpacked; its SHA-256
goes to the build's hash cache, so nothing reads the file again to hash it
(docs/design/shifted-build.md).  Used by :mod:`cachebuild.localize.describe`.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
from pathlib import Path
from typing import Any

from cachebuild._util.npyio import NpyRowWriter
from cachebuild._util.statcache import HashCache, wait_past_tick
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


class _HashedRows:
    """A :class:`NpyRowWriter` fed through a thread that writes the rows and hashes the file's bytes.

    The rows given to :meth:`write` must not change afterwards (the thread
    reads them later).  :meth:`close` renames the file into place and
    returns its SHA-256; on an error the temporary file is removed.  At
    most two chunks wait for the thread.
    """

    def __init__(self, path: Path, dtype: Any, shape: tuple[int, ...]):
        import numpy as np

        self.path = path
        self.header = _npy_header(np.dtype(dtype), shape)
        self._sha = hashlib.sha256(self.header)
        self._sink = NpyRowWriter(path, dtype, shape)
        self._todo: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="describe-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (rows := self._todo.get()) is not None:
            if self._error is None:
                try:
                    self._sink.write(rows)
                    self._sha.update(rows.data)
                except BaseException as exc:  # noqa: BLE001  raised in the caller's thread
                    self._error = exc

    def write(self, rows: Any) -> None:
        import numpy as np

        if self._error is not None:
            raise self._error
        self._todo.put(np.ascontiguousarray(rows, dtype=self._sink.dtype))

    def close(self) -> str:
        """Wait for the thread, rename the file into place; the file's SHA-256."""
        self._todo.put(None)
        self._thread.join()
        if self._error is not None:
            self._sink.abort()
            raise self._error
        self._sink.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._todo.put(None)
        self._thread.join()
        self._sink.abort()


def _npy_header(dtype: Any, shape: tuple[int, ...]) -> bytes:
    """The header :class:`NpyRowWriter` writes for ``dtype`` and ``shape`` (the same numpy call)."""
    import numpy as np

    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)}  # fmt: skip
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _remember(hash_cache: Path, written: list[tuple[_HashedRows, str]]) -> None:
    """Remember the written files' hashes (each file's header checked against the one hashed).

    Remembered at least one timestamp tick after the last write, so that the
    entries are not racy (:mod:`cachebuild._util.statcache`) and the next
    reader trusts them.
    """
    cache = HashCache(hash_cache)
    wait_past_tick([Path(w.path) for w, _ in written])
    for w, digest in written:
        with open(w.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if fh.read(len(w.header)) != w.header:
                continue  # not the header hashed: the file is hashed when it is next needed
        cache.remember(w.path, digest, st)
    try:
        cache.save()
    except OSError:  # only a cache: the file is hashed when it is next needed
        pass


def _assemble(
    ds: DescriptorStore,
    shard: Any,
    row: Any,
    ids: Any,
    path: Path,
    dim: int,
    valid: Any = None,
    cells: tuple[Path, tuple[int, ...]] | None = None,
    hash_cache: Path | None = None,
) -> int:
    """Write ``path`` (``descriptors.npy``) from the store, in tile order; refuse a non-finite row.

    A stored row holds blocks of windows of ``dim`` columns each, or with
    ``cells`` (``(cells.npy, per-window shape)``) of ``dim`` plus the packed
    cells, which go to that file (int8, the same rows);
    with ``valid`` (bool ``[N, windows a block]``) only those are written.
    With ``hash_cache`` (a :class:`~cachebuild._util.statcache.HashCache`
    file) the files' SHA-256, computed as they are written, are remembered
    there.  Returns the rows written.
    """
    import numpy as np

    values = int(np.prod(cells[1])) if cells is not None else 0
    width = dim + (packed_width(values) if cells is not None else 0)
    n, per = len(ids), ds.dim // width
    chunk = max(1, _ASSEMBLE_ROWS // per)
    total = n * per if valid is None else int(valid.sum())
    sinks: list[_HashedRows] = []
    try:
        sinks.append(_HashedRows(path, "<f4", (total, dim)))
        if cells is not None:
            sinks.append(_HashedRows(cells[0], "|i1", (total, *cells[1])))
        buf = np.empty((min(chunk, max(n, 1)), ds.dim), dtype=np.float32)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            part = ds.read(shard[s:e], row[s:e], out=buf[: e - s]).reshape(e - s, per, width)
            # each part copied once, out of buf (the writer thread reads it later, when the next
            # step fills buf): the descriptors' columns, then the cells' (valid windows only)
            if valid is None:
                desc = np.array(part[:, :, :dim].reshape(-1, dim), order="C")
                packed = part[:, :, dim:].reshape(len(desc), -1)  # unpack copies it
            else:
                desc, packed = part[:, :, :dim][valid[s:e]], part[:, :, dim:][valid[s:e]]
            _check_finite(ds, (desc, packed), part, ids, s)
            sinks[0].write(desc)
            if cells is not None:
                sinks[1].write(unpack(packed, values).reshape(len(desc), *cells[1]))
        done = [(w, w.close()) for w in sinks]
    except BaseException:
        for w in sinks:
            w.abort()
        raise
    if hash_cache is not None:
        _remember(hash_cache, done)
    return total


def _check_finite(ds: DescriptorStore, rows: tuple[Any, ...], part: Any, ids: Any, s: int) -> None:
    """Refuse a non-finite descriptor (naming its tile): the store is damaged."""
    import numpy as np

    if all(bool(np.all(np.isfinite(r))) for r in rows):
        return
    bad = s + int(np.flatnonzero(~np.isfinite(part).all(axis=(1, 2)))[0])
    z, x, y = tile_zxy(ids[bad])
    raise BuildError(
        f"the descriptor store {ds.root} holds a non-finite descriptor for tile z={z} x={x} y={y}",
        remedy=f"delete {ds.root} (its descriptors are computed again)",
        phase=_PHASE,
    )
