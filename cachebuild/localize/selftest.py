"""The localisation self-test: can the finished cache find where a frame was taken?

After the index is built, sample tiles, cut from the mosaic of each sampled
tile and its eight neighbours a 256-pixel *frame* the way a downward camera
would see that ground, describe it with the same engine, search the index,
and count a hit when a result is the tile under the frame's centre or one
of its eight neighbours.  The numbers go to ``selftest.json``, the signed
manifest's ``info`` and the JSON report; ``MIN_RECALL`` turns recall@1 into
a gate (exit 22, failure phase ``selftest``).

A frame, around a tile T among the tiles whose eight neighbours are
present: the candidates are ranked by a 64-bit hash of (tile id, the
tile's content hash, seed) and the first ``queries`` taken, which is a
uniform random sample that a moved bbox mostly keeps (a tile stays in the
sample while it stays a candidate with the same image, so after a 10%
shift about 90% of the frames are the same frames).  Each frame's
parameters are drawn from a generator seeded by that hash:

- centre: T's centre moved by up to :data:`MAX_OFFSET` of a tile on each
  axis (uniform), so the frame straddles one or two tile borders;
- rotation: uniform in +-:data:`ROTATION_DEG` degrees;
- scale: ground size x uniform in 1 +- :data:`SCALE`;
- brightness: x uniform in 1 +- :data:`GAIN`, then + uniform in
  +-:data:`BIAS` grey levels; bilinear resampling.

A frame's descriptor is a function of the nine images it is cut from, its
parameters, the renderer and the engine, and nothing else; the build
keeps each in :data:`FRAMES_FILE` (build directory) under the SHA-256 of
(:data:`RENDER_VERSION`, engine key, frame size, the nine content hashes,
the parameters), so a rebuild renders and describes only the frames it
has not described before and loads the engine only then.  Every frame is
searched in the new index every time: the recall is always that of the
index being published.

About a quarter as many frames are also drawn, from the sampled tiles
whose hash is 0 mod 4, with the centre *anywhere* in T (offsets up to half
a tile) and reported as ``anywhere``: a frame centred
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

from cachebuild._util.fs import atomic_write
from cachebuild.engine.interface import read_engine_json
from cachebuild.errors import CoverageError
from cachebuild.tileset import read_tiles

if TYPE_CHECKING:
    pass

__all__ = [
    "SELFTEST_FILE",
    "SELFTEST_VERSION",
    "FRAMES_FILE",
    "RENDER_VERSION",
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
SELFTEST_VERSION = 3
#: The frame descriptors a build keeps for the next (build directory; not part of the cache).
FRAMES_FILE = "selftest-frames.npy"
#: Part of each kept frame's key: bump when _render or the engine input preprocessing changes.
RENDER_VERSION = 1
DEFAULT_QUERIES = 200
#: Largest offset of the frame centre from the tile centre, per axis, as a
#: fraction of the tile (1/8: 32 px on a 256 px tile).
MAX_OFFSET = 0.125
ROTATION_DEG = 10.0
SCALE = 0.1
GAIN = 0.2
BIAS = 10.0
_K = 5
#: A sampled tile whose hash is 0 mod this also gives an "anywhere" frame.
_ANYWHERE_EVERY = 4
_MASK = (1 << 29) - 1
#: Frames rendered and described at a time.  A batch holds up to nine
#: decoded tiles per frame (the sample is sparse on a large area, so the
#: blocks rarely share tiles): 16 frames keep that under ~30 MB for 256 px
#: tiles, where 64 put ~110 MB on the build's peak RSS.
_BATCH = 16


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


def _mix(x: Any) -> Any:
    """splitmix64's finaliser over a uint64 array (wrapping arithmetic)."""
    import numpy as np

    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _frame_hashes(ids: Any, digests: Any, seed: int) -> Any:
    """Each tile's 64-bit sampling hash: of its id, its image's content hash and the seed."""
    import numpy as np

    head = np.ascontiguousarray(digests[:, :8]).view("<u8")[:, 0]
    salt = _mix(np.array([seed & (2**64 - 1)], dtype=np.uint64))[0]
    return _mix(_mix(np.asarray(ids, dtype=np.int64).view(np.uint64) ^ salt) ^ head)


def _frame_key(
    engine_key: str, size: tuple[int, int], block: list[bytes], params: tuple[float, ...]
) -> bytes:
    """What a frame's descriptor is a function of, hashed."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(
        f"cachebuild-selftest-frame\0{RENDER_VERSION}\0{engine_key}\0{size[0]}x{size[1]}\0".encode()
    )
    for digest in block:
        h.update(digest)
    h.update(np.asarray(params, dtype="<f8").tobytes())
    return h.digest()


def _frames_dtype(dim: int) -> Any:
    import numpy as np

    return np.dtype([("key", "u1", (32,)), ("d", "<f4", (dim,))])


def _read_frames(path: Path | None, dim: int) -> dict[bytes, Any]:
    """The kept frame descriptors (key -> row); empty when there are none or they are unusable."""
    import numpy as np

    if path is None or not path.is_file():
        return {}
    try:
        with open(path, "rb") as fh:
            kept = np.load(fh, allow_pickle=False)
        if kept.dtype != _frames_dtype(dim) or kept.ndim != 1 or not np.all(np.isfinite(kept["d"])):
            return {}
    except Exception:  # truncated or garbage: describe the frames again  # noqa: BLE001
        return {}
    return {row["key"].tobytes(): row["d"] for row in kept}


def _write_frames(path: Path, rows: dict[bytes, Any], dim: int) -> None:
    """Write the frame descriptors through a temp file and a rename (never in place)."""
    import uuid

    import numpy as np

    out = np.empty(len(rows), dtype=_frames_dtype(dim))
    for i, (key, d) in enumerate(sorted(rows.items())):
        out[i]["key"] = np.frombuffer(key, dtype=np.uint8)
        out[i]["d"] = d
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, out, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _describe_frames(
    jobs: list[tuple[list[int], tuple[float, ...]]],
    paths: dict[int, Path],
    size: tuple[int, int],
    workers: int,
    run: Any,
) -> Any:
    """Render and describe frames: each job is (the 3x3 block's tile ids, row by row; parameters).

    Jobs go ``_BATCH`` at a time: the block tiles of a batch are decoded
    once each (hash-checked reads), the frames rendered in threads, and the
    batch run through the engine.  Returns L2-normalised float32 ``[len(jobs), D]``.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from cachebuild.localize.decode import _preprocess_into, decode_tile, tile_zxy
    from cachebuild.store.objects import read_object

    tile = size[0]

    def load(tid: int) -> Any:
        # hash checked (StoreObjectError: the build fetches the image again)
        data = read_object(paths[tid], what="tile z={} x={} y={}".format(*tile_zxy(tid)))
        return decode_tile(io.BytesIO(data), size)

    out = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="selftest") as pool:
        for s in range(0, len(jobs), _BATCH):
            part = jobs[s : s + _BATCH]
            unique = sorted({t for block, _ in part for t in block})
            images = dict(zip(unique, pool.map(load, unique)))
            batch = np.empty((len(part), 3, *size), dtype=np.float32)

            def frame(i: int, part: Any = part, images: Any = images, batch: Any = batch) -> None:
                block, params = part[i]
                mosaic = np.empty((3 * tile, 3 * tile, 3), dtype=np.uint8)
                for k in range(9):
                    r, c = divmod(k, 3)
                    mosaic[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = images[block[k]]
                _preprocess_into(
                    _render(mosaic, params, tile), batch[i], np.empty((3, *size), dtype=np.uint8)
                )

            list(pool.map(frame, range(len(part))))
            del images
            d = np.asarray(run(batch), dtype=np.float32)
            d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), np.float32(1e-12))
            out.append(d)
    return np.concatenate(out) if out else None


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
    frames_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run the self-test over a built cache; returns what ``selftest.json`` holds.

    Parameters
    ----------
    build_dir
        Holds ``tiles.npy``.
    store_root
        The tile store the images are read from.
    engine_dir
        The engine that described the tiles.
    index_path
        The index to search.
    queries
        Frames per test (0: skip the test).
    seed
        Seed of the sample and the frames (``None``: 0).
    threads
        Engine threads (``None``: every core).
    max_offset
        Largest shift of a frame's centre from its tile's centre, per axis,
        as a fraction of the tile (the build uses :data:`MAX_OFFSET`).
    frames_file
        Where frame descriptors are kept between runs (the build passes
        :data:`FRAMES_FILE` in the build directory): frames found there
        are not rendered and described again; the file is then replaced by
        this run's frames.  ``None``: describe every frame, keep nothing.

    Returns
    -------
    dict
        ``recall_at_1``, ``recall_at_5`` (None without frames), ``queries``,
        ``candidates`` (tiles with all eight neighbours), ``max_offset_px``,
        ``rotation_deg``, ``scale``, ``gain``, ``bias``, ``seed``,
        ``version``, ``frames`` {``described``, ``reused``} (over both
        tests), and ``anywhere`` (the same for centres anywhere in the
        tile).
    """
    import numpy as np

    from cachebuild.engine.compile import load_engine
    from cachebuild.localize.decode import default_decode_threads
    from cachebuild.localize.index import load_index
    from cachebuild.store.objects import TileStore

    build = Path(build_dir)
    tiles = read_tiles(build)
    ids = np.ascontiguousarray(tiles["id"], dtype=np.int64)
    digests = np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(len(tiles), 32)
    seed = 0 if seed is None else int(seed)
    candidates = interior_tiles(ids)
    q = min(int(queries), len(candidates))
    result: dict[str, Any] = {
        "version": SELFTEST_VERSION,
        "queries": q,
        "candidates": int(len(candidates)),
        "seed": seed,
        "rotation_deg": ROTATION_DEG,
        "scale": SCALE,
        "gain": GAIN,
        "bias": BIAS,
        "recall_at_1": None,
        "recall_at_5": None,
        "frames": {"described": 0, "reused": 0},
    }
    record = read_engine_json(engine_dir)
    shape = record["input"].get("shape") or []
    runner = None
    if len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape[2:]):
        size = (int(shape[2]), int(shape[3]))
    else:  # dynamic spatial axes: the loaded engine knows its input
        runner = load_engine(engine_dir, threads=threads)
        size = (int(runner.input_hw[0]), int(runner.input_hw[1]))
    result["max_offset_px"] = round(max_offset * size[0], 1)
    # the sample: candidates in order of their hash; the first q
    hashes = _frame_hashes(ids[candidates], digests[candidates], seed)
    order = np.argsort(hashes, kind="stable")[:q]
    centres, hashes = candidates[order], hashes[order]
    anywhere = _mix(hashes) % np.uint64(_ANYWHERE_EVERY) == 0
    result["anywhere"] = {
        "queries": int(anywhere.sum()),
        "max_offset_px": round(0.5 * size[0], 1),
        "recall_at_1": None,
        "recall_at_5": None,
    }
    if q == 0:
        return result

    # each frame: its block (ids and content hashes, row by row), parameters and key
    block_pos = np.stack(
        [
            np.searchsorted(ids, _neighbour_ids(ids[centres], dx, dy)[0])
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ],
        axis=1,
    )
    engine_key = str(record.get("key") or "")
    tests: list[tuple[Any, list[tuple[list[int], tuple[float, ...], bytes]]]] = [
        (centres, []),
        (centres[anywhere], []),
    ]
    for i, h in enumerate(hashes):
        rng = np.random.default_rng(int(h))
        params = (
            _draw(rng, max_offset),
            _draw(rng, 0.5),
        )  # both drawn: a frame never depends on the other test
        block = [int(ids[p]) for p in block_pos[i]]
        contents = [digests[p].tobytes() for p in block_pos[i]]
        for t, (_, jobs) in enumerate(tests):
            if t == 0 or anywhere[i]:
                jobs.append((block, params[t], _frame_key(engine_key, size, contents, params[t])))

    dim = int(record["descriptor_dim"])
    # without an engine key nothing says whose descriptors they are: none kept
    keep = Path(frames_file) if frames_file is not None and engine_key else None
    kept = _read_frames(keep, dim)
    wanted = [job for _, jobs in tests for job in jobs]
    todo = [job for job in wanted if job[2] not in kept]
    have = dict(kept)
    if todo:
        if runner is None:
            runner = load_engine(engine_dir, threads=threads)
        store = TileStore(store_root)
        paths = {
            t: store.path(digests[np.searchsorted(ids, t)].tobytes().hex())
            for b, _, _ in todo
            for t in b
        }
        described = _describe_frames(
            [(b, p) for b, p, _ in todo], paths, size, default_decode_threads(), runner.run
        )
        have.update((job[2], d) for job, d in zip(todo, described))
    result["frames"] = {"described": len(todo), "reused": len(wanted) - len(todo)}
    index = load_index(index_path)
    for target, (which, jobs) in zip((result, result["anywhere"]), tests):
        if not jobs:
            continue
        queries_d = np.ascontiguousarray(np.stack([have[k] for _, _, k in jobs]), dtype=np.float32)
        _, found = index.search(queries_d, _K)
        r1, r5 = _hits(found, which, ids)
        target["recall_at_1"], target["recall_at_5"] = round(r1, 4), round(r5, 4)
    if keep is not None and (todo or set(kept) != {k for _, _, k in wanted}):
        _write_frames(keep, {k: have[k] for _, _, k in wanted}, dim)  # this run's frames only
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

    atomic_write(
        Path(path), (json.dumps(result, indent=1, sort_keys=True) + "\n").encode(), durable=False
    )
