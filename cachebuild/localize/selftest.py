"""The localisation self-test: can the finished cache find where a frame was taken?

After the index is built, sample tiles, cut from the mosaic of each sampled
tile and its eight neighbours a 256-pixel *frame* the way a downward camera
would see that ground, describe it with the same engine and search the
index.  A result is a hit when at least half the frame's ground lies in
the place it names, and the position error is the ground distance from
the frame's centre to that place's centre
(:mod:`cachebuild.localize.selftest_score`).

The headline is frames centred *anywhere* in the sampled tile (offsets up
to half a tile on each axis), as a drone's frame is: recall@1, recall@5,
median and p95 position error in metres, with the frame count (fewer than
:data:`~cachebuild.localize.selftest_score.MIN_FRAMES` give no figure).
About a quarter as many frames (the sampled tiles whose hash is 0 mod 4)
are also cut within :data:`MAX_OFFSET` of a tile centre and reported as
``near_centre``.  The numbers go to ``selftest.json``, the signed
manifest's ``info`` and the JSON report; ``MIN_RECALL`` turns the
headline recall@1 into a gate (exit 22, failure phase ``selftest``) and
``RECALL_WARN`` into a warning.

A frame, around a tile T among the tiles whose eight neighbours are
present: the candidates are ranked by a 64-bit hash of (tile id, the
tile's content hash, seed) and the first ``queries`` taken, which is a
uniform random sample that a moved bbox mostly keeps (a tile stays in the
sample while it stays a candidate with the same image, so after a 10%
shift about 90% of the frames are the same frames).  Each frame's
parameters are drawn from a generator seeded by that hash:

- centre: T's centre moved by up to half a tile (headline) or
  :data:`MAX_OFFSET` of a tile (near-centre) on each axis, uniform;
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
index being published.  ``selftest.json`` holds only what the figures
are a function of; how many frames this run described or reused goes to
:data:`RUN_FILE` and from there to the build report.

Where the cache has a second stage (``windows.json``'s ``cells``), the
search is the two-stage one an onboard client runs
(:mod:`cachebuild.localize.rerank`): the index's first
:data:`~cachebuild.localize.rerank.CANDIDATES` places re-ranked by their
cells against the frame's (``engine/cells.onnx``); the headline is the
final order, ``stage1`` the index's order alone.

numpy, Pillow and the engine's backend are imported inside the functions.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_write
from cachebuild.engine.compile import load_engine
from cachebuild.engine.interface import read_engine_json
from cachebuild.errors import CoverageError
from cachebuild.localize.index import load_index
from cachebuild.localize.rerank import CANDIDATES, OFFSETS, open_stage2, rerank
from cachebuild.localize.selftest_frames import (
    _describe_frames,
    _read_frames,
    _render,
    _write_frames,
)
from cachebuild.localize.selftest_score import MIN_FRAMES, MIN_OVERLAP, headline, score
from cachebuild.tileset import read_tiles

__all__ = [
    "SELFTEST_FILE",
    "SELFTEST_VERSION",
    "RUN_FILE",
    "read_run",
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
SELFTEST_VERSION = 5
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
#: A sampled tile whose hash is 0 mod this also gives a near-centre frame.
_NEAR_EVERY = 4
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


def _engine_input(
    engine_dir: Any, threads: int | None
) -> tuple[dict[str, Any], tuple[int, int], Any]:
    """``(engine.json, frame size, runner or None)``: the runner is loaded only for dynamic axes."""
    record = read_engine_json(engine_dir)
    shape = record["input"].get("shape") or []
    if len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape[2:]):
        return record, (int(shape[2]), int(shape[3])), None
    runner = load_engine(engine_dir, threads=threads)  # dynamic spatial axes: it knows its input
    return record, (int(runner.input_hw[0]), int(runner.input_hw[1])), runner


def _plan_frames(
    ids: Any,
    digests: Any,
    centres: Any,
    hashes: Any,
    near: Any,
    engine_key: str,
    size: Any,
    max_offset: float,
) -> list[tuple[Any, list[tuple[list[int], tuple[float, ...], bytes]]]]:
    """The two tests' frames: ``[(middle tiles' positions, [(block, params, key)])]``.

    The first test is the headline (centres anywhere in the tile), the second
    the near-centre frames of the tiles flagged ``near``.  Both parameter sets
    are drawn for every tile, near-centre first, so a frame never depends on
    the other test.
    """
    import numpy as np

    block_pos = np.stack(
        [
            np.searchsorted(ids, _neighbour_ids(ids[centres], dx, dy)[0])
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ],
        axis=1,
    )
    tests: list[tuple[Any, list[tuple[list[int], tuple[float, ...], bytes]]]] = [
        (centres, []),
        (centres[near], []),
    ]
    for i, h in enumerate(hashes):
        rng = np.random.default_rng(int(h))
        params = (_draw(rng, max_offset), _draw(rng, 0.5))
        block = [int(ids[p]) for p in block_pos[i]]
        contents = [digests[p].tobytes() for p in block_pos[i]]
        for t, (_, jobs) in enumerate(tests):
            if t == 1 and not near[i]:
                continue
            p = params[1 - t]  # anywhere: the second draw, as before, so kept frames stay valid
            jobs.append((block, p, _frame_key(engine_key, size, contents, p)))
    return tests


def _score_test(
    index: Any,
    which: Any,
    jobs: list[Any],
    have: dict[bytes, Any],
    ids: Any,
    dim: int,
    stage2: tuple[Any, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Search one test's frames and score them (:func:`selftest_score.score`): ``(final, stage 1)``.

    A frame's row is its descriptor (``dim`` columns), then with ``stage2``
    its cells; stage 1 alone is None without a second stage.
    """
    import numpy as np

    if not jobs:
        empty = score(np.zeros((0, _K), np.int64), [], [], [], np.zeros((0, 6)))
        return empty, (dict(empty) if stage2 is not None else None)
    rows = np.ascontiguousarray(np.stack([have[k] for _, _, k in jobs]), dtype=np.float32)
    _, found = index.search(
        np.ascontiguousarray(rows[:, :dim]), _K if stage2 is None else CANDIDATES
    )
    tid = ids[which]
    where = ((tid >> 29) & _MASK, tid & _MASK, tid >> 58, [p for _, p, _ in jobs])
    first = score(found[:, :_K], *where)
    if stage2 is None:
        return first, None
    cells = stage2[1].get(found)  # [n, K, k, g, g]
    final = rerank(found, rows[:, dim:].reshape(len(rows), *cells.shape[2:]), cells)
    return score(final[:, :_K], *where), first


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
    """Run the self-test over a built cache; returns what ``selftest.json`` holds, and ``frames``.

    ``build_dir`` holds ``tiles.npy``; images come from ``store_root``,
    descriptors from the engine in ``engine_dir``, results from the index
    at ``index_path``.  ``queries`` frames are centred anywhere (0: no
    test), about a quarter as many within ``max_offset`` of a tile centre
    (:data:`MAX_OFFSET`); ``seed`` (None: 0) draws sample and frames;
    ``threads``: the engine's (None: every core).  With ``frames_file``
    (the build passes :data:`FRAMES_FILE`) frame descriptors kept there
    are reused and the file replaced by this run's; None keeps nothing.

    Returns the headline over frames centred anywhere -- ``recall_at_1``,
    ``recall_at_5``, ``median_error_m``, ``p95_error_m`` (None without
    frames or when unbounded), ``queries``, ``too_few_frames`` -- then
    ``candidates``, ``max_offset_px``, ``min_overlap``, ``rotation_deg``,
    ``scale``, ``gain``, ``bias``, ``seed``, ``version``, ``near_centre``
    (the same figures for the near-centre frames) and ``frames``
    {``described``, ``reused``}: this run's history, which
    :func:`write_selftest` keeps out of ``selftest.json``.
    """
    import numpy as np

    tiles = read_tiles(Path(build_dir))
    ids = np.ascontiguousarray(tiles["id"], dtype=np.int64)
    digests = np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(len(tiles), 32)
    seed = 0 if seed is None else int(seed)
    candidates = interior_tiles(ids)
    q = min(int(queries), len(candidates))
    record, size, runner = _engine_input(engine_dir, threads)
    result = _empty_result(q, len(candidates), seed, size, max_offset)
    if q == 0:
        return result
    # the sample: candidates in order of their hash; the first q
    hashes = _frame_hashes(ids[candidates], digests[candidates], seed)
    order = np.argsort(hashes, kind="stable")[:q]
    centres, hashes = candidates[order], hashes[order]
    near = _mix(hashes) % np.uint64(_NEAR_EVERY) == 0
    engine_key = str(record.get("key") or "")
    dim = int(record["descriptor_dim"])
    stage2 = open_stage2(Path(build_dir), engine_dir, threads)
    width = dim + (int(np.prod(stage2[1].cells.shape[1:])) if stage2 is not None else 0)
    # with a second stage a frame's row is its descriptor, then its cells: kept under other keys
    frame_key = f"{engine_key}\0cells" if stage2 is not None else engine_key
    tests = _plan_frames(ids, digests, centres, hashes, near, frame_key, size, max_offset)
    # without an engine key nothing says whose descriptors they are: none kept
    keep = Path(frames_file) if frames_file is not None and engine_key else None
    kept = _read_frames(keep, width)
    wanted = [job for _, jobs in tests for job in jobs]
    todo = [job for job in wanted if job[2] not in kept]
    have = dict(kept)
    if todo:
        if runner is None:
            runner = load_engine(engine_dir, threads=threads)
        have.update(_describe_todo(todo, ids, digests, store_root, size, runner, stage2, dim))
    result["frames"] = {"described": len(todo), "reused": len(wanted) - len(todo)}
    index = load_index(index_path, mapped=True)  # searched only
    if stage2 is not None:
        result["rerank"] = {"candidates": CANDIDATES, "offsets": OFFSETS}
    for t, out in ((tests[0], result), (tests[1], result["near_centre"])):
        final, first = _score_test(index, *t, have, ids, dim, stage2)
        out.update(_headline_fields(final))
        out["stage1"] = _figures(first)
    if keep is not None and (todo or set(kept) != {k for _, _, k in wanted}):
        _write_frames(keep, {k: have[k] for _, _, k in wanted}, width)  # this run's frames only
    return result


def _figures(scored: dict[str, Any] | None) -> dict[str, Any] | None:
    """Stage 1's figures alone (None without a second stage)."""
    if scored is None:
        return None
    return {k: scored[k] for k in ("recall_at_1", "recall_at_5", "median_error_m", "p95_error_m")}


def _headline_fields(scored: dict[str, Any]) -> dict[str, Any]:
    out = dict(scored)
    out["queries"] = out.pop("frames")
    out["too_few_frames"] = out["queries"] < MIN_FRAMES
    return out


def _empty_result(
    q: int, candidates: int, seed: int, size: tuple[int, int], max_offset: float
) -> dict[str, Any]:
    """``selftest.json`` before any frame: the parameters, no figures."""
    none = {
        "recall_at_1": None,
        "recall_at_5": None,
        "median_error_m": None,
        "p95_error_m": None,
    }
    return {
        "version": SELFTEST_VERSION,
        "queries": q,
        "too_few_frames": q < MIN_FRAMES,
        "candidates": int(candidates),
        "seed": seed,
        "max_offset_px": round(0.5 * size[0], 1),
        "min_overlap": MIN_OVERLAP,
        "rotation_deg": ROTATION_DEG,
        "scale": SCALE,
        "gain": GAIN,
        "bias": BIAS,
        **none,
        "stage1": None,
        "rerank": None,
        "near_centre": {
            "queries": 0,
            "too_few_frames": True,
            "max_offset_px": round(max_offset * size[0], 1),
            **none,
            "stage1": None,
        },
        "frames": {"described": 0, "reused": 0},
    }


def _describe_todo(
    todo: list[Any],
    ids: Any,
    digests: Any,
    store_root: Any,
    size: tuple[int, int],
    runner: Any,
    stage2: tuple[Any, Any] | None,
    dim: int,
) -> Any:
    """``(key, row)`` of each frame to describe, read from the tile store: its descriptor, then its cells."""
    import numpy as np

    run = runner.run
    if stage2 is not None:

        def run(batch: Any) -> Any:
            cells = np.asarray(stage2[0](batch), dtype=np.float32).reshape(len(batch), -1)
            return np.concatenate([np.asarray(runner.run(batch), dtype=np.float32), cells], axis=1)

    from cachebuild.localize.decode import default_decode_threads
    from cachebuild.store.objects import TileStore

    store = TileStore(store_root)
    paths = {
        t: store.path(digests[np.searchsorted(ids, t)].tobytes().hex())
        for b, _, _ in todo
        for t in b
    }
    described = _describe_frames(
        [(b, p) for b, p, _ in todo], paths, size, default_decode_threads(), run, dim
    )
    return [(job[2], d) for job, d in zip(todo, described)]


def summary(info: dict[str, Any] | None) -> dict[str, Any]:
    """The report's ``selftest`` object: the headline figures, stage 1's alone, the frame count and its line."""
    info = info or {}
    return {
        "recall_at_1": info.get("recall_at_1"),
        "recall_at_5": info.get("recall_at_5"),
        "median_error_m": info.get("median_error_m"),
        "p95_error_m": info.get("p95_error_m"),
        "queries": int(info.get("queries") or 0),
        "too_few_frames": bool(
            info.get("too_few_frames", int(info.get("queries") or 0) < MIN_FRAMES)
        ),
        "stage1": info.get("stage1"),
        "text": headline(info),
    }


def check_recall(info: dict[str, Any] | None, min_recall: float | None) -> None:
    """Raise :class:`SelfTestError` when recall@1 (frames centred anywhere) is below ``min_recall``.

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
            f"({headline(info)})"
        )


#: Beside ``selftest.json``: what this run described and reused (history, for the build report).
RUN_FILE = "selftest-run.json"


def write_selftest(path: str | os.PathLike[str], result: dict[str, Any]) -> None:
    """Write ``selftest.json`` (content only) and :data:`RUN_FILE` (this run's ``frames``) atomically."""
    path = Path(path)
    content = {k: v for k, v in result.items() if k != "frames"}
    atomic_write(
        path, (json.dumps(content, indent=1, sort_keys=True) + "\n").encode(), durable=False
    )
    run = {"frames": result.get("frames") or {"described": 0, "reused": 0}}
    atomic_write(
        path.with_name(RUN_FILE), (json.dumps(run, sort_keys=True) + "\n").encode(), durable=False
    )


def read_run(build_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last run's :data:`RUN_FILE` (None when absent or unreadable)."""
    try:
        run = json.loads((Path(build_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) else None
