"""Fresh imagery end to end: a real `doit build-cache`, then the provider's
imagery changes for a third of the tiles, then a rebuild with TILE_MAX_AGE=0
downloads exactly those (the rest answer 304), describes only them, and
signs a cache that verifies; without TILE_MAX_AGE nothing is asked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cachebuild.inputs.flight import flight_area, load_flight_file
from cachebuild.tilemath import Tile, tiles
from tests._harness.etagserver import EtagServer
from tests.conftest import Cb, write_flight

SMALL = ("BUFFER_M=200", "ZOOM=17")


@pytest.fixture
def server() -> Iterator[EtagServer]:
    srv = EtagServer()
    yield srv
    srv.close()


def planned(flight: Path) -> list[Tile]:
    return list(tiles(flight_area(load_flight_file(flight), 200), [17]))


def test_a_third_changed_rebuild_with_max_age_0_fetches_and_describes_only_those(
    cb: Cb, tmp_path: Path, server: EtagServer
) -> None:
    f = write_flight(tmp_path / "f.json")
    wanted = planned(f)
    args = (f"FLIGHT={f}", *SMALL, f"PROVIDER={server.template(query='')}")
    r = cb.build(*args)
    assert r.code == 0, r.stderr
    assert r.report["descriptors"]["computed"] == len(wanted)

    changed = sorted(wanted)[::3]
    for t in changed:
        server.change(t)
    server.downloads.clear()
    r = cb.build(*args)  # no TILE_MAX_AGE: as before, nothing is asked
    assert r.code == 0 and r.report["outcome"] == "up_to_date", r.stderr
    assert not server.downloads and not server.not_modified

    r = cb.build(*args, "TILE_MAX_AGE=0")
    assert r.code == 0, r.stderr
    t = r.report["tiles"]
    assert set(server.downloads) == set(changed)
    assert sum(server.not_modified.values()) == len(wanted) - len(changed)
    assert t["refreshed"] == len(changed) and t["not_modified"] == len(wanted) - len(changed)
    assert t["fetched"] == len(changed)
    # only what changed: the anchors whose windows cover a changed tile (itself, its left,
    # upper and upper-left neighbours, where present)
    covering = {(t.x - dx, t.y - dy, t.z) for t in changed for dx in (0, 1) for dy in (0, 1)} & {
        (t.x, t.y, t.z) for t in wanted
    }
    assert r.report["descriptors"]["computed"] == len(covering)
    assert cb.run("verify-cache").code == 0

    server.downloads.clear()
    server.not_modified.clear()
    r = cb.build(*args, "TILE_MAX_AGE=30d")  # all fresh now: nothing is downloaded
    assert r.code == 0, r.stderr
    assert not server.downloads and not server.not_modified
    assert r.report["tiles"]["not_modified"] == r.report["tiles"]["refreshed"] == 0
