"""``doit gc-store``: keep the shared store within a size, never losing what a cache uses.

The store grows with every flight: tile images (about 20 KiB each) and
descriptors (1 KiB each, per engine).  Collection keeps everything a *known
cache* references and removes the rest, oldest first, until the store fits
in ``MAX_STORE_BYTES`` (without a bound: everything unreferenced).

Which caches are known, and what each references: :mod:`cachebuild.release.gcrefs`.

In order, while the store is over the bound:

1. garbage, always: temp files of dead writers, descriptor shard files or
   tails no index row reaches (a killed describe), index rows whose shard
   is gone, action-cache records that do not parse and action-cache
   objects no record names;
2. unreferenced tile images, whole unreferenced engines' descriptor
   stores (an old model's) and unreferenced action-cache outputs
   (:mod:`cachebuild.store.actioncache`: an index, self-test result or coverage
   map no known cache holds a file with the hash of; the records naming
   one go with it), oldest first (images by fetch time, engines by the
   last build that used them, outputs by when they were stored); a
   removed image's coverage-map thumbnail (:mod:`cachebuild.store.thumbs`) goes
   with it;
3. unreferenced descriptors of referenced engines: the engine's shards are
   rewritten with only the referenced rows (compaction).

If the referenced data alone exceeds the bound, it is kept and a warning
says so.  Sizes are apparent file sizes.  The refs of removed images are
dropped from ``refs.sqlite``, so a later build fetches them again.

Collection takes the store lock exclusively and every known cache's build
lock, without waiting (exit 50 when a build runs); builds wait for it.

numpy is imported inside the functions.  This module does not import doit;
the command is :class:`cachebuild.cli.doitcmds.GcStoreCmd`.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cachebuild._util.report import Report, redact
from cachebuild._util.sizes import human_bytes
from cachebuild.errors import CacheBuildError
from cachebuild.inputs.config import load_settings
from cachebuild.release.gcrefs import known_caches, referenced, referenced_actions
from cachebuild.release.lock import CacheLock
from cachebuild.store.actioncache import ACTIONS_DIR
from cachebuild.store.descriptors import SHARD_ROWS, DescriptorStore, engine_store_dirs
from cachebuild.store.lock import StoreLock
from cachebuild.store.objects import TileStore
from cachebuild.store.thumbs import THUMBS_DIR, ThumbStore

__all__ = [
    "store_bytes",
    "collect_garbage",
    "gc_store_cmd",
]


def _scan_actions(
    root: Path,
) -> tuple[dict[Path, list[str] | None], dict[str, tuple[int, float, Path]]]:
    """``({record path: its object digests, or None when damaged}, {digest: (size, mtime, path)})``."""
    records: dict[Path, list[str] | None] = {}
    objects: dict[str, tuple[int, float, Path]] = {}
    for sub in sorted((root / "ac").glob("*/*.json")):
        try:
            body = json.loads(sub.read_bytes())
            records[sub] = [str(o["sha256"]) for o in body["outputs"].values()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            records[sub] = None
    for sub in (root / "cas").glob("*/*"):
        if len(sub.name) != 64:
            continue
        try:
            st = sub.stat()
        except OSError:
            continue
        objects[sub.name] = (st.st_size, st.st_mtime, sub)
    return records, objects


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def store_bytes(store_root: str | os.PathLike[str]) -> int:
    """Apparent size of every file under the store."""
    return _tree_bytes(Path(store_root))


def _scan_objects(objects: Path) -> tuple[Any, Any, Any]:
    """``(digests void[n], sizes int64[n], mtimes float64[n])`` of every stored image."""
    import numpy as np

    names: list[bytes] = []
    sizes: list[int] = []
    mtimes: list[float] = []
    if objects.is_dir():
        for sub in os.scandir(objects):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if len(entry.name) != 64:
                    continue
                try:
                    st = entry.stat()
                    raw = bytes.fromhex(entry.name)
                except (OSError, ValueError):
                    continue
                names.append(raw)
                sizes.append(st.st_size)
                mtimes.append(st.st_mtime)
    digests = np.frombuffer(b"".join(names), dtype=np.dtype((np.void, 32))).copy()
    return digests, np.array(sizes, dtype=np.int64), np.array(mtimes, dtype=np.float64)


def _unlink_size(path: Path) -> int:
    """Remove a file; its size, or 0 when it was already gone."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _in(sorted_set: Any, values: Any) -> Any:
    import numpy as np

    if not len(sorted_set) or not len(values):
        return np.zeros(len(values), dtype=bool)
    pos = np.clip(np.searchsorted(sorted_set, values), 0, len(sorted_set) - 1)
    return sorted_set[pos] == values


def _engine_dim(engine_dir: Path) -> int | None:
    try:
        return int(json.loads((engine_dir / "meta.json").read_text())["dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _clean_engine(ds: DescriptorStore) -> int:
    """Remove unreachable shard files, tails and rows; returns bytes freed."""
    db = ds.conn()
    shards = dict(db.execute("SELECT name, rows FROM shards").fetchall())
    freed = 0
    for f in list(ds.shards_dir.iterdir()):
        rows = shards.get(f.stem)
        size = f.stat().st_size
        if rows is None:
            f.unlink()
            freed += size
        elif size > rows * ds.row_bytes:
            os.truncate(f, rows * ds.row_bytes)
            freed += size - rows * ds.row_bytes
    missing = [name for name in shards if not (ds.shards_dir / f"{name}.f32").is_file()]
    if missing:
        db.execute("BEGIN IMMEDIATE")
        for name in missing:
            (sid,) = db.execute("SELECT id FROM shards WHERE name = ?", (name,)).fetchone()
            db.execute("DELETE FROM descriptors WHERE shard = ?", (sid,))
            db.execute("DELETE FROM shards WHERE id = ?", (sid,))
        db.execute("COMMIT")
    return freed


def _compact(ds: DescriptorStore, keep: Any) -> tuple[int, int]:
    """Rewrite the engine's shards with only the ``keep`` digests; ``(rows dropped, bytes freed)``."""
    import numpy as np

    db = ds.conn()
    rows = db.execute("SELECT sha256, shard, row FROM descriptors ORDER BY shard, row").fetchall()
    if not rows:
        return 0, 0
    digests = np.frombuffer(b"".join(r[0] for r in rows), dtype=np.dtype((np.void, 32)))
    loc = np.array([(r[1], r[2]) for r in rows], dtype=np.int64)
    mask = _in(keep, digests)
    dropped = int(len(rows) - mask.sum())
    if dropped == 0:
        return 0, 0
    before = _tree_bytes(ds.shards_dir)
    kept_loc, kept_digests = loc[mask], digests[mask]
    new: list[tuple[str, int]] = []
    records: list[tuple[bytes, int, int]] = []
    fh = None
    try:
        for i in range(0, len(kept_loc), 16_384):
            vectors = ds.read(kept_loc[i : i + 16_384, 0], kept_loc[i : i + 16_384, 1])
            for j, vec in enumerate(vectors):
                if fh is None or new[-1][1] >= SHARD_ROWS:
                    if fh is not None:
                        fh.flush()
                        os.fdatasync(fh.fileno())
                        fh.close()
                    new.append((f"{os.getpid()}-{uuid.uuid4().hex[:12]}", 0))
                    fh = open(ds.shards_dir / f"{new[-1][0]}.f32", "wb")
                fh.write(vec.astype("<f4").tobytes())
                records.append((kept_digests[i + j].tobytes(), len(new) - 1, new[-1][1]))
                new[-1] = (new[-1][0], new[-1][1] + 1)
        if fh is not None:
            fh.flush()
            os.fdatasync(fh.fileno())
            fh.close()
            fh = None
        old = [r[0] for r in db.execute("SELECT name FROM shards").fetchall()]
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM descriptors")
        db.execute("DELETE FROM shards")
        ids = []
        for name, count in new:
            ids.append(
                int(
                    db.execute(
                        "INSERT INTO shards (name, rows) VALUES (?, ?)", (name, count)
                    ).lastrowid
                    or 0
                )
            )
        db.executemany(
            "INSERT INTO descriptors VALUES (?, ?, ?)", ((d, ids[s], r) for d, s, r in records)
        )
        db.execute("COMMIT")
    except BaseException:
        if fh is not None:
            fh.close()
        for name, _ in new:  # the old shards are still the indexed ones
            (ds.shards_dir / f"{name}.f32").unlink(missing_ok=True)
        raise
    ds._names.clear()
    for name in old:
        (ds.shards_dir / f"{name}.f32").unlink(missing_ok=True)
    db.execute("VACUUM")
    return dropped, max(0, before - _tree_bytes(ds.shards_dir))


def _drop_refs(store_root: Path, gone: list[str]) -> None:
    """Forget which tiles the removed images served (refs.sqlite), so they are fetched again."""
    path = store_root / "refs.sqlite"
    if not gone or not path.is_file():
        return
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        db.execute("CREATE TEMP TABLE gone (sha256 TEXT PRIMARY KEY)")
        db.executemany("INSERT OR IGNORE INTO gone VALUES (?)", ((d,) for d in gone))
        db.execute("BEGIN IMMEDIATE")
        for table in ("tile_refs", "object_checks"):
            if table in tables:
                db.execute(f"DELETE FROM {table} WHERE sha256 IN (SELECT sha256 FROM gone)")
        db.execute("COMMIT")
    finally:
        db.close()


def _drop_thumbs(store_root: Path, gone: list[str]) -> int:
    """Drop the coverage-map thumbnails of removed images (:mod:`cachebuild.store.thumbs`)."""

    if not gone or not (store_root / THUMBS_DIR / "thumbs.sqlite").is_file():
        return 0
    with ThumbStore(store_root) as ts:
        return ts.drop(bytes.fromhex(d) for d in gone)


def collect_garbage(
    store_root: str | os.PathLike[str],
    caches: Iterable[Path],
    max_bytes: int | None,
    *,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Shrink the store to ``max_bytes`` keeping what ``caches`` reference.

    The caller holds the store lock exclusively (:func:`gc_store_cmd` does).

    Parameters
    ----------
    store_root
        The store.
    caches
        Every cache directory whose references are kept.
    max_bytes
        The bound; ``None`` removes everything unreferenced.
    warn
        Called with a message when the referenced data alone exceeds the bound.

    Returns
    -------
    dict
        ``bytes_before``, ``bytes_after``, ``max_bytes``, ``caches``,
        ``removed`` {``garbage_bytes``, ``tiles``, ``tile_bytes``,
        ``engines``, ``descriptors``, ``descriptor_bytes``, ``action_outputs``,
        ``action_bytes``, ``thumbnails``} and ``kept`` {``tiles``,
        ``engines``, ``action_outputs``}.
    """
    root = Path(store_root)
    caches = list(caches)
    target = 0 if max_bytes is None else int(max_bytes)
    live_tiles, live_desc = referenced(caches)
    live_actions = referenced_actions(caches)
    before = store_bytes(root)
    removed = {
        "garbage_bytes": 0, "tiles": 0, "tile_bytes": 0, "engines": 0, "descriptors": 0, "descriptor_bytes": 0,
        "action_outputs": 0, "action_bytes": 0,
    }  # fmt: skip

    # 1. garbage
    engines, records, action_objects = _remove_garbage(root, live_actions, removed)
    total = before - removed["garbage_bytes"]
    # 2. unreferenced images and engines, oldest first
    live = (live_tiles, live_desc, live_actions)
    total, images = _remove_unreferenced(
        root, total, target, live, engines, records, action_objects, removed
    )
    # 3. unreferenced descriptors of referenced engines
    _compact_engines(root, total, target, engines, live, removed)

    after = store_bytes(root)
    if after > target and max_bytes is not None and warn is not None:
        warn(
            f"the store holds {after} bytes, above MAX_STORE_BYTES={max_bytes}: what the "
            f"{len(caches)} known cache(s) reference is kept"
        )
    return {
        "store": str(root),
        "max_bytes": max_bytes,
        "caches": [str(c) for c in caches],
        "bytes_before": before,
        "bytes_after": after,
        "removed": removed,
        "kept": {
            "tiles": int(images - removed["tiles"]),
            "engines": len(engines),
            "action_outputs": len(action_objects) - removed["action_outputs"],
        },
    }


def _remove_garbage(
    root: Path, live_actions: set[str], removed: dict[str, int]
) -> tuple[dict[str, Path], dict[Path, list[str] | None], dict[str, tuple[int, float, Path]]]:
    """Step 1: what nothing can use, always; ``(engines, action records, action objects)`` left.

    Temp files of dead writers, engines that never finished creating, their
    unreachable shard rows, and the action cache's temp files, damaged
    records and objects no record names.  Counts into ``removed``.
    """
    with TileStore(root) as store:
        tmp_before = _tree_bytes(store.tmp)
        store.clean_tmp(older_than_s=0.0)
        removed["garbage_bytes"] += tmp_before - _tree_bytes(store.tmp)
    engines: dict[str, Path] = {}
    for d in engine_store_dirs(root):
        dim = _engine_dim(d)
        if dim is None:  # never finished creating: nothing can reference its rows
            removed["garbage_bytes"] += _tree_bytes(d)
            shutil.rmtree(d, ignore_errors=True)
            continue
        with DescriptorStore(root, d.name, dim) as ds:
            removed["garbage_bytes"] += _clean_engine(ds)
        engines[d.name] = d
    # the action cache's temp files, damaged records, objects no record names

    actions = root / ACTIONS_DIR
    removed["garbage_bytes"] += _tree_bytes(actions / "tmp")
    shutil.rmtree(actions / "tmp", ignore_errors=True)
    records, action_objects = _scan_actions(actions)
    named = {d for names in records.values() if names for d in names}
    for rec, names in list(records.items()):
        if names is None:
            removed["garbage_bytes"] += _unlink_size(rec)
            del records[rec]
    for digest in [d for d in action_objects if d not in named and d not in live_actions]:
        removed["garbage_bytes"] += _unlink_size(action_objects.pop(digest)[2])
    return engines, records, action_objects


def _remove_unreferenced(
    root: Path,
    total: int,
    target: int,
    live: tuple[Any, dict[str, Any], set[str]],
    engines: dict[str, Path],
    records: dict[Path, list[str] | None],
    action_objects: dict[str, tuple[int, float, Path]],
    removed: dict[str, int],
) -> tuple[int, int]:
    """Step 2: unreferenced images, engines and action outputs, oldest first, while over ``target``.

    ``live`` is ``(tile digests, {engine key: digests}, action digests)``.
    Returns ``(store bytes left, images the store held)``; counts into ``removed``.
    """
    import numpy as np

    live_tiles, live_desc, live_actions = live
    digests, sizes, mtimes = _scan_objects(root / "objects")
    unref = np.flatnonzero(~_in(live_tiles, digests))
    candidates: list[tuple[float, str, Any]] = [(float(mtimes[i]), "tile", int(i)) for i in unref]
    for key, d in engines.items():
        if key not in live_desc:
            candidates.append((os.stat(d / "meta.json").st_mtime, "engine", key))
    for digest, (_, mtime, _) in action_objects.items():
        if digest not in live_actions:
            candidates.append((mtime, "action", digest))
    candidates.sort(key=lambda c: (c[0], c[1]))
    gone: list[str] = []
    for _, what, item in candidates:
        if total <= target:
            break
        if what == "tile":
            digest = bytes(digests[item]).hex()
            try:
                os.unlink(root / "objects" / digest[:2] / digest)
            except FileNotFoundError:
                continue
            gone.append(digest)
            total -= int(sizes[item])
            removed["tiles"] += 1
            removed["tile_bytes"] += int(sizes[item])
        elif what == "action":  # an output nothing uses, and the records that name it
            size = _unlink_size(action_objects[item][2])
            # ``names``, not ``digests``: the tile digests are still indexed by later candidates
            for rec, names in list(records.items()):
                if names and item in names:
                    size += _unlink_size(rec)
                    del records[rec]
            total -= size
            removed["action_outputs"] += 1
            removed["action_bytes"] += size
        else:
            size = _tree_bytes(engines[item])
            shutil.rmtree(engines.pop(item), ignore_errors=True)
            total -= size
            removed["engines"] += 1
            removed["descriptor_bytes"] += size
    _drop_refs(root, gone)
    removed["thumbnails"] = _drop_thumbs(root, gone)
    return total, len(digests)


def _compact_engines(
    root: Path,
    total: int,
    target: int,
    engines: dict[str, Path],
    live: tuple[Any, dict[str, Any], set[str]],
    removed: dict[str, int],
) -> None:
    """Step 3: referenced engines' shards rewritten with only referenced rows, oldest engine first.

    Stops once the store fits ``target``; counts into ``removed``.
    """
    live_tiles, live_desc, _ = live
    for key in sorted(engines, key=lambda k: os.stat(engines[k] / "meta.json").st_mtime):
        if total <= target:
            break
        dim = _engine_dim(engines[key])
        with DescriptorStore(root, key, int(dim or 0)) as ds:
            rows, freed = _compact(ds, live_desc.get(key, live_tiles[:0]))
        total -= freed
        removed["descriptors"] += rows
        removed["descriptor_bytes"] += freed


def gc_store_cmd(vars: Mapping[str, str], env: Mapping[str, str] | None = None) -> int:
    """``doit gc-store [MAX_STORE_BYTES=20G]``: collect under the locks, report, exit code."""

    raw = (
        vars.get("REPORT")
        or (env if env is not None else os.environ).get("CACHEBUILD_REPORT")
        or "text"
    )
    fmt = "json" if raw.lower() == "json" else "text"
    report = Report("gc-store")

    def warn(msg: str) -> None:
        report.warnings.append(msg)
        sys.stderr.write(f"WARNING: {redact(msg)}\n")

    try:
        settings = load_settings(vars, env)
        t = time.monotonic()
        with ExitStack() as locks:
            locks.enter_context(StoreLock(settings.store, exclusive=True, wait=False))
            caches = known_caches(settings.store, settings.cache_dir, settings.home)
            for cache in caches:
                locks.enter_context(CacheLock(cache / "build.lock"))
            report.timed("lock", time.monotonic() - t)
            t = time.monotonic()
            result = collect_garbage(settings.store, caches, settings.max_store_bytes, warn=warn)
            report.timed("gc", time.monotonic() - t)
        report.extra["gc"] = result
        report.outcome = "success"
        report.exit_code = 0
        if fmt == "text":
            r = result["removed"]

            bound = (
                "no bound"
                if result["max_bytes"] is None
                else f"bound {human_bytes(result['max_bytes'])}"
            )
            sys.stderr.write(
                f"gc-store {result['store']} ({bound}, {len(result['caches'])} cache(s) kept): "
                f"{human_bytes(result['bytes_before'])} -> {human_bytes(result['bytes_after'])}; removed {r['tiles']} tile "
                f"images, {r['engines']} engine(s), {r['descriptors']} descriptors, "
                f"{human_bytes(r['garbage_bytes'])} of garbage\n"
            )
    except CacheBuildError as exc:
        report.fail(exc)
    report.emit(fmt)
    return report.exit_code
