"""Describe an area as overlapping windows (``WINDOW_STRIDE`` > 1), reusing blocks by content.

Every present tile anchors ``stride * stride`` windows
(:mod:`cachebuild.store.windowkeys`); one anchor's window descriptors are a
block, kept in the descriptor store under the hash of the four images it
covers.  Only the blocks the store lacks are described
(:mod:`cachebuild.localize.windows`), here through the decode-ahead ring
(:mod:`cachebuild.localize.decode_ahead`) or on a Dask cluster; then
``descriptors.npy`` gets one row per window whose tiles are all present,
and ``descriptor_ids.npy`` its place id, in anchor order; ``cells.npy`` the
same rows' cells for the second stage (:mod:`cachebuild.localize.rerank`).

Anchors are described ``BATCH`` at a time in bands 16 tiles wide, walking
down the rows, so a batch of 64 anchors (the default) decodes about 85
tiles (each tile's features are computed once per batch that needs them).

numpy is imported inside the functions.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_save_npy
from cachebuild._util.progress import Progress
from cachebuild.engine.cells import CELLS_HEAD
from cachebuild.engine.features import HEAD_FILE, HEAD_MODEL, load_head_model, read_head
from cachebuild.errors import CacheBuildError
from cachebuild.localize.decode import decode_batch
from cachebuild.localize.decode_ahead import _engine_batches
from cachebuild.localize.describe_store import _assemble, _engine_key, _ThumbKeeper
from cachebuild.localize.rerank import CELLS_FILE
from cachebuild.localize.windows import (
    WindowDescriber,
    describer_dir,
    engine_blocks,
    pooled_blocks,
    stored_dim,
    window_record,
)
from cachebuild.store.descriptors import DescriptorStore
from cachebuild.store.objects import TileStore
from cachebuild.store.thumbs import THUMB_PX
from cachebuild.store.windowkeys import (
    block_digests,
    namespace,
    neighbours,
    window_ids,
    window_valid,
)

__all__ = ["WINDOWS_FILE", "describe_windows", "window_plan", "describe_window_batch"]

#: Beside the descriptors: how the windows were made (stride, mode, descriptor size).
WINDOWS_FILE = "windows.json"
_PHASE = "describe"
_BAND = 16
#: Halo tiles kept for later batches at most (each holds its feature maps: 0.75 MiB with the built-in model).
KEEP_TILES = 96
#: A Dask worker's head models, by engine key (loaded once per process).
_HEADS: dict[str, Any] = {}


def window_plan(
    engine_dir: str | os.PathLike[str], raw: Any, ids: Any, stride: int
) -> dict[str, Any]:
    """Where this area's blocks live: ``key`` (store namespace), ``dim``, ``digests``, ``nb``, ``record``."""
    record = window_record(engine_dir, stride)
    key = namespace(_engine_key(engine_dir), stride, record["mode"])
    nb = neighbours(ids)
    return {
        "key": key,
        "dim": stride * stride * stored_dim(record),
        "digests": block_digests(raw, nb, stride, record["mode"]),
        "nb": nb,
        "record": record,
    }


def describe_windows(
    store: TileStore,
    engine_dir: str | os.PathLike[str],
    raw: Any,
    ids: Any,
    out: Path,
    *,
    stride: int,
    batch_size: int,
    workers: int,
    threads: int | None,
    stream: Any,
    dask_scheduler: str | None,
    executor: dict[str, Any],
    thumbnails: dict[str, int] | None,
    descriptors_file: str,
    ids_file: str,
    hash_cache: Path | None = None,
) -> dict[str, int]:
    """Describe the blocks the store lacks, then write the window descriptors and ids.

    Returns ``computed`` (anchors described), ``engine_runs`` (tiles run
    through the per-tile stage) and ``windows`` (rows written).  With
    ``hash_cache``, the assembled files' hashes are remembered there.
    """
    import numpy as np

    plan = window_plan(engine_dir, raw, ids, stride)
    with DescriptorStore(store.root, plan["key"], plan["dim"]) as ds:
        shard, row = ds.lookup(plan["digests"])
        todo = np.flatnonzero(shard < 0)
        runs = 0
        if len(todo):
            runs = _describe_missing(
                ds, store, engine_dir, raw, ids, plan, todo, shard, row, stride=stride,
                batch_size=batch_size, workers=workers, threads=threads, stream=stream, dask_scheduler=dask_scheduler,
                executor=executor, thumbnails=thumbnails,
            )  # fmt: skip
        else:
            executor["workers"] = 0
        ds.touch()
        record = plan["record"]
        d = int(record["descriptor_dim"])
        valid = window_valid(plan["nb"], stride)
        cells = (out / CELLS_FILE, tuple(record["cells"]["shape"])) if record["cells"] else None
        n = _assemble(ds, shard, row, ids, out / descriptors_file, d, valid, cells, hash_cache)
    if cells is None:  # no second stage (an operator's own model): an empty cells.npy
        atomic_save_npy(out / CELLS_FILE, np.zeros((0, 0, 0, 0), dtype=np.int8))
    atomic_save_npy(out / ids_file, window_ids(ids, stride)[valid])
    return {"computed": int(len(todo)), "engine_runs": int(runs), "windows": int(n)}


def _batches(todo: Any, ids: Any, nb: Any, size: int) -> list[tuple[Any, Any, Any]]:
    """``(anchor positions, tiles to decode, cover in those tiles)``, ``size`` anchors a batch, in bands."""
    import numpy as np

    x = (ids[todo] >> 29) & ((1 << 29) - 1)
    y = ids[todo] & ((1 << 29) - 1)
    order = todo[np.lexsort((x, y, x // _BAND))]
    out = []
    for s in range(0, len(order), size):
        anchors = order[s : s + size]
        cover = nb[anchors]
        need = np.unique(cover[cover >= 0])
        local = np.where(cover >= 0, np.searchsorted(need, np.maximum(cover, 0)), -1)
        out.append((anchors, need, local))
    return out


def _describe_missing(
    ds: DescriptorStore,
    store: TileStore,
    engine_dir: str | os.PathLike[str],
    raw: Any,
    ids: Any,
    plan: dict[str, Any],
    todo: Any,
    shard: Any,
    row: Any,
    *,
    stride: int,
    batch_size: int,
    workers: int,
    threads: int | None,
    stream: Any,
    dask_scheduler: str | None,
    executor: dict[str, Any],
    thumbnails: dict[str, int] | None,
) -> int:
    """Describe one block per distinct key of ``todo``; fill ``shard``/``row``; return tiles run."""
    import numpy as np

    digests = plan["digests"]
    keys = np.ascontiguousarray(digests[todo]).view(np.dtype((np.void, 32))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    ushard = np.empty(len(first), dtype=np.int32)
    urow = np.empty(len(first), dtype=np.int32)
    slot = np.full(len(ids), -1, dtype=np.int64)
    slot[todo[first]] = np.arange(len(first))
    batches = _batches(todo[first], ids, plan["nb"], batch_size)
    runs = {"engine_runs": sum(len(need) for _, need, _ in batches)}  # less what is kept, locally
    with ExitStack() as stack:
        results, cluster = _results(
            stack, batches, store, engine_dir, ids, raw, stride=stride, workers=workers,
            threads=threads, dask_scheduler=dask_scheduler, thumbs=thumbnails is not None,
            stats=runs,
        )  # fmt: skip
        writer = stack.enter_context(ds.writer())
        keep = stack.enter_context(_ThumbKeeper(store.root)) if thumbnails is not None else None
        bar = stack.enter_context(Progress(_PHASE, total=len(first), stream=stream))
        for anchors, blocks, th in results:
            where = slot[anchors]
            ushard[where], urow[where] = writer.append(digests[anchors], blocks)
            if keep is not None and th is not None:
                keep.add(raw[anchors], th)
            bar.advance(len(anchors))
        if keep is not None and thumbnails is not None:
            keep.flush()
            thumbnails["thumbnails"] = keep.kept
        if cluster is not None:
            executor["workers"] = cluster.workers
    shard[todo] = ushard[inverse]
    row[todo] = urow[inverse]
    return int(runs["engine_runs"])


def _results(
    stack: ExitStack,
    batches: list[tuple[Any, Any, Any]],
    store: TileStore,
    engine_dir: str | os.PathLike[str],
    ids: Any,
    raw: Any,
    *,
    stride: int,
    workers: int,
    threads: int | None,
    dask_scheduler: str | None,
    thumbs: bool,
    stats: dict[str, int],
) -> tuple[Any, Any]:
    """``(results, cluster)``: ``(anchors, blocks, anchor thumbnails)`` per batch, here or on Dask.

    Here, a batch's halo tiles (the next batches' anchors) are kept for the
    batches after it (``keep`` of :func:`_engine_batches`); ``stats`` then
    counts the tiles run.
    """
    if dask_scheduler is not None:
        from cachebuild.localize.daskexec import DaskExecutor

        where, _ = describer_dir(engine_dir)
        cluster = stack.enter_context(
            DaskExecutor(dask_scheduler, engine_dir=where, store_root=store.root, threads=threads)
        )
        remote = ((b, ids[b[1]], raw[b[1]], b[2], stride) for b in batches)
        done = cluster.run(remote, task=describe_window_batch)
        return ((b[0], *got) for b, got in done), cluster
    describer = WindowDescriber(engine_dir, stride, threads)
    work = ((b, ids[b[1]], raw[b[1]]) for b in batches)
    max_rows = max(len(need) for _, need, _ in batches)

    def post(meta: Any, out: Any, _ids: Any) -> Any:
        return describer.blocks(out, meta[2])

    stats.clear()
    local = _engine_batches(
        describer, store, work, size=describer.input_hw, max_rows=max_rows, workers=workers,
        thumbs=thumbs, post=post, keep=_halo, keep_max=KEEP_TILES, stats=stats,
    )  # fmt: skip
    stack.callback(local.close)
    return ((b[0], blocks, _anchor_thumbs(b, th)) for b, blocks, th in local), None


def _halo(meta: Any, n: int) -> Any:
    """bool ``[n]``: a batch's tiles that are not its anchors (``meta``: ``(anchors, tiles, cover)``)."""
    import numpy as np

    out = np.ones(n, dtype=bool)
    out[np.asarray(meta[2])[:, 0]] = False
    return out


def _anchor_thumbs(batch: tuple[Any, Any, Any], th: Any) -> Any:
    """The thumbnails of a batch's anchors, from those of its decoded tiles."""
    if th is None:
        return None
    _, _, local = batch
    return th[local[:, 0]]


def describe_window_batch(
    key: str, source: Any, ids: Any, digests: Any, cover: Any, stride: int
) -> Any:
    """On a Dask worker: ``(blocks, anchor thumbnails)`` of one batch (its errors made to travel)."""
    import numpy as np

    from cachebuild.localize import daskexec as dx  # needs distributed: only on a worker

    try:
        runner = dx.engine_runner(key)
        size = (int(runner.input_hw[0]), int(runner.input_hw[1]))
        paths = dx._tile_paths(source, ids, digests)
        buf = np.empty((len(paths), 3, *size), dtype=np.float32)
        thumbs = np.empty((len(paths), THUMB_PX, THUMB_PX, 3), dtype=np.uint8)
        x = decode_batch(paths, ids, size, buf, thumbs)
        where, threads = dx._ENGINE_DIRS[key]
        if (where / HEAD_FILE).is_file():
            head = read_head(where / HEAD_FILE)
            c = int(head["pool.rows"].shape[1])
            maps = np.asarray(runner.run(x), dtype=np.float32).reshape(len(x), -1, c, c)
            run_head, run_cells = _HEADS.get(key) or _HEADS.setdefault(
                key,
                (load_head_model(where / HEAD_MODEL, 1), load_head_model(where / CELLS_HEAD, 1)),
            )
            blocks = pooled_blocks(maps, cover, stride, head, run_head, run_cells)
        else:
            blocks = engine_blocks(runner, x, cover, stride)
        return blocks, thumbs[np.asarray(cover)[:, 0]]
    except CacheBuildError as exc:
        raise dx.WorkerError.of(exc) from None
