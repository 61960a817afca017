"""SIGKILL real builds anywhere: the published cache, the store and the lock survive.

The harness (tests/killharness.py) builds an old cache, then kills a real
``doit build-cache`` of a new flight at chosen instants and checks, after
each kill, the published cache (old or new, whole), the store (every object
hashes to its name, every indexed descriptor is on disk), the lock (free)
and the resume (succeeds, fetches and describes only what the store lacked).

CI runs six kill points: mid-download and at five phases.  The long run, hundreds of points spread
evenly over a measured build and over each phase, is opt-in::

    CACHEBUILD_LONG=1 nice .venv/bin/python -m pytest -q -s tests/test_kill_anywhere.py -k long

``CACHEBUILD_KILL_POINTS`` (default 300) sets how many evenly spread points
it adds to 8 points within each phase; ``CACHEBUILD_KILL_REPORT=path.json``
saves every outcome.  It prints a table of kill points by phase.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

from .tileserver import TileServer
from .killharness import KillHarness, KillOutcome, KillPoint

LONG = os.environ.get("CACHEBUILD_LONG") == "1"


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> KillHarness:
    server = TileServer()
    h = KillHarness(tmp_path_factory.mktemp("kill"), server)
    h.setup()
    yield h
    server.close()


def _table(outcomes: list[KillOutcome]) -> str:
    by_phase: Counter[str] = Counter(o.phase for o in outcomes)
    damaged: Counter[str] = Counter(o.phase for o in outcomes if o.problems)
    new: Counter[str] = Counter(o.phase for o in outcomes if o.published == "new")
    lines = ["| phase at the kill | kill points | published new | damaged |", "| --- | ---: | ---: | ---: |"]
    for phase, n in by_phase.most_common():
        lines.append(f"| {phase} | {n} | {new[phase]} | {damaged[phase]} |")
    lines.append(f"| all | {len(outcomes)} | {sum(new.values())} | {sum(damaged.values())} |")
    return "\n".join(lines)


def test_the_harness_measured_every_phase(harness: KillHarness) -> None:
    # the kill points below are placed by these
    for phase in ("tiles", "mbtiles", "engine", "describe", "index", "selftest", "manifest", "publish"):
        assert phase in harness.phase_starts, harness.phase_starts
    assert harness.old_id and harness.new_id and harness.old_id != harness.new_id
    # B shares some tiles with A, and needs some A did not have
    objects = {p.name for p in (harness.snapshot / "home" / "store" / "objects").glob("*/*")}
    assert 0 < sum(d in objects for d in harness.b_digests) < len(harness.b_digests)


@pytest.mark.parametrize("phase", ["mbtiles", "describe", "selftest", "manifest", "publish"])
def test_kill_in_phase(harness: KillHarness, phase: str) -> None:
    outcome = harness.kill_at(KillPoint(marker=phase))
    assert outcome.problems == [], outcome
    if outcome.killed and phase != "publish":
        assert outcome.published == "old"


def test_kill_mid_download_keeps_fetched_tiles(harness: KillHarness) -> None:
    """Killed while tiles are arriving (each answer slowed): what landed is not asked for again."""
    harness.server.latency_s = 0.15
    try:
        start = harness.phase_starts["tiles"]
        outcome = harness.kill_at(KillPoint(marker="tiles", offset_s=0.2))
    finally:
        harness.server.latency_s = 0.0
    assert outcome.problems == [], outcome
    assert outcome.requests_resume == outcome.requests_expected
    assert start > 0


@pytest.mark.skipif(not LONG, reason="the long kill-anywhere run: set CACHEBUILD_LONG=1")
def test_long_kill_anywhere(harness: KillHarness) -> None:
    n = int(os.environ.get("CACHEBUILD_KILL_POINTS", "300"))
    points = harness.within_phases(8) + harness.spread(n)
    outcomes = []
    t0 = time.monotonic()
    for i, point in enumerate(points):
        o = harness.kill_at(point)
        outcomes.append(o)
        status = "DAMAGED " + "; ".join(o.problems) if o.problems else "ok"
        print(f"[{i + 1}/{len(points)}] {point} phase={o.phase} published={o.published} {status}", flush=True)
    report = os.environ.get("CACHEBUILD_KILL_REPORT")
    if report:
        Path(report).write_text(
            json.dumps(
                {
                    "seconds": round(time.monotonic() - t0, 1),
                    "build_seconds": round(harness.duration_s, 3),
                    "phase_starts": harness.phase_starts,
                    "outcomes": [{**asdict(o), "point": str(o.point)} for o in outcomes],
                },
                indent=1,
            )
        )
    print(_table(outcomes))
    damaged = [o for o in outcomes if o.problems]
    assert damaged == []
