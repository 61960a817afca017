"""Hostile input end to end: garbage flights through real ``doit build-cache``
processes, flight ids and tile coordinates that try to leave their
directories, Flights API answers that are not flights, and absurd areas
refused before the lock and before any download (``MAX_TILES``, free disk).
docs/reliability.md, section 4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachebuild.errors import AreaTooLargeError, FlightInvalidAnswerError, UsageError
from cachebuild.inputs.area import BYTES_PER_TILE, STORE_BYTES_PER_TILE, check_area, estimate_area
from cachebuild.inputs.config import DEFAULT_MAX_TILES, load_settings
from tests.conftest import REPO, Cb, TileServer, write_flight
from tests.unit.inputs.test_flights_api import TOKEN, FlightsApi

LONG = os.environ.get("CACHEBUILD_LONG") == "1"

#: (name, file bytes) of garbage flight files, each run through a real build.
GARBAGE_FILES = [
    ("empty", b""),
    ("binary", bytes(range(256)) * 4),
    ("utf16", '{"waypoints": []}'.encode("utf-16")),
    ("not-utf8", b'{"waypoints": [{"lat": "\xff\xfe", "lon": 0, "alt_m": 0}]}'),
    ("deep", b'{"waypoints": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
    ("nan", b'{"waypoints": [{"lat": NaN, "lon": 0, "alt_m": 0}]}'),
    ("huge-int", b'{"waypoints": [{"lat": 1' + b"0" * 10_000 + b', "lon": 0, "alt_m": 0}]}'),
    ("1e999", b'{"waypoints": [{"lat": 1e999, "lon": 0, "alt_m": 0}]}'),
    ("dup-key", b'{"waypoints": [], "waypoints": []}'),
    (
        "traversal-id",
        b'{"flight_id": "../../../etc/passwd", "waypoints": [{"lat": 1, "lon": 1, "alt_m": 1}]}',
    ),
    (
        "absolute-id",
        b'{"flight_id": "/etc/passwd", "waypoints": [{"lat": 1, "lon": 1, "alt_m": 1}]}',
    ),
    ("array", b"[1, 2, 3]"),
    (
        "many-waypoints",
        json.dumps({"waypoints": [{"lat": 0, "lon": 0, "alt_m": 0}] * 10_001}).encode(),
    ),
]

#: FLIGHT values that are no flight at all.
GARBAGE_VALUES = [
    "",
    "-",
    "\x01\x02",
    "3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b/../../../etc/passwd",
    "../../../../../../etc/shadow",
    "/",
    "/dev/null",
    '{"waypoints": []}',
]


def assert_clean(r: Any, codes: set[int]) -> dict[str, Any]:
    """A refusal with one of ``codes``, a JSON report, an ERROR line and no traceback."""
    assert "Traceback" not in r.stdout and "Traceback" not in r.stderr, r.stderr
    assert r.code in codes, (r.code, r.stderr)
    rep = r.report
    assert rep["outcome"] == "failure" and rep["exit_code"] == r.code
    assert rep["error"] and f"exit {r.code}]" in r.stderr
    return rep


# -- garbage flights through real builds ------------------------------------------------------


@pytest.mark.parametrize("name, data", GARBAGE_FILES, ids=[n for n, _ in GARBAGE_FILES])
def test_garbage_flight_file(cb: Cb, tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / f"{name}.json"
    path.write_bytes(data)
    rep = assert_clean(cb.build(f"FLIGHT={path}"), {95})
    assert rep["failure_phase"] == "flight" and str(path) in rep["error"]
    assert not (cb.cache_dir / "build.lock").exists()  # refused before the lock


@pytest.mark.parametrize("value", GARBAGE_VALUES, ids=range(len(GARBAGE_VALUES)))
def test_garbage_flight_value(cb: Cb, value: str) -> None:
    rep = assert_clean(cb.build(f"FLIGHT={value}"), {2, 94, 95})
    assert rep["failure_phase"] in ("arguments", "flight")
    assert not (cb.cache_dir / "build.lock").exists()


def test_flight_argument_that_is_not_utf8(cb: Cb) -> None:
    argv = [
        sys.executable.encode(),
        b"-m",
        b"doit",
        b"build-cache",
        b"FLIGHT=\xff\xfe.json",
        b"REPORT=json",
    ]
    p = subprocess.run(argv, cwd=REPO, env=cb.env(), capture_output=True)
    out, err = p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
    assert "Traceback" not in out + err
    assert p.returncode == 94, err
    assert "flight file not found" in json.loads(out.strip().splitlines()[-1])["error"]


def test_random_garbage_files_through_real_builds(cb: Cb, tmp_path: Path) -> None:
    """A handful of random byte strings and JSON-ish texts (seeded), each a real build."""
    import random

    rng = random.Random(7)
    for i in range(4):
        if i % 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        else:
            pieces = [
                '{"waypoints": [',
                '{"lat": ',
                "1e308",
                "-0",
                '"x"',
                "null",
                "}",
                "]",
                ",",
                "{",
                "[",
                "NaN",
            ]
            data = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40))).encode()
        path = tmp_path / f"rand{i}.json"
        path.write_bytes(data)
        assert_clean(cb.build(f"FLIGHT={path}"), {95})


# -- flight ids never become paths outside their directory ------------------------------------


@pytest.fixture
def api() -> Any:
    srv = FlightsApi()
    yield srv
    srv.close()


@pytest.mark.parametrize(
    "bad_id", ["../../../etc/passwd", "/etc/passwd", "..", "a/b", "3f2b8c1e-5a7d-4e6f-9b0a"]
)
def test_api_answer_with_a_hostile_flight_id_is_refused(
    api: FlightsApi, cb: Cb, bad_id: str
) -> None:
    asked = "3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b"
    api.routes[asked] = (
        "json",
        {"flight_id": bad_id, "waypoints": [{"lat": 1, "lon": 1, "alt_m": 1}]},
    )
    r = cb.build(
        f"FLIGHT={asked}", f"FLIGHTS_API_URL={api.url}", env=cb.env(FLIGHTS_API_TOKEN=TOKEN)
    )
    rep = assert_clean(r, {93})
    assert "flight_id" in rep["error"] and "not a UUID" in rep["error"]
    flights = cb.cache_dir / "state" / "flights"
    assert not flights.exists() or list(flights.iterdir()) == []  # nothing saved, anywhere
    assert not (cb.home.parent / "etc").exists()


@settings(max_examples=2000 if LONG else 60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_api_answers_that_are_not_flights(body: bytes) -> None:
    """Hostile Flights API bodies over real HTTP: a flight, or exit 93 naming the URL."""
    from cachebuild.inputs.flights_api import fetch_flight

    srv = _shared_api()
    fid = "3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b"
    srv.routes[fid] = ("raw", body)
    try:
        fetch_flight(fid, url=srv.url, token=TOKEN, retries=0)
    except FlightInvalidAnswerError as exc:
        assert exc.exit_code == 93 and "/flights/" in exc.message and TOKEN not in str(exc)


_API: list[FlightsApi] = []


def _shared_api() -> FlightsApi:
    if not _API:
        _API.append(FlightsApi())
    return _API[0]


@pytest.fixture(scope="module", autouse=True)
def _close_shared_api() -> Any:
    yield
    for srv in _API:
        srv.close()
    _API.clear()


def test_offline_flight_id_is_only_a_checked_file_name(cb: Cb) -> None:
    """OFFLINE=1 reads state/flights/<uuid>.json and nothing else."""
    r = cb.build("FLIGHT=3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b", "OFFLINE=1")
    rep = assert_clean(r, {92})
    assert (
        str(cb.cache_dir / "state" / "flights" / "3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b.json")
        in rep["error"]
    )


def test_companion_agent_refuses_paths_outside_its_dir(tmp_path: Path) -> None:
    """What the workstation asks the companion about is relative and stays under DIR."""
    from cachebuild.companion.agent import _absent

    for rel in ("../../etc/passwd", "/etc/passwd", "inbox/../../x", ""):
        with pytest.raises(ValueError, match="not a path under DIR"):
            _absent(tmp_path, [rel])
    assert _absent(tmp_path, ["store/objects/ab/ab12"]) == ["store/objects/ab/ab12"]


@settings(max_examples=2000 if LONG else 200, deadline=None)
@given(st.integers(-(2**40), 2**40), st.integers(-(2**40), 2**40), st.integers(-5, 40))
def test_tile_coordinates_never_leave_the_tile_directory(x: int, y: int, z: int) -> None:
    """Any coordinates, even ones no tile has, fill a directory template as plain numbers."""
    from cachebuild.providers.base import fill_template
    from cachebuild.tilemath import Tile

    root = "/srv/tiles"
    path = fill_template(root + "/{z}/{x}/{-y}.png", Tile(x, y, z) if z >= 0 else Tile(x, y, 0))
    assert os.path.normpath(path).startswith(root + "/") and ".." not in path.split("/")
    assert path.count("/") == root.count("/") + 3


# -- absurd areas: MAX_TILES and the free disk ------------------------------------------------


def test_absurd_area_is_refused_before_the_lock_and_any_download(
    cb: Cb, tmp_path: Path, tile_server: TileServer
) -> None:
    f = write_flight(tmp_path / "far.json", waypoints=[(-60.0, -170.0), (70.0, 170.0)])
    r = cb.build(f"FLIGHT={f}", "ZOOM=19", f"PROVIDER={tile_server.template()}")
    rep = assert_clean(r, {2})
    assert rep["failure_phase"] == "area"
    assert "tiles" in rep["error"] and f"MAX_TILES={DEFAULT_MAX_TILES:,}" in rep["error"]
    assert "TiB" in rep["error"] and "nothing was downloaded" in rep["error"]
    assert "MAX_TILES" in rep["remedy"]
    assert tile_server.requests == []  # not one tile asked for
    assert not (cb.cache_dir / "build.lock").exists()  # refused before the lock
    assert not (cb.home / "store" / "objects").exists() or not any(
        (cb.home / "store" / "objects").iterdir()
    )


def test_max_tiles_is_a_limit_the_operator_sets(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={f}", "BUFFER_M=200", "MAX_TILES=4")
    rep = assert_clean(r, {2})
    n = int(rep["error"].split(" has ", 1)[1].split(" tiles", 1)[0].replace(",", ""))
    assert n > 4 and "more than MAX_TILES=4" in rep["error"]
    assert f"MAX_TILES={n}" in rep["remedy"]
    ok = cb.build(f"FLIGHT={f}", "BUFFER_M=200", f"MAX_TILES={n}", "SELFTEST_QUERIES=0")
    assert ok.code == 0, ok.stderr
    assert ok.report["tiles"]["planned"] == n


@pytest.mark.parametrize("value", ["0", "-5", "1e6", "lots", "1" * 40])
def test_max_tiles_is_validated(cb: Cb, tmp_path: Path, value: str) -> None:
    f = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={f}", f"MAX_TILES={value}")
    rep = assert_clean(r, {2})
    assert rep["failure_phase"] == "arguments" and "MAX_TILES" in rep["error"]


def test_an_area_larger_than_the_free_disk_is_refused(
    cb: Cb, tmp_path: Path, tile_server: TileServer
) -> None:
    """No disk is filled: the zoom is chosen so that the estimate exceeds what is free."""
    from cachebuild.inputs.area import free_bytes
    from cachebuild.tilemath import LngLatBbox, count_tiles

    free, _ = free_bytes(cb.home)
    bbox = LngLatBbox(8.0, 47.0, 9.0, 48.0)
    z = next(z for z in range(10, 23) if count_tiles(bbox, [z]) * BYTES_PER_TILE > free)
    f = write_flight(tmp_path / "f.json", waypoints=[(47.0, 8.0), (48.0, 9.0)])
    r = cb.build(
        f"FLIGHT={f}",
        f"ZOOM={z}",
        "BUFFER_M=0",
        "MAX_TILES=1000000000000",
        f"PROVIDER={tile_server.template()}",
    )
    rep = assert_clean(r, {2})
    assert rep["failure_phase"] == "area" and "free" in rep["error"] and "STORE=" in rep["error"]
    assert "gc-store" in rep["remedy"]
    assert tile_server.requests == [] and not (cb.cache_dir / "build.lock").exists()


# -- the area check, in-process ---------------------------------------------------------------


def _settings(tmp_path: Path, **kw: Any) -> Any:
    base = {"CACHE_DIR": str(tmp_path / "cache"), "STORE": str(tmp_path / "store")}
    base.update(kw)
    return load_settings(base, {"CACHEBUILD_HOME": str(tmp_path)})


def test_check_area_counts_bytes_per_disk(tmp_path: Path) -> None:
    s = _settings(tmp_path, ZOOM="17")
    bbox = (8.54, 47.37, 8.55, 47.38)
    est = check_area(s, bbox)
    assert est.tiles == est.new_tiles > 0
    assert est.bytes == est.tiles * BYTES_PER_TILE
    # the same disk for STORE and CACHE_DIR: the two are added before comparing with what is free
    with pytest.raises(AreaTooLargeError, match=r"need about .* STORE=.* and CACHE_DIR=") as info:
        check_area(s, bbox, free=lambda p: (est.bytes - 1, 1))
    assert info.value.exit_code == 2 and info.value.phase == "area"
    check_area(s, bbox, free=lambda p: (est.bytes, 1))  # exactly enough
    # on two disks, each is checked for its own part
    per_dir = {
        str(tmp_path / "store"): (est.store_bytes, 1),
        str(tmp_path / "cache"): (est.cache_bytes, 2),
    }
    check_area(s, bbox, free=lambda p: per_dir[str(p)])


def test_check_area_counts_only_tiles_not_staged(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    bbox = (8.54, 47.37, 8.55, 47.38)
    n = estimate_area(bbox, s.zooms, cache_dir=s.cache_dir).tiles
    staged = s.cache_dir / "state" / "build"
    staged.mkdir(parents=True)
    (staged / "tileset.json").write_text(json.dumps({"planned": n - 3}))
    est = check_area(s, bbox, free=lambda p: (3 * BYTES_PER_TILE, 1))
    assert est.new_tiles == 3


def test_check_area_with_a_companion_counts_only_the_store(tmp_path: Path) -> None:
    s = SimpleNamespace(**{**_settings(tmp_path).__dict__, "companion": "u@h"})
    bbox = (8.54, 47.37, 8.55, 47.38)
    est = check_area(s, bbox, free=lambda p: (10**15, 1))
    assert est.cache_bytes == 0 and est.store_bytes == est.tiles * STORE_BYTES_PER_TILE


def test_max_tiles_in_settings(tmp_path: Path) -> None:
    assert _settings(tmp_path).max_tiles == DEFAULT_MAX_TILES
    assert _settings(tmp_path, MAX_TILES="5000").max_tiles == 5000
    for bad in ("0", "x", "2.5"):
        with pytest.raises(UsageError, match="MAX_TILES"):
            _settings(tmp_path, MAX_TILES=bad)


def test_a_missing_store_is_measured_on_the_disk_it_would_be_made_on(tmp_path: Path) -> None:
    from cachebuild.inputs.area import free_bytes

    before = shutil.disk_usage(tmp_path).free
    free, dev = free_bytes(tmp_path / "not" / "yet" / "there")
    after = shutil.disk_usage(tmp_path).free
    # the same disk; its free space read between two readings of it (other
    # processes write while the suite runs, so equality would be a race)
    slack = 256 << 20
    assert dev == os.stat(tmp_path).st_dev
    assert min(before, after) - slack <= free <= max(before, after) + slack
