"""SIGKILL real builds anywhere: the published cache, the store and the lock survive.

The harness (tests/_harness/killharness.py) builds an old cache, then kills a real
``doit build-cache`` of a new flight at chosen instants and checks, after
each kill, the published cache (old or new, whole), the store (every object
hashes to its name, every indexed descriptor is on disk), the lock (free)
and the resume (succeeds, fetches and describes only what the store lacked).

CI runs six kill points: mid-download and at five phases.  The long run,
hundreds of points spread evenly over a measured build and over each phase,
is opt-in::

    CACHEBUILD_LONG=1 nice .venv/bin/python -m pytest -q -s tests/scenarios/test_kill_anywhere.py -k long_kill_anywhere

``CACHEBUILD_KILL_POINTS`` (default 300) sets how many evenly spread points
it adds to 8 points within each phase and 16 mid-download (the tile server
slowed); ``CACHEBUILD_KILL_REPORT=path.json`` saves every outcome.  It
prints a line per point and a table of kill points by phase.

With an sshd (tests/_harness/sshd.py), ``-k long_kill_companion`` kills a ``COMPANION=``
build too: during the push (spread over it) and in the companion's build.
Each point costs a whole companion build (minutes here), so it is opt-in
as well and has few points (``CACHEBUILD_COMPANION_KILL_POINTS``, default 6).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

from tests._harness.killharness import CompanionKillHarness, KillHarness, KillOutcome, KillPoint
from tests._harness.tileserver import TileServer

LONG = os.environ.get("CACHEBUILD_LONG") == "1"


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> KillHarness:
    server = TileServer()
    h = KillHarness(tmp_path_factory.mktemp("kill"), server)
    h.setup()
    yield h
    server.close()


def _interleaved(points: list[KillPoint]) -> list[KillPoint]:
    """The same points in an order that covers the build evenly at any prefix (golden-ratio stride)."""
    order = sorted(range(len(points)), key=lambda i: (i * 0.6180339887) % 1.0)
    return [points[i] for i in order]


def _table(outcomes: list[KillOutcome]) -> str:
    by_phase: Counter[str] = Counter(o.phase for o in outcomes)
    damaged: Counter[str] = Counter(o.phase for o in outcomes if o.problems)
    new: Counter[str] = Counter(o.phase for o in outcomes if o.published == "new")
    lines = [
        "| phase at the kill | kill points | published new | damaged |",
        "| --- | ---: | ---: | ---: |",
    ]
    for phase, n in by_phase.most_common():
        lines.append(f"| {phase} | {n} | {new[phase]} | {damaged[phase]} |")
    lines.append(f"| all | {len(outcomes)} | {sum(new.values())} | {sum(damaged.values())} |")
    return "\n".join(lines)


def test_the_harness_measured_every_phase(harness: KillHarness) -> None:
    # the kill points below are placed by these
    for phase in (
        "tiles",
        "mbtiles",
        "engine",
        "describe",
        "index",
        "preview",
        "selftest",
        "manifest",
        "publish",
    ):
        assert phase in harness.phase_starts, harness.phase_starts
    assert harness.old_id and harness.new_id and harness.old_id != harness.new_id
    # B shares some tiles with A, and needs some A did not have
    objects = {p.name for p in (harness.snapshot / "home" / "store" / "objects").glob("*/*")}
    assert 0 < sum(d in objects for d in harness.b_digests) < len(harness.b_digests)


@pytest.mark.parametrize(
    "phase", ["mbtiles", "describe", "preview", "selftest", "manifest", "publish"]
)
def test_kill_in_phase(harness: KillHarness, phase: str) -> None:
    outcome = harness.kill_at(KillPoint(marker=phase))
    assert outcome.problems == [], outcome
    if outcome.killed and phase != "publish":
        assert outcome.published == "old"


def test_kill_mid_download_keeps_fetched_tiles(harness: KillHarness) -> None:
    """Killed while tiles arrive one by one (one request at a time, each answer slowed)."""
    harness.server.latency_s = 0.4
    harness.extra_args = ("CONCURRENCY=1",)
    try:
        before = harness.server.count()
        # killed once the server has begun answering a second tile: the first
        # has then been in the client's hands for a whole answer's latency
        landed = KillPoint(
            marker="tiles", offset_s=0.0, until=lambda: harness.server.count() - before >= 2
        )
        outcome = harness.kill_at(landed)
        asked = harness.server.count() - before - outcome.requests_resume
    finally:
        harness.server.latency_s = 0.0
        harness.extra_args = ()
    assert outcome.problems == [], outcome
    if outcome.killed and outcome.phase == "tiles":
        # the kill came after some tiles had landed: they were not asked for again
        assert (
            outcome.requests_resume
            == outcome.requests_expected
            < 3
            <= asked + outcome.requests_resume
        )


@pytest.mark.skipif(not LONG, reason="the long kill-anywhere run: set CACHEBUILD_LONG=1")
def test_long_kill_anywhere(harness: KillHarness) -> None:
    n = int(os.environ.get("CACHEBUILD_KILL_POINTS", "300"))
    points = _interleaved(harness.within_phases(8) + harness.spread(n))
    # and 16 mid-download: one request at a time, each answer slowed, tiles land one by one
    slow = [KillPoint(marker="tiles", offset_s=0.05 * i) for i in range(16)]
    outcomes = []
    t0 = time.monotonic()
    for i, point in enumerate(points + slow):
        harness.server.latency_s = 0.15 if i >= len(points) else 0.0
        harness.extra_args = ("CONCURRENCY=1",) if i >= len(points) else ()
        o = harness.kill_at(point)
        outcomes.append(o)
        status = "DAMAGED " + "; ".join(o.problems) if o.problems else "ok"
        print(
            f"[{i + 1}/{len(points) + len(slow)}] {point} phase={o.phase} published={o.published} "
            f"requests {o.requests_resume}/{o.requests_expected} computed {o.computed_resume}/{o.computed_expected} "
            f"{status}",
            flush=True,
        )
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
    harness.server.latency_s = 0.0
    harness.extra_args = ()
    print(_table(outcomes))
    damaged = [o for o in outcomes if o.problems]
    assert damaged == []


@pytest.mark.skipif(not LONG, reason="the long kill-anywhere run: set CACHEBUILD_LONG=1")
def test_long_kill_companion(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests._harness.sshd import start_or_skip

    root = tmp_path_factory.mktemp("ckill")
    sshd = start_or_skip(root / "sshd")
    server = TileServer()
    try:
        (root / "h").mkdir()
        h = CompanionKillHarness(root / "h", server, sshd)
        h.setup()
        n = int(os.environ.get("CACHEBUILD_COMPANION_KILL_POINTS", "6"))
        push = h.phase_starts["push"]
        remote = min(v for k, v in h.phase_starts.items() if k.startswith("remote "))
        # spread over the push (bring-up done, packs going up), then two in the companion's build
        points = [
            KillPoint(marker="push", offset_s=(remote - push) * i / max(n - 2, 1))
            for i in range(max(n - 2, 1))
        ]
        points += [KillPoint(marker="remote describe"), KillPoint(marker="remote manifest")]
        outcomes = []
        for i, point in enumerate(points):
            o = h.kill_at(point)
            outcomes.append(o)
            status = "DAMAGED " + "; ".join(o.problems) if o.problems else "ok"
            print(
                f"[companion {i + 1}/{len(points)}] {point} phase={o.phase} published={o.published} "
                f"pushed {o.computed_resume}/{o.computed_expected} {status}",
                flush=True,
            )
        print(_table(outcomes))
        assert [o for o in outcomes if o.problems] == []
    finally:
        server.close()
        sshd.stop()
