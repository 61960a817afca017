"""index.faiss: the FAISS index over the descriptors."""

from __future__ import annotations

from typing import Any

from doit.tools import config_changed

from cachebuild import actions


def task(plan: Any) -> dict[str, Any]:
    build = plan.paths.build
    return {
        "name": "index",
        "doc": "build the FAISS index over the descriptors (index.faiss)",
        "actions": [(actions.phase_action("index", actions.index), [], {"build": str(build)})],
        "file_dep": [str(build / "descriptors.npy"), str(build / "descriptor_ids.npy")],
        "targets": [str(build / "index.faiss"), str(build / "index.json")],
        "uptodate": [config_changed({"index": "flat-ip"})],
        "clean": True,
    }
