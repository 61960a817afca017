"""Which cache this workstation last built on each companion (``doit cache-info COMPANION=…`` compares).

Kept in the state directory, :data:`LAST_BUILD_FILE`, one record per
companion and ``COMPANION_DIR``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_write

__all__ = ["LAST_BUILD_FILE", "record_companion_build", "last_companion_build"]

#: In the workstation's state directory: the cache it last built on each
#: companion and ``COMPANION_DIR`` (``doit cache-info COMPANION=…`` compares with it).
LAST_BUILD_FILE = "companion-build.json"


def _build_records(path: Any) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(doc, dict) and isinstance(doc.get("builds"), dict):
        return {k: v for k, v in doc["builds"].items() if isinstance(v, dict)}
    if isinstance(doc, dict) and "host" in doc and "dir" in doc:  # one record, as written before
        return {f"{doc['host']} {doc['dir']}": doc}
    return {}


def record_companion_build(state_dir: Any, host: str, root: str, report: Any) -> None:
    """Remember which cache this workstation last built on ``host`` in ``root``."""
    path = Path(state_dir) / LAST_BUILD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    builds = _build_records(path)
    builds[f"{host} {root}"] = {
        "host": host,
        "dir": root,
        "build_id": report.build_id,
        "manifest_version": report.manifest_version,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps({"format": 2, "builds": builds}, indent=1, sort_keys=True) + "\n"
    atomic_write(path, text.encode(), durable=False)


def last_companion_build(state_dir: Any, host: str, root: str) -> dict[str, Any] | None:
    """What :func:`record_companion_build` kept for ``host`` and ``root``, or None."""
    record = _build_records(Path(state_dir) / LAST_BUILD_FILE).get(f"{host} {root}")
    return record if record is not None and isinstance(record.get("build_id"), str) else None
