"""Descriptors in the shared bucket (``STORE=s3://...``): per-cell batches around describe.

Layout and guarantees: :mod:`cachebuild.s3store`.  A batch holds the
descriptors one build computed for the images of one cell::

    descriptors/<engine key>/<z>/<cx>-<cy>/<sha256>.bin
        b"CBDESC1\\n", dim and n (uint32 LE), n raw SHA-256, n x dim float32 LE

Before describe, :func:`pull_descriptors` imports into the local
descriptor store the ones it lacks from the batches of the flight's cells;
after, :func:`push_descriptors` uploads, one batch per cell, those the
bucket did not have there.  Bucket failures are exit 21, phase describe.

numpy is imported inside the functions.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .s3store import (
    CELL_SHIFT,
    S3Store,
    StoreUnavailable,
    _cell_part,
    _sha,
    phase_error,
)

__all__ = ["pull_descriptors", "push_descriptors"]

_DESC_MAGIC = b"CBDESC1\n"


def _encode_batch(digests: Any, vectors: Any) -> bytes:
    import numpy as np

    n, dim = vectors.shape
    return b"".join(
        (
            _DESC_MAGIC,
            struct.pack("<II", dim, n),
            np.ascontiguousarray(digests, dtype=np.uint8).tobytes(),
            np.ascontiguousarray(vectors, dtype="<f4").tobytes(),
        )
    )


def _decode_batch(data: bytes, dim: int) -> tuple[Any, Any] | None:
    """``(digests uint8 [n, 32], vectors float32 [n, dim])``, or None for another format or dim."""
    import numpy as np

    head = len(_DESC_MAGIC) + 8
    if len(data) < head or not data.startswith(_DESC_MAGIC):
        return None
    d, n = struct.unpack_from("<II", data, len(_DESC_MAGIC))
    if d != dim or len(data) != head + n * (32 + 4 * dim):
        return None
    digests = np.frombuffer(data, dtype=np.uint8, count=32 * n, offset=head).reshape(n, 32)
    vectors = np.frombuffer(data, dtype="<f4", count=n * dim, offset=head + 32 * n).reshape(n, dim)
    return digests, vectors


class _FlightDescriptors(NamedTuple):
    key: str
    dim: int
    raw: Any  # uint8 [n, 32], the tiles' image digests
    cells: Any  # int64 [n], the cell of each tile (packed)
    order: Any  # tile indices sorted by cell
    bounds: Any  # where each cell's run starts in ``order`` (and the end)


def _flight(build_dir: Path) -> _FlightDescriptors:
    import numpy as np

    from .tileset import read_tiles

    engine = json.loads((build_dir / "engine" / "engine.json").read_text())
    tiles = read_tiles(build_dir)
    n = len(tiles)
    raw = np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(n, 32)
    ids = np.asarray(tiles["id"], dtype=np.int64)
    z = ids >> 58
    x = (ids >> 29) & ((1 << 29) - 1)
    y = ids & ((1 << 29) - 1)
    cells = (z << 50) | ((x >> CELL_SHIFT) << 25) | (y >> CELL_SHIFT)
    order = np.argsort(cells, kind="stable")
    sc = cells[order]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]]) if n else np.zeros(0, dtype=np.int64)
    return _FlightDescriptors(
        str(engine["key"]), int(engine["descriptor_dim"]), raw, cells, order, np.r_[starts, n]
    )


def _cell_of(packed: int) -> tuple[int, int, int]:
    return (packed >> 50, (packed >> 25) & ((1 << 25) - 1), packed & ((1 << 25) - 1))


def _desc_prefix(remote: S3Store, key: str, cell: tuple[int, int, int]) -> str:
    return remote.url.key("descriptors", key, _cell_part(cell))


#: Cells whose batches are read at a time (bounds the memory a pull holds).
_CELLS_AT_ONCE = 64


def pull_descriptors(remote: S3Store, store_root: Path, build_dir: Path) -> dict[int, set[bytes]]:
    """Import the descriptors the local store lacks from the bucket's batches.

    Reads the batches of every cell of the flight's tiles (a batch whose
    hash does not match its name is skipped and removed).  Returns, per cell
    (packed), the image digests the bucket has there: what
    :func:`push_descriptors` need not upload.

    Raises
    ------
    BuildError
        ``phase="describe"`` (exit 21) when the bucket fails.
    """
    try:
        return _pull_descriptors(remote, Path(store_root), Path(build_dir))
    except StoreUnavailable as exc:
        raise phase_error(exc, "describe") from None


def _pull_descriptors(remote: S3Store, store_root: Path, build_dir: Path) -> dict[int, set[bytes]]:
    import numpy as np

    from .descstore import DescriptorStore

    f = _flight(build_dir)
    have: dict[int, set[bytes]] = {}
    if not len(f.raw):
        return have
    with DescriptorStore(store_root, f.key, f.dim) as ds:
        shard, _ = ds.lookup(f.raw)
        lacking = {f.raw[i].tobytes() for i in np.flatnonzero(shard < 0).tolist()}
        cell_ids = [int(f.cells[f.order[s]]) for s in f.bounds[:-1].tolist()]

        def read_cell(packed: int) -> list[tuple[Any, Any]]:
            prefix = _desc_prefix(remote, f.key, _cell_of(packed))
            out = []
            for k in remote.list(prefix):
                name = k.rsplit("/", 1)[-1]
                if not name.endswith(".bin"):
                    continue
                data = remote.get_verified(k, name[: -len(".bin")])
                batch = _decode_batch(data, f.dim) if data is not None else None
                if batch is not None:
                    out.append(batch)
            return out

        with ds.writer() as writer:
            for s in range(0, len(cell_ids), _CELLS_AT_ONCE):
                part = cell_ids[s : s + _CELLS_AT_ONCE]
                for packed, batches in zip(part, remote.map(read_cell, part)):
                    seen = have.setdefault(packed, set())
                    for digests, vectors in batches:
                        rows = []
                        for i in range(len(digests)):
                            d = digests[i].tobytes()
                            seen.add(d)
                            if d in lacking and bool(np.all(np.isfinite(vectors[i]))):
                                lacking.discard(d)
                                rows.append(i)
                        if rows:
                            writer.append(digests[rows], vectors[rows])
    return have


def push_descriptors(
    remote: S3Store, store_root: Path, build_dir: Path, have: Mapping[int, set[bytes]]
) -> int:
    """Upload, one batch per cell, the flight's descriptors the bucket lacks; returns how many.

    Raises
    ------
    BuildError
        ``phase="describe"`` (exit 21) when the bucket fails.
    """
    try:
        return _push_descriptors(remote, Path(store_root), Path(build_dir), have)
    except StoreUnavailable as exc:
        raise phase_error(exc, "describe") from None


def _push_descriptors(remote: S3Store, store_root: Path, build_dir: Path, have: Mapping[int, set[bytes]]) -> int:
    import numpy as np

    from .descstore import DescriptorStore

    f = _flight(build_dir)
    todo: list[tuple[int, Any]] = []
    for s, e in zip(f.bounds[:-1].tolist(), f.bounds[1:].tolist()):
        packed = int(f.cells[f.order[s]])
        seen = have.get(packed, set())
        rows: dict[bytes, int] = {}
        for i in f.order[s:e].tolist():
            d = f.raw[i].tobytes()
            if d not in seen and d not in rows:
                rows[d] = i
        if rows:
            todo.append((packed, np.fromiter(rows.values(), dtype=np.int64, count=len(rows))))
    if not todo:
        return 0
    with DescriptorStore(store_root, f.key, f.dim) as ds:
        pushed = 0
        for s in range(0, len(todo), _CELLS_AT_ONCE):
            batches = []
            for packed, idx in todo[s : s + _CELLS_AT_ONCE]:
                digests = f.raw[idx]
                shard, row = ds.lookup(digests)
                ok = shard >= 0
                if not ok.any():
                    continue
                data = _encode_batch(digests[ok], ds.read(shard[ok], row[ok]))
                key = _desc_prefix(remote, f.key, _cell_of(packed)) + f"{_sha(data)}.bin"
                batches.append((key, data))
                pushed += int(ok.sum())
            remote.map(lambda kd: remote.put(*kd), batches)
    return pushed
