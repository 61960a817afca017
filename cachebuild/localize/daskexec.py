"""Describe on a Dask distributed cluster (``DASK_SCHEDULER``: ``tcp://host:port`` or ``local:N``).

The build's process keeps the lock, the tile set and every write to the
descriptor store: it submits batches of tile hashes (a bounded window of
them) and appends each batch's descriptors as they arrive, skipping a
batch it has already stored, so a batch Dask reschedules after a worker
died is stored exactly once.  Each worker gets the compiled engine once
(:class:`EnginePlugin`, applied to late joiners too), loads it once per
process (:func:`engine_runner`), reads the batch's tiles by hash -- from
the build's store path, or with ``STORE=s3://...`` and a ``tcp://``
cluster from the bucket's tile packs, checked and kept per worker
(:func:`workers_read_bucket`) -- and returns descriptors; it stores
nothing.  docs/scale.md says how to run it and what each side needs.
distributed is imported here; this module is imported only with ``DASK_SCHEDULER``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from cachebuild._util.cpus import usable_cpus
from cachebuild._util.signals import deferred_interrupts
from cachebuild.engine.compile import load_engine
from cachebuild.engine.features import HEAD_FILES
from cachebuild.engine.interface import read_engine_json
from cachebuild.errors import BuildError, CacheBuildError, UsageError
from cachebuild.inputs.config import parse_dask_scheduler
from cachebuild.localize.decode import checked_unit, decode_batch, tile_zxy
from cachebuild.store.objects import TileStore
from cachebuild.store.s3 import CELL_SHIFT, StoreUnavailable, _cell_part, _decode_pack, open_store
from cachebuild.store.thumbs import THUMB_PX

try:
    from distributed import Client, KilledWorker, LocalCluster, wait
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError as exc:  # the optional extra is not installed
    raise UsageError(
        f"DASK_SCHEDULER needs Dask's distributed scheduler, which is not installed here ({exc})",
        remedy="pip install 'cachebuild[dask]' (or 'dask[distributed]'), or unset DASK_SCHEDULER",
    ) from exc

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "NO_WORKERS_TIMEOUT_S",
    "probe_scheduler",
    "EnginePlugin",
    "engine_runner",
    "engine_loads",
    "describe_batch",
    "WorkerError",
    "DaskExecutor",
    "BucketSource",
    "workers_read_bucket",
]

#: Seconds to wait for the scheduler to answer before failing (exit 21).
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Seconds a scheduler may have no workers, while work waits, before the build fails.
NO_WORKERS_TIMEOUT_S = 60.0
#: Batches submitted per worker thread at once (the rest wait in the wrapper).
_WINDOW_PER_THREAD = 3
#: Worker threads of a ``local:N`` worker: one batch decodes while another runs.
_LOCAL_THREADS_PER_WORKER = 2
_POLL_S = 2.0
_PHASE = "describe"
_KEY_PREFIX = "cachebuild-describe"

_REMEDY = (
    "start the scheduler (`dask scheduler`) and its workers (`dask worker <address>`), check "
    "DASK_SCHEDULER, or unset it to describe on this machine (docs/scale.md)"
)


def _unreachable(address: str, exc: BaseException) -> BuildError:
    return BuildError(
        f"the Dask scheduler at {address} cannot be reached: {type(exc).__name__}: {exc}",
        remedy=_REMEDY,
        phase=_PHASE,
    )


def _connect(address: str, timeout: float) -> Client:
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise _unreachable(address, exc) from exc


def probe_scheduler(raw: str, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Fail fast (``BuildError``, exit 21) when a ``tcp://`` scheduler does not answer.

    Run before the lock and before any work.  ``local:N`` needs no probe.
    """
    kind, address = parse_dask_scheduler(raw)
    if kind == "local":
        return
    from urllib.parse import urlsplit

    url = urlsplit(str(address))
    try:  # a refused connection fails at once; Dask would retry it until the timeout
        socket.create_connection((url.hostname, url.port or 0), timeout=timeout).close()
    except OSError as exc:
        raise _unreachable(str(address), exc) from exc
    _connect(str(address), timeout).close()


# -- the worker side ---------------------------------------------------------

#: engine key -> (engine directory on this worker, ONNX Runtime threads)
_ENGINE_DIRS: dict[str, tuple[Path, int | None]] = {}
#: engine key -> loaded runner, one per process
_RUNNERS: dict[str, Any] = {}
#: engine key -> times the engine was loaded in this process
_LOADS: dict[str, int] = {}
_STORES: dict[str, TileStore] = {}
_LOCK = threading.Lock()


class EnginePlugin(WorkerPlugin):
    """Puts a compiled engine's files on every worker, once.

    Registered under a name derived from the engine key, and idempotent: a
    second build with the same engine does not send it again.  The files go
    into the worker's local directory; the engine is loaded on first use.
    """

    idempotent = True

    def __init__(self, key: str, files: dict[str, bytes], threads: int | None):
        self.key = key
        self.files = files
        self.threads = threads

    def setup(self, worker: Any) -> None:
        target = Path(worker.local_directory) / f"cachebuild-engine-{self.key[:16]}"
        if not (target / "engine.json").is_file():
            tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            for name, data in self.files.items():
                (tmp / name).write_bytes(data)
            try:
                os.replace(tmp, target)
            except OSError:  # another plugin instance got there first
                shutil.rmtree(tmp, ignore_errors=True)
        threads = self.threads
        if threads is None:  # share the worker's CPUs among its task threads
            threads = max(1, usable_cpus() // max(1, int(worker.state.nthreads)))
        _ENGINE_DIRS[self.key] = (target, threads)


def _plugin_name(key: str) -> str:
    return f"cachebuild-engine-{key}"


def engine_runner(key: str) -> Any:
    """This process's runner for engine ``key``, loaded on first use."""
    runner = _RUNNERS.get(key)
    if runner is not None:
        return runner
    with _LOCK:
        runner = _RUNNERS.get(key)
        if runner is None:
            if key not in _ENGINE_DIRS:
                raise BuildError(
                    f"engine {key[:16]} was not delivered to this Dask worker",
                    remedy="run build-cache again; if it persists, restart the Dask workers",
                    phase=_PHASE,
                )
            path, threads = _ENGINE_DIRS[key]
            runner = _RUNNERS[key] = load_engine(path, threads=threads)
            _LOADS[key] = _LOADS.get(key, 0) + 1
    return runner


def engine_loads() -> dict[str, int]:
    """How often each engine was loaded in this process (once, however many batches)."""
    return dict(_LOADS)


def _store(root: Path) -> TileStore:
    if str(root) not in _STORES:
        _STORES[str(root)] = TileStore(root)
    return _STORES[str(root)]


class BucketSource(NamedTuple):
    """Where workers read tile images with ``STORE=s3://...``: the bucket's tile packs.

    ``url`` is the ``STORE`` URL (no credentials: the worker has its own),
    ``namespace`` the provider's folder under ``tiles/`` (:class:`cachebuild.store.s3.TileSync`).
    """

    url: str
    namespace: str


#: Set by :func:`workers_read_bucket` around a describe: a ``tcp://`` executor made then reads the bucket.
_BUCKET_SOURCE: contextvars.ContextVar[BucketSource | None] = contextvars.ContextVar(
    "cachebuild_bucket_source", default=None
)


@contextmanager
def workers_read_bucket(url: str, provider_identity: str) -> Iterator[BucketSource]:
    """While inside, a ``tcp://`` :class:`DaskExecutor` has its workers read tiles from the bucket at ``url``."""
    import hashlib

    source = BucketSource(str(url), hashlib.sha256(provider_identity.encode()).hexdigest()[:32])
    token = _BUCKET_SOURCE.set(source)
    try:
        yield source
    finally:
        _BUCKET_SOURCE.reset(token)


#: pack keys this process has read into its own store, and a lock per cell
_PACKS_READ: set[str] = set()
_CELL_LOCKS: dict[str, threading.Lock] = {}
_REMOTES: dict[str, Any] = {}
_BUCKET_LOCK = threading.Lock()


def _worker_store() -> TileStore:
    """This worker's own store of tile images read from the bucket (under its Dask local directory)."""
    try:
        from distributed import get_worker

        base = Path(get_worker().local_directory)
    except ValueError:  # not in a worker (a unit test, a direct call): this process's temp dir
        import tempfile

        base = Path(tempfile.gettempdir()) / f"cachebuild-worker-{os.getpid()}"
    return _store(base / "cachebuild-tiles")


def _bucket_paths(source: BucketSource, ids: Any, digests: Any) -> list[Path]:
    """Each image's path in this worker's store, the cells' packs read from the bucket first where it lacks one."""

    local = _worker_store()
    hexes = [bytes(d).hex() for d in digests]
    cells = sorted(
        {
            (z, x >> CELL_SHIFT, y >> CELL_SHIFT)
            for (z, x, y), h in zip((tile_zxy(i) for i in ids), hexes)
            if not local.has(h)
        }
    )
    try:
        with _BUCKET_LOCK:
            remote = _REMOTES.get(source.url) or _REMOTES.setdefault(
                source.url, open_store(source.url)
            )
        for cell in cells:
            prefix = remote.url.key("tiles", source.namespace, _cell_part(cell))
            with _BUCKET_LOCK:
                lock = _CELL_LOCKS.setdefault(prefix, threading.Lock())
            with lock:  # one thread reads a cell's packs; the others then find the images
                for key in remote.list(prefix):
                    name = key.rsplit("/", 1)[-1]
                    if key in _PACKS_READ or not name.endswith(".pack"):
                        continue
                    data = remote.get_verified(key, name[: -len(".pack")])
                    pack = _decode_pack(data) if data is not None else None
                    for _x, _y, d, image in pack[1] if pack is not None else ():
                        if not local.has(d):  # each image checked against its hash by _decode_pack
                            local.put(image)
                    if pack is not None:
                        _PACKS_READ.add(key)
    except StoreUnavailable as exc:
        raise BuildError(
            f"the Dask worker on {socket.gethostname()} cannot read tiles from {exc.message}",
            remedy=f"{exc.remedy}; the workers need their own AWS credentials and endpoint (docs/scale.md)",
            phase=_PHASE,
        ) from None
    paths = []
    for i, h in enumerate(hexes):
        path = local.path(h)
        if not path.is_file():
            z, x, y = tile_zxy(ids[i])
            raise BuildError(
                f"the Dask worker on {socket.gethostname()} finds no image for tile z={z} x={x} y={y} "
                f"in the tile packs of {source.url} (store object {h[:16]}...)",
                remedy="run build-cache again: its tiles phase uploads the tiles the bucket lacks",
                phase=_PHASE,
            )
        paths.append(path)
    return paths


def _tile_paths(store_root: str | BucketSource, ids: Any, digests: Any) -> list[Path]:
    """Where this worker reads each image: the build's store at the same path, or the bucket."""

    if isinstance(store_root, BucketSource):
        return _bucket_paths(store_root, ids, digests)
    root = Path(store_root)
    local = _store(root) if (root / "objects").is_dir() else None  # never create it here
    paths = []
    for i, d in enumerate(digests):
        path = None if local is None else local.path(bytes(d).hex())
        if path is None or not path.is_file():
            z, x, y = tile_zxy(ids[i])
            raise BuildError(
                f"the Dask worker on {socket.gethostname()} finds no image for tile z={z} x={x} y={y} "
                f"under {root} (store object {bytes(d).hex()[:16]}...)",
                remedy="run the workers where the store is at the same path (this machine, or a "
                "shared file system mounted there; docs/scale.md)",
                phase=_PHASE,
            )
        paths.append(path)
    return paths


class WorkerError(Exception):
    """A :class:`~cachebuild.errors.CacheBuildError` raised on a worker, in transit.

    Exceptions cross to the build by pickle, which rebuilds them from their
    positional arguments only; an error with keyword-only fields (a store
    object's ``digest``...) would not survive it.  This carries the class
    and every field, and :meth:`rebuild` makes the same error again.
    """

    def __init__(self, module: str, name: str, message: str, state: dict[str, Any]):
        super().__init__(module, name, message, state)

    @classmethod
    def of(cls, exc: CacheBuildError) -> WorkerError:
        return cls(type(exc).__module__, type(exc).__qualname__, exc.message, dict(vars(exc)))

    def rebuild(self) -> CacheBuildError:
        import importlib

        module, name, message, state = self.args
        kind = getattr(importlib.import_module(module), name)
        if not (isinstance(kind, type) and issubclass(kind, CacheBuildError)):
            return BuildError(message, phase=_PHASE)
        err: CacheBuildError = kind.__new__(kind)
        Exception.__init__(err, message)
        err.__dict__.update(state)
        return err


def describe_batch(key: str, store_root: str | BucketSource, ids: Any, digests: Any) -> Any:
    """On a worker: :func:`_describe_batch`, its errors made fit to travel (:class:`WorkerError`)."""
    try:
        return _describe_batch(key, store_root, ids, digests)
    except CacheBuildError as exc:
        raise WorkerError.of(exc) from None


def _describe_batch(key: str, store_root: str | BucketSource, ids: Any, digests: Any) -> Any:
    """On a worker: ``(descriptors, thumbnails)`` of one batch of images.

    Descriptors float32 ``[k, dim]``, unit rows; thumbnails uint8
    ``[k, THUMB_PX, THUMB_PX, 3]``, made from the same decoded pixels
    (the wrapper keeps them for the coverage map, :mod:`cachebuild.store.thumbs`).
    ``digests`` is uint8 ``[k, 32]`` (SHA-256 of each image in the store),
    ``ids`` the tile ids they were found under (for error messages).
    """
    import numpy as np

    runner = engine_runner(key)
    size = (int(runner.input_hw[0]), int(runner.input_hw[1]))
    paths = _tile_paths(store_root, ids, digests)
    buf = np.empty((len(paths), 3, *size), dtype=np.float32)
    thumbs = np.empty((len(paths), THUMB_PX, THUMB_PX, 3), dtype=np.uint8)
    x = decode_batch(paths, ids, size, buf, thumbs)
    try:
        out = runner.run(x)
    except Exception as exc:
        raise BuildError(
            f"the engine failed on a Dask worker on {len(ids)} tiles: {type(exc).__name__}: {exc}",
            remedy="recompile the engine (delete the engine directory) and retry",
            phase=_PHASE,
        ) from exc
    return checked_unit(np.array(out, dtype=np.float32), ids), thumbs


# -- the wrapper side --------------------------------------------------------


class DaskExecutor:
    """Runs describe batches on a Dask cluster; a context manager.

    Parameters
    ----------
    scheduler
        A ``DASK_SCHEDULER`` value: ``tcp://host:port`` or ``local:N``.
    engine_dir
        The compiled engine (its files are sent to the workers).
    store_root
        The store the workers read tiles from.
    threads
        ONNX Runtime threads per worker process; ``None``: the worker's
        CPUs divided among its task threads.
    connect_timeout
        Seconds to wait for a ``tcp://`` scheduler.

    Attributes
    ----------
    workers
        The most workers the cluster had while this executor ran.
    """

    name = "dask"

    def __init__(
        self,
        scheduler: str,
        *,
        engine_dir: str | os.PathLike[str],
        store_root: str | os.PathLike[str],
        threads: int | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    ):
        self.kind, target = parse_dask_scheduler(scheduler)
        self.scheduler = scheduler
        self.engine_dir = Path(engine_dir)
        self.store_root = str(store_root)
        #: where the workers read tiles: the bucket (STORE=s3://, a tcp:// cluster) or the store path
        self.source: str | BucketSource = self.store_root
        bucket = _BUCKET_SOURCE.get()
        if bucket is not None and self.kind == "tcp":
            self.source = bucket
        self.threads = threads
        self.connect_timeout = connect_timeout
        self.workers = 0
        self._target = target
        self._cluster: Any = None
        self.client: Any = None
        self.address = str(target) if self.kind == "tcp" else ""
        record = read_engine_json(self.engine_dir)
        self.key = str(record["key"])
        extra = [n for n in HEAD_FILES if (self.engine_dir / n).is_file()]
        self._files = ["engine.json", str(record["engine_file"]), *extra]

    def __enter__(self) -> DaskExecutor:
        try:  # a Ctrl-C as it starts is taken once it has: a half-made cluster prints tracebacks
            with deferred_interrupts():
                self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        threads = self.threads
        if self.kind == "local":
            n = int(self._target)
            if threads is None:  # this machine's CPUs shared by every task thread of every worker
                threads = max(1, usable_cpus() // (n * _LOCAL_THREADS_PER_WORKER))
            try:
                self._cluster = LocalCluster(
                    n_workers=n,
                    threads_per_worker=_LOCAL_THREADS_PER_WORKER,
                    processes=True,
                    host="127.0.0.1",
                    scheduler_port=0,
                    dashboard_address=None,
                    # no dashboard; the scheduler's HTTP server (health) on a free port, not 8787
                    scheduler_kwargs={"dashboard_address": ":0"},
                    silence_logs=logging.CRITICAL,
                )
            except Exception as exc:
                raise BuildError(
                    f"DASK_SCHEDULER={self.scheduler}: the local Dask cluster did not start: "
                    f"{type(exc).__name__}: {exc}",
                    remedy="use fewer workers, or unset DASK_SCHEDULER to describe in this process",
                    phase=_PHASE,
                ) from exc
            self.address = self._cluster.scheduler_address
        self.client = _connect(self.address, self.connect_timeout)
        files = {name: (self.engine_dir / name).read_bytes() for name in self._files}
        self.client.register_plugin(
            EnginePlugin(self.key, files, threads), name=_plugin_name(self.key)
        )
        self.workers = len(self.client.nthreads())

    def __exit__(self, *exc: object) -> None:
        with deferred_interrupts():  # closed whole, as it started
            client, cluster, self.client, self._cluster = self.client, self._cluster, None, None
            try:
                if client is not None:
                    client.close()
            finally:
                if cluster is not None:
                    cluster.close()

    def _window(self) -> int:
        threads = sum(self.client.nthreads().values())
        return max(2, _WINDOW_PER_THREAD * max(1, threads))

    def run(self, work: Iterator[tuple[Any, ...]], task: Any = None) -> Iterator[tuple[Any, Any]]:
        """Yield ``(meta, result)`` for each ``(meta, ids, digests, *extra)`` of ``work``.

        ``result``: what ``task(key, source, ids, digests, *extra)`` returned on
        a worker (default :func:`describe_batch`: ``(descriptors, thumbnails)``).
        Results come in the order they finish, each batch exactly once.
        """
        import numpy as np

        client = self.client
        run_id = uuid.uuid4().hex[:12]
        pending: dict[Any, tuple[int, Any, Any]] = {}
        seen: set[int] = set()
        counter = iter(range(1 << 62))
        no_workers_since: float | None = None

        def submit() -> bool:
            item = next(work, None)
            if item is None:
                return False
            meta, ids, digests, *extra = item
            b = next(counter)
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            fut = client.submit(
                task or describe_batch, self.key, self.source, ids,
                np.ascontiguousarray(digests, dtype=np.uint8), *extra,
                key=f"{_KEY_PREFIX}-{run_id}-{b}",
            )  # fmt: skip
            pending[fut] = (b, meta, ids)
            return True

        try:
            window = self._window()
            while len(pending) < window and submit():
                pass
            while pending:
                try:
                    with client.as_current():
                        done, _ = wait(
                            list(pending), timeout=_POLL_S, return_when="FIRST_COMPLETED"
                        )
                except TimeoutError:
                    nthreads = client.nthreads()
                    self.workers = max(self.workers, len(nthreads))
                    if nthreads:
                        no_workers_since = None
                        # workers that joined since get work too
                        window = max(window, _WINDOW_PER_THREAD * sum(nthreads.values()))
                        while len(pending) < window and submit():
                            pass
                    elif no_workers_since is None:
                        no_workers_since = time.monotonic()
                    elif time.monotonic() - no_workers_since > NO_WORKERS_TIMEOUT_S:
                        raise BuildError(
                            f"the Dask cluster at {self.address} has had no workers for "
                            f"{NO_WORKERS_TIMEOUT_S:.0f} s while {len(pending)} describe batches waited",
                            remedy=_REMEDY,
                            phase=_PHASE,
                        ) from None
                    continue
                for fut in done:
                    b, meta, ids = pending.pop(fut)
                    d = self._result(fut, ids)
                    fut.release()
                    if b in seen:  # never expected: one result per key
                        continue
                    seen.add(b)
                    yield meta, d
                    submit()
            self.workers = max(self.workers, len(client.nthreads()))
        finally:
            if pending:
                client.cancel(list(pending))

    def _result(self, fut: Any, ids: Any) -> Any:
        try:
            return fut.result()
        except WorkerError as exc:
            raise exc.rebuild() from None
        except CacheBuildError:
            raise
        except KilledWorker as exc:
            z, x, y = tile_zxy(ids[0])
            raise BuildError(
                f"Dask workers at {self.address} kept dying on the describe batch of {len(ids)} tiles "
                f"starting at z={z} x={x} y={y}: {exc}",
                remedy="check the workers' logs (memory, GPU) and run build-cache again",
                phase=_PHASE,
            ) from exc
        except Exception as exc:
            z, x, y = tile_zxy(ids[0])
            raise BuildError(
                f"the describe batch of {len(ids)} tiles starting at z={z} x={x} y={y} failed on the "
                f"Dask cluster at {self.address}: {type(exc).__name__}: {exc}",
                remedy=_REMEDY,
                phase=_PHASE,
            ) from exc
