"""doit task creators, one module per artifact: wiring only.

Each module's ``task(plan)`` returns a doit task dict (or None when the
artifact is not built in this configuration): what the task depends on,
what it produces, and which :mod:`targets.actions` function it calls.
No behaviour lives here.
"""

from __future__ import annotations

from typing import Any

from cachebuild.release import produced
from targets import actions

from . import descriptors, engine, flight, index, manifest, mbtiles, model, preview, selftest, tiles

__all__ = ["TASK_MODULES", "task_dicts", "FINAL_TASK"]

#: In build order (doit orders by dependencies; this order is for `doit list`).
TASK_MODULES = (
    flight,
    tiles,
    mbtiles,
    preview,
    model,
    engine,
    descriptors,
    index,
    selftest,
    manifest,
)
FINAL_TASK = "manifest"


def task_dicts(plan: Any) -> list[dict[str, Any]]:
    """Every task of a build for ``plan`` (a :class:`cachebuild.inputs.plan.BuildPlan`).

    Each task records the hash of its targets after its action, and is up
    to date only while they still have it (:mod:`cachebuild.release.produced`): a
    target replaced behind the build's back is made again, never signed.
    """
    out = []
    build = str(plan.paths.build)
    for mod in TASK_MODULES:
        d = mod.task(plan)
        if d is not None:
            targets = list(d.get("targets", []))
            if targets:
                first = d["actions"][0]
                phase = getattr(
                    first[0] if isinstance(first, tuple) else first, "__name__", d["name"]
                )
                record = actions.phase_action(phase.removesuffix("_action"), produced.record)
                d["actions"] = [*d["actions"], (record, [], {"build": build, "targets": targets})]
                d["uptodate"] = [*d.get("uptodate", []), (produced.intact, [build, targets])]
            out.append(d)
    return out
