"""Find damaged build state before and during a build, and repair it.

What a build keeps between runs can be damaged by a disk, a person or a
crash of something else: doit's database, the staged artifacts, the tile
store.  Each is checked where it is cheap, named in a warning, and repaired
by rebuilding or fetching again; nothing damaged is ever published.

- **doit's database** (``state/doit.sqlite3``) that SQLite cannot read, or
  whose rows doit could not decode: moved aside to ``doit.sqlite3.corrupt``;
  every task then runs again, reusing the store (no tile fetched and no
  descriptor computed twice).
- **Staged artifacts** that do not match the staged manifest (missing, or
  another length: a truncated ``tiles.mbtiles``, say) or a staged manifest
  that is not one: removed, so doit rebuilds them.  A stat per artifact, as
  for the published release (:func:`cachebuild.release.publish.release_intact`).
  Published releases hard-link the staged files, so damage written through
  one shows in both; the rebuilt file is a new one, and the wrapper then
  publishes a new release.
- **Tile images** in the store that are missing or do not hash to their
  name (:class:`cachebuild.errors.StoreObjectError`, raised by whichever
  phase reads them, or by a companion build's push): the object is
  removed, the tile set is marked stale and doit runs once more, so the
  tiles phase fetches it again (and the push runs once more).

Library code reports soft problems as :class:`~cachebuild.errors.CacheBuildWarning`;
:func:`run_repairing` passes them to the report's warnings.
"""

from __future__ import annotations

import json
import os
import sqlite3
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cachebuild._util.sqliteuri import sqlite_uri
from cachebuild.errors import CacheBuildWarning, StoreObjectError
from cachebuild.errors import StoreObjectError as _Bad
from cachebuild.inputs.config import Paths
from cachebuild.store.objects import read_object
from cachebuild.tileset import hex_digests, read_tiles

__all__ = ["check_doit_db", "check_staged", "run_repairing", "push_repairing", "STALE_TILESET"]

#: The tiles task's target removed to make doit fetch again.
STALE_TILESET = "tileset.json"

_T = TypeVar("_T")


def _db_problem(path: Path) -> str | None:
    """Why doit could not use the database at ``path``, or None."""
    try:
        conn = sqlite3.connect(sqlite_uri(path, mode="ro"), uri=True)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        verdict = conn.execute("PRAGMA quick_check").fetchone()
        if verdict is None or verdict[0] != "ok":
            return f"integrity check: {verdict[0] if verdict else 'no answer'}"
        has_table = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'doit'"
        ).fetchone()
        if not has_table:
            return None  # doit creates it
        for task_id, data in conn.execute("SELECT task_id, task_data FROM doit"):
            try:
                value = json.loads(data)
            except (TypeError, ValueError):
                return f"the state of task {task_id!r} is not JSON"
            if not isinstance(value, dict):
                return f"the state of task {task_id!r} is not a JSON object"
    except sqlite3.Error as exc:
        return str(exc)
    finally:
        conn.close()
    return None


def check_doit_db(paths: Paths, warn: Callable[[str], None]) -> bool:
    """Move aside a doit database doit could not use; True when it did.

    Runs under the cache lock, before doit opens the file.  Its journal
    files go with it: a hot journal left beside a new database would be
    rolled back into it.
    """
    db = paths.dep_file
    if not db.exists():
        return False
    problem = _db_problem(db)
    if problem is None:
        return False
    aside = db.with_name(db.name + ".corrupt")
    os.replace(db, aside)
    for suffix in ("-journal", "-wal", "-shm"):
        side = db.with_name(db.name + suffix)
        if side.exists():
            os.replace(side, aside.with_name(aside.name + suffix))
    warn(
        f"doit's database {db} is damaged ({problem}); moved it to {aside} and started a new one: "
        "every task runs again, reusing the tiles and descriptors in the store"
    )
    return True


def check_staged(paths: Paths, warn: Callable[[str], None]) -> list[str]:
    """Remove staged artifacts that do not match the staged manifest; returns their names.

    Without a staged manifest there is nothing to compare with (doit
    rebuilds what is missing).
    """
    build = paths.build
    manifest = build / "manifest.json"
    if not manifest.exists():
        return []
    try:
        signed = json.loads(manifest.read_bytes())["signed"]
        targets = dict(signed["targets"])
        lengths = {str(rel): int(meta["length"]) for rel, meta in targets.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        manifest.unlink(missing_ok=True)
        warn(
            f"the staged manifest {manifest} is damaged ({type(exc).__name__}); it is signed again"
        )
        return ["manifest.json"]
    damaged = []
    for rel, length in sorted(lengths.items()):
        path = build / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            continue  # not ours to touch; verify-cache refuses such a manifest
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = None
        if size == length:
            continue
        if size is not None:
            path.unlink()
        damaged.append(rel)
        what = "missing" if size is None else f"{size} bytes, the manifest says {length}"
        warn(f"the staged artifact {path} is damaged ({what}); it is built again")
    return damaged


def _scan_tileset(paths: Paths, objects: Path) -> list[str]:
    """Check every image of the staged tile set; remove the corrupt ones.  Returns the bad digests.

    Bit rot seldom strikes one file: one pass finds them all, so one more
    doit run fetches them all.
    """

    try:
        digests = sorted(set(hex_digests(read_tiles(paths.build))))
    except (OSError, ValueError):
        return []  # no tile set: the tiles phase runs anyway
    bad = []
    for d in digests:
        try:
            read_object(objects / d[:2] / d, what=f"object {d}")
        except _Bad:
            bad.append(d)
    return bad


def _stale_tileset(paths: Paths, err: StoreObjectError, warn: Callable[[str], None]) -> None:
    others: list[str] = []
    if err.path:
        others = [d for d in _scan_tileset(paths, Path(err.path).parent.parent) if d != err.digest]
    more = (
        f"; {len(others)} more of the tile set's images were missing or corrupt ({others[0][:12]}…)"
        if others
        else ""
    )
    warn(f"{err.message}{more}; fetching {'them' if others else 'it'} again")
    (paths.build / STALE_TILESET).unlink(missing_ok=True)


def run_repairing(
    paths: Paths,
    warn: Callable[[str], None],
    run: Callable[[], int],
    reporter: Any,
    failures: list[Any] | None = None,
) -> int:
    """Check doit's database and the staged artifacts, then ``run()`` doit.

    When a phase found a tile image in the store missing or corrupt (the
    object is gone by then), the tile set is marked stale and doit runs
    once more: the tiles phase fetches the image again.  ``reporter`` (the
    runner's recording reporter) is told only the last run's failures and
    lists each task that ran once.  ``failures`` is the actions' failure
    list (:data:`targets.actions.FAILURES`).  Returns doit's exit code.
    """
    if failures is None:
        from targets.actions import FAILURES as failures
    check_doit_db(paths, warn)
    check_staged(paths, warn)
    code = _run_forwarding_warnings(run, warn)
    if code != 0 and failures and isinstance(failures[-1], StoreObjectError):
        _stale_tileset(paths, failures[-1], warn)
        failures.clear()
        code = _again(reporter, lambda: _run_forwarding_warnings(run, warn))
    return code


def _again(reporter: Any, run: Callable[[], _T]) -> _T:
    """``run()`` doit once more, ``reporter`` then listing each task that ran once."""
    ran = list(reporter.ran)
    reporter.failed.clear()
    reporter.errors.clear()
    reporter.ran.clear()
    reporter.up_to_date.clear()
    code = run()
    reporter.ran[:0] = [t for t in ran if t not in reporter.ran]
    reporter.up_to_date[:] = [t for t in reporter.up_to_date if t not in reporter.ran]
    return code


def push_repairing(
    paths: Paths,
    warn: Callable[[str], None],
    push: Callable[[], None],
    run: Callable[[], None],
    reporter: Any,
) -> None:
    """``push()`` (a companion build: push, build there), repairing the store it reads from.

    The push reads each tile image checked; when it finds one corrupt (a
    :class:`StoreObjectError`, the object removed by then), the tile set is
    marked stale as for a phase that read it (:func:`run_repairing`),
    ``run()`` runs the workstation's tasks once more (the tiles phase
    fetches the image again; it raises when they fail) and ``push()`` runs
    once more.
    """
    try:
        push()
        return
    except StoreObjectError as err:
        _stale_tileset(paths, err, warn)
    _again(reporter, run)
    push()


def _run_forwarding_warnings(run: Callable[[], int], warn: Callable[[str], None]) -> int:
    """``run()``, passing every :class:`CacheBuildWarning` it raised to ``warn``.

    Other warnings are issued again once the recording has stopped.
    """
    caught: list[Any] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CacheBuildWarning)
            return run()
    finally:
        for w in caught:
            if issubclass(w.category, CacheBuildWarning):
                warn(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
