"""The engine: the network compiled for the device that runs it."""

from __future__ import annotations

from typing import Any

from doit.tools import config_changed

from cachebuild import actions


def task(plan: Any) -> dict[str, Any]:
    s = plan.settings
    out = plan.paths.build / "engine"
    deps = [str(plan.model_path)]
    if s.calibration is not None:
        deps.append(str(s.calibration))
    return {
        "name": "engine",
        "doc": "compile the descriptor network for this device (engine/)",
        "actions": [
            (
                actions.phase_action("engine", actions.build_engine),
                [],
                {
                    "model": str(plan.model_path),
                    "calibration": str(s.calibration) if s.calibration else None,
                    "precision": s.precision,
                    "backend": s.backend,
                    "out_dir": str(out),
                },
            )
        ],
        "file_dep": deps,
        "targets": [str(out / "engine.json"), str(out / plan.engine_file)],
        "uptodate": [config_changed({"precision": s.precision, **plan.engine_env})],
        "clean": True,
    }
