"""The localisation self-test: can the finished cache find where a frame was taken?

After the index is built, sample tiles, cut from the mosaic of each sampled
tile and its eight neighbours a 256-pixel *frame* the way a downward camera
would see that ground, describe it with the same engine, search the index,
and count a hit when a result is the tile under the frame's centre or one
of its eight neighbours.  The numbers go to ``selftest.json``, the signed
manifest's ``info`` and the JSON report; ``MIN_RECALL`` turns recall@1 into
a gate (exit 22, failure phase ``selftest``).

A frame, around a tile T chosen uniformly among the tiles whose eight
neighbours are present, seeded by the tile set's aggregate hash (so the
same tiles give the same frames):

- centre: T's centre moved by up to :data:`MAX_OFFSET` of a tile on each
  axis (uniform), so the frame straddles one or two tile borders;
- rotation: uniform in +-:data:`ROTATION_DEG` degrees;
- scale: ground size x uniform in 1 +- :data:`SCALE`;
- brightness: x uniform in 1 +- :data:`GAIN`, then + uniform in
  +-:data:`BIAS` grey levels; bilinear resampling.

A quarter as many frames are also drawn, from every fourth of the same
tiles, with the centre *anywhere* in T (offsets up to half a tile) and
reported as ``anywhere``: a frame centred
near a tile corner shares only a quarter of its ground with any one tile,
and no index of one descriptor per tile finds those reliably (see
docs/benchmarks.md); the figure is there so nobody mistakes the gated one
for it.

numpy, Pillow and the engine's backend are imported inside the functions.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CoverageError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "SELFTEST_FILE",
    "SELFTEST_VERSION",
    "DEFAULT_QUERIES",
    "MAX_OFFSET",
    "ROTATION_DEG",
    "SCALE",
    "GAIN",
    "BIAS",
    "SelfTestError",
    "interior_tiles",
    "make_frame",
    "run_selftest",
    "summary",
    "check_recall",
    "write_selftest",
]

SELFTEST_FILE = "selftest.json"
#: Bump when the frames change: it is a dependency of the selftest task.
SELFTEST_VERSION = 2
DEFAULT_QUERIES = 200
#: Largest offset of the frame centre from the tile centre, per axis, as a
#: fraction of the tile (1/8: 32 px on a 256 px tile).
MAX_OFFSET = 0.125
ROTATION_DEG = 10.0
SCALE = 0.1
GAIN = 0.2
BIAS = 10.0
_K = 5
#: Every this many frames' tiles also give an "anywhere" frame.
_ANYWHERE_EVERY = 4
_MASK = (1 << 29) - 1


class SelfTestError(CoverageError):
    """The self-test's recall@1 is below ``MIN_RECALL`` (or there were no frames)."""

    phase = "selftest"
    remedy = (
        "check the imagery (PROVIDER), the model (MODEL) and the area; or lower MIN_RECALL "
        "(the published cache was left as it was)"
    )


def _neighbour_ids(ids: Any, dx: int, dy: int) -> tuple[Any, Any]:
    """``(ids of the (dx, dy) neighbours, valid)``; x wraps at the antimeridian."""
    import numpy as np

    z = ids >> 58
    x = (ids >> 29) & _MASK
    y = ids & _MASK
    side = np.left_shift(np.int64(1), z)
    nx = (x + dx) % side
    ny = y + dy
    valid = (ny >= 0) & (ny < side)
    return (z << 58) | (nx << 29) | np.clip(ny, 0, None), valid


def interior_tiles(ids: Any) -> Any:
    """Positions in sorted ``ids`` of the tiles whose eight neighbours are all present."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.int64)
    ok = np.ones(len(ids), dtype=bool)
    if not len(ids):
        return np.flatnonzero(ok)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dx == dy == 0:
                continue
            nb, valid = _neighbour_ids(ids, dx, dy)
            pos = np.clip(np.searchsorted(ids, nb), 0, max(len(ids) - 1, 0))
            ok &= valid & (ids[pos] == nb)
    return np.flatnonzero(ok)


def _draw(rng: Any, max_offset: float) -> tuple[float, ...]:
    """A frame's random parameters: centre shift (x, y), turn, scale, gain, bias."""
    return (
        rng.uniform(-max_offset, max_offset),
        rng.uniform(-max_offset, max_offset),
        math.radians(rng.uniform(-ROTATION_DEG, ROTATION_DEG)),
        rng.uniform(1 - SCALE, 1 + SCALE),
        rng.uniform(1 - GAIN, 1 + GAIN),
        rng.uniform(-BIAS, BIAS),
    )


def _render(mosaic: Any, params: tuple[float, ...], size: int) -> Any:
    import numpy as np
    from PIL import Image

    dx, dy, theta, scale, gain, bias = params
    tile = mosaic.shape[0] // 3
    cx, cy = 1.5 * tile + dx * tile, 1.5 * tile + dy * tile
    s = scale * tile / size
    a, b = s * math.cos(theta), -s * math.sin(theta)
    d, e = s * math.sin(theta), s * math.cos(theta)
    h = size / 2
    # output pixel (u, v) samples the mosaic at centre + R * s * (u - h, v - h)
    coeffs = (a, b, cx - a * h - b * h, d, e, cy - d * h - e * h)
    frame = Image.fromarray(mosaic).transform(
        (size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
    )
    out = np.asarray(frame, dtype=np.float32) * np.float32(gain) + np.float32(bias)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_frame(mosaic: Any, rng: Any, max_offset: float, size: int = 256) -> Any:
    """A camera-like ``size`` x ``size`` frame from a 3x3-tile ``mosaic``.

    Parameters
    ----------
    mosaic
        uint8 ``[3 * t, 3 * t, 3]``: the tile and its neighbours.
    rng
        A ``numpy.random.Generator``; draws offset, rotation, scale, light.
    max_offset
        Largest shift of the frame centre from the middle tile's centre,
        per axis, as a fraction of the tile.

    Returns
    -------
    numpy.ndarray
        uint8 ``[size, size, 3]``.
    """
    return _render(mosaic, _draw(rng, max_offset), size)


def _frames(
    centres: Any,
    ids: Any,
    paths: dict[int, Path],
    rng: Any,
    offsets: tuple[float, ...],
    size: tuple[int, int],
    workers: int,
    keep: list[Any],
) -> list[Any]:
    """Frames around the tiles at ``centres`` (positions in ``ids``), as engine input.

    Each tile's 3x3 block is decoded once and gives one frame per entry of
    ``offsets`` (largest centre shift, a fraction of the tile) where that
    offset's ``keep`` mask is true: one batch per offset, in centre order.
    Parameters are drawn for every centre and offset alike, so the frames
    do not depend on the masks.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from .describe import _preprocess_into, decode_tile, tile_zxy
    from .store import read_object

    tile = size[0]

    def load(tid: int) -> Any:
        # hash checked (StoreObjectError: the build fetches the image again)
        data = read_object(paths[tid], what="tile z={} x={} y={}".format(*tile_zxy(tid)))
        return decode_tile(io.BytesIO(data), size)

    wanted = []
    for c in centres:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                wanted.append(int(_neighbour_ids(ids[c : c + 1], dx, dy)[0][0]))
    unique = sorted(set(wanted))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="selftest-decode") as pool:
        images = dict(zip(unique, pool.map(load, unique)))
    rows = [np.cumsum(k) - 1 for k in keep]
    batches = [np.empty((int(k.sum()), 3, *size), dtype=np.float32) for k in keep]
    # parameters drawn here, in order, so the frames do not depend on thread timing
    params = [[_draw(rng, offset) for offset in offsets] for _ in range(len(centres))]

    def frame(i: int) -> None:
        mosaic = np.empty((3 * tile, 3 * tile, 3), dtype=np.uint8)
        scratch = np.empty((3, *size), dtype=np.uint8)
        for k in range(9):
            r, c = divmod(k, 3)
            mosaic[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = images[wanted[9 * i + k]]
        for batch, p, k, row in zip(batches, params[i], keep, rows):
            if k[i]:
                _preprocess_into(_render(mosaic, p, tile), batch[row[i]], scratch)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="selftest-frame") as pool:
        list(pool.map(frame, range(len(centres))))
    return batches


def _hits(found: Any, centres: Any, ids: Any) -> tuple[float, float]:
    """recall@1 and recall@5: a result in the centre tile's 3x3 block counts."""
    import numpy as np

    block = np.stack(
        [_neighbour_ids(ids[centres], dx, dy)[0] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=1
    )
    hit = (found[:, :, None] == block[:, None, :]).any(axis=2)
    return float(np.mean(hit[:, 0])), float(np.mean(hit.any(axis=1)))


def run_selftest(
    *,
    build_dir: str | os.PathLike[str],
    store_root: str | os.PathLike[str],
    engine_dir: str | os.PathLike[str],
    index_path: str | os.PathLike[str],
    queries: int = DEFAULT_QUERIES,
    seed: int | None = None,
    threads: int | None = None,
    max_offset: float = MAX_OFFSET,
) -> dict[str, Any]:
    """Run the self-test over a built cache; returns what ``selftest.json`` holds.

    Parameters
    ----------
    build_dir
        Holds ``tiles.npy`` (and ``tileset.json``, whose aggregate hash seeds
        the sample when ``seed`` is None).
    store_root
        The tile store the images are read from.
    engine_dir
        The engine that described the tiles.
    index_path
        The index to search.
    queries
        Frames per test (0: skip the test).
    seed
        Seed of the sample (``None``: from the tile set's aggregate hash).
    threads
        Engine threads (``None``: every core).
    max_offset
        Largest shift of a frame's centre from its tile's centre, per axis,
        as a fraction of the tile (the build uses :data:`MAX_OFFSET`).

    Returns
    -------
    dict
        ``recall_at_1``, ``recall_at_5`` (None without frames), ``queries``,
        ``candidates`` (tiles with all eight neighbours), ``max_offset_px``,
        ``rotation_deg``, ``scale``, ``gain``, ``bias``, ``seed``,
        ``version``, and ``anywhere`` (the same for centres anywhere in the
        tile).
    """
    import numpy as np

    from .describe import default_decode_threads
    from .engine import load_engine
    from .index import load_index
    from .store import TileStore
    from .tileset import hex_digests, read_summary, read_tiles

    build = Path(build_dir)
    tiles = read_tiles(build)
    ids = np.ascontiguousarray(tiles["id"], dtype=np.int64)
    if seed is None:
        seed = int(read_summary(build)["aggregate_sha256"][:15], 16)
    rng = np.random.default_rng(seed)
    candidates = interior_tiles(ids)
    q = min(int(queries), len(candidates))
    result: dict[str, Any] = {
        "version": SELFTEST_VERSION,
        "queries": q,
        "candidates": int(len(candidates)),
        "seed": int(seed),
        "rotation_deg": ROTATION_DEG,
        "scale": SCALE,
        "gain": GAIN,
        "bias": BIAS,
        "recall_at_1": None,
        "recall_at_5": None,
    }
    runner = load_engine(engine_dir, threads=threads)
    size = (int(runner.input_hw[0]), int(runner.input_hw[1]))
    result["max_offset_px"] = round(max_offset * size[0], 1)
    anywhere = np.arange(q) % _ANYWHERE_EVERY == 0
    result["anywhere"] = {
        "queries": int(anywhere.sum()),
        "max_offset_px": round(0.5 * size[0], 1),
        "recall_at_1": None,
        "recall_at_5": None,
    }
    if q == 0:
        return result
    index = load_index(index_path)
    store = TileStore(store_root)
    workers = default_decode_threads()
    # the same tiles serve both tests: each 3x3 block is decoded once
    centres = np.sort(rng.choice(candidates, size=q, replace=False))
    block_pos = set()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            block_pos.update(np.searchsorted(ids, _neighbour_ids(ids[centres], dx, dy)[0]).tolist())
    pos = np.array(sorted(block_pos), dtype=np.int64)
    paths = {int(ids[p]): store.path(h) for p, h in zip(pos, hex_digests(tiles[pos]))}
    offsets = (max_offset, 0.5)
    descriptors: list[list[Any]] = [[] for _ in offsets]
    for s in range(0, q, 64):
        keep = [np.ones(min(64, q - s), dtype=bool), anywhere[s : s + 64]]
        for out, batch in zip(descriptors, _frames(centres[s : s + 64], ids, paths, rng, offsets, size, workers, keep)):
            if not len(batch):
                continue
            d = np.asarray(runner.run(batch), dtype=np.float32)
            d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), np.float32(1e-12))
            out.append(d)
    for target, found_d, which in ((result, descriptors[0], centres), (result["anywhere"], descriptors[1], centres[anywhere])):
        _, found = index.search(np.ascontiguousarray(np.concatenate(found_d)), _K)
        r1, r5 = _hits(found, which, ids)
        target["recall_at_1"], target["recall_at_5"] = round(r1, 4), round(r5, 4)
    return result


def summary(info: dict[str, Any] | None) -> dict[str, Any]:
    """The report's ``selftest`` object: ``recall_at_1``, ``recall_at_5``, ``queries``."""
    info = info or {}
    return {
        "recall_at_1": info.get("recall_at_1"),
        "recall_at_5": info.get("recall_at_5"),
        "queries": int(info.get("queries") or 0),
    }


def check_recall(info: dict[str, Any] | None, min_recall: float | None) -> None:
    """Raise :class:`SelfTestError` when recall@1 is below ``min_recall``.

    Without ``min_recall`` nothing is checked.  A self-test without frames
    (an area with no tile whose eight neighbours are present, or
    ``SELFTEST_QUERIES=0``) fails the gate: nothing was shown.
    """
    if min_recall is None:
        return
    info = info or {}
    r1 = info.get("recall_at_1")
    if r1 is None:
        raise SelfTestError(
            f"MIN_RECALL={min_recall:g}, but the self-test ran no frames "
            f"({info.get('candidates', 0)} tiles have all eight neighbours; SELFTEST_QUERIES="
            f"{info.get('queries', 0)})",
            remedy="build a larger area (BUFFER_M) or set SELFTEST_QUERIES > 0, or drop MIN_RECALL",
        )
    if float(r1) < min_recall:
        raise SelfTestError(
            f"self-test recall@1 {float(r1):.3f} is below MIN_RECALL={min_recall:g} "
            f"({info.get('queries')} frames; recall@5 {info.get('recall_at_5')})"
        )


def write_selftest(path: str | os.PathLike[str], result: dict[str, Any]) -> None:
    """Write ``selftest.json`` atomically."""
    from .tileset import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(result, indent=1, sort_keys=True) + "\n").encode())
