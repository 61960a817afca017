"""manifest.json: every artifact's hash and the build identity, signed."""

from __future__ import annotations

from typing import Any

from doit.tools import config_changed

from targets import actions


def task(plan: Any) -> dict[str, Any]:
    s = plan.settings
    build = plan.paths.build
    artifacts = actions.cache_artifacts(plan.engine_file)
    return {
        "name": "manifest",
        "doc": "sign the manifest of every artifact (manifest.json)",
        "actions": [
            (
                actions.phase_action("manifest", actions.manifest),
                [],
                {
                    "build": str(build),
                    "current": str(plan.paths.current),
                    "key": str(plan.key_path),
                    "expires_days": s.expires_days,
                    "artifacts": artifacts,
                },
            )
        ],
        # the optional ones (engine/cells.onnx) are made by the engine task where they exist
        "file_dep": [
            str(build / name) for name in artifacts if name not in actions.OPTIONAL_ARTIFACTS
        ],
        "targets": [str(build / "manifest.json"), str(build / "signer.pub")],
        # the key's public id, never its bytes, is the dependency
        "uptodate": [
            config_changed({"keyid": plan.keyid, "expires_days": s.expires_days, "form": 2})
        ],
        "clean": True,
    }
