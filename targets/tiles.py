"""The tile set: which tiles cover the area, fetched into the shared store."""

from __future__ import annotations

from typing import Any

from doit.tools import config_changed

from cachebuild.providers import source_stamp
from cachebuild.tileset import read_summary
from targets import actions


def _no_retry_needed(summary_path: str, retry_missing: bool) -> Any:
    def check() -> bool:
        if not retry_missing:
            return True
        from pathlib import Path

        try:
            return read_summary(Path(summary_path).parent)["missing"] == 0
        except (OSError, ValueError, KeyError):
            return False

    return check


def task(plan: Any) -> dict[str, Any]:
    build = plan.paths.build
    s = plan.settings
    # the store too: tiles.npy names objects in it
    value = {
        "bbox": plan.bbox,
        "zooms": list(s.zooms),
        "provider": plan.provider_key,
        "store": str(s.store),
    }
    # what changes which tiles end up in the cache (not headers, subdomains,
    # rate limit or retries); keys only when set, so older states stay valid
    source = source_stamp(s.provider)
    if source is not None:
        value["source"] = source
    if s.nodata:
        value["nodata"] = dict(s.nodata)
    if s.shared_store:  # the bucket gets what it lacks when it is first used
        value["shared"] = s.shared_store
    return {
        "name": "tiles",
        "doc": "fetch the tiles covering the area into the store (tiles.npy, tileset.json)",
        "actions": [
            (
                actions.phase_action("tiles", actions.fetch),
                [],
                {
                    "bbox": list(plan.bbox) if plan.bbox else None,
                    "zooms": list(s.zooms),
                    "provider": s.provider,
                    "store": str(s.store),
                    "out_dir": str(build),
                    "concurrency": s.concurrency,
                    "http": dict(s.http),
                    "nodata": dict(s.nodata),
                    "shared": s.shared_store,
                    # registered with the store from the first phase on: a build that stops
                    # after it has staged tiles gc-store must keep (a companion's COMPANION_DIR
                    # is not under its home)
                    "cache_dir": str(plan.paths.cache_dir),
                },
            )
        ],
        "targets": [str(build / n) for n in ("tiles.npy", "missing.npy", "tileset.json")],
        "uptodate": [
            config_changed(value),
            _no_retry_needed(str(build / "tileset.json"), s.retry_missing),
            # TILE_MAX_AGE: the phase runs and asks only the tiles due (conditionally)
            "TILE_MAX_AGE" not in s.http,
        ],
        "clean": True,
    }
