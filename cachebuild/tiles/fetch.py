"""The tiles phase: every planned tile, from the store or from the provider.

1. List the planned tiles of the box at each zoom (lazily, in chunks).
2. Tiles the store already holds for this provider are *reused*.
3. The rest are fetched on a thread pool with a bounded number in flight,
   each image put into the content-addressed store by its worker and
   appended to this process's ref journal at once; which object served
   which tile is committed to the store's database every :data:`REF_BATCH`
   tiles (and every few seconds), so an interrupted run, even a SIGKILLed
   one, keeps what it fetched.
4. A tile the provider has no image for is *missing*; so is one the
   no-data rule (:mod:`cachebuild.providers.nodata`) matches, which is not stored.
5. Tiles that failed after retries fail the phase, after the others are
   recorded.
6. The tile set (:mod:`cachebuild.tileset`) is written.

With ``STORE=s3://...`` (:mod:`cachebuild.store.s3`) step 2 also looks in
the shared bucket, whose tiles are downloaded rather than fetched, and the
tiles the bucket lacks are uploaded as the fetch goes and at its end.

Progress goes to stderr: a live line on a terminal, one summary line
otherwise.

When the fetch ends early (an interrupt, a provider that gave up), a
provider with a ``cancel()`` method (the XYZ provider) is told to stop the
requests on the wire, so nothing waits for a slow server before the lock is
released.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachebuild._util.progress import Progress
from cachebuild.errors import DownloadError, UsageError
from cachebuild.providers import open_provider
from cachebuild.providers.base import TileFetchError
from cachebuild.providers.nodata import UNIFORM_CHECK, NoDataRule
from cachebuild.providers.xyzconfig import DEFAULT_FETCH_DEADLINE_S, parse_duration
from cachebuild.store.objects import TileStore
from cachebuild.store.s3 import TileSync
from cachebuild.tilemath import LngLatBbox, Tile, count_tiles, tile_from_id, tile_id, tiles
from cachebuild.tiles.work import NOT_MODIFIED, REFRESHED, Outcome, Validators, work
from cachebuild.tileset import tile_dtype, write_tileset

if TYPE_CHECKING:
    from concurrent.futures import Future

    from cachebuild._util.progress import Progress
    from cachebuild.providers.base import Provider
    from cachebuild.providers.nodata import NoDataRule
    from cachebuild.store.objects import TileStore
    from cachebuild.store.s3 import S3Store, TileSync

__all__ = [
    "REF_BATCH",
    "REF_FLUSH_S",
    "LOOKUP_BATCH",
    "MAX_FAILURES",
    "MISSING_EXAMPLES",
    "fetch_tiles",
    "fetch_with_provider",
    "summary_line",
]

#: Refs are committed after this many fetched tiles...
REF_BATCH = 500
#: ...or this many seconds, whichever comes first (the journal covers the gap).
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


def summary_line(counts: Mapping[str, int], seconds: float) -> str:
    """The one line the tiles phase prints when stderr is not a terminal.

    >>> summary_line({"planned": 10, "fetched": 8, "reused": 1, "missing": 1, "retries": 2}, 2.0)
    'tiles: 10 planned, 8 fetched, 1 reused, 1 missing, 2 retries, 2.0 s, 4 tiles/s'
    >>> summary_line({"planned": 4, "fetched": 4, "reused": 0, "missing": 0, "retries": 3,
    ...               "throttled": 3, "lowest_concurrency": 2}, 1.0)
    'tiles: 4 planned, 4 fetched, 0 reused, 0 missing, 3 retries, 3 throttled (concurrency down to 2), 1.0 s, 4 tiles/s'
    """
    c = counts
    text = f"tiles: {c['planned']} planned, {c['fetched']} fetched, {c['reused']} reused, {c['missing']} missing"
    if c.get("nodata"):
        text += f" ({c['nodata']} no data)"
    if c.get("failed"):
        text += f", {c['failed']} failed"
    rate = c["fetched"] / seconds if seconds > 0 else 0.0
    text += f", {c.get('retries', 0)} retries"
    if c.get("throttled"):
        text += f", {c['throttled']} throttled (concurrency down to {c['lowest_concurrency']})"
    return text + f", {seconds:.1f} s, {rate:,.0f} tiles/s"


class _Run:
    """The counts and pending refs of one fetch; used from the main thread only."""

    def __init__(
        self,
        provider: Provider,
        store: TileStore,
        bar: Progress,
        rule: NoDataRule,
        sync: TileSync | None = None,
        max_age_s: float | None = None,
        observer: Any = None,
    ):

        self.provider = provider
        self.observer = observer  # told each tile settled: present(id, digest) / absent(id)
        self._on_fetched = getattr(observer, "fetched", None)  # and each one downloaded now
        self.store = store
        self.sync = sync  # STORE=s3://...: the bucket's refs and objects
        self.bar = bar
        self.rule = rule
        self.check = UNIFORM_CHECK
        self.present: list[tuple[int, bytes]] = []
        self.missing: list[int] = []
        self.planned = 0
        self.fetched = 0
        self.reused = 0
        self.nodata = 0
        self.failed = 0
        self.first_failure: tuple[int, str] | None = None
        self.out_of_time = False  # FETCH_DEADLINE passed
        self.max_age_s = max_age_s  # TILE_MAX_AGE: None, never revalidate
        self.not_modified = 0
        self.refreshed = 0
        self._validators: list[tuple[tuple[int, int, int], str | None, str | None, float]] = []
        self.flow = getattr(provider, "flow", None)  # an HTTP provider's flow control
        self._refs: list[tuple[tuple[int, int, int], str]] = []
        self._verdicts: list[tuple[str, bool]] = []
        self._flushed_at = time.monotonic()

    @property
    def retries(self) -> int:
        return int(getattr(self.provider, "retries", 0))

    def counts(self) -> dict[str, int]:
        return {
            "planned": self.planned,
            "fetched": self.fetched,
            "reused": self.reused,
            "missing": len(self.missing),
            "nodata": self.nodata,
            "failed": self.failed,
            "retries": self.retries,
            **self.flow_counts(),
        }

    def flow_counts(self) -> dict[str, int]:
        """``throttled`` (429/503 answers) and ``lowest_concurrency`` once flow control
        acted; ``not_modified`` and ``refreshed`` with ``TILE_MAX_AGE``."""
        out = {}
        if self.max_age_s is not None:
            out = {"not_modified": self.not_modified, "refreshed": self.refreshed}
        flow = self.flow
        if flow is not None and flow.throttled:
            out["throttled"] = flow.throttled
            out["lowest_concurrency"] = flow.lowest_concurrency
        return out

    def _show_flow(self) -> None:
        flow = self.flow
        if flow is None or not flow.active:
            return
        rate = f", {flow.rate:,.1f} req/s" if flow.rate else ""
        self.bar.note("flow", f"{flow.throttled} throttled, {flow.concurrency} in flight{rate}")

    def _blank(self, t: Tile) -> None:

        self._lacks(tile_id(t))
        self.nodata += 1

    def _has(self, tid: int, digest: str) -> None:
        raw = bytes.fromhex(digest)
        self.present.append((tid, raw))
        if self.observer is not None:
            self.observer.present(tid, raw)

    def _lacks(self, tid: int) -> None:
        self.missing.append(tid)
        if self.observer is not None:
            self.observer.absent(tid)

    def _due(
        self, known: Mapping[tuple[int, int, int], str]
    ) -> dict[tuple[int, int, int], Validators]:
        """The stored tiles to revalidate (``TILE_MAX_AGE``), with their validators."""
        if self.max_age_s is None or not hasattr(self.provider, "fetch_validated"):
            return {}
        have = self.store.lookup_validators(self.provider.identity, known)
        now = time.time()
        never: Validators = (None, None, 0.0)  # fetched before validators were kept
        return {zxy: v for zxy in known if now - (v := have.get(zxy, never))[2] >= self.max_age_s}

    def to_do(
        self, planned: Iterable[Tile]
    ) -> Iterator[tuple[Tile, str | None, Validators | None]]:
        """Work for the pool: ``(tile, None, None)`` to fetch, ``(tile, digest, None)``
        to check, ``(tile, digest, validators)`` to revalidate.

        Stored tiles that need no check are counted as reused here.
        """

        for chunk in _chunks(planned, LOOKUP_BATCH):
            self.planned += len(chunk)
            zxy = [(t.z, t.x, t.y) for t in chunk]
            known = self.store.lookup_refs(self.provider.identity, zxy)
            if (
                self.sync is not None
            ):  # what another machine fetched: from the bucket, not the provider
                known.update(self.sync.pull(zxy, known))
            verdicts: dict[str, bool] = {}
            if self.rule.uniform:
                verdicts = self.store.lookup_checks(self.check, set(known.values()))
            due = self._due(known)
            todo: list[tuple[Tile, str | None, Validators | None]] = []
            done = 0
            for t in chunk:
                digest = known.get((t.z, t.x, t.y))
                if digest is None:
                    todo.append((t, None, None))
                    continue
                if digest in self.rule.sha256 or verdicts.get(digest) is True:
                    self._blank(t)
                elif (t.z, t.x, t.y) in due:  # older than TILE_MAX_AGE: ask if it changed
                    todo.append((t, digest, due[(t.z, t.x, t.y)]))
                    continue
                elif self.rule.uniform and digest not in verdicts:
                    todo.append((t, digest, None))
                    continue
                else:
                    self._has(tile_id(t), digest)
                    self.reused += 1
                done += 1
            self.bar.advance(done)
            yield from todo

    def done(self, future: Future[Outcome]) -> None:
        """Account for one finished piece of work; re-raises what is not a tile failure."""

        exc = future.exception()
        if isinstance(exc, TileFetchError):
            self.failed += 1
            tid = tile_id(exc.tile)
            if self.first_failure is None or tid < self.first_failure[0]:
                self.first_failure = (tid, exc.message)
        elif exc is not None:
            raise exc
        else:
            out = future.result()
            t, digest, blank, reused = out.tile, out.digest, out.blank, out.reused
            if out.validated and digest is not None and not blank:
                self._validators.append(((t.z, t.x, t.y), out.etag, out.last_modified, time.time()))
            if out.revalidated == NOT_MODIFIED:
                self.not_modified += 1
            elif out.revalidated == REFRESHED:
                self.refreshed += 1
            if digest is not None and self.rule.uniform:
                self._verdicts.append((digest, blank))
            if digest is None or blank:
                if blank:
                    self._blank(t)
                else:
                    self._lacks(tile_id(t))
            else:
                if reused:
                    self.reused += 1
                else:  # told before present(): the observer knows the tile is new when it settles
                    self._refs.append(((t.z, t.x, t.y), digest))
                    self.fetched += 1
                    if self._on_fetched is not None:
                        self._on_fetched(tile_id(t), bytes.fromhex(digest))
                    if self.sync is not None:
                        self.sync.fetched((t.z, t.x, t.y), digest)
                self._has(tile_id(t), digest)
            if (
                len(self._refs) + len(self._verdicts) + len(self._validators) >= REF_BATCH
                or time.monotonic() - self._flushed_at >= REF_FLUSH_S
            ):
                self.flush()
        self.bar.count("retries", self.retries)
        self._show_flow()
        self.bar.advance(1)

    def flush(self) -> None:
        if self._refs:
            self.store.record_refs(self.provider.identity, self._refs)
            self._refs = []
        if self._validators:
            self.store.record_validators(self.provider.identity, self._validators)
            self._validators = []
        if self._verdicts:
            self.store.record_checks(self.check, self._verdicts)
            self._verdicts = []
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
    nodata: NoDataRule | None = None,
    shared: S3Store | None = None,
    deadline_s: float | None = None,
    max_age_s: float | None = None,
    observer: Any = None,
) -> dict[str, Any]:
    """:func:`fetch_tiles` with an open provider (left open).

    ``observer``: told, from this thread, each tile as it is settled:
    ``observer.present(tile id, image hash bytes)`` or ``observer.absent(tile id)``
    (the describe-ahead of docs/design/pipeline.md); and, where it has that
    method, ``observer.fetched(tile id, image hash bytes)``, before its ``present``,
    for a tile this run downloaded and stored (pre-push; describe-ahead's back-pressure).

    ``max_age_s`` (``TILE_MAX_AGE``): stored tiles fetched longer ago than
    this are revalidated with conditional requests (an HTTP provider only).

    ``deadline_s`` bounds the whole fetch (``FETCH_DEADLINE``): past it,
    no more tiles are asked for and the phase fails naming how many are left.

    Raises
    ------
    DownloadError
        When tiles failed after retries (the fetched ones are kept), the
        provider refused the credentials, or the deadline passed.
    UsageError
        When ``concurrency`` is below 1.
    """
    if concurrency < 1:
        raise UsageError(f"CONCURRENCY={concurrency} must be at least 1")
    rule = nodata or NoDataRule()
    zooms = sorted({int(z) for z in zooms})
    total = count_tiles(bbox, zooms)
    workers = max(1, min(concurrency, provider.concurrency))
    flow = getattr(provider, "flow", None)
    if flow is not None:
        flow.set_ceiling(workers)  # CONCURRENCY is what success raises it back to
    started = time.monotonic()
    ends = None if not deadline_s else started + deadline_s

    with (
        TileStore(store_root) as store,
        Progress("tiles", total, stream=sys.stderr if progress else None) as bar,
    ):
        store.clean_tmp()
        store.replay_journals()
        sync = TileSync(shared, store, provider.identity) if shared is not None else None
        run = _Run(provider, store, bar, rule, sync, max_age_s, observer)
        try:
            _pump(run, run.to_do(tiles(bbox, zooms)), workers, ends)
        finally:
            bar.summary(summary_line(counts := run.counts(), time.monotonic() - started), counts)
        if sync is not None:
            sync.push()  # objects, then refs: another machine finds these tiles in the bucket

    _raise_failures(run, total - bar.done, deadline_s)
    missing = sorted(run.missing)
    # what the tile set holds, never how this run got it (fetched, reused,
    # throttled: the report's): the same inputs give the same tileset.json
    summary: dict[str, Any] = {
        "zooms": zooms,
        "bbox": [float(v) for v in bbox],
        # a companion's pushed tiles name the workstation's provider, not the push
        "provider": getattr(provider, "published", provider.identity),
        "missing_examples": [_name(tile_from_id(i)) for i in missing[:MISSING_EXAMPLES]],
    }
    if rule.active:
        summary["nodata"] = run.nodata
        summary["nodata_rule"] = rule.as_value()
    written = _write(out_dir, run.present, missing, summary)
    return {**written, "fetched": run.fetched, "reused": run.reused, **run.flow_counts()}


def _write(
    out_dir: Path, present: list[tuple[int, bytes]], missing: list[int], summary: dict[str, Any]
) -> dict[str, Any]:
    import numpy as np

    rows = np.array(present, dtype=tile_dtype())
    return write_tileset(Path(out_dir), rows, np.array(missing, dtype="<i8"), summary)


def _pump(
    run: _Run,
    todo: Iterator[tuple[Tile, str | None, tuple[str | None, str | None, float] | None]],
    workers: int,
    ends: float | None,
) -> None:
    """Run the work on ``workers`` threads, ``2 * workers`` in flight, until done or ``ends``.

    Whatever stops it (an interrupt, a failure, the deadline), the tiles
    fetched are kept, the work not started is dropped and the requests on
    the wire are stopped (a dripping server must not hold the lock).  Each
    future reports to a queue as it ends: ``concurrent.futures.wait`` would
    hook and unhook every pending future at each wake-up, in this thread,
    which every tile's bookkeeping already waits on.
    """
    import queue
    from concurrent.futures import ThreadPoolExecutor, wait

    provider, store, rule = run.provider, run.store, run.rule
    journal = store.open_journal(provider.identity)
    pending: set[Future[Outcome]] = set()
    finished: list[Future[Outcome]] = []
    ended: queue.SimpleQueue[Future[Outcome]] = queue.SimpleQueue()
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="cachebuild-fetch") as pool:
            try:
                exhausted = False
                while True:
                    if ends is not None and time.monotonic() >= ends:
                        run.out_of_time = True
                        break
                    while (
                        not exhausted and len(pending) < 2 * workers and run.failed < MAX_FAILURES
                    ):
                        item = next(todo, None)
                        if item is None:
                            exhausted = True
                        else:
                            future = pool.submit(work, provider, store, journal, rule, *item)
                            future.add_done_callback(ended.put)
                            pending.add(future)
                    if not pending:
                        break
                    left = None if ends is None else max(0.0, ends - time.monotonic())
                    try:
                        finished.append(ended.get(timeout=left))
                        while True:
                            finished.append(ended.get_nowait())
                    except queue.Empty:
                        pass
                    pending.difference_update(finished)
                    while finished:
                        run.done(finished.pop())
                    if run.sync is not None and run.sync.due():
                        run.flush()
                        run.sync.push()
            finally:
                if pending and callable(cancel := getattr(provider, "cancel", None)):
                    cancel()
                for future in pending:
                    future.cancel()
                wait(pending)
                for future in [*finished, *pending.difference(finished)]:
                    if not future.cancelled() and future.exception() is None:
                        run.done(future)
    finally:
        run.flush()
        journal.close()  # every ref is committed (else the next fetch replays it)


def _raise_failures(run: _Run, left: int, deadline_s: float | None) -> None:
    """The phase's error, if any: the deadline passed, or tiles failed."""
    if run.out_of_time and left > 0:
        throttled = run.flow_counts().get("throttled", 0)
        why = f", {throttled} answer(s) were 429/503" if throttled else ""
        raise DownloadError(
            f"FETCH_DEADLINE={deadline_s:g} s passed with {left} tile(s) left to fetch{why}; "
            f"the {run.fetched} fetched are kept",
            remedy="build again later (only the tiles left are asked for), or raise FETCH_DEADLINE",
        )
    if run.failed:
        assert run.first_failure is not None
        stopped = " (stopped early)" if run.failed >= MAX_FAILURES else ""
        # the example's message starts "tile z/x/y: ..."
        raise DownloadError(
            f"{run.failed} tile(s) could not be fetched{stopped}; e.g. {run.first_failure[1]}"
        )


def _durations(env: Mapping[str, str]) -> tuple[float, float | None]:
    """``FETCH_DEADLINE`` (default 6 h) and ``TILE_MAX_AGE`` (None: never) in seconds."""
    raw_deadline = env.get("FETCH_DEADLINE", "").strip()
    raw_age = env.get("TILE_MAX_AGE", "").strip()
    return (
        parse_duration("FETCH_DEADLINE", raw_deadline)
        if raw_deadline
        else DEFAULT_FETCH_DEADLINE_S,
        parse_duration("TILE_MAX_AGE", raw_age) if raw_age else None,
    )


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
    shared: S3Store | None = None,
    observer: Any = None,
) -> dict[str, Any]:
    """Fetch every tile of ``bbox`` at ``zooms`` into the store; write the tile set.

    Parameters
    ----------
    bbox, zooms
        The area (``west > east`` crosses the antimeridian) and its zoom levels.
    provider_spec
        ``PROVIDER``: see :func:`cachebuild.providers.open_provider`.
    store_root
        The content-addressed tile store.
    out_dir
        Where ``tiles.npy``, ``missing.npy`` and ``tileset.json`` go.
    env
        The environment: the API key and headers, the HTTP settings
        (see :func:`cachebuild.providers.open_provider`), and ``NODATA``
        and ``NODATA_SHA256`` (:class:`cachebuild.providers.nodata.NoDataRule`),
        ``FETCH_DEADLINE`` (a duration; ``0``: none) and ``TILE_MAX_AGE``
        (a duration: revalidate stored tiles older than that; unset: never).
    concurrency, progress
        Requests in flight at most; draw a progress line on stderr (a terminal's).
    shared
        ``STORE=s3://...``: the bucket shared with other machines; tiles it
        has are downloaded, the ones it lacks uploaded
        (:class:`cachebuild.store.s3.TileSync`); ``store_root`` is then the
        local read-through copy.
    observer
        Told each tile settled (:func:`fetch_with_provider`).

    Returns
    -------
    dict
        The tile set summary as written: ``planned``, ``present``, ``missing``,
        ``zooms``, ``bbox``, ``provider``, ``missing_examples``, ``aggregate_sha256``;
        with a no-data rule also ``nodata`` (how many of the missing are no-data
        tiles) and ``nodata_rule``.  Plus this run's ``fetched`` and ``reused``,
        which are not written: ``tileset.json`` describes content, not history.

    Raises
    ------
    UsageError
        For a bad provider spec (before any request).
    DownloadError
        When tiles failed after retries, naming how many and one of them;
        every tile fetched before is kept in the store.  Or when the shared
        bucket failed, naming its URL (never credentials).
    """
    rule = NoDataRule.from_env(env)
    deadline_s, max_age_s = _durations(env)
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
            nodata=rule,
            shared=shared,
            deadline_s=deadline_s,
            max_age_s=max_age_s,
            observer=observer,
        )
    finally:
        provider.close()
