"""Which installed distribution answers to a name, and its version (package metadata, nothing imported)."""

from __future__ import annotations

from importlib import metadata

__all__ = ["installed_version"]


def installed_version(*names: str) -> tuple[str, str] | None:
    """``(name, version)`` of the first of ``names`` (distribution names) that is installed, else None.

    Cheap: it reads package metadata only, so a no-op build can ask on every
    run (engine probes, action versions).
    """
    for name in names:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None
