"""flight.json: the normalised flight record, saved with the build."""

from __future__ import annotations

from typing import Any

from doit.tools import config_changed

from targets import actions


def task(plan: Any) -> dict[str, Any]:
    path = plan.paths.build / "flight.json"
    return {
        "name": "flight",
        "doc": "the normalised flight record (flight.json)",
        "actions": [
            (
                actions.phase_action("flight", actions.write_flight),
                [],
                {"path": str(path), "record": plan.record},
            )
        ],
        "targets": [str(path)],
        "uptodate": [config_changed({"record": plan.record})],
        "clean": True,
    }
