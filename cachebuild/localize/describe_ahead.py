"""Describing while the tiles arrive: the describe stage run behind the fetch, in the background.

The tiles phase tells a :class:`DescribeAhead` every tile it settles:
present (with its image hash) or absent (missing, no data).  An anchor
tile's block (:mod:`cachebuild.store.windowkeys`) is keyed by the images
of the anchor and its right, lower and lower-right neighbours, so it can
be described as soon as each of those is settled or lies outside the plan
(``PIPELINE``, docs/design/pipeline.md).  Ready anchors are grouped into
batches in bands :data:`_BAND` tiles wide, as the describe stage does, and
go through a queue to one thread (back-pressure: at most
:data:`QUEUE_BATCHES` batches holding a tile downloaded now wait there;
when the describer falls behind on them the fetch waits, it does not
buffer; a batch of stored tiles only, as after a 304, is mostly looked
up, and the fetch goes on past it) that runs the same describer as the describe stage
(:class:`~cachebuild.localize.windows.WindowDescriber`, or the engine for
``WINDOW_STRIDE=1``) through the same decode-ahead ring, and appends the
blocks to the descriptor store under the same keys.  The describe task
then finds them stored and computes only what is left.

Nothing here decides what is up to date: that stays doit's.  A failure in
the background (a tile that does not decode, a full disk) stops it
quietly; the describe task meets the same problem and reports it.  An
interrupted or failed fetch stops it too: the blocks appended so far are
committed (the store's commit rules keep a torn write out).

numpy is imported inside the functions.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cachebuild.engine.compile import load_engine
from cachebuild.localize.decode import _lower_decoder_priority, default_decode_threads
from cachebuild.localize.decode_ahead import _engine_batches
from cachebuild.localize.describe_store import _engine_key, _ThumbKeeper
from cachebuild.localize.describe_windows import KEEP_TILES
from cachebuild.localize.windows import WindowDescriber, stored_dim, window_record
from cachebuild.store.descriptors import DescriptorStore
from cachebuild.store.lock import store_user
from cachebuild.store.objects import TileStore
from cachebuild.store.windowkeys import block_digests, namespace
from cachebuild.tilemath import LngLatBbox, tile_ranges

__all__ = ["DescribeAhead", "QUEUE_BATCHES"]

#: Batches with a tile downloaded now waiting for the describer at most (2,048 anchors at 32
#: a batch): the fetch waits beyond.  Deep enough that the describer always finds whole
#: batches while the fetch waits on the network, and that a survey block's new tiles do not
#: hold back the revalidation of the rest of the area; the queue holds tile hashes, not images.
QUEUE_BATCHES = 64
#: Anchors of a batch come from bands this many tiles wide (as in describe_windows).
_BAND = 4
_MASK = (1 << 29) - 1
_AFTER = ((1, 0), (0, 1), (1, 1))  # an anchor's right, lower and lower-right neighbours
_BEFORE = ((0, 0), (-1, 0), (0, -1), (-1, -1))  # the anchors a tile is part of


class _Stopped(Exception):
    """Raised in the describer thread when the run is aborted."""


def _import_first() -> None:
    """Import numpy and Pillow here, before the thread: two threads importing a C extension
    at once can find it half initialised (numpy then fails with an ImportError)."""
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401


def _tid(z: int, x: int, y: int) -> int:
    return (z << 58) | (x << 29) | y


class DescribeAhead:
    """A background describer fed by the tiles phase (its ``observer``).

    Parameters
    ----------
    store_root
        The store the tiles land in; the blocks go to its descriptor store.
    engine_dir
        The compiled engine (compiled before the tiles: it does not depend on them).
    bbox, zooms
        The plan: a neighbour outside it is absent, as in the tile set.
    stride, batch_size, threads
        ``WINDOW_STRIDE``, ``BATCH`` and ``THREADS`` of the describe stage.

    Call :meth:`present` / :meth:`absent` from one thread (the fetch's),
    then :meth:`finish` (no more tiles: describe the rest) or :meth:`abort`,
    then :meth:`join`.
    """

    def __init__(
        self,
        store_root: str | os.PathLike[str],
        engine_dir: str | os.PathLike[str],
        *,
        bbox: Sequence[float],
        zooms: Sequence[int],
        stride: int,
        batch_size: int = 64,
        threads: int | None = None,
    ):
        self.store_root = Path(store_root)
        self.engine_dir = Path(engine_dir)
        self.stride = int(stride)
        # half the describe stage's batches of windows: its ring of input buffers, the largest
        # thing it holds, is then half as large (it runs beside the fetch), for ~5% more engine runs
        self.batch = max(1, int(batch_size) // (2 if self.stride > 1 else 1))
        # tiles a batch decodes at most: a full band's (45 for 32 anchors)
        rows = -(-self.batch // _BAND)
        self.max_rows = (_BAND + 1) * (rows + 1) if self.stride > 1 else self.batch
        self.threads = threads
        box = LngLatBbox(*bbox)
        self._ranges = {int(z): tile_ranges(box, int(z)) for z in zooms}
        self._known: dict[int, bytes | None] = {}
        self._waiting: set[int] = set()
        self._ready: list[int] = []
        self._queue: queue.Queue[Any] = queue.Queue()
        self._slots = threading.BoundedSemaphore(QUEUE_BATCHES)  # for batches with new tiles
        self._new: set[int] = set()  # tiles downloaded now (fetched), not taken from the store
        self._fresh = False  # a tile downloaded now has readied anchors since the last batch
        self._stop = threading.Event()
        self._finished = False
        self._idle = 0.0
        self._hungry = False  # the describer waits for work (read by the fetch's thread)
        self._first: Any = None  # the batch that opened the descriptor store
        self._runs: dict[str, int] = {}  # tiles decoded and run, and taken from kept halos
        self.stats: dict[str, Any] = {
            "blocks": 0,  # blocks described and stored
            "found": 0,  # blocks the store already had
            "engine_runs": 0,  # tiles run through the per-tile stage
            "busy_s": 0.0,
            "fetch_waited_s": 0.0,  # the fetch waiting for room in the queue
            "error": None,
        }
        _import_first()
        self._thread = threading.Thread(
            target=self._main, name="cachebuild-describe-ahead", daemon=True
        )
        self._thread.start()

    # -- the fetch's side ----------------------------------------------------

    def present(self, tid: int, digest: bytes) -> None:
        """Tile ``tid`` is in the store with image hash ``digest`` (32 bytes)."""
        self._known[tid] = bytes(digest)
        self._waiting.add(tid)
        self._fresh = self._fresh or tid in self._new
        self._settle(tid)

    def fetched(self, tid: int, digest: bytes) -> None:
        """Tile ``tid`` was downloaded now (told before :meth:`present`): its blocks are new work."""
        self._new.add(tid)

    def absent(self, tid: int) -> None:
        """Tile ``tid`` has no image (missing, or no data)."""
        self._known[tid] = None
        self._settle(tid)

    def finish(self) -> None:
        """No more tiles: queue every anchor left whose neighbours are settled, then the end."""
        if self._finished:
            return
        self._finished = True
        self._ready.extend(
            a for a in self._waiting if self._settled(a >> 58, (a >> 29) & _MASK, a & _MASK)
        )
        self._waiting.clear()
        self._emit(final=True)
        self._put(None)

    def abort(self) -> None:
        """Stop now: what was described is committed, the rest is the describe task's."""
        self._finished = True
        self._stop.set()

    def join(self) -> float:
        """Wait for the describer to end; returns the seconds waited."""
        t = time.monotonic()
        self._thread.join()
        return time.monotonic() - t

    def _planned(self, z: int, x: int, y: int) -> bool:
        return any(x in xs and y in ys for xs, ys in self._ranges.get(z, ()))

    def _settled(self, z: int, x: int, y: int) -> bool:
        """Whether the anchor's neighbours are all known (present, absent or not planned)."""
        side = 1 << z
        for dx, dy in _AFTER:
            nx, ny = x + dx, y + dy
            if nx < side and ny < side and _tid(z, nx, ny) not in self._known:
                if self._planned(z, nx, ny):
                    return False
        return True

    def _settle(self, tid: int) -> None:
        z, x, y = tid >> 58, (tid >> 29) & _MASK, tid & _MASK
        for dx, dy in _BEFORE:
            ax, ay = x + dx, y + dy
            if ax < 0 or ay < 0:
                continue
            a = _tid(z, ax, ay)
            if a in self._waiting and self._settled(z, ax, ay):
                self._waiting.discard(a)
                self._ready.append(a)
        if len(self._ready) >= 2 * self.batch or (
            self._hungry and self._fresh and len(self._ready) >= max(1, self.batch // 4)
        ):  # whole bands while the describer is busy, or has only stored tiles to look up
            self._emit(final=False)  # (as after 304s); what there is when new tiles wait for it

    def _emit(self, final: bool) -> None:
        """Queue batches of ready anchors, in bands: all when ``final``, else while enough wait (one at least)."""
        self._ready.sort(key=lambda a: (a >> 58, ((a >> 29) & _MASK) // _BAND, a & _MASK, a))
        first = True
        while self._ready and (final or first or len(self._ready) >= 2 * self.batch):
            first = False
            anchors: list[int] = []
            covers: list[tuple[int, int, int, int]] = []
            need: set[int] = set()
            for a in self._ready:
                cover = self._cover(a)
                grown = need | {t for t in cover if t >= 0}
                if anchors and (len(anchors) >= self.batch or len(grown) > self.max_rows):
                    break
                anchors.append(a)
                covers.append(cover)
                need = grown
            del self._ready[: len(anchors)]
            self._fresh = False
            digests = {t: self._known[t] for t in need}
            self._put((covers, digests, not self._new.isdisjoint(need)))

    def _cover(self, a: int) -> tuple[int, int, int, int]:
        """The anchor and its right, lower and lower-right neighbours (-1: absent)."""
        if self.stride == 1:
            return (a, -1, -1, -1)
        z, x, y = a >> 58, (a >> 29) & _MASK, a & _MASK
        side = 1 << z
        out = [a]
        for dx, dy in _AFTER:
            nx, ny = x + dx, y + dy
            t = _tid(z, nx, ny) if nx < side and ny < side else -1
            out.append(t if t >= 0 and self._known.get(t) is not None else -1)
        return (out[0], out[1], out[2], out[3])

    def _put(self, item: Any) -> None:
        """Queue ``item``; a batch with new tiles waits for a slot (back-pressure) unless the
        describer has stopped."""
        t = time.monotonic()
        try:
            if item is not None and item[2]:
                while not self._slots.acquire(timeout=0.2):
                    if self._stop.is_set() or not self._thread.is_alive():
                        return
            self._queue.put(item)
        finally:
            self.stats["fetch_waited_s"] += time.monotonic() - t

    # -- the describer thread ------------------------------------------------

    def _main(self) -> None:
        t0 = time.monotonic()
        _lower_decoder_priority()  # the fetch first: the engine's threads inherit this
        try:
            with store_user(str(self.store_root)):
                self._describe()
        except _Stopped:
            pass
        except BaseException as exc:  # the describe task meets it again and reports it
            self.stats["error"] = f"{type(exc).__name__}: {exc}"
            self._stop.set()
        finally:
            self.stats["busy_s"] = round(max(0.0, time.monotonic() - t0 - self._idle), 3)

    def _get(self) -> Any:
        """The next batch (None at the end); raises :class:`_Stopped` once aborted."""
        t = time.monotonic()
        try:
            while True:
                if self._stop.is_set():
                    raise _Stopped
                try:
                    return self._took(self._queue.get_nowait())
                except queue.Empty:
                    self._hungry = True
                try:
                    return self._took(self._queue.get(timeout=0.2))
                except queue.Empty:
                    continue
        finally:
            self._hungry = False
            self._idle += time.monotonic() - t

    def _took(self, item: Any) -> Any:
        """``item`` taken off the queue: a batch with new tiles frees its slot."""
        if item is not None and item[2]:
            self._slots.release()
        return item

    def _describer(self) -> tuple[Any, str, int, Any, str]:
        """``(runner, descriptor store key, block size, post, mode)`` as the describe stage has them."""
        if self.stride == 1:
            runner = load_engine(self.engine_dir, threads=self.threads)
            return runner, _engine_key(self.engine_dir), int(runner.descriptor_dim), None, "tile"
        describer = WindowDescriber(self.engine_dir, self.stride, self.threads)
        record = window_record(self.engine_dir, self.stride)
        key = namespace(_engine_key(self.engine_dir), self.stride, record["mode"])
        dim = self.stride * self.stride * stored_dim(record)

        def post(meta: Any, out: Any, _ids: Any) -> Any:
            return describer.blocks(out, meta[1])

        return describer, key, dim, post, str(record["mode"])

    def _describe(self) -> None:
        runner, key, dim, post, mode = self._describer()
        first = self._get()
        if first is None:  # no anchor (every tile failed): the descriptor store is not touched
            return
        self._first = first
        store = TileStore(self.store_root)
        size = (int(runner.input_hw[0]), int(runner.input_hw[1]))
        with (
            DescriptorStore(self.store_root, key, dim) as ds,
            ds.writer() as writer,
            _ThumbKeeper(self.store_root) as keep,
        ):
            batches = _engine_batches(
                runner, store, self._work(ds, mode), size=size, max_rows=self.max_rows,
                workers=default_decode_threads(), thumbs=True, post=post,
                keep=None if mode == "tile" else _halo, keep_max=KEEP_TILES, stats=self._runs,
            )  # fmt: skip
            try:
                for (keys, local, anchor_raw), out, th in batches:
                    writer.append(keys, out)
                    writer.commit()  # each batch, so a killed build keeps it too
                    if th is not None:
                        keep.add(anchor_raw, th[local[:, 0]])
                    self.stats["blocks"] += len(keys)
            finally:
                batches.close()
                keep.flush()
                self.stats["engine_runs"] = self._runs.get("engine_runs", 0)

    def _work(self, ds: DescriptorStore, mode: str) -> Iterator[tuple[Any, Any, Any]]:
        """``((keys, cover, anchor digests), ids, digests)`` of each batch, blocks the store has left out."""
        item, self._first = self._first, None
        while item is not None:
            covers, digests, _ = item
            got = _batch(covers, digests, self.stride, mode, ds)
            self.stats["found"] += got[1]
            if got[0] is not None:
                yield got[0]
            item = self._get()


def _halo(meta: Any, n: int) -> Any:
    """bool ``[n]``: a batch's tiles that are not its anchors (``meta``: ``(keys, cover, anchor digests)``)."""
    import numpy as np

    out = np.ones(n, dtype=bool)
    out[np.asarray(meta[1])[:, 0]] = False
    return out


def _batch(
    covers: list[tuple[int, int, int, int]],
    digests: dict[int, bytes | None],
    stride: int,
    mode: str,
    ds: DescriptorStore,
) -> tuple[Any, int]:
    """One batch for the ring, less the blocks ``ds`` has: ``(work or None, blocks found)``."""
    import numpy as np

    cover = np.array(covers, dtype=np.int64).reshape(-1, 4)
    if mode == "tile":  # the engine's rows come in tile order: so do the keys
        cover = cover[np.argsort(cover[:, 0])]
        covers = [tuple(c) for c in cover.tolist()]  # type: ignore[misc]
    for _ in range(2):  # once for every anchor, once more for the ones the store lacks
        need = np.unique(cover[cover >= 0])
        local = np.where(cover >= 0, np.searchsorted(need, np.maximum(cover, 0)), -1)
        raw = np.frombuffer(
            b"".join(digests[int(t)] or bytes(32) for t in need), dtype=np.uint8
        ).reshape(-1, 32)
        if mode == "tile":
            keys = raw[local[:, 0]]
        else:
            keys = block_digests(raw, local, stride, mode)
        if len(cover) != len(covers):
            break
        shard, _ = ds.lookup(keys)
        lacking = shard < 0
        if not lacking.any():
            return None, len(covers)
        if lacking.all():
            break
        cover = cover[lacking]
    found = len(covers) - len(cover)
    return ((keys, local, raw[local[:, 0]]), need, raw), found
