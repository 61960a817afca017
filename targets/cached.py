"""The three artifacts the action cache serves (index, self-test, coverage map).

Each ``*_action`` says what an artifact is made from, so that
:mod:`cachebuild.store.actioncache` can key it by its inputs' hashes;
:func:`cached` wraps a task's action so a hit copies the outputs instead of
running it (docs/scale.md).  The specs live here, beside the actions, because
they name what the tasks read: the store knows only keys and bytes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cachebuild._util.dists import installed_version
from cachebuild.localize.selftest import SELFTEST_VERSION
from cachebuild.store.actioncache import (
    OUTPUTS,
    Action,
    ActionCache,
    action_key,
    code_version,
)
from cachebuild.store.lock import store_user
from cachebuild.store.s3 import open_store
from cachebuild.tiles.preview import DEFAULT_SIZE, PREVIEW_VERSION

__all__ = ["SPECS", "action_for", "cached", "index_action", "preview_action", "selftest_action"]


def _engine_key(build: Path) -> str | None:
    try:
        return str(json.loads((build / "engine" / "engine.json").read_text())["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def index_action(build: Path, kind: str = "auto", **_: Any) -> Action:
    """The index: its descriptors and their ids, the kind, the index code and faiss."""
    return Action(
        name="index",
        version="index:"
        + code_version(
            "cachebuild.localize.index",
            "cachebuild.localize.index_tune",
            "cachebuild.localize.index_reference",
        )
        + ":"
        + " ".join(installed_version("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "faiss") or ()),
        inputs={
            "descriptors.npy": build / "descriptors.npy",
            "descriptor_ids.npy": build / "descriptor_ids.npy",
        },
        values={"kind": kind},
        engine_key=_engine_key(build),
        outputs=OUTPUTS["index"],
        build=build,
    )


def selftest_action(build: Path, queries: int = 0, **_: Any) -> Action:
    """The self-test: the tiles (ids and image hashes; they seed the sample), the index, the engine, the queries."""
    return Action(
        name="selftest",
        version=f"selftest {SELFTEST_VERSION}:"
        + code_version("cachebuild.localize.selftest", "cachebuild.localize.rerank")
        + ":"
        + " ".join(installed_version("numpy") or ()),
        inputs={
            "tiles.npy": build / "tiles.npy",
            "index.faiss": build / "index.faiss",
            "cells.npy": build / "cells.npy",
            "descriptor_ids.npy": build / "descriptor_ids.npy",
            "windows.json": build / "windows.json",
        },
        values={"queries": int(queries)},
        engine_key=_engine_key(build),
        outputs=OUTPUTS["selftest"],
        build=build,
    )


def preview_action(build: Path, **_: Any) -> Action:
    """The coverage map: what it draws (tiles, holes, area, route, legend and its date)."""
    summary = json.loads((build / "tileset.json").read_text())
    record = json.loads((build / "flight.json").read_text())
    drawn = {k: summary.get(k) for k in ("bbox", "zooms", "planned", "present", "missing")}
    return Action(
        name="preview",
        version=f"preview {PREVIEW_VERSION}:"
        + code_version(
            "cachebuild.tiles.preview",
            "cachebuild.tiles.preview_geometry",
            "cachebuild.tiles.preview_cells",
            "cachebuild.store.thumbs",
        )
        + ":"
        + " ".join(installed_version("pillow") or ()),
        # tiles.npy: every tile's image hash (tiles.mbtiles holds the same images)
        # selftest.json: the legend gives the self-test's recall and error
        inputs={
            "tiles.npy": build / "tiles.npy",
            "missing.npy": build / "missing.npy",
            "selftest.json": build / "selftest.json",
        },
        values={
            "size": DEFAULT_SIZE,
            "tileset": drawn,
            "flight": {k: record.get(k) for k in ("flight_id", "takeoff_origin", "waypoints")},
            # the legend says the day it was drawn: a map drawn on another day is drawn again
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        },
        engine_key=None,
        outputs=OUTPUTS["preview"],
        build=build,
    )


#: action name -> the function that describes it from the doit action's keyword arguments
SPECS: dict[str, Callable[..., Action]] = {
    "index": index_action,
    "selftest": selftest_action,
    "preview": preview_action,
}


def action_for(name: str, **kwargs: Any) -> Action:
    """The :class:`Action` for ``name`` and an action's keyword arguments."""
    return SPECS[name](Path(kwargs["build"]), **{k: v for k, v in kwargs.items() if k != "build"})


def cached(
    name: str, fn: Callable[..., None], context: Callable[[], Mapping[str, Any]]
) -> Callable[..., None]:
    """``fn`` (a :mod:`targets.actions` function) served from the action cache.

    ``context()`` gives, when the action runs, the ``store`` (the local
    store root, for actions without a ``store`` argument of their own),
    ``shared`` (the ``STORE=s3://...`` URL or None) and ``action_cache``
    (the report's dict: ``hits``, ``misses`` and ``from_bucket`` lists).
    Without a store, or when an input cannot be read (the action then
    raises its own error), the action just runs.
    """

    @functools.wraps(fn)
    def run(**kwargs: Any) -> None:
        ctx = context()
        store = kwargs.get("store") or ctx.get("store")
        if not store:
            fn(**kwargs)
            return
        remote = None
        if ctx.get("shared"):
            remote = open_store(str(ctx["shared"]))
        cache = ActionCache(store, remote)
        stats = ctx.get("action_cache")
        try:
            action = action_for(name, **kwargs)
            key = action_key(action)
        except (OSError, ValueError, KeyError, TypeError):  # an input missing or unreadable:
            fn(**kwargs)  # the action itself says which, with its own remedy
            return
        with store_user(str(store)):  # gc-store waits while the cache is read or written
            if cache.lookup(action, key):
                if stats is not None:
                    stats.setdefault("hits", []).append(name)
                    if cache.served_from == "bucket":
                        stats.setdefault("from_bucket", []).append(name)
                return
        fn(**kwargs)
        with store_user(str(store)):
            cache.record(action, key)
        if stats is not None:
            stats.setdefault("misses", []).append(name)

    return run
