"""Companion mode: build the cache on the drone's companion computer over SSH.

TensorRT engines run only on the GPU and TensorRT version they were built
with, so with ``COMPANION=user@host[:port]`` the workstation (which has the
internet) resolves the flight and fetches the tiles, pushes what the
companion lacks, and the companion builds engine, descriptors, index and
signed manifest itself (docs/companion.md).

Modules:

:mod:`.ssh`
    ``COMPANION`` parsing, host-key trust, the injectable connection factory.
:mod:`.push`
    The delta push over SFTP (tile images in :mod:`.packs`).
:mod:`.remote`
    Remote commands, output streaming, the remote report.
:mod:`.flow`
    Bringup, push and remote build, in order.
:mod:`.prepush`
    Push while fetching (``PIPELINE``): packs sent as the tiles arrive.
:mod:`.reach`
    The companion's address, SSH options and ``COMPANION_DIR``.
:mod:`.records`
    Which cache this workstation last built on each companion.
:mod:`.agent`
    The companion's side (``doit companion-agent``).
:mod:`.pushed`
    The ``pushed:<dir>`` tile provider the remote build reads from.

Nothing here imports doit; paramiko is imported when connecting.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LOCAL_TASKS", "build_on_companion"]

#: The tasks the workstation runs itself in companion mode.
LOCAL_TASKS = ("flight", "tiles")


def build_on_companion(plan: Any, report: Any, warn: Any, **kw: Any) -> None:
    """See :func:`cachebuild.companion.flow.build_on_companion`."""
    from cachebuild.companion.flow import build_on_companion as run

    run(plan, report, warn, **kw)
