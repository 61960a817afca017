"""selftest.json: can the cache find where camera-like frames were taken?"""

from __future__ import annotations

from typing import Any

from doit.tools import config_changed

from cachebuild.localize.selftest import SELFTEST_VERSION
from targets import actions


def task(plan: Any) -> dict[str, Any]:
    s = plan.settings
    build = plan.paths.build
    return {
        "name": "selftest",
        "doc": "search camera-like frames cut across tile borders; recall@1/@5 (selftest.json)",
        "actions": [
            (
                actions.phase_action("selftest", actions.selftest),
                [],
                {
                    "build": str(build),
                    "store": str(s.store),
                    "queries": s.selftest_queries,
                    "threads": s.threads,
                },
            )
        ],
        "file_dep": [
            str(build / "tiles.npy"),
            str(build / "index.faiss"),
            # the second stage: the places' cells, their ids and windows.json's settings
            str(build / "cells.npy"),
            str(build / "descriptor_ids.npy"),
            str(build / "windows.json"),
            str(build / "engine" / "engine.json"),
            str(build / "engine" / plan.engine_file),
        ],
        # selftest-frames.npy (the frame descriptors the next run may reuse) is not a target:
        # a cache keyed by what each descriptor depends on, checked before use
        "targets": [str(build / "selftest.json")],
        # MIN_RECALL is not a dependency: the gate reads the result, the test need not rerun
        "uptodate": [config_changed({"queries": s.selftest_queries, "version": SELFTEST_VERSION})],
        "clean": True,
    }
