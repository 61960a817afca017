"""Describe (or push) while fetching (``PIPELINE``): when it applies, the order doit is asked for, the report's entry.

The tiles phase feeds a background describer
(:mod:`cachebuild.localize.describe_ahead`) that needs the compiled engine:
with the pipeline on, the build asks doit for ``engine`` before the final
task, so the engine (which does not depend on the tiles) is compiled or
found up to date first.  That is a choice of order only: the tasks, their
dependencies and what doit finds up to date are the same.  Why and what it
gains: docs/design/pipeline.md.
"""

from __future__ import annotations

from typing import Any

from targets import FINAL_TASK

__all__ = [
    "pipeline_on",
    "prepush_on",
    "arm_pipeline",
    "describe_ahead_config",
    "doit_tasks",
    "pipeline_entry",
]


def pipeline_on(settings: Any) -> bool:
    """Whether this build describes while it fetches: locally, in this process, with a local store.

    Not on a companion (it describes there), on a Dask cluster (its workers
    describe) or with ``STORE=s3://`` (the bucket's descriptors are imported first).
    """
    return bool(
        settings.pipeline
        and settings.companion is None
        and settings.dask_scheduler is None
        and settings.shared_store is None
    )


def prepush_on(settings: Any) -> bool:
    """Whether this build pushes to the companion while it fetches (``COMPANION`` with ``PIPELINE``).

    The tiles action then starts a :class:`~cachebuild.companion.prepush.PrePush`
    (``ACTIVE["prepush"]`` holds the settings) and the companion flow waits for it.
    """
    return bool(settings.pipeline and settings.companion is not None)


def arm_pipeline(active: dict[str, Any], settings: Any, ahead: dict[str, Any] | None) -> None:
    """Tell the tiles action (``targets.actions.ACTIVE``) what runs beside the fetch this build.

    ``ahead``: :func:`describe_ahead_config`'s; with ``COMPANION``, the
    settings the pre-push is made from (:func:`prepush_on`).
    """
    active["describe_ahead"] = ahead
    active.pop("ahead_stats", None)
    active["prepush"] = settings if prepush_on(settings) else None
    active.pop("prepush_run", None)
    active.pop("fetch_ended", None)


def describe_ahead_config(settings: Any, plan: Any, reporter: Any) -> dict[str, Any] | None:
    """What the tiles action needs to start the background describer (``ACTIVE["describe_ahead"]``)."""
    if not pipeline_on(settings):
        return None
    return {
        "engine_dir": str(plan.paths.build / "engine"),
        "stride": settings.window_stride,
        "batch": settings.batch,
        "threads": settings.threads,
        # this run's engine task is done (ran or up to date): the engine directory is this build's
        "engine_ready": lambda: "engine" in reporter.ran or "engine" in reporter.up_to_date,
    }


def doit_tasks(settings: Any) -> list[str] | None:
    """The tasks to ask doit for: the engine first when the pipeline is on (None: the final task)."""
    return ["engine", FINAL_TASK] if pipeline_on(settings) else None


def pipeline_entry(
    enabled: bool, seconds: dict[str, float], stats: dict[str, Any] | None, wall_s: float
) -> dict[str, Any]:
    """The report's ``pipeline``: each stage's busy seconds, their sum, the wall time, the overlap.

    ``seconds``: the tasks that ran and their times (the reporter's);
    ``stats``: the background describer's (None when none ran).  The
    describe task's wait for the background describer is not busy time.
    ``overlap_s`` is the sum of the stages less the wall time: what ran at
    the same time as something else.
    """
    stages = {k: round(float(v), 3) for k, v in seconds.items()}
    ahead = stats or {}
    if stats is not None:
        stages["describe_ahead"] = round(float(ahead.get("busy_s", 0.0)), 3)
        if "describe" in stages:
            stages["describe"] = round(
                max(0.0, stages["describe"] - float(ahead.get("describe_waited_s", 0.0))), 3
            )
    total = round(sum(stages.values()), 3)
    return {
        "enabled": enabled,
        "stages": stages,
        "sum_s": total,
        "wall_s": round(wall_s, 3),
        "overlap_s": round(max(0.0, total - wall_s), 3),
        "described_ahead": int(ahead.get("blocks", 0)),
        "found_ahead": int(ahead.get("found", 0)),
        "fetch_waited_s": round(float(ahead.get("fetch_waited_s", 0.0)), 3),
        "error": ahead.get("error"),
    }
