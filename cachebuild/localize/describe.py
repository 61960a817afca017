"""One L2-normalised descriptor per present tile.

Reads the tile set (``tiles.npy``), decodes tile images from the store,
runs the compiled engine over them in batches and writes, in ``out_dir``::

    descriptors.npy      float32 [N, D], row i describes tiles[i]
    descriptor_ids.npy   int64 [N], the tile ids, sorted

With ``reuse=True`` (what a build does) descriptors live in the store's
descriptor store (:mod:`cachebuild.store.descriptors`), keyed by (image SHA-256,
engine key): only the tiles the store has no descriptor for are run through
the engine (an image shared by several tiles, once), and the two files are
then assembled from the store.  A bbox shifted by 10% describes 10% of the
tiles.

Decoding overlaps inference: a thread pool decodes and preprocesses the
next batches into a ring of reused input buffers while the engine runs the
current one (Pillow and ONNX Runtime both release the GIL).  At most
``_IN_FLIGHT`` batches exist at once, and the output is written and
assembled in chunks of rows (:mod:`cachebuild._util.npyio`), so memory stays
bounded whatever the number of tiles: about 40 bytes a tile for the tile
list and the descriptor locations, plus constants.  Each batch is split
among all decoder threads; the engine uses every core.

On Linux the decoder threads run at a lower priority (nice +5): when the
engine runs on the same CPUs, its threads then get the cores the moment
they have work, and the decoders fill the gaps; without it an engine
thread that loses its core to a decoder stalls the whole batch.  Measured:
docs/design/describe-pipeline.md.

numpy, Pillow and the engine's backend are imported inside the functions.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachebuild._util.fs import atomic_save_npy
from cachebuild._util.npyio import NpyRowWriter
from cachebuild._util.progress import Progress
from cachebuild.engine.compile import load_engine
from cachebuild.engine.interface import read_engine_json
from cachebuild.errors import BuildError, UsageError
from cachebuild.localize.decode import default_decode_threads, tile_zxy
from cachebuild.localize.decode_ahead import _engine_batches
from cachebuild.localize.describe_store import _assemble, _engine_key, _ThumbKeeper
from cachebuild.localize.describe_windows import describe_windows
from cachebuild.localize.rerank import CELLS_FILE
from cachebuild.store.descriptors import DescriptorStore
from cachebuild.store.objects import TileStore
from cachebuild.store.windowkeys import STRIDES, tile_place_ids
from cachebuild.tileset import TILES_FILE, read_tiles

if TYPE_CHECKING:
    pass

__all__ = [
    "DESCRIPTORS_FILE",
    "DESCRIPTOR_IDS_FILE",
    "DESCRIBE_SUMMARY",
    "DEFAULT_BATCH_SIZE",
    "describe_tiles",
]

DESCRIPTORS_FILE = "descriptors.npy"
DESCRIPTOR_IDS_FILE = "descriptor_ids.npy"
#: What the last describe run did (written by the build's action; read by the report).
DESCRIBE_SUMMARY = "describe.json"
DEFAULT_BATCH_SIZE = 64

_PHASE = "describe"


def _read_sorted_tiles(tileset_dir: Path) -> Any:
    import numpy as np

    try:
        tiles = read_tiles(tileset_dir)
    except FileNotFoundError as exc:
        raise BuildError(
            f"no {TILES_FILE} in {tileset_dir}",
            remedy="run the tiles phase first (doit build-cache does)",
            phase=_PHASE,
        ) from exc
    if tiles.dtype.names is None or not {"id", "sha256"} <= set(tiles.dtype.names):
        raise BuildError(
            f"{tileset_dir / TILES_FILE} is not a tile set (dtype {tiles.dtype})",
            remedy="delete the build directory's tiles files and run build-cache again",
            phase=_PHASE,
        )
    ids = tiles["id"]
    if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        tiles = tiles[np.argsort(ids, kind="stable")]
        ids = tiles["id"]
        if bool(np.any(ids[1:] == ids[:-1])):
            dup = int(ids[1:][ids[1:] == ids[:-1]][0])
            raise BuildError(
                f"{tileset_dir / TILES_FILE} lists tile z={tile_zxy(dup)[0]} "
                f"x={tile_zxy(dup)[1]} y={tile_zxy(dup)[2]} more than once",
                remedy="delete the build directory's tiles files and run build-cache again",
                phase=_PHASE,
            )
    return tiles


def _batches(index: Any, ids: Any, raw: Any, batch_size: int) -> Iterator[tuple[Any, Any, Any]]:
    """``(positions, ids, digests)`` of ``index`` in batches (meta = the positions)."""
    for s in range(0, len(index), batch_size):
        part = index[s : s + batch_size]
        yield part, ids[part], raw[part]


def describe_tiles(
    *,
    tileset_dir: str | os.PathLike[str],
    store_root: str | os.PathLike[str],
    engine_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    progress: bool = True,
    decode_threads: int | None = None,
    reuse: bool = False,
    dask_scheduler: str | None = None,
    thumbnails: bool = True,
    window_stride: int = 1,
    hash_cache: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Describe every present tile of a tile set with the compiled engine.

    Parameters
    ----------
    tileset_dir
        Directory holding ``tiles.npy``.
    store_root
        Root of the :class:`~cachebuild.store.objects.TileStore` holding the images
        (and, with ``reuse``, the descriptor store).
    engine_dir
        A compiled engine (:func:`cachebuild.engine.compile.compile_engine`).
    out_dir
        Where ``descriptors.npy`` and ``descriptor_ids.npy`` go (created).
    batch_size
        Tiles per engine call.
    threads
        Engine threads (ONNX Runtime intra-op threads); ``None`` for the
        backend's default (every core).
    progress, decode_threads
        Draw a progress line on stderr (only on a terminal); tile decoder
        threads (``None``: :func:`default_decode_threads`).
    reuse
        Take the store's descriptors for this engine and keep new ones there
        (without it every tile is described and nothing is kept).
    dask_scheduler
        ``tcp://host:port`` or ``local:N``: run the engine on that Dask
        cluster (:mod:`cachebuild.localize.daskexec`), started only when the store
        lacks some descriptors; needs ``reuse``.  ``None``: in this process.
    thumbnails
        With ``reuse``: keep each described image's coverage-map thumbnail
        (:mod:`cachebuild.store.thumbs`), so the preview need not decode it.
    window_stride
        Windows per tile side (1: one per tile; more needs ``reuse``,
        :mod:`cachebuild.localize.describe_windows`).
    hash_cache
        A :class:`~cachebuild._util.statcache.HashCache` file: the written
        arrays' SHA-256 (taken as they are written) are remembered there.

    Returns
    -------
    dict
        ``tiles`` (N), ``window_stride``, ``windows`` (rows written), ``windows_per_s``,
        ``dim``, ``computed`` (tiles described, not reused), ``reused``, ``engine_runs``,
        ``seconds``, ``tiles_per_s``, ``computed_per_s``, ``executor`` (``local``/``dask``),
        ``workers`` (0 when none was needed), ``thumbnails`` (thumbnails kept).

    Raises
    ------
    BuildError
        ``phase="describe"``: a tile that cannot be decoded (naming its z/x/y and
        store path), a missing tile set, a failing engine (EngineError: not loaded).

    ``descriptor_ids.npy`` (place ids) is written last: if it exists, the
    pair is complete and consistent (see :func:`_describe`).
    """
    _check_args(batch_size, decode_threads, dask_scheduler, reuse)
    if window_stride not in STRIDES or (window_stride > 1 and not reuse):
        raise UsageError(f"window_stride must be one of {STRIDES} (more than 1 needs reuse=True)")
    return _describe(
        Path(tileset_dir), store_root, engine_dir, Path(out_dir), batch_size=batch_size,
        threads=threads, progress=progress, decode_threads=decode_threads, reuse=reuse,
        dask_scheduler=dask_scheduler, thumbnails=thumbnails, stride=window_stride,
        hash_cache=None if hash_cache is None else Path(hash_cache),
    )  # fmt: skip


def _check_args(
    batch_size: int, decode_threads: int | None, dask_scheduler: str | None, reuse: bool
) -> None:
    """Refuse settings :func:`describe_tiles` cannot honour, before any file is read."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if decode_threads is not None and decode_threads < 1:
        raise UsageError(f"decode_threads must be at least 1, got {decode_threads}")
    if dask_scheduler is not None and not reuse:
        raise UsageError("describing on a Dask cluster needs reuse=True (the descriptor store)")


def _open_engine(
    engine_dir: str | os.PathLike[str], load: bool, threads: int | None
) -> tuple[Any, int, tuple[int, int]]:
    """``(runner, descriptor dim, input size)``; without ``load`` no runner (Dask workers or windows load theirs)."""
    if load:
        runner = load_engine(engine_dir, threads=threads)
        dim = int(runner.descriptor_dim)
        size = (int(runner.input_hw[0]), int(runner.input_hw[1]))
    else:  # the workers load the engine; this machine may not be able to
        runner = None
        record = read_engine_json(engine_dir)
        dim = int(record["descriptor_dim"])
        size = (int(record["input"]["shape"][2]), int(record["input"]["shape"][3]))
    return runner, dim, size


def _describe(
    tileset_dir: Path,
    store_root: str | os.PathLike[str],
    engine_dir: str | os.PathLike[str],
    out: Path,
    *,
    batch_size: int,
    threads: int | None,
    progress: bool,
    decode_threads: int | None,
    reuse: bool,
    dask_scheduler: str | None,
    thumbnails: bool,
    stride: int = 1,
    hash_cache: Path | None = None,
) -> dict[str, Any]:
    """:func:`describe_tiles` once its settings are checked.

    ``descriptor_ids.npy`` is removed before ``descriptors.npy`` is replaced and written
    after it, both by a temp file and a rename: if it exists, the pair is consistent.
    """
    import numpy as np

    start = time.perf_counter()
    tiles = _read_sorted_tiles(tileset_dir)
    load = dask_scheduler is None and stride == 1  # windows load their own describer
    runner, dim, size = _open_engine(engine_dir, load, threads)
    n = len(tiles)
    # S32 items lose trailing NUL bytes when read one by one: go through raw bytes
    raw = np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(n, 32)
    ids = np.ascontiguousarray(tiles["id"], dtype=np.int64)
    store = TileStore(store_root)
    workers = decode_threads or default_decode_threads()
    max_rows = max(1, min(batch_size, n))
    stream = sys.stderr if progress else None

    out.mkdir(parents=True, exist_ok=True)
    (out / DESCRIPTOR_IDS_FILE).unlink(missing_ok=True)
    (out / CELLS_FILE).unlink(missing_ok=True)
    executor = {"executor": "local" if dask_scheduler is None else "dask", "workers": 1}
    made = {"thumbnails": 0}
    windows = n
    if stride > 1:
        got = describe_windows(
            store, engine_dir, raw, ids, out, stride=stride, batch_size=batch_size,
            workers=workers, threads=threads,
            stream=stream, dask_scheduler=dask_scheduler, executor=executor,
            thumbnails=made if thumbnails else None, descriptors_file=DESCRIPTORS_FILE,
            ids_file=DESCRIPTOR_IDS_FILE, hash_cache=hash_cache,
        )  # fmt: skip
        computed, runs, windows = got["computed"], got["engine_runs"], got["windows"]
    elif reuse:
        computed, runs = _describe_with_store(
            store, engine_dir, raw, ids, out, dim=dim, size=size, batch_size=batch_size,
            max_rows=max_rows, workers=workers, runner=runner, stream=stream,
            dask_scheduler=dask_scheduler, threads=threads, executor=executor,
            thumbnails=made if thumbnails else None, hash_cache=hash_cache,
        )  # fmt: skip
    else:
        _describe_all(runner, store, raw, ids, out, dim, size, batch_size, workers, stream)
        computed = runs = n
    if stride == 1:  # one place per tile (describe_windows wrote the windows' ids)
        atomic_save_npy(out / CELLS_FILE, np.zeros((0, 0, 0, 0), dtype=np.int8))  # no stage 2
        atomic_save_npy(out / DESCRIPTOR_IDS_FILE, tile_place_ids(ids))
    seconds = time.perf_counter() - start
    return {
        "tiles": n,
        "window_stride": stride,
        "windows": int(windows),
        "windows_per_s": windows / seconds if seconds > 0 else 0.0,
        "dim": dim,
        "computed": int(computed),
        "reused": int(n - computed),
        "engine_runs": int(runs),
        "seconds": seconds,
        "tiles_per_s": n / seconds if seconds > 0 else 0.0,
        "computed_per_s": computed / seconds if seconds > 0 else 0.0,
        **executor,
        **made,
    }


def _describe_all(
    runner: Any, store: TileStore, raw: Any, ids: Any, out: Path, dim: int,
    size: tuple[int, int], batch_size: int, workers: int, stream: Any,
) -> None:  # fmt: skip
    """Without the descriptor store: run every tile through the engine into ``descriptors.npy``."""
    import numpy as np

    n = len(ids)
    with (
        NpyRowWriter(out / DESCRIPTORS_FILE, "<f4", (n, dim)) as sink,
        Progress(_PHASE, total=n, stream=stream) as bar,
    ):
        work = _batches(np.arange(n), ids, raw, batch_size)
        max_rows = max(1, min(batch_size, n))
        for _, d, _ in _engine_batches(
            runner, store, work, size=size, max_rows=max_rows, workers=workers
        ):
            sink.write(d)
            bar.advance(len(d))


def _describe_with_store(
    store: TileStore,
    engine_dir: str | os.PathLike[str],
    raw: Any,
    ids: Any,
    out: Path,
    *,
    dim: int,
    size: tuple[int, int],
    batch_size: int,
    max_rows: int,
    workers: int,
    runner: Any,
    stream: Any,
    dask_scheduler: str | None = None,
    threads: int | None = None,
    executor: dict[str, Any] | None = None,
    thumbnails: dict[str, int] | None = None,
    hash_cache: Path | None = None,
) -> tuple[int, int]:
    """Describe what the descriptor store lacks, then assemble the output from it.

    With ``dask_scheduler`` the engine runs on that cluster, and
    ``executor["workers"]`` is set to its worker count; it is set to 0 if
    no image needed describing.  With ``thumbnails`` (a counter), each
    described image's thumbnail is kept in the store's thumbnail store,
    and ``thumbnails["thumbnails"]`` counts them.  Returns ``(computed,
    engine runs)``.
    """
    import numpy as np

    key = _engine_key(engine_dir)
    with DescriptorStore(store.root, key, dim) as ds:
        shard, row = ds.lookup(raw)
        todo = np.flatnonzero(shard < 0)
        runs = 0
        if len(todo):
            runs = _describe_missing(
                ds, store, engine_dir, raw, ids, todo, shard, row, size=size,
                batch_size=batch_size, max_rows=max_rows, workers=workers, runner=runner,
                stream=stream, dask_scheduler=dask_scheduler, threads=threads,
                executor=executor, thumbnails=thumbnails,
            )  # fmt: skip
        elif executor is not None:  # every image was in the store: no engine ran
            executor["workers"] = 0
        ds.touch()
        _assemble(ds, shard, row, ids, out / DESCRIPTORS_FILE, dim, hash_cache=hash_cache)
    return len(todo), runs


def _describe_missing(
    ds: DescriptorStore,
    store: TileStore,
    engine_dir: str | os.PathLike[str],
    raw: Any,
    ids: Any,
    todo: Any,
    shard: Any,
    row: Any,
    *,
    size: tuple[int, int],
    batch_size: int,
    max_rows: int,
    workers: int,
    runner: Any,
    stream: Any,
    dask_scheduler: str | None,
    threads: int | None,
    executor: dict[str, Any] | None,
    thumbnails: dict[str, int] | None,
) -> int:
    """Run the engine once per distinct image of ``todo``, keep the results in ``ds``.

    Fills ``shard`` and ``row`` at ``todo``; returns the engine runs.
    """
    import numpy as np

    # one engine run per distinct image; its location serves every tile showing it
    keys = np.ascontiguousarray(raw[todo]).view(np.dtype((np.void, 32))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    ushard = np.empty(len(first), dtype=np.int32)
    urow = np.empty(len(first), dtype=np.int32)
    order = np.argsort(first, kind="stable")  # describe in tile order
    work_pos = todo[first[order]]
    runs = len(work_pos)
    with ExitStack() as stack:
        work = ((order[s : s + batch_size], ids[p], raw[p]) for s in range(0, runs, batch_size)
                for p in [work_pos[s : s + batch_size]])  # fmt: skip
        results, cluster = _open_results(
            stack, work, store, engine_dir, size=size, max_rows=max_rows, workers=workers,
            runner=runner, dask_scheduler=dask_scheduler, threads=threads,
            thumbs=thumbnails is not None,
        )  # fmt: skip
        stack.callback(results.close)  # on an error: cancel what is in flight first
        writer = stack.enter_context(ds.writer())
        keep = stack.enter_context(_ThumbKeeper(store.root)) if thumbnails is not None else None
        bar = stack.enter_context(Progress(_PHASE, total=runs, stream=stream))
        for uidx, *got in results:
            # local: (descriptors, thumbnails); Dask: one value, a pair or (older workers) an array
            d, th = (
                got if len(got) == 2 else (got[0] if isinstance(got[0], tuple) else (got[0], None))
            )
            digests = raw[todo[first[uidx]]]
            ushard[uidx], urow[uidx] = writer.append(digests, d)
            if keep is not None and th is not None:
                keep.add(digests, th)
            bar.advance(len(d))
        if keep is not None and thumbnails is not None:
            keep.flush()
            thumbnails["thumbnails"] = keep.kept
        if cluster is not None and executor is not None:
            executor["workers"] = cluster.workers
    shard[todo] = ushard[inverse]
    row[todo] = urow[inverse]
    return runs


def _open_results(
    stack: ExitStack,
    work: Iterator[tuple[Any, Any, Any]],
    store: TileStore,
    engine_dir: str | os.PathLike[str],
    *,
    size: tuple[int, int],
    max_rows: int,
    workers: int,
    runner: Any,
    dask_scheduler: str | None,
    threads: int | None,
    thumbs: bool,
) -> tuple[Any, Any]:
    """``(results, cluster)``: the engine's results over ``work``, here or on the Dask cluster.

    Local results are ``(uidx, descriptors, thumbnails)`` in order; Dask's are
    ``(uidx, value)`` in any order, each carrying its positions.  The cluster
    (None when local) is entered on ``stack``.
    """
    if dask_scheduler is None:
        results = _engine_batches(
            runner, store, work, size=size, max_rows=max_rows, workers=workers, thumbs=thumbs
        )
        return results, None
    from cachebuild.localize.daskexec import DaskExecutor

    cluster = stack.enter_context(
        DaskExecutor(dask_scheduler, engine_dir=engine_dir, store_root=store.root, threads=threads)
    )
    return cluster.run(work), cluster
