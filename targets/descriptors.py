"""Descriptors: one L2-normalised vector per present tile."""

from __future__ import annotations

from typing import Any

from cachebuild import actions


def task(plan: Any) -> dict[str, Any]:
    s = plan.settings
    build = plan.paths.build
    return {
        "name": "describe",
        "doc": "describe every tile with the engine (descriptors.npy)",
        "actions": [
            (
                actions.phase_action("describe", actions.describe),
                [],
                {"build": str(build), "store": str(s.store), "batch": s.batch, "threads": s.threads},
            )
        ],
        "file_dep": [
            str(build / "tiles.npy"),
            str(build / "engine" / "engine.json"),
            str(build / "engine" / plan.engine_file),
        ],
        "targets": [str(build / "descriptors.npy"), str(build / "descriptor_ids.npy")],
        "clean": True,
    }
