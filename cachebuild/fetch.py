"""The tiles phase: every planned tile, from the store or from the provider.

1. List the planned tiles of the box at each zoom (lazily, in chunks).
2. Tiles the store already holds for this provider are *reused*.
3. The rest are fetched on a thread pool with a bounded number in flight,
   each image put into the content-addressed store by its worker; which
   object served which tile is recorded every :data:`REF_BATCH` tiles (and
   every few seconds), so an interrupted run keeps what it fetched.
4. A tile the provider has no image for is *missing*.
5. Tiles that failed after retries fail the phase, after the others are
   recorded.
6. The tile set (:mod:`cachebuild.tileset`) is written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DownloadError, UsageError
from .tiles import LngLatBbox, Tile

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .providers import Provider
    from .store import TileStore

__all__ = [
    "REF_BATCH",
    "REF_FLUSH_S",
    "LOOKUP_BATCH",
    "MAX_FAILURES",
    "MISSING_EXAMPLES",
    "fetch_tiles",
    "fetch_with_provider",
]

#: Refs are recorded after this many fetched tiles...
REF_BATCH = 500
#: ...or this many seconds, whichever comes first.
REF_FLUSH_S = 5.0
#: Planned tiles looked up in the store at a time.
LOOKUP_BATCH = 20_000
#: Stop asking for more tiles after this many have failed: the provider is
#: down or refusing, and the operator learns it sooner.
MAX_FAILURES = 100
#: How many missing tiles the summary names.
MISSING_EXAMPLES = 10


def _name(t: Tile) -> str:
    return f"{t.z}/{t.x}/{t.y}"


def _chunks(items: Iterable[Tile], n: int) -> Iterator[list[Tile]]:
    chunk: list[Tile] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _fetch_one(provider: Provider, store: TileStore, t: Tile) -> tuple[Tile, str | None]:
    data = provider.fetch(t)
    if data is None:
        return t, None
    return t, store.put(data)


class _Run:
    """The counts and pending refs of one fetch; used from the main thread only."""

    def __init__(self, provider: Provider, store: TileStore, bar: Any):
        self.provider = provider
        self.store = store
        self.bar = bar
        self.present: list[tuple[int, bytes]] = []
        self.missing: list[int] = []
        self.fetched = 0
        self.reused = 0
        self.failed = 0
        self.first_failure: tuple[int, str] | None = None
        self._refs: list[tuple[tuple[int, int, int], str]] = []
        self._flushed_at = time.monotonic()

    def to_fetch(self, planned: Iterable[Tile]) -> Iterator[Tile]:
        """The planned tiles the store lacks; counts the others as reused."""
        from .tiles import tile_id

        for chunk in _chunks(planned, LOOKUP_BATCH):
            known = self.store.lookup_refs(self.provider.identity, [(t.z, t.x, t.y) for t in chunk])
            todo = []
            for t in chunk:
                digest = known.get((t.z, t.x, t.y))
                if digest is None:
                    todo.append(t)
                else:
                    self.present.append((tile_id(t), bytes.fromhex(digest)))
            self.reused += len(chunk) - len(todo)
            self.bar.advance(len(chunk) - len(todo))
            yield from todo

    def done(self, future: Future[tuple[Tile, str | None]]) -> None:
        """Account for one finished fetch; re-raises what is not a tile failure."""
        from .providers import TileFetchError
        from .tiles import tile_id

        exc = future.exception()
        if isinstance(exc, TileFetchError):
            self.failed += 1
            tid = tile_id(exc.tile)
            if self.first_failure is None or tid < self.first_failure[0]:
                self.first_failure = (tid, exc.message)
        elif exc is not None:
            raise exc
        else:
            t, digest = future.result()
            if digest is None:
                self.missing.append(tile_id(t))
            else:
                self.present.append((tile_id(t), bytes.fromhex(digest)))
                self._refs.append(((t.z, t.x, t.y), digest))
                self.fetched += 1
                if len(self._refs) >= REF_BATCH or time.monotonic() - self._flushed_at >= REF_FLUSH_S:
                    self.flush()
        self.bar.advance(1)

    def flush(self) -> None:
        if self._refs:
            self.store.record_refs(self.provider.identity, self._refs)
            self._refs = []
        self._flushed_at = time.monotonic()


def fetch_with_provider(
    provider: Provider,
    *,
    bbox: LngLatBbox,
    zooms: Sequence[int],
    store_root: Path,
    out_dir: Path,
    concurrency: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`fetch_tiles` with an open provider (left open).

    Raises
    ------
    DownloadError
        When tiles failed after retries (the fetched ones are kept), or the
        provider refused the credentials.
    UsageError
        When ``concurrency`` is below 1.
    """
    import numpy as np
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from .progress import Progress
    from .store import TileStore
    from .tiles import count_tiles, tile_from_id, tiles
    from .tileset import tile_dtype, write_tileset

    if concurrency < 1:
        raise UsageError(f"CONCURRENCY={concurrency} must be at least 1")
    zooms = sorted({int(z) for z in zooms})
    planned = tiles(bbox, zooms)
    total = count_tiles(bbox, zooms)
    workers = max(1, min(concurrency, provider.concurrency))
    in_flight_max = 2 * workers

    with TileStore(store_root) as store, Progress(
        "tiles", total, stream=sys.stderr if progress else None
    ) as bar:
        store.clean_tmp()
        run = _Run(provider, store, bar)
        todo = run.to_fetch(planned)
        pending: set[Future[tuple[Tile, str | None]]] = set()
        finished: list[Future[tuple[Tile, str | None]]] = []
        with ThreadPoolExecutor(workers, thread_name_prefix="cachebuild-fetch") as pool:
            try:
                exhausted = False
                while True:
                    while not exhausted and len(pending) < in_flight_max and run.failed < MAX_FAILURES:
                        t = next(todo, None)
                        if t is None:
                            exhausted = True
                        else:
                            pending.add(pool.submit(_fetch_one, provider, store, t))
                    if not pending:
                        break
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    finished.extend(done)
                    while finished:
                        run.done(finished.pop())
            finally:
                # interrupted or failed: keep the tiles that were fetched,
                # drop the requests that had not started
                for future in pending:
                    future.cancel()
                wait(pending)
                for future in [*finished, *pending]:
                    if not future.cancelled() and future.exception() is None:
                        run.done(future)
                run.flush()

    if run.failed:
        assert run.first_failure is not None
        stopped = " (stopped early)" if run.failed >= MAX_FAILURES else ""
        # the example's message starts "tile z/x/y: ..."
        raise DownloadError(f"{run.failed} tile(s) could not be fetched{stopped}; e.g. {run.first_failure[1]}")

    missing = sorted(run.missing)
    summary = {
        "fetched": run.fetched,
        "reused": run.reused,
        "zooms": zooms,
        "bbox": [float(v) for v in bbox],
        "provider": provider.identity,
        "missing_examples": [_name(tile_from_id(i)) for i in missing[:MISSING_EXAMPLES]],
    }
    present = np.array(run.present, dtype=tile_dtype())
    return write_tileset(Path(out_dir), present, np.array(missing, dtype="<i8"), summary)


def fetch_tiles(
    *,
    bbox: LngLatBbox,
    zooms: Sequence[int],
    provider_spec: str,
    store_root: Path,
    out_dir: Path,
    env: Mapping[str, str],
    concurrency: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Fetch every tile of ``bbox`` at ``zooms`` into the store; write the tile set.

    Parameters
    ----------
    bbox
        The area; ``west > east`` crosses the antimeridian.
    zooms
        Zoom levels.
    provider_spec
        ``PROVIDER``: see :func:`cachebuild.providers.open_provider`.
    store_root
        The content-addressed tile store.
    out_dir
        Where ``tiles.npy``, ``missing.npy`` and ``tileset.json`` go.
    env
        The environment (API key, HTTP settings).
    concurrency
        Requests in flight at most.
    progress
        Draw a progress line on stderr (when it is a terminal).

    Returns
    -------
    dict
        The tile set summary as written: ``planned``, ``present``,
        ``missing``, ``fetched``, ``reused``, ``zooms``, ``bbox``,
        ``provider``, ``missing_examples``, ``aggregate_sha256``.

    Raises
    ------
    UsageError
        For a bad provider spec (before any request).
    DownloadError
        When tiles failed after retries, naming how many and one of them;
        every tile fetched before is kept in the store.
    """
    from .providers import open_provider

    provider = open_provider(provider_spec, env=env)
    try:
        return fetch_with_provider(
            provider,
            bbox=bbox,
            zooms=zooms,
            store_root=store_root,
            out_dir=out_dir,
            concurrency=concurrency,
            progress=progress,
        )
    finally:
        provider.close()
