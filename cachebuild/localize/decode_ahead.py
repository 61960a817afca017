"""Decoding ahead of the engine: a bounded ring of batches, decoded by low-priority threads.

:func:`_engine_batches` runs the engine over batches of tiles while a thread
pool decodes and prepares the next ones into a ring of reused input buffers
(Pillow and the engine both release the GIL).  At most :data:`_IN_FLIGHT`
batches exist at once, so memory stays bounded.  Why and what it gains:
docs/design/describe-pipeline.md.  Tile descriptors
(:mod:`cachebuild.localize.describe`) and window blocks
(:mod:`cachebuild.localize.describe_windows`) both go through it.

numpy is imported inside the functions.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
) -> Generator[tuple[Any, Any, Any], None, None]:
    """Run the engine over ``work``, decoding ahead; yields ``(meta, descriptors, thumbnails)`` in order.

    ``work`` yields ``(meta, ids, digests)`` batches (uint8 ``[k, 32]``
    digests, ``k <= max_rows``); ``meta`` is passed through.  Batch k is
    decoded into ``ring[k % R]`` while the engine runs earlier ones; batch
    k + R is submitted once batch k has run.  With ``thumbs``, each
    batch's thumbnails (uint8 ``[k, THUMB_PX, THUMB_PX, 3]``, a copy) made
    from the decoded pixels; otherwise None.
    """
    import numpy as np

    chunk = -(-max_rows // workers)  # each batch is split among all decoders
    ring, tring = _rings(max_rows, size, thumbs)
    with ThreadPoolExecutor(
        max_workers=workers,
        thread_name_prefix="describe-decode",
        initializer=_lower_decoder_priority,
    ) as pool:
        pending: deque[tuple[Any, Any, int, list[Future[np.ndarray]]]] = deque()
        free = deque(range(len(ring)))

        def submit() -> bool:
            item = next(work, None)
            if item is None:
                return False
            meta, ids, digests = item
            slot = free.popleft()
            buf, tbuf = ring[slot], tring[slot]
            paths = [store.path(bytes(d).hex()) for d in digests]
            parts = [
                pool.submit(
                    decode_batch,
                    paths[c : c + chunk],
                    ids[c : c + chunk],
                    size,
                    buf[c : c + chunk],
                    *(() if tbuf is None else (tbuf[c : c + chunk],)),
                )  # fmt: skip
                for c in range(0, len(paths), chunk)
            ]
            pending.append((meta, ids, slot, parts))
            return True

        try:
            while free and submit():
                pass
            while pending:
                meta, ids, slot, parts = pending.popleft()
                for part in parts:
                    part.result()  # in order: the first bad tile is the one reported
                out = _run_engine(runner, ring[slot][: len(ids)], ids)
                tb = tring[slot]
                th = None if tb is None else tb[: len(ids)].copy()
                free.append(slot)
                submit()
                if post is not None:
                    yield meta, post(meta, out, ids), th
                else:
                    yield meta, checked_unit(np.array(out, dtype=np.float32), ids), th
        except BaseException:
            for *_, parts in pending:
                for part in parts:
                    part.cancel()
            raise


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
