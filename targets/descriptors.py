"""Descriptors: one L2-normalised vector per indexed window (WINDOW_STRIDE per tile side), reused by content."""

from __future__ import annotations

from typing import Any

from doit.tools import config_changed

from targets import actions


def task(plan: Any) -> dict[str, Any]:
    s = plan.settings
    build = plan.paths.build
    d: dict[str, Any] = {
        "name": "describe",
        "doc": "describe the windows the descriptor store lacks (descriptors.npy, describe.json)",
        "actions": [
            (
                actions.phase_action("describe", actions.describe),
                [],
                {
                    "build": str(build),
                    "store": str(s.store),
                    "batch": s.batch,
                    "threads": s.threads,
                    "cache_dir": str(plan.paths.cache_dir),
                    "shared": s.shared_store,
                    "stride": s.window_stride,
                    # where the engine runs is not a dependency: the descriptors are the same
                    "dask_scheduler": s.dask_scheduler,
                },
            )
        ],
        # the store is not a dependency: its descriptors are a pure function of
        # (image hash, engine key), both already in these files
        "file_dep": [
            str(build / "tiles.npy"),
            str(build / "engine" / "engine.json"),
            str(build / "engine" / plan.engine_file),
        ],
        "targets": [
            str(build / n)
            for n in (
                "descriptors.npy",
                "descriptor_ids.npy",
                "cells.npy",
                "windows.json",
                "describe.json",
            )
        ],
        "clean": True,
    }
    # one config_changed per task: doit keeps a single value for it
    config: dict[str, Any] = {"window_stride": s.window_stride}
    if s.shared_store:  # the bucket gets the descriptors it lacks when it is first used
        config["shared"] = s.shared_store
    d["uptodate"] = [config_changed(config)]
    return d
