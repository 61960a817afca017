"""The built-in descriptor network, made from code when MODEL is not given."""

from __future__ import annotations

from typing import Any

from doit.tools import config_changed

from targets import actions


def task(plan: Any) -> dict[str, Any] | None:
    if not plan.builtin_model:
        return None
    return {
        "name": "model",
        "doc": "the built-in descriptor network (ONNX), made from code",
        "actions": [
            (
                actions.phase_action("engine", actions.write_model),
                [],
                {"path": str(plan.model_path)},
            )
        ],
        "targets": [str(plan.model_path)],
        "uptodate": [config_changed({"model": plan.model_path.stem})],
        "clean": True,
    }
