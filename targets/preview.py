"""preview.png: the coverage map, drawn from what the cache holds."""

from __future__ import annotations

from typing import Any

from doit.tools import config_changed

from cachebuild.tiles.preview import DEFAULT_SIZE, PREVIEW_VERSION
from targets import actions


def task(plan: Any) -> dict[str, Any]:
    build = plan.paths.build
    s = plan.settings
    return {
        "name": "preview",
        "doc": "draw the coverage map: imagery, holes, route, origin, area (preview.png)",
        "actions": [
            (
                actions.phase_action("preview", actions.preview),
                [],
                {"build": str(build), "store": str(s.store)},
            )
        ],
        # exactly what it draws: the tiles and holes (tiles.npy, missing.npy,
        # tiles.mbtiles), the area and zooms (tileset.json), the route, origin
        # and flight id (flight.json); the thumbnails in the store are a pure
        # function of the images already named in tiles.npy
        "file_dep": [
            str(build / n)
            for n in (
                "tiles.npy",
                "missing.npy",
                "tileset.json",
                "tiles.mbtiles",
                "flight.json",
                "selftest.json",  # the legend gives its recall and error
            )
        ],
        # order only, not a dependency (doit's task_dep never makes a task out of
        # date): describe runs first, so it has kept the thumbnail of every image it
        # decoded and this finds them all instead of decoding each JPEG again; a
        # change that leaves describe up to date (origin, flight id) still redraws
        # only this.  Without it doit picks the order of the two at random (file_dep
        # is a set).
        "task_dep": ["describe"],
        "targets": [str(build / "preview.png")],
        # the version: how the map is drawn (cachebuild.tiles.preview)
        "uptodate": [config_changed({"size": DEFAULT_SIZE, "version": PREVIEW_VERSION})],
        "clean": True,
    }
