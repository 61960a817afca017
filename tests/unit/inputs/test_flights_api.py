"""The Flights API: a real HTTP server on 127.0.0.1, unit calls and real builds."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cachebuild.errors import (
    FlightInvalidAnswerError,
    FlightNetworkError,
    FlightNotFoundError,
    FlightUnauthorizedError,
)
from cachebuild.inputs.flights_api import fetch_flight, load_saved_answer, public_url, save_answer
from tests.conftest import Cb

TOKEN = "tok-7c1e9a55-secret"
GOOD = "3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b"
FLIGHT = {
    "flight_id": GOOD,
    "takeoff_origin": {"lat": 47.3702, "lon": 8.5402, "alt_m": 410.0},
    "waypoints": [
        {"lat": 47.3700, "lon": 8.5400, "alt_m": 120.0},
        {"lat": 47.3710, "lon": 8.5410, "alt_m": 120.0},
    ],
}


class FlightsApi:
    """Plays the Flights API. ``routes`` maps a flight id to a behaviour."""

    def __init__(self) -> None:
        self.routes: dict[str, Any] = {GOOD: ("json", FLIGHT)}
        self.hits: dict[str, int] = {}
        self.auth: list[str | None] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def log_message(self, *a: Any) -> None:
                pass

            def _send(
                self, status: int, body: bytes = b"", ctype: str = "application/json"
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                fid = self.path.rsplit("/", 1)[-1]
                api.hits[fid] = api.hits.get(fid, 0) + 1
                api.auth.append(self.headers.get("Authorization"))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, b'{"error": "unauthorised"}')
                kind, arg = api.routes.get(fid, ("status", 404))
                if kind == "json":
                    return self._send(200, json.dumps(arg).encode())
                if kind == "status":
                    return self._send(arg, b"{}")
                if kind == "fail_then":  # arg = (failures, then-flight)
                    if api.hits[fid] <= arg[0]:
                        return self._send(500, b"oops")
                    return self._send(200, json.dumps(arg[1]).encode())
                if kind == "throttle_then":  # arg = (429s, Retry-After, then-flight)
                    if api.hits[fid] <= arg[0]:
                        self.send_response(429)
                        self.send_header("Retry-After", arg[1])
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return None
                    return self._send(200, json.dumps(arg[2]).encode())
                if kind == "hang":
                    time.sleep(arg)
                    return self._send(200, json.dumps(FLIGHT).encode())
                if kind == "html":
                    return self._send(200, b"<html>login</html>", "text/html")
                if kind == "raw":
                    return self._send(200, arg)
                raise AssertionError(kind)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api() -> Iterator[FlightsApi]:
    srv = FlightsApi()
    yield srv
    srv.close()


def _id(n: int) -> str:
    return f"{n:08x}-0000-4000-8000-000000000000"


# -- unit: fetch_flight against the real server -----------------------------


def test_good_flight(api: FlightsApi) -> None:
    flight, record = fetch_flight(GOOD, url=api.url, token=TOKEN)
    assert flight.flight_id == GOOD and len(flight.waypoints) == 2
    assert record["takeoff_origin"]["alt_m"] == 410.0
    assert api.auth == [f"Bearer {TOKEN}"]


def test_answer_without_id_takes_the_asked_one(api: FlightsApi) -> None:
    api.routes[_id(1)] = ("json", {k: v for k, v in FLIGHT.items() if k != "flight_id"})
    flight, _ = fetch_flight(_id(1), url=api.url, token=TOKEN)
    assert flight.flight_id == _id(1)


@pytest.mark.parametrize(
    "route, exc, needle",
    [
        (("status", 404), FlightNotFoundError, "not found"),
        (("status", 403), FlightUnauthorizedError, "refused the token"),
        (("html", None), FlightInvalidAnswerError, "text/html"),
        (("raw", b"{not json"), FlightInvalidAnswerError, "line 1"),
        (("json", {"waypoints": []}), FlightInvalidAnswerError, "waypoints"),
        (
            ("json", {**FLIGHT, "waypoints": [{"lat": 91, "lon": 0, "alt_m": 1}]}),
            FlightInvalidAnswerError,
            "waypoints[0].lat",
        ),
        (("json", {**FLIGHT, "flight_id": _id(9)}), FlightInvalidAnswerError, "asked for flight"),
        (("status", 418), FlightInvalidAnswerError, "HTTP 418"),
    ],
)
def test_each_failure_has_its_error(api: FlightsApi, route: Any, exc: type, needle: str) -> None:
    api.routes[_id(2)] = route
    with pytest.raises(exc) as info:
        fetch_flight(_id(2), url=api.url, token=TOKEN, backoff_s=0.01)
    assert needle in str(info.value)
    assert TOKEN not in str(info.value)


def test_wrong_token_is_91_and_never_echoed(api: FlightsApi) -> None:
    with pytest.raises(FlightUnauthorizedError) as info:
        fetch_flight(GOOD, url=api.url, token="wrong-token-123")
    assert info.value.exit_code == 91 and "wrong-token-123" not in str(info.value)


def test_500_then_success_is_retried(api: FlightsApi) -> None:
    api.routes[_id(3)] = ("fail_then", (2, {**FLIGHT, "flight_id": _id(3)}))
    flight, _ = fetch_flight(_id(3), url=api.url, token=TOKEN, retries=2, backoff_s=0.01)
    assert flight.flight_id == _id(3) and api.hits[_id(3)] == 3


def test_429_with_retry_after_is_waited_and_spends_no_retry(api: FlightsApi) -> None:
    api.routes[_id(6)] = ("throttle_then", (2, "0", {**FLIGHT, "flight_id": _id(6)}))
    # no retries at all: only the 429s' own allowance lets the third request happen
    flight, _ = fetch_flight(_id(6), url=api.url, token=TOKEN, retries=0, backoff_s=30.0)
    assert flight.flight_id == _id(6) and api.hits[_id(6)] == 3


def test_429_forever_is_a_network_error_after_its_allowance(api: FlightsApi) -> None:
    from cachebuild.inputs.flights_api import MAX_THROTTLED

    api.routes[_id(7)] = ("throttle_then", (100, "0", FLIGHT))
    with pytest.raises(FlightNetworkError) as info:
        fetch_flight(_id(7), url=api.url, token=TOKEN, retries=1, backoff_s=0.01)
    assert info.value.exit_code == 92 and "HTTP 429" in str(info.value)
    assert api.hits[_id(7)] == MAX_THROTTLED + 1  # the allowance, then it gives up


def test_persistent_500_and_hang_are_network_errors(api: FlightsApi) -> None:
    api.routes[_id(4)] = ("status", 503)
    with pytest.raises(FlightNetworkError) as info:
        fetch_flight(_id(4), url=api.url, token=TOKEN, retries=1, backoff_s=0.01)
    assert "HTTP 503 after 2 attempts" in str(info.value)
    api.routes[_id(5)] = ("hang", 3.0)
    t = time.monotonic()
    with pytest.raises(FlightNetworkError) as info:
        fetch_flight(_id(5), url=api.url, token=TOKEN, timeout_s=0.3, retries=1, backoff_s=0.01)
    assert "no answer within 0.3 s" in str(info.value)
    assert time.monotonic() - t < 2.5


def test_a_dripping_answer_is_cut_at_the_timeout() -> None:
    """FLIGHTS_API_TIMEOUT bounds each attempt in all: one byte now and then passes any per-read timeout."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    done = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9999\r\n\r\n"
            )
            for _ in range(
                50
            ):  # 10 s at most: without the deadline the client would wait that long
                if done.wait(0.2):
                    return
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    threading.Thread(target=drip, daemon=True).start()
    try:
        with pytest.raises(FlightNetworkError) as info:
            url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
            fetch_flight(GOOD, url=url, token=TOKEN, timeout_s=1.0, retries=0)
    finally:
        done.set()
        listener.close()
    assert "no answer within 1 s" in str(info.value)


def test_unreachable_api(tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(FlightNetworkError) as info:
        fetch_flight(GOOD, url=f"http://user:pw@127.0.0.1:{port}/api", token=TOKEN, retries=0)
    assert "cannot connect" in str(info.value) and "pw" not in str(info.value)


def test_public_url_drops_credentials_and_query() -> None:
    assert public_url("https://u:secret@h.example:8443/a/b?t=x#f") == "https://h.example:8443/a/b"


def test_saved_answer_round_trip(tmp_path: Path) -> None:
    from cachebuild.inputs.flight import flight_record, parse_flight

    rec = flight_record(parse_flight(json.dumps(FLIGHT), "x"))
    save_answer(tmp_path, GOOD, rec)
    flight, again = load_saved_answer(tmp_path, GOOD)
    assert again == rec and flight.flight_id == GOOD
    with pytest.raises(FlightNetworkError):
        load_saved_answer(tmp_path, _id(7))


# -- end to end: real doit processes ----------------------------------------


def _cb_env(cb: Cb, api: FlightsApi, **extra: str) -> dict[str, str]:
    return cb.env(**{"FLIGHTS_API_URL": api.url, "FLIGHTS_API_TOKEN": TOKEN, **extra})


@pytest.mark.parametrize(
    "route, code",
    [
        (("status", 404), 90),
        (("html", None), 93),
        (("json", {"waypoints": "nope"}), 93),
        (("hang", 5.0), 92),
        (("status", 500), 92),
    ],
)
def test_build_by_id_exit_codes_and_no_lock(cb: Cb, api: FlightsApi, route: Any, code: int) -> None:
    api.routes[_id(6)] = route
    r = cb.build(f"FLIGHT={_id(6)}", "FLIGHTS_API_TIMEOUT=0.5", env=_cb_env(cb, api))
    assert r.code == code, r.stderr
    assert r.report["failure_phase"] == "flight"
    assert not (cb.cache_dir / "build.lock").exists()
    assert TOKEN not in r.stdout + r.stderr


def test_build_by_id_unauthorised(cb: Cb, api: FlightsApi) -> None:
    r = cb.build(f"FLIGHT={GOOD}", env=_cb_env(cb, api, FLIGHTS_API_TOKEN="bad-token-xyz"))
    assert r.code == 91
    assert "bad-token-xyz" not in r.stdout + r.stderr
    assert not (cb.cache_dir / "build.lock").exists()


def test_build_by_id_then_unchanged_answer_rebuilds_nothing_then_offline(
    cb: Cb, api: FlightsApi
) -> None:
    env = _cb_env(cb, api)
    r = cb.build(f"FLIGHT={GOOD}", "BUFFER_M=200", env=env)
    assert r.code == 0, r.stderr
    assert r.report["flight_id"] == GOOD and r.report["flight_source"] == "api"
    again = cb.build(f"FLIGHT={GOOD.upper()}", "BUFFER_M=200", env=env)
    assert again.code == 0 and again.report["outcome"] == "up_to_date"
    assert api.hits[GOOD] == 2, "the default always asks the API"

    # the API changes the takeoff origin: the flight record, the coverage map (it
    # marks the origin) and the manifest rebuild
    api.routes[GOOD] = (
        "json",
        {**FLIGHT, "takeoff_origin": {"lat": 47.3705, "lon": 8.5405, "alt_m": 410.0}},
    )
    changed = cb.build(f"FLIGHT={GOOD}", "BUFFER_M=200", env=env)
    assert set(changed.report["tasks"]["run"]) == {"flight", "preview", "manifest"}

    # the API goes away: the default fails with 92, OFFLINE=1 rebuilds from the saved answer
    api.close()
    down = cb.build(f"FLIGHT={GOOD}", "BUFFER_M=200", "FLIGHTS_API_TIMEOUT=0.3", env=env)
    assert down.code == 92
    offline = cb.build(f"FLIGHT={GOOD}", "BUFFER_M=200", "OFFLINE=1", env=env)
    assert offline.code == 0, offline.stderr
    assert (
        offline.report["outcome"] == "up_to_date" and offline.report["flight_source"] == "offline"
    )
    for path in cb.home.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_flight_that_is_neither_path_nor_uuid(cb: Cb) -> None:
    r = cb.build("FLIGHT=tomorrows-flight")
    assert r.code == 2
    assert "neither an existing flight file nor a flight id" in r.report["error"]


def test_flight_id_without_api_url(cb: Cb) -> None:
    r = cb.build(f"FLIGHT={GOOD}")
    assert r.code == 2 and "FLIGHTS_API_URL" in r.report["error"]


@pytest.mark.parametrize("example", ["antimeridian.json", "single_waypoint.json"])
def test_awkward_routes_from_the_api_build(cb: Cb, api: FlightsApi, example: str) -> None:
    """Real routes served by the API: the area holds every waypoint and the origin."""
    from cachebuild.inputs.flight import flight_area, parse_flight
    from cachebuild.tilemath import bbox_contains

    doc = json.loads(
        (Path(__file__).resolve().parents[3] / "examples" / "flights" / example).read_text()
    )
    fid = _id(8)
    doc["flight_id"] = fid
    api.routes[fid] = ("json", doc)
    r = cb.build(f"FLIGHT={fid}", "BUFFER_M=100", env=_cb_env(cb, api))
    assert r.code == 0, r.stderr
    flight = parse_flight(json.dumps(doc), example)
    area = flight_area(flight, 100)
    for p in [*flight.waypoints, *([flight.takeoff_origin] if flight.takeoff_origin else [])]:
        assert bbox_contains(area, p.lat, p.lon)
    signed = json.loads((cb.current / "manifest.json").read_text())["signed"]
    assert signed["identity"]["bbox"] == pytest.approx(list(area))
