"""Tests for cachebuild.inputs.flight: parsing, validation messages, the area."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachebuild.errors import (
    FlightError,
    FlightFileInvalidError,
    FlightFileMissingError,
    FlightInvalidAnswerError,
)
from cachebuild.inputs import flight as F
from cachebuild.inputs.flight import (
    MAX_WAYPOINTS,
    Flight,
    flight_area,
    flight_from_record,
    flight_record,
    load_flight_file,
    looks_like_uuid,
    parse_flight,
)
from cachebuild.tilemath import EARTH_RADIUS_M, MAX_LAT, LatLonAlt, bbox_contains, count_tiles

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "flights"
DEMO_ID = "3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b"


def wp(lat: float = 47.37, lon: float = 8.54, alt_m: float = 120.0) -> dict[str, Any]:
    return {"lat": lat, "lon": lon, "alt_m": alt_m}


def doc(**overrides: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "flight_id": DEMO_ID,
        "takeoff_origin": wp(alt_m=0.0),
        "waypoints": [wp(), wp(47.38)],
    }
    d.update(overrides)
    return d


def write(tmp_path: Path, content: Any, name: str = "flight.json") -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, str):
        p.write_text(content, encoding="utf-8")
    else:
        p.write_text(json.dumps(content), encoding="utf-8")
    return p


def invalid(tmp_path: Path, content: Any) -> tuple[Path, FlightFileInvalidError]:
    p = write(tmp_path, content)
    with pytest.raises(FlightFileInvalidError) as info:
        load_flight_file(p)
    assert info.value.exit_code == 95
    assert info.value.message.startswith(f"{p}: "), info.value.message
    return p, info.value


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


# ---------------------------------------------------------------- surface


def test_docstring_examples() -> None:
    import doctest

    result = doctest.testmod(F, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_all_is_complete() -> None:
    public = {
        n
        for n in dir(F)
        if not n.startswith("_") and getattr(getattr(F, n), "__module__", "") == F.__name__
    }
    assert public <= set(F.__all__)
    for name in F.__all__:
        assert hasattr(F, name)


def test_imports_no_numpy() -> None:
    import subprocess

    code = (
        "import sys, cachebuild.inputs.flight, cachebuild.tilemath; print('numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- valid input


def test_valid_file(tmp_path: Path) -> None:
    p = write(tmp_path, doc())
    f = load_flight_file(p)
    assert f == Flight(
        flight_id=DEMO_ID,
        takeoff_origin=LatLonAlt(47.37, 8.54, 0.0),
        waypoints=(LatLonAlt(47.37, 8.54, 120.0), LatLonAlt(47.38, 8.54, 120.0)),
    )
    assert all(isinstance(v, float) for p_ in f.waypoints for v in p_)
    assert load_flight_file(str(p)) == f


def test_demo_example() -> None:
    f = load_flight_file(EXAMPLES / "demo.json")
    assert f.flight_id == DEMO_ID
    assert f.takeoff_origin is not None
    assert len(f.waypoints) == 6
    area = flight_area(f, 500.0)
    assert 150 <= count_tiles(area, [17]) <= 300
    assert bbox_contains(area, 47.37, 8.54)


@pytest.mark.parametrize("name", ["demo", "antimeridian", "high_latitude", "single_waypoint"])
def test_every_example_loads(name: str) -> None:
    f = load_flight_file(EXAMPLES / f"{name}.json")
    area = flight_area(f, 500.0)
    for p in f.waypoints:
        assert bbox_contains(area, p.lat, p.lon)
    assert 0 < count_tiles(area, [17]) < 5000


def test_antimeridian_example_wraps() -> None:
    area = flight_area(load_flight_file(EXAMPLES / "antimeridian.json"), 500.0)
    assert area.west > area.east
    assert -17.1 < area.south < area.north < -16.9


def test_takeoff_origin_null_and_absent(tmp_path: Path) -> None:
    assert parse_flight(json.dumps(doc(takeoff_origin=None)), "x").takeoff_origin is None
    d = doc()
    del d["takeoff_origin"]
    assert parse_flight(json.dumps(d), "x").takeoff_origin is None


def test_flight_id_optional_and_normalised() -> None:
    d = doc()
    del d["flight_id"]
    assert parse_flight(json.dumps(d), "x").flight_id is None
    assert parse_flight(json.dumps(doc(flight_id=None)), "x").flight_id is None
    assert parse_flight(json.dumps(doc(flight_id=DEMO_ID.upper())), "x").flight_id == DEMO_ID
    assert (
        parse_flight(json.dumps(doc(flight_id=DEMO_ID.replace("-", ""))), "x").flight_id == DEMO_ID
    )


def test_integers_bytes_and_bom() -> None:
    text = '{"waypoints": [{"lat": 47, "lon": -8, "alt_m": 0}]}'
    f = parse_flight(text, "x")
    assert f.waypoints == (LatLonAlt(47.0, -8.0, 0.0),)
    assert parse_flight(text.encode(), "x") == f
    assert parse_flight(b"\xef\xbb\xbf" + text.encode(), "x") == f


def test_limits_are_inclusive() -> None:
    pts = [wp(90.0, 180.0, -1000.0), wp(-90.0, -180.0, 100_000.0)]
    assert len(parse_flight(json.dumps(doc(waypoints=pts)), "x").waypoints) == 2
    many = [wp()] * MAX_WAYPOINTS
    assert len(parse_flight(json.dumps(doc(waypoints=many)), "x").waypoints) == MAX_WAYPOINTS


# ---------------------------------------------------------------- missing files (94)


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.json"
    with pytest.raises(FlightFileMissingError) as info:
        load_flight_file(p)
    assert info.value.exit_code == 94
    assert info.value.message == f"flight file not found: {p}"
    assert "remedy" in str(info.value)


def test_directory_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FlightFileMissingError) as info:
        load_flight_file(tmp_path)
    assert info.value.message.startswith(f"flight file not found: {tmp_path}")
    assert "directory" in info.value.message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_missing_and_does_not_block(tmp_path: Path) -> None:
    p = tmp_path / "pipe.json"
    os.mkfifo(p)
    with pytest.raises(FlightFileMissingError, match="not a regular file"):
        load_flight_file(p)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads everything")
def test_unreadable_is_missing(tmp_path: Path) -> None:
    p = write(tmp_path, doc())
    p.chmod(0)
    try:
        with pytest.raises(FlightFileMissingError, match="cannot read"):
            load_flight_file(p)
    finally:
        p.chmod(0o644)


def test_read_error_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, doc())

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(F, "open", refuse, raising=False)
    with pytest.raises(FlightFileMissingError) as info:
        load_flight_file(p)
    assert info.value.message == f"flight file not found: {p} (cannot read it: Permission denied)"


def test_nul_in_path_is_missing() -> None:
    with pytest.raises(FlightFileMissingError, match="flight file not found"):
        load_flight_file("bad\0name.json")


# ---------------------------------------------------------------- invalid files (95)


def test_bad_json_names_line_and_column(tmp_path: Path) -> None:
    p, e = invalid(tmp_path, '{"waypoints": [\n  {"lat": 1,}\n]}')
    assert "line 2 column 13" in e.message
    assert "invalid JSON" in e.message


def test_empty_file(tmp_path: Path) -> None:
    _, e = invalid(tmp_path, "")
    assert "line 1 column 1" in e.message


def test_empty_waypoints(tmp_path: Path) -> None:
    p, e = invalid(tmp_path, doc(waypoints=[]))
    assert e.message == f"{p}: waypoints: empty; a flight needs at least 1 waypoint"


def test_too_many_waypoints(tmp_path: Path) -> None:
    _, e = invalid(tmp_path, doc(waypoints=[wp()] * (MAX_WAYPOINTS + 1)))
    assert f"waypoints: {MAX_WAYPOINTS + 1} waypoints; at most {MAX_WAYPOINTS}" in e.message


def test_lat_out_of_range(tmp_path: Path) -> None:
    pts = [wp(), wp(), wp(), wp(95.0)]
    p, e = invalid(tmp_path, doc(waypoints=pts))
    assert e.message == f"{p}: waypoints[3].lat: 95.0 is outside -90..90"


def test_lon_out_of_range(tmp_path: Path) -> None:
    p, e = invalid(tmp_path, doc(waypoints=[wp(lon=-181)]))
    assert e.message == f"{p}: waypoints[0].lon: -181 is outside -180..180"


def test_alt_out_of_range(tmp_path: Path) -> None:
    p, e = invalid(tmp_path, doc(takeoff_origin=wp(alt_m=-1000.5)))
    assert e.message == f"{p}: takeoff_origin.alt_m: -1000.5 is outside -1000..100000 m"


def test_string_number(tmp_path: Path) -> None:
    p, e = invalid(tmp_path, doc(waypoints=[wp(), {"lat": "47.3", "lon": 8.5, "alt_m": 100}]))
    assert e.message == f'{p}: waypoints[1].lat: "47.3" is a string, expected a number'


def test_bool_is_not_a_number(tmp_path: Path) -> None:
    p, e = invalid(tmp_path, doc(waypoints=[{"lat": 47.0, "lon": 8.5, "alt_m": True}]))
    assert e.message == f"{p}: waypoints[0].alt_m: true is a boolean, expected a number"


def test_null_is_not_a_number(tmp_path: Path) -> None:
    _, e = invalid(tmp_path, doc(waypoints=[{"lat": None, "lon": 8.5, "alt_m": 1}]))
    assert "waypoints[0].lat: null is null, expected a number" in e.message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literals(tmp_path: Path, literal: str) -> None:
    text = f'{{"waypoints": [{{"lat": 1, "lon": 2, "alt_m": 3}}, {{"lat": 1, "lon": {literal}, "alt_m": 3}}]}}'
    p, e = invalid(tmp_path, text)
    assert e.message.startswith(f"{p}: waypoints[1].lon: {literal} is not allowed")


def test_overflowing_number(tmp_path: Path) -> None:
    _, e = invalid(tmp_path, '{"waypoints": [{"lat": 1e400, "lon": 2, "alt_m": 3}]}')
    assert "waypoints[0].lat: " in e.message and "not a finite number" in e.message
    _, e = invalid(tmp_path, '{"waypoints": [{"lat": 1, "lon": 2, "alt_m": %s}]}' % ("9" * 5000))
    assert "waypoints[0].alt_m: " in e.message and "not a finite number" in e.message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    p, e = invalid(tmp_path, doc(pilot="me"))
    assert e.message == f"{p}: pilot: unknown key (allowed: flight_id, takeoff_origin, waypoints)"


def test_unknown_waypoint_key(tmp_path: Path) -> None:
    p, e = invalid(tmp_path, doc(waypoints=[wp(), {**wp(), "speed": 12}]))
    assert e.message == f"{p}: waypoints[1].speed: unknown key (allowed: lat, lon, alt_m)"


def test_unknown_origin_key(tmp_path: Path) -> None:
    _, e = invalid(tmp_path, doc(takeoff_origin={**wp(), "heading": 0}))
    assert "takeoff_origin.heading: unknown key" in e.message


def test_missing_fields(tmp_path: Path) -> None:
    _, e = invalid(tmp_path, {"flight_id": DEMO_ID})
    assert e.message.endswith("waypoints: missing (required)")
    _, e = invalid(tmp_path, doc(waypoints=[{"lat": 1, "lon": 2}]))
    assert e.message.endswith("waypoints[0].alt_m: missing (required)")


def test_wrong_shapes(tmp_path: Path) -> None:
    _, e = invalid(tmp_path, [wp()])
    assert "the flight must be a JSON object, got an array" in e.message
    _, e = invalid(tmp_path, doc(waypoints={"0": wp()}))
    assert "waypoints: expected an array, got an object" in e.message
    _, e = invalid(tmp_path, doc(waypoints=[[47.0, 8.5, 100.0]]))
    assert "waypoints[0]: expected an object with lat, lon, alt_m, got an array" in e.message


def test_duplicate_key(tmp_path: Path) -> None:
    _, e = invalid(tmp_path, '{"waypoints": [{"lat": 1, "lat": 2, "lon": 2, "alt_m": 3}]}')
    assert 'duplicate key "lat"' in e.message


@pytest.mark.parametrize(
    "bad", ["not-a-uuid", DEMO_ID[:-1], DEMO_ID + "0", "{" + DEMO_ID + "}", " " + DEMO_ID, ""]
)
def test_bad_uuid(tmp_path: Path, bad: str) -> None:
    p, e = invalid(tmp_path, doc(flight_id=bad))
    assert e.message.startswith(f"{p}: flight_id: {json.dumps(bad)} is not a UUID")


def test_uuid_of_wrong_type(tmp_path: Path) -> None:
    _, e = invalid(tmp_path, doc(flight_id=12))
    assert "flight_id: 12 is a number, expected a UUID string" in e.message


def test_non_utf8(tmp_path: Path) -> None:
    p, e = invalid(tmp_path, b'{"waypoints": [{"lat": 1, "lon": 2, "alt_m": 3}], "x": "\xff"}')
    assert e.message == f"{p}: not UTF-8 text (byte 0xff at offset 56)"


def test_deep_nesting(tmp_path: Path) -> None:
    _, e = invalid(tmp_path, "[" * 100_000 + "]" * 100_000)
    assert e.message.endswith("invalid JSON: nested too deeply")


def test_api_answers_raise_the_given_class() -> None:
    url = "https://flights.example/api/flights/" + DEMO_ID
    with pytest.raises(FlightInvalidAnswerError) as info:
        parse_flight(b"{}", url, error_cls=FlightInvalidAnswerError)
    assert info.value.message == f"{url}: waypoints: missing (required)"
    assert info.value.exit_code == 93


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
point_like = st.fixed_dictionaries(
    {
        "lat": json_values | st.floats(-100, 100),
        "lon": json_values | st.floats(-200, 200),
        "alt_m": json_values,
    },
    optional={"x": json_values},
)


@settings(max_examples=150)
@given(
    st.one_of(
        st.binary(max_size=64),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"waypoints": st.lists(point_like, max_size=3)},
            optional={
                "flight_id": json_values,
                "takeoff_origin": point_like | json_values,
                "y": json_values,
            },
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_no_input_gives_a_traceback(data: bytes) -> None:
    try:
        f = parse_flight(data, "fuzz.json")
    except FlightFileInvalidError as exc:
        assert exc.message.startswith("fuzz.json: ")
    else:
        assert isinstance(f, Flight) and f.waypoints


# ---------------------------------------------------------------- record


def test_record_round_trip() -> None:
    f = load_flight_file(EXAMPLES / "demo.json")
    rec = flight_record(f)
    assert set(rec) == {"flight_id", "takeoff_origin", "waypoints"}
    assert rec["flight_id"] == DEMO_ID
    assert rec["waypoints"][0] == {"lat": 47.371, "lon": 8.541, "alt_m": 120.0}
    assert flight_from_record(rec) == f
    assert parse_flight(json.dumps(rec), "rec") == f
    g = Flight(None, None, (LatLonAlt(1.0, 2.0, 3.0),))
    assert flight_record(g)["takeoff_origin"] is None
    assert flight_from_record(flight_record(g)) == g


def test_flight_from_record_validates() -> None:
    with pytest.raises(
        FlightFileInvalidError, match=r"flight record: waypoints\[0\].lat: NaN is not a finite"
    ):
        flight_from_record({"waypoints": [{"lat": math.nan, "lon": 0.0, "alt_m": 0.0}]})


@given(
    st.lists(
        st.builds(LatLonAlt, st.floats(-90, 90), st.floats(-180, 180), st.floats(-1000, 100_000)),
        min_size=1,
        max_size=5,
    ),
    st.none() | st.uuids().map(str),
)
def test_record_round_trip_property(points: list[LatLonAlt], fid: str | None) -> None:
    f = Flight(fid, points[0], tuple(points))
    assert parse_flight(json.dumps(flight_record(f)), "p") == f


def test_looks_like_uuid() -> None:
    u = str(uuid.uuid4())
    assert looks_like_uuid(u) and looks_like_uuid(u.upper()) and looks_like_uuid(u.replace("-", ""))
    assert not looks_like_uuid("examples/flights/demo.json")
    assert not looks_like_uuid(u + "\n")
    assert not looks_like_uuid(12)  # type: ignore[arg-type]


# ---------------------------------------------------------------- area


def test_single_waypoint_box_is_twice_the_buffer() -> None:
    f = load_flight_file(EXAMPLES / "single_waypoint.json")
    p = f.waypoints[0]
    area = flight_area(f, 500.0)
    assert haversine_m(area.south, p.lon, area.north, p.lon) == pytest.approx(1000.0, rel=1e-9)
    width = haversine_m(p.lat, area.west, p.lat, area.east)
    assert 1000.0 <= width <= 1000.5
    assert area.south < p.lat < area.north and area.west < p.lon < area.east


def test_area_includes_origin_outside_waypoints() -> None:
    f = Flight(
        None,
        LatLonAlt(47.30, 8.40, 0.0),
        (LatLonAlt(47.37, 8.54, 100.0), LatLonAlt(47.38, 8.55, 100.0)),
    )
    area = flight_area(f, 100.0)
    assert bbox_contains(area, 47.30, 8.40)
    assert area.south < 47.30 < area.south + 0.002 and area.west < 8.40 < area.west + 0.002
    no_origin = flight_area(Flight(None, None, f.waypoints), 100.0)
    assert not bbox_contains(no_origin, 47.30, 8.40)


def test_route_across_the_antimeridian_wraps(tmp_path: Path) -> None:
    pts = [wp(-17.0, 179.99), wp(-17.01, -179.99), wp(-17.02, -179.98)]
    f = load_flight_file(write(tmp_path, doc(takeoff_origin=None, waypoints=pts)))
    area = flight_area(f, 500.0)
    assert area.west > area.east
    assert 179.98 < area.west < 179.99 and -179.98 < area.east < -179.97
    for p in f.waypoints:
        assert bbox_contains(area, p.lat, p.lon)
    assert 0 < count_tiles(area, [17]) < 500


def test_area_near_85_degrees_clamps() -> None:
    f = Flight(None, None, (LatLonAlt(85.04, 10.0, 100.0),))
    area = flight_area(f, 2000.0)
    assert area.north == MAX_LAT
    assert area.south == pytest.approx(85.04 - math.degrees(2000.0 / EARTH_RADIUS_M))
    beyond = flight_area(Flight(None, None, (LatLonAlt(88.0, 10.0, 100.0),)), 500.0)
    assert beyond.south == beyond.north == MAX_LAT
    hi = flight_area(load_flight_file(EXAMPLES / "high_latitude.json"), 20_000.0)
    assert hi.north == MAX_LAT


def test_area_refuses_negative_buffer() -> None:
    with pytest.raises(ValueError):
        flight_area(Flight(None, None, (LatLonAlt(0.0, 0.0, 0.0),)), -1.0)


def test_errors_are_flight_errors() -> None:
    assert issubclass(FlightFileInvalidError, FlightError)
    assert issubclass(FlightFileMissingError, FlightError)
