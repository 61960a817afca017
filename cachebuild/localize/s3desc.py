"""Descriptors in the shared bucket (``STORE=s3://...``): per-cell batches around describe.

Layout and guarantees: :mod:`cachebuild.store.s3`.  A batch holds the
descriptors one build computed for the images of one cell::

    descriptors/<engine key>/<z>/<cx>-<cy>/<sha256>.bin
        b"CBDESC1\\n", dim and n (uint32 LE), n raw SHA-256, n x dim float32 LE

Before describe, :func:`pull_descriptors` imports into the local
descriptor store the ones it lacks from the batches of the flight's cells;
after, :func:`push_descriptors` uploads, one batch per cell, those the
bucket did not have there.  Bucket failures are exit 21, phase describe.

The coverage-map thumbnails (:mod:`cachebuild.store.thumbs`) travel the same way,
in their own per-cell batches, since they do not depend on the engine::

    thumbs/<z>/<cx>-<cy>/<sha256>.bin
        b"CBTHMB1\n", px and n (uint32 LE), n raw SHA-256, n x px x px x 3 uint8 RGB

pulled with the descriptors (those the local thumbnail store lacks) and
pushed after describe, which made one for every image it described: a
second machine with a warm bucket then draws its coverage map without
decoding a tile.  A thumbnail the preview made later by decoding (an image
whose descriptor was reused but had none) goes up with the next build that
pushes that cell.

numpy is imported inside the functions.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from cachebuild.localize.describe_windows import WINDOWS_FILE, window_plan
from cachebuild.store.descriptors import DescriptorStore
from cachebuild.store.s3 import CELL_SHIFT, S3Store, StoreUnavailable, _cell_part, _sha, phase_error
from cachebuild.store.thumbs import THUMB_PX, ThumbStore
from cachebuild.tileset import read_tiles

__all__ = ["pull_descriptors", "push_descriptors"]

_DESC_MAGIC = b"CBDESC1\n"
_THUMB_MAGIC = b"CBTHMB1\n"


class _Seen(dict):
    """cell (packed) -> image digests the bucket has descriptors for there; :attr:`thumbs` likewise.

    What :func:`pull_descriptors` returns and :func:`push_descriptors` takes:
    a plain dict (cells of descriptors only) still works, all thumbnails of
    the flight are then offered again (same bytes, same names).
    """

    #: cell -> digests with a thumbnail in the bucket there; None: the cell has
    #: thumbnail batches that were not read (this machine lacked none of them)
    thumbs: dict[int, set[bytes] | None]

    def __init__(self) -> None:
        super().__init__()
        self.thumbs = {}


def _encode_thumbs(digests: list[bytes], pixels: list[bytes]) -> bytes:

    return b"".join(
        (
            _THUMB_MAGIC,
            struct.pack("<II", THUMB_PX, len(pixels)),
            b"".join(bytes(d) for d in digests),
            *pixels,
        )
    )


def _decode_thumbs(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """``[(digest, raw RGB)]`` of a thumbnail batch, or None for another format or size."""
    from cachebuild.store.thumbs import THUMB_BYTES, THUMB_PX

    head = len(_THUMB_MAGIC) + 8
    if len(data) < head or not data.startswith(_THUMB_MAGIC):
        return None
    px, n = struct.unpack_from("<II", data, len(_THUMB_MAGIC))
    if px != THUMB_PX or len(data) != head + n * (32 + THUMB_BYTES):
        return None
    at = head + 32 * n
    return [
        (
            data[head + 32 * i : head + 32 * (i + 1)],
            data[at + THUMB_BYTES * i : at + THUMB_BYTES * (i + 1)],
        )
        for i in range(n)
    ]


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
    desc: (
        Any  # uint8 [n, 32], what each tile's descriptors are stored under (image or window block)
    )
    cells: Any  # int64 [n], the cell of each tile (packed)
    order: Any  # tile indices sorted by cell
    bounds: Any  # where each cell's run starts in ``order`` (and the end)


def _flight(build_dir: Path) -> _FlightDescriptors:
    import numpy as np

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
    key, dim, desc = str(engine["key"]), int(engine["descriptor_dim"]), raw
    stride = _stride(build_dir)
    if stride > 1:  # windows: one block per anchor tile, under its own keys
        plan = window_plan(build_dir / "engine", raw, ids, stride)
        key, dim, desc = plan["key"], plan["dim"], plan["digests"]
    return _FlightDescriptors(key, dim, raw, desc, cells, order, np.r_[starts, n])


def _stride(build_dir: Path) -> int:
    """The build's ``WINDOW_STRIDE``, from the windows.json its describe wrote first."""
    try:
        return int(json.loads((build_dir / WINDOWS_FILE).read_text())["stride"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1


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

    f = _flight(build_dir)
    have = _Seen()
    if not len(f.raw):
        return have
    with DescriptorStore(store_root, f.key, f.dim) as ds:
        shard, _ = ds.lookup(f.desc)
        lacking = {f.desc[i].tobytes() for i in np.flatnonzero(shard < 0).tolist()}
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
    _pull_thumbs(remote, store_root, f, cell_ids, have.thumbs)
    return have


def _thumb_prefix(remote: S3Store, cell: tuple[int, int, int]) -> str:
    return remote.url.key("thumbs", _cell_part(cell))


def _pull_thumbs(
    remote: S3Store,
    store_root: Path,
    f: _FlightDescriptors,
    cell_ids: list[int],
    seen: dict[int, set[bytes] | None],
) -> None:
    """Import the thumbnails of the flight's images the local thumbnail store lacks.

    Each cell's batches are listed; they are read only where this machine
    lacks a thumbnail of one of the cell's images (otherwise ``seen[cell]``
    is None: the bucket has some there, which ones is not known).
    """

    with ThumbStore(store_root) as ts:
        mine = ts.present(f.raw[i].tobytes() for i in range(len(f.raw)))
        lacking = {
            int(f.cells[f.order[s]]): {f.raw[i].tobytes() for i in f.order[s:e].tolist()} - mine
            for s, e in zip(f.bounds[:-1].tolist(), f.bounds[1:].tolist())
        }

        def read_cell(packed: int) -> tuple[bool, list[tuple[bytes, bytes]]]:
            keys = [
                k
                for k in remote.list(_thumb_prefix(remote, _cell_of(packed)))
                if k.endswith(".bin")
            ]
            if not lacking[packed]:
                return bool(keys), []
            out: list[tuple[bytes, bytes]] = []
            for k in keys:
                data = remote.get_verified(k, k.rsplit("/", 1)[-1][: -len(".bin")])
                out.extend((_decode_thumbs(data) or []) if data is not None else [])
            return False, out

        for s in range(0, len(cell_ids), _CELLS_AT_ONCE):
            part = cell_ids[s : s + _CELLS_AT_ONCE]
            for packed, (unread, rows) in zip(part, remote.map(read_cell, part)):
                if unread:
                    seen[packed] = None
                    continue
                got: set[bytes] = set()
                seen[packed] = got
                want = lacking[packed]
                new = []
                for d, px in rows:
                    got.add(d)
                    if d in want:
                        want.discard(d)
                        new.append((d, px))
                ts.put(new)


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


def _push_descriptors(
    remote: S3Store, store_root: Path, build_dir: Path, have: Mapping[int, set[bytes]]
) -> int:
    import numpy as np

    f = _flight(build_dir)
    todo: list[tuple[int, Any]] = []
    for s, e in zip(f.bounds[:-1].tolist(), f.bounds[1:].tolist()):
        packed = int(f.cells[f.order[s]])
        seen = have.get(packed, set())
        rows: dict[bytes, int] = {}
        for i in f.order[s:e].tolist():
            d = f.desc[i].tobytes()
            if d not in seen and d not in rows:
                rows[d] = i
        if rows:
            todo.append((packed, np.fromiter(rows.values(), dtype=np.int64, count=len(rows))))
    _push_thumbs(remote, store_root, f, getattr(have, "thumbs", {}))
    if not todo:
        return 0
    with DescriptorStore(store_root, f.key, f.dim) as ds:
        pushed = 0
        for s in range(0, len(todo), _CELLS_AT_ONCE):
            batches = []
            for packed, idx in todo[s : s + _CELLS_AT_ONCE]:
                digests = f.desc[idx]
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


def _push_thumbs(
    remote: S3Store, store_root: Path, f: _FlightDescriptors, seen: Mapping[int, set[bytes] | None]
) -> int:
    """Upload, one batch per cell, the flight's thumbnails the bucket lacks; returns how many."""

    if not len(f.raw):
        return 0
    pushed = 0
    with ThumbStore(store_root) as ts:
        for s in range(0, len(f.bounds) - 1, _CELLS_AT_ONCE):
            batches = []
            for a, e in zip(
                f.bounds[s : s + _CELLS_AT_ONCE].tolist(),
                f.bounds[s + 1 : s + 1 + _CELLS_AT_ONCE].tolist(),
            ):
                packed = int(f.cells[f.order[a]])
                there = seen.get(packed, set())
                if (
                    there is None
                ):  # the bucket has thumbnails here this machine did not need to read
                    continue
                want = {f.raw[i].tobytes() for i in f.order[a:e].tolist()} - there
                found = ts.lookup(want)
                if not found:
                    continue
                digests = sorted(found)  # the same thumbnails make the same batch, so the same name
                data = _encode_thumbs(digests, [found[d] for d in digests])
                batches.append(
                    (_thumb_prefix(remote, _cell_of(packed)) + f"{_sha(data)}.bin", data)
                )
                pushed += len(digests)
            remote.map(lambda kd: remote.put(*kd), batches)
    return pushed
