"""The engine: the network compiled for the device that runs it."""

from __future__ import annotations

from typing import Any

from doit.tools import config_changed

from cachebuild.engine.modelfiles import external_data_files_cached, remembered
from targets import actions


def _poolable(path: Any) -> bool:
    from cachebuild.engine.features import poolable

    return poolable(path)


def task(plan: Any) -> dict[str, Any]:
    s = plan.settings
    out = plan.paths.build / "engine"
    deps = [str(plan.model_path)]
    # a model's external data (weights.bin beside model.onnx) is part of it
    if not plan.builtin_model:  # the built-in network is one file
        listed = external_data_files_cached(plan.model_path, plan.paths.build / ".model-files.json")
        deps += [str(plan.model_path.parent / loc) for loc in listed]
    # a poolable network (the built-in one, or the same graph with other weights) also gets its
    # feature half and the second stage's engine/cells.onnx: targets, so they are recorded
    pooled = plan.builtin_model or remembered(
        plan.model_path, plan.paths.build / ".model-poolable.json", _poolable, False
    )
    if s.calibration is not None:
        deps.append(str(s.calibration))
    backend = plan.engine_env.get("backend", s.backend)  # BACKEND=auto resolved for this machine
    # engine_json: what engine.json records (2: the input's preparation, issue 21); not in the key
    # features: 1 -- the feature half that describes windows (issue 21) is compiled too
    # features: 2 -- and the cells models of the second stage (engine/cells.onnx)
    depends = {"precision": s.precision, **plan.engine_env, "engine_json": 2, "features": 2}
    if backend == "tensorrt":  # part of a TensorRT engine's key; ONNX Runtime has no workspace
        depends["workspace"] = s.workspace
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
                    "backend": backend,
                    "out_dir": str(out),
                    "workspace": s.workspace,
                    "timing_cache_dir": str(s.home / "tensorrt"),
                },
            )
        ],
        "file_dep": deps,
        "targets": [str(out / "engine.json"), str(out / plan.engine_file)]
        + ([str(out / "features" / "engine.json"), str(out / "cells.onnx")] if pooled else []),
        "uptodate": [config_changed(depends)],
        "clean": True,
    }
