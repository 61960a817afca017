"""Decoding ahead of the engine: a bounded ring of batches, decoded by low-priority threads.

:func:`_engine_batches` runs the engine over batches of tiles while a thread
pool decodes and prepares the next ones into a ring of reused input buffers
(Pillow and the engine both release the GIL).  At most :data:`_IN_FLIGHT`
batches exist at once, so memory stays bounded.  Why and what it gains:
docs/design/describe-pipeline.md.

With ``keep`` (window blocks), the per-tile stage's output of the tiles a
batch only borders (its halo: the right column and bottom row of a band,
the anchors of later batches) is kept, up to ``keep_max`` tiles, by image
hash: a later batch that covers them takes them from there instead of
decoding and running them again.  A tile's output does not depend on the
batch it ran in (fixed-shape products, docs/design/windows.md), so the
blocks are the same bits either way.  Tile descriptors
(:mod:`cachebuild.localize.describe`) and window blocks
(:mod:`cachebuild.localize.describe_windows`) both go through it.

numpy is imported inside the functions.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

from cachebuild.errors import BuildError
from cachebuild.localize.decode import (
    _lower_decoder_priority,
    checked_unit,
    decode_batch,
    tile_zxy,
)
from cachebuild.store.objects import TileStore
from cachebuild.store.thumbs import THUMB_PX

if TYPE_CHECKING:
    import numpy as np

# Batches that exist at once: one in the engine, the rest being decoded.
_IN_FLIGHT = 3
_PHASE = "describe"


class _Kept:
    """One batch's per-tile outputs (and thumbnails) that later batches take, by row; filled once it ran."""

    __slots__ = ("rows", "thumbs")

    def __init__(self) -> None:
        self.rows: dict[int, Any] = {}
        self.thumbs: dict[int, Any] = {}


def _engine_batches(
    runner: Any,
    store: TileStore,
    work: Iterator[tuple[Any, Any, Any]],
    *,
    size: tuple[int, int],
    max_rows: int,
    workers: int,
    thumbs: bool = False,
    post: Callable[[Any, Any, Any], Any] | None = None,
    keep: Callable[[Any, int], Any] | None = None,
    keep_max: int = 0,
    stats: dict[str, int] | None = None,
) -> Generator[tuple[Any, Any, Any], None, None]:
    """Run the engine over ``work``, decoding ahead; yields ``(meta, descriptors, thumbnails)`` in order.

    ``work`` yields ``(meta, ids, digests)`` batches (uint8 ``[k, 32]``
    digests, ``k <= max_rows``); ``meta`` is passed through.  Batch k is
    decoded into ``ring[k % R]`` while the engine runs earlier ones; batch
    k + R is submitted once batch k has run.  With ``thumbs``, each
    batch's thumbnails (uint8 ``[k, THUMB_PX, THUMB_PX, 3]``, a copy) made
    from the decoded pixels; otherwise None.  ``keep(meta, k)``: bool
    ``[k]``, which of a batch's tiles to keep for later batches (at most
    ``keep_max`` tiles kept, the oldest dropped first); ``stats`` gains
    ``engine_runs`` (tiles decoded and run) and ``kept_reused``.
    """
    import numpy as np

    chunk = -(-max_rows // workers)  # each batch is split among all decoders
    ring, tring = _rings(max_rows, size, thumbs)
    memory: OrderedDict[bytes, tuple[_Kept, int]] = OrderedDict()
    counts = stats if stats is not None else {}
    counts.setdefault("engine_runs", 0)
    counts.setdefault("kept_reused", 0)
    with ThreadPoolExecutor(
        max_workers=workers,
        thread_name_prefix="describe-decode",
        initializer=_lower_decoder_priority,
    ) as pool:
        pending: deque[tuple[Any, Any, int, list[Future[np.ndarray]], Any]] = deque()
        free = deque(range(len(ring)))

        start = partial(_submit, pool, store, ring, tring, chunk, size, memory, keep, keep_max)

        def submit() -> bool:
            item = next(work, None)
            if item is None:
                return False
            pending.append(start(counts, item, free.popleft()))
            return True

        try:
            while free and submit():
                pass
            while pending:
                meta, ids, slot, parts, reuse = pending.popleft()
                for part in parts:
                    part.result()  # in order: the first bad tile is the one reported
                todo = reuse[0]
                tids = np.asarray(ids)[todo]
                out = _run_engine(runner, ring[slot][: len(todo)], tids) if len(todo) else None
                tb = tring[slot]
                th = None if tb is None else tb[: len(todo)].copy()
                free.append(slot)
                submit()
                out, th = _with_kept(out, th, len(ids), reuse)
                if post is not None:
                    yield meta, post(meta, out, ids), th
                else:
                    yield meta, checked_unit(np.array(out, dtype=np.float32), ids), th
        except BaseException:
            for _, _, _, parts, _ in pending:
                for part in parts:
                    part.cancel()
            raise


def _submit(
    pool: ThreadPoolExecutor,
    store: TileStore,
    ring: list[Any],
    tring: list[Any],
    chunk: int,
    size: tuple[int, int],
    memory: OrderedDict[bytes, tuple[_Kept, int]],
    keep: Callable[[Any, int], Any] | None,
    keep_max: int,
    counts: dict[str, int],
    item: tuple[Any, Any, Any],
    slot: int,
) -> tuple[Any, Any, int, list[Future[Any]], Any]:
    """Start decoding one batch's tiles (less those kept) into ``ring[slot]``: its pending entry."""
    import numpy as np

    meta, ids, digests = item
    buf, tbuf = ring[slot], tring[slot]
    reuse = _take(memory, meta, digests, keep, keep_max)
    todo = reuse[0]
    paths = [store.path(bytes(digests[i]).hex()) for i in todo]
    tids = np.asarray(ids)[todo]
    counts["engine_runs"] += len(todo)
    counts["kept_reused"] += len(digests) - len(todo)
    parts = [
        pool.submit(
            decode_batch,
            paths[c : c + chunk],
            tids[c : c + chunk],
            size,
            buf[c : c + chunk],
            *(() if tbuf is None else (tbuf[c : c + chunk],)),
        )  # fmt: skip
        for c in range(0, len(paths), chunk)
    ]
    return meta, ids, slot, parts, reuse


def _take(
    memory: OrderedDict[bytes, tuple[_Kept, int]],
    meta: Any,
    digests: Any,
    keep: Callable[[Any, int], Any] | None,
    keep_max: int,
) -> tuple[list[int], list[tuple[int, _Kept, int]], _Kept, list[int]]:
    """``(rows to run, [(row, kept batch, its row)] taken from memory, this batch's keeper, rows to keep)``.

    The rows to keep are registered at once (by the keeper, filled when the
    batch has run): batches are consumed in order, so a later batch that
    takes one finds it filled.
    """
    keys = [bytes(d) for d in digests]
    taken: list[tuple[int, _Kept, int]] = []
    todo: list[int] = []
    for i, k in enumerate(keys):
        got = memory.get(k) if keep is not None else None
        if got is None:
            todo.append(i)
        else:
            taken.append((i, *got))
    mine = _Kept()
    kept: list[int] = []
    if keep is not None and keep_max > 0:
        wanted = keep(meta, len(keys))
        for j, i in enumerate(todo):
            if wanted[i]:
                memory[keys[i]] = (mine, j)
                memory.move_to_end(keys[i])
                kept.append(j)
        while len(memory) > keep_max:
            memory.popitem(last=False)
    return todo, taken, mine, kept


def _with_kept(out: Any, th: Any, n: int, reuse: Any) -> tuple[Any, Any]:
    """A batch's per-tile outputs and thumbnails in its own row order: the rows run and the rows taken."""
    import numpy as np

    todo, taken, mine, kept = reuse
    for j in kept:  # copies: the batch's arrays are not held for a few rows
        mine.rows[j] = out[j].copy()
        if th is not None:
            mine.thumbs[j] = th[j].copy()
    if not taken:
        return out, th
    first = taken[0][1].rows[taken[0][2]]
    full = np.empty((n, *first.shape), dtype=first.dtype)
    fth = None if th is None else np.empty((n, *th.shape[1:]), dtype=th.dtype)
    if len(todo):
        full[todo] = out
        if fth is not None:
            fth[todo] = th
    for i, src, row in taken:
        full[i] = src.rows[row]
        if fth is not None:
            fth[i] = src.thumbs[row]
    return full, fth


def _rings(max_rows: int, size: tuple[int, int], thumbs: bool) -> tuple[list[Any], list[Any]]:
    """The engine's input buffers and (with ``thumbs``) the thumbnail buffers, one per batch in flight."""
    import numpy as np

    # a ring of input buffers, reused: fresh 50 MB arrays would page-fault each batch
    ring = [np.empty((max_rows, 3, *size), dtype=np.float32) for _ in range(_IN_FLIGHT)]
    tring = [
        np.empty((max_rows, THUMB_PX, THUMB_PX, 3), dtype=np.uint8) if thumbs else None
        for _ in ring
    ]
    return ring, tring


def _run_engine(runner: Any, batch: Any, ids: Any) -> Any:
    """``runner.run(batch)``; a failure is a BuildError naming the batch's first tile."""
    try:
        return runner.run(batch)
    except Exception as exc:
        z0, x0, y0 = tile_zxy(ids[0])
        raise BuildError(
            f"the engine failed on {len(ids)} tiles starting at z={z0} x={x0} y={y0}: "
            f"{type(exc).__name__}: {exc}",
            remedy="recompile the engine (delete the engine directory) and retry",
            phase=_PHASE,
        ) from exc
