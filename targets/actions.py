"""The functions doit actions call: one per artifact, plus failure recording.

Each action runs the library function for its phase.  A
:class:`~cachebuild.errors.CacheBuildError` is recorded (so the wrapper can
map it to the phase's exit code and message) and the action returns False,
which doit treats as a task failure.  Actions refuse to run unless the
wrapper holds the cache lock: running a task straight from ``doit <task>``
would bypass it.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_write
from cachebuild._util.statcache import HASH_CACHE_NAME
from cachebuild.engine.interface import read_engine_json
from cachebuild.engine.model import write_default_model
from cachebuild.errors import BuildError, CacheBuildError, UsageError
from cachebuild.localize.selftest import FRAMES_FILE, SELFTEST_FILE, run_selftest, write_selftest
from cachebuild.release.rollback import highest_accepted
from cachebuild.release.signing import load_private_key
from cachebuild.store.lock import store_user
from cachebuild.tilemath import LngLatBbox
from cachebuild.tiles.preview import render_preview
from cachebuild.tileset import read_summary
from targets.cached import cached

__all__ = [
    "ACTIVE",
    "OPTIONAL_ARTIFACTS",
    "FAILURES",
    "phase_action",
    "write_flight",
    "write_model",
    "fetch",
    "stop_describe_ahead",
    "write_tiles_mbtiles",
    "build_engine",
    "describe",
    "index",
    "selftest",
    "preview",
    "manifest",
    "store_user",
    "CACHE_ARTIFACTS",
    "cache_artifacts",
]

#: Set by the wrapper while it holds the lock (same process: doit runs
#: python-actions in-process).
ACTIVE: dict[str, Any] = {"locked": False}
#: Failures recorded by actions in this process, newest last.
FAILURES: list[CacheBuildError] = []

#: Files of a published cache, relative to the build directory; the manifest
#: lists each with its hash, plus the manifest and signer key themselves.
#: ``{engine}`` is the backend's engine file (engine.onnx for ONNX Runtime).
CACHE_ARTIFACTS = (
    "flight.json",
    "tileset.json",
    "tiles.npy",
    "missing.npy",
    "tiles.mbtiles",
    "engine/engine.json",
    "engine/{engine}",
    "descriptors.npy",
    "descriptor_ids.npy",
    "cells.npy",
    "windows.json",
    "index.faiss",
    "index.json",
    "positions.npy",
    "selftest.json",
    "preview.png",
    "engine/cells.onnx",
)
#: Artifacts signed only where the build made them: the frame-to-cells model
#: of the second stage exists for a poolable network only (the built-in one).
OPTIONAL_ARTIFACTS = ("engine/cells.onnx",)


def cache_artifacts(engine_file: str) -> list[str]:
    """:data:`CACHE_ARTIFACTS` with the backend's engine file name filled in."""
    return [a.format(engine=engine_file) for a in CACHE_ARTIFACTS]


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` wraps a KeyboardInterrupt (pybind11 turns one raised while a
    module initialises into ``ImportError: initialization failed``, its cause)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def phase_action(phase: str, fn: Callable[..., Any]) -> Callable[..., bool]:
    """Wrap ``fn`` as a doit python-action for ``phase``."""

    def action(**kwargs: Any) -> bool:
        if not ACTIVE["locked"]:
            FAILURES.append(
                UsageError(
                    f"task '{phase}' must run through `doit build-cache`, which holds the cache lock",
                    phase=phase,
                )
            )
            sys.stderr.write(f"ERROR: {FAILURES[-1]}\n")
            return False
        try:
            fn(**kwargs)
        except CacheBuildError as exc:
            if exc.phase in ("build",):
                exc.phase = phase
            FAILURES.append(exc)
            return False
        except Exception as exc:  # a bug, or a library error not translated yet
            from cachebuild._util.diskspace import disk_full_error, is_disk_full

            if _interrupted(exc):  # Ctrl-C inside a C extension's import: an interrupt
                raise KeyboardInterrupt from exc
            if is_disk_full(exc):  # ENOSPC, EDQUOT, SQLITE_FULL: exit 24, not a bug
                FAILURES.append(disk_full_error(exc, phase))
                return False
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            err = BuildError(f"{phase} failed: {detail}", phase=phase)
            err.__cause__ = exc
            err.traceback = traceback.format_exc()  # type: ignore[attr-defined]
            FAILURES.append(err)
            return False
        return True

    action.__name__ = f"{phase}_action"
    action.__qualname__ = action.__name__
    return action


def _atomic_json(path: Path, obj: Any) -> None:

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), durable=False)


def write_flight(*, path: str, record: dict[str, Any]) -> None:
    _atomic_json(Path(path), record)


def write_model(*, path: str) -> None:

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_default_model(Path(path))


def fetch(
    *,
    bbox: list[float],
    zooms: list[int],
    provider: str,
    store: str,
    out_dir: str,
    concurrency: int,
    http: dict[str, str],
    nodata: dict[str, str] | None = None,
    cache_dir: str | None = None,
    shared: str | None = None,
) -> None:
    """The tiles phase; ``shared`` is ``STORE=s3://...`` (``store`` is then its local copy)."""
    import os

    from cachebuild.tiles.fetch import fetch_tiles

    remote = None
    if shared:
        from cachebuild.store.s3 import open_store

        remote = open_store(shared)
    ahead = _describe_ahead(bbox, zooms, store)
    pre = _prepush(store)  # COMPANION with PIPELINE: push while fetching
    with store_user(store, cache_dir):
        try:
            fetch_tiles(
                bbox=LngLatBbox(*bbox),
                zooms=zooms,
                provider_spec=provider,
                store_root=Path(store),
                out_dir=Path(out_dir),
                # secrets (API key, headers) come from the environment, never through doit
                env={**os.environ, **http, **(nodata or {})},
                concurrency=concurrency,
                shared=remote,
                observer=ahead or pre,
            )
        except BaseException:
            if ahead is not None:  # what it described is kept; the rest is describe's
                ahead.abort()
            if pre is not None:  # what arrived there is kept; the rest is the push's
                pre.abort()
            raise
    if ahead is not None:
        ahead.finish()  # it describes the last anchors while the next tasks run
    if pre is not None:
        pre.finish()  # it sends what is left; the companion flow waits for it
    ACTIVE["fetch_ended"] = time.monotonic()


def _describe_ahead(bbox: list[float] | None, zooms: list[int], store: str) -> Any:
    """The tiles phase's background describer (``PIPELINE``, docs/design/pipeline.md), or None.

    Set up by the wrapper in ``ACTIVE["describe_ahead"]``, and only once this
    run's engine task is done (it runs first then): the describer uses it.
    """
    stop_describe_ahead()  # a run repaired and run again starts afresh
    cfg = ACTIVE.get("describe_ahead")
    if not cfg or bbox is None or not cfg["engine_ready"]():
        return None
    from cachebuild.localize.describe_ahead import DescribeAhead

    ahead = DescribeAhead(
        store, cfg["engine_dir"], bbox=bbox, zooms=zooms, stride=cfg["stride"],
        batch_size=cfg["batch"], threads=cfg["threads"],
    )  # fmt: skip
    ACTIVE["ahead"] = ahead
    return ahead


def _prepush(store: str) -> Any:
    """The tiles phase's pre-push to the companion (docs/design/pipeline.md), or None.

    Set up by the wrapper in ``ACTIVE["prepush"]`` (the settings) in companion
    mode with ``PIPELINE`` on; the wrapper hands it to the companion flow.
    """
    old = ACTIVE.pop("prepush_run", None)
    if old is not None:  # a run repaired and run again starts afresh
        old.abort()
    settings = ACTIVE.get("prepush")
    if settings is None:
        return None
    # here, not at the top: the warm no-op imports this module, and only companion builds need it
    from cachebuild.companion.prepush import PrePush

    pre = PrePush.for_settings(settings, store)
    ACTIVE["prepush_run"] = pre
    return pre


def take_prepush(abort: bool = False) -> dict[str, Any]:
    """The tiles phase's pre-push and the download's end, for the companion flow (its keywords).

    Taken once: a repaired run's tiles phase starts no other (the flow has
    waited for this one by then).  ``abort``: a failed build stops it.
    """
    ACTIVE["prepush"] = None
    pre = ACTIVE.pop("prepush_run", None)
    if pre is not None and abort:  # what it sent stays there: the next push sends less
        pre.abort()
    return {"prepush": pre, "download_ended": ACTIVE.pop("fetch_ended", None)}


def stop_describe_ahead(wait: bool = False) -> dict[str, Any] | None:
    """End the background describer, if one runs: let it finish (``wait``) or stop it; its stats."""
    ahead = ACTIVE.pop("ahead", None)
    if ahead is None:
        return None
    if not wait:
        ahead.abort()
    try:
        waited = ahead.join()
    except BaseException:  # a Ctrl-C while waiting: stop it, never leave it running the engine
        ahead.abort()
        ahead.join()
        raise
    stats = dict(ahead.stats, describe_waited_s=round(waited, 3) if wait else 0.0)
    ACTIVE["ahead_stats"] = stats
    return stats


def write_tiles_mbtiles(*, build: str, store: str, bbox: list[float], zooms: list[int]) -> None:
    """tiles.mbtiles: the last build's file updated where it can be; its hash remembered for the manifest."""
    from cachebuild.tiles.mbtiles import write_mbtiles

    with store_user(store):
        write_mbtiles(
            tileset_dir=Path(build),
            store_root=Path(store),
            out_path=Path(build) / "tiles.mbtiles",
            name="cachebuild tiles",
            bbox=LngLatBbox(*bbox),
            zooms=zooms,
            hash_cache=Path(build) / HASH_CACHE_NAME,
        )


def build_engine(
    *,
    model: str,
    calibration: str | None,
    precision: str,
    backend: str,
    out_dir: str,
    workspace: int | None = None,
    timing_cache_dir: str | None = None,
) -> None:
    """The engine, then (a poolable network) its feature half, which describes windows."""
    from cachebuild.engine.compile import compile_engine
    from cachebuild.engine.features import compile_features

    common: dict[str, Any] = {
        "calibration_path": Path(calibration) if calibration else None,
        "precision": precision,
        "backend": backend,
        "workspace": workspace,
        "timing_cache_dir": timing_cache_dir,
    }
    compile_engine(model_path=Path(model), out_dir=Path(out_dir), **common)
    compile_features(model_path=Path(model), engine_dir=Path(out_dir), **common)


def describe(
    *,
    build: str,
    store: str,
    batch: int,
    threads: int | None,
    cache_dir: str | None = None,
    shared: str | None = None,
    dask_scheduler: str | None = None,
    stride: int = 1,
) -> None:
    """Describe the windows the descriptor store lacks; write the descriptors, windows.json and describe.json.

    With ``dask_scheduler`` (``DASK_SCHEDULER``) the engine runs on that Dask
    cluster; this process still writes every descriptor (docs/scale.md).

    With ``shared`` (``STORE=s3://...``) the descriptors the bucket has are
    imported first and the ones it lacks uploaded after.
    """
    from cachebuild.localize.describe import DESCRIBE_SUMMARY, describe_tiles
    from cachebuild.localize.describe_windows import WINDOWS_FILE
    from cachebuild.localize.windows import window_record

    remote = None
    if shared:
        from cachebuild.localize.s3desc import pull_descriptors, push_descriptors
        from cachebuild.store.s3 import open_store

        remote = open_store(shared)
    from contextlib import nullcontext

    workers_read: Any = nullcontext()
    if (
        remote is not None and dask_scheduler is not None
    ):  # tcp:// workers read tiles from the bucket
        from cachebuild.localize.daskexec import workers_read_bucket

        workers_read = workers_read_bucket(str(remote.url), read_summary(Path(build))["provider"])
    stop_describe_ahead(wait=True)  # the blocks it is describing are then in the store
    with store_user(store, cache_dir), workers_read:
        _atomic_json(Path(build) / WINDOWS_FILE, window_record(Path(build) / "engine", stride))
        have = pull_descriptors(remote, Path(store), Path(build)) if remote is not None else None
        result = describe_tiles(
            tileset_dir=Path(build),
            store_root=Path(store),
            engine_dir=Path(build) / "engine",
            out_dir=Path(build),
            batch_size=batch,
            threads=threads,
            reuse=True,
            dask_scheduler=dask_scheduler,
            window_stride=stride,
            hash_cache=Path(build)
            / HASH_CACHE_NAME,  # the arrays' hashes, taken as they are written
        )
        if remote is not None and have is not None:
            push_descriptors(remote, Path(store), Path(build), have)
    result["seconds"] = round(result["seconds"], 3)
    for key in ("tiles_per_s", "computed_per_s", "windows_per_s"):
        result[key] = round(result[key], 1)
    _atomic_json(Path(build) / DESCRIBE_SUMMARY, result)


def _action_cached(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The action served from the action cache (cachebuild.store.actioncache, docs/scale.md) when its
    inputs' hashes match an earlier run's; ACTIVE carries the store, the bucket URL and the
    report's hits and misses, set by the wrapper."""

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:

        return cached(name, fn, lambda: ACTIVE)

    return wrap


@_action_cached("index")
def index(*, build: str, kind: str = "auto") -> None:
    """The index over the staged descriptors; the last build's trained IVF quantizer is reused when it fits."""
    from cachebuild.localize.index import build_index
    from cachebuild.localize.index_files import write_index_json

    b = Path(build)
    info = build_index(
        descriptors_dir=b,
        out_path=b / "index.faiss",
        kind=kind,
        reuse=True,
        engine_key=read_engine_json(b / "engine").get("key"),
        hash_cache=b / HASH_CACHE_NAME,  # index.faiss hashed as it is written, not read again
    )
    write_index_json(b, info)  # index.json: content; index-run.json: this build's history


@_action_cached("selftest")
def selftest(*, build: str, store: str, queries: int, threads: int | None) -> None:
    """The localisation self-test over the staged cache (selftest.json)."""

    b = Path(build)
    with store_user(store):
        result = run_selftest(
            build_dir=b,
            store_root=Path(store),
            engine_dir=b / "engine",
            index_path=b / "index.faiss",
            queries=queries,
            threads=threads,
            frames_file=b / FRAMES_FILE,  # frames the last build described are not described again
        )
    write_selftest(b / SELFTEST_FILE, result)


@_action_cached("preview")
def preview(*, build: str, store: str) -> None:
    """The coverage map of the staged cache (preview.png), thumbnails kept in the store."""

    b = Path(build)
    with store_user(store):
        render_preview(b, b / "preview.png", store=Path(store), cells_dir=b)


def _previous_version(current: Path) -> int:
    """The highest version this cache published or accepted (cachebuild.release.rollback): the next is above it."""

    accepted = highest_accepted(current.parent, tolerant=True)  # current = CACHE_DIR/current
    try:
        env = json.loads((current / "manifest.json").read_text())
        return max(int(env["signed"]["version"]), accepted)
    except (OSError, ValueError, KeyError, TypeError):
        return accepted


def manifest(
    *, build: str, current: str, key: str, expires_days: float, artifacts: list[str]
) -> None:
    """Sign the manifest over every artifact of the staged cache."""
    import numpy as np

    from cachebuild.localize.describe_windows import WINDOWS_FILE
    from cachebuild.release.manifest import build_identity, write_manifest
    from cachebuild.store.windowkeys import tile_windows

    b = Path(build)
    artifacts = [a for a in artifacts if a not in OPTIONAL_ARTIFACTS or (b / a).is_file()]
    record = json.loads((b / "flight.json").read_text())
    summary = read_summary(b)
    engine = json.loads((b / "engine" / "engine.json").read_text())
    index_info = json.loads((b / "index.json").read_text())
    selftest_info = json.loads((b / "selftest.json").read_text())
    places = np.load(b / "descriptor_ids.npy", mmap_mode="r")
    n_desc = int(tile_windows(places).sum())  # every present tile's own window is indexed
    windows = json.loads((b / WINDOWS_FILE).read_text())
    build_id, identity = build_identity(
        bbox=summary["bbox"],
        zooms=summary["zooms"],
        takeoff_origin=record["takeoff_origin"],
        flight_id=record["flight_id"],
        calibration_sha256=engine.get("calibration_sha256"),
        tiles_sha256=summary["aggregate_sha256"],
        engine_key=engine["key"],
    )
    info = {
        "tiles": {k: summary[k] for k in ("planned", "present", "missing")},
        "missing_examples": summary.get("missing_examples", []),
        "provider": summary["provider"],
        "descriptors": n_desc,
        "windows": {"count": int(len(places)), **windows},
        "engine": {
            k: engine.get(k) for k in ("backend", "backend_version", "device", "precision", "key")
        },
        "index": {k: v for k, v in index_info.items() if k != "seconds"},
        # None when no frame could be made (no tile with all eight neighbours, or
        # SELFTEST_QUERIES=0): selftest.json, in the cache, says why
        "selftest": selftest_info if selftest_info.get("queries") else None,
    }
    now = datetime.now(timezone.utc).replace(microsecond=0)
    write_manifest(
        cache_dir=b,
        artifacts=artifacts,
        identity=identity,
        build_id=build_id,
        info=info,
        key=load_private_key(Path(key)),
        version=_previous_version(Path(current)) + 1,
        expires_at=now + timedelta(days=expires_days),
        hash_cache=b
        / HASH_CACHE_NAME,  # an artifact unchanged since it was hashed is not read again
        check_produced=True,  # sign only what the build's tasks wrote (cachebuild.release.produced)
    )
