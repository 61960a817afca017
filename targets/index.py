"""index.faiss: the FAISS index over the descriptors, chosen by size."""

from __future__ import annotations

from typing import Any

from doit.tools import config_changed

from targets import actions


def task(plan: Any) -> dict[str, Any]:
    build = plan.paths.build
    kind = plan.settings.index_kind
    return {
        "name": "index",
        "doc": "build the FAISS index over the descriptors (index.faiss, index.json, positions.npy)",
        "actions": [
            (actions.phase_action("index", actions.index), [], {"build": str(build), "kind": kind})
        ],
        "file_dep": [str(build / "descriptors.npy"), str(build / "descriptor_ids.npy")],
        "targets": [str(build / n) for n in ("index.faiss", "index.json", "positions.npy")],
        # the version: how a kind is built and tuned (cachebuild.localize.index); the saved quantizer
        # (index-quantizer.npz) and recall reference (index-recall.npz) are not targets: they are
        # caches, checked before they are used.  7: an IVF index's recall queries chosen by content
        "uptodate": [config_changed({"index": kind, "version": 7})],
        "clean": True,
    }
