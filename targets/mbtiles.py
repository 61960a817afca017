"""tiles.mbtiles: the flight's tiles as one MBTiles 1.3 file."""

from __future__ import annotations

from typing import Any

from doit.tools import config_changed

from targets import actions


def task(plan: Any) -> dict[str, Any]:
    build = plan.paths.build
    s = plan.settings
    return {
        "name": "mbtiles",
        "doc": "the cache's tiles as one MBTiles file (tiles.mbtiles)",
        "actions": [
            (
                actions.phase_action("mbtiles", actions.write_tiles_mbtiles),
                [],
                {
                    "build": str(build),
                    "store": str(s.store),
                    "bbox": list(plan.bbox) if plan.bbox else None,
                    "zooms": list(s.zooms),
                },
            )
        ],
        "file_dep": [str(build / "tiles.npy")],
        "targets": [str(build / "tiles.mbtiles")],
        "uptodate": [config_changed({"bbox": plan.bbox, "zooms": list(s.zooms)})],
        "clean": True,
    }
