"""Flow control end to end: a real `doit build-cache` against a tile server that
answers 429 with Retry-After (it has every tile): the build succeeds and the
report counts the throttling; FETCH_DEADLINE ends a wait that would not end."""

from __future__ import annotations

from pathlib import Path

from cachebuild.inputs.flight import flight_area, load_flight_file
from cachebuild.tilemath import Tile, tiles
from tests._harness.throttleserver import ThrottleServer
from tests._harness.tileserver import too_many
from tests.conftest import Cb, TileServer, write_flight

SMALL = ("BUFFER_M=200", "ZOOM=17")


def planned(flight: Path, buffer_m: float) -> list[Tile]:
    return list(tiles(flight_area(load_flight_file(flight), buffer_m), [17]))


def test_a_fifth_answered_429_retry_after_1_builds_and_reports_it(
    cb: Cb, tmp_path: Path, tile_server: TileServer
) -> None:
    f = write_flight(tmp_path / "f.json")
    wanted = planned(f, 200)
    tile_server.fault_rate(too_many("1"), 0.2, seed=11, attempts=10_000)
    r = cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={tile_server.template()}", "HTTP_RETRIES=2")
    assert r.code == 0, r.stderr
    t = r.report["tiles"]
    assert t["fetched"] == len(wanted) and t["missing"] == 0
    throttled = len(tile_server.requests) - len(wanted)
    assert throttled > 0 and t["throttled"] == throttled
    assert 1 <= t["lowest_concurrency"] < 8
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("tiles: "))
    assert f"{throttled} throttled (concurrency down to {t['lowest_concurrency']})" in line


def test_fetch_deadline_fails_exit_20_naming_the_tiles_left_then_the_rest_is_fetched(
    cb: Cb, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json")
    wanted = planned(f, 200)
    # three tiles served, then "slow down" to everything: busy, not down
    server = ThrottleServer(ok_first=3, retry_after="0.5")
    try:
        args = (f"FLIGHT={f}", *SMALL, f"PROVIDER={server.template(query='')}", "CONCURRENCY=1")
        r = cb.build(*args, "FETCH_DEADLINE=2s")
        assert r.code == 20, r.stderr
        assert r.report["failure_phase"] == "tiles"
        assert f"FETCH_DEADLINE=2 s passed with {len(wanted) - 3} tile(s) left" in r.report["error"]
        assert "the 3 fetched are kept" in r.report["error"]
        server.ok_first = None  # the server recovers: only the rest is asked for
        before = sum(server.served_ok.values())
        r = cb.build(*args)
        assert r.code == 0, r.stderr
        assert sum(server.served_ok.values()) - before == len(wanted) - 3
    finally:
        server.close()
