"""Tests for cachebuild.providers.xyz: XYZ/TMS/quadkey templates over HTTP,
against the real server of tests/_harness/tileserver.py on 127.0.0.1, which counts
every request server-side.

Subdomains, extra headers (tokens), the rate limit, retries, and each fault
the server can play: 429/503 with Retry-After, 500, dropped connections,
truncated bodies, HTML with 200, slow answers.
"""

from __future__ import annotations

import io
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from PIL import Image

from cachebuild.errors import EXIT_DOWNLOAD, DownloadError, UsageError
from cachebuild.providers import open_provider
from cachebuild.providers.base import USER_AGENT, TileFetchError
from cachebuild.providers.xyz import XyzProvider
from cachebuild.providers.xyzconfig import (
    API_KEY_ENV,
    HEADERS_ENV,
    HttpConfig,
    parse_headers,
    parse_rate_limit,
    parse_subdomains,
)
from cachebuild.tilemath import Tile, quadkey
from tests._harness.tileserver import (
    DROP,
    DROP_MID_BODY,
    HTML,
    KEY,
    TRUNCATED,
    Reply,
    Slow,
    TileServer,
    html,
    tile_bytes,
    too_many,
)
from tests.unit.providers.test_providers import (
    TOKEN,
    T,
    _png,
    assert_no_key,
    fast_env,
    full_text,
    xyz,
)

# ------------------------------------------------------------------ XYZ over HTTP


def test_fetch_returns_the_servers_bytes(server: TileServer) -> None:
    with closing(open_provider(server.template(), env=fast_env())) as p:
        assert p.fetch(T) == tile_bytes(T)
    assert server.requests == [f"/{T.z}/{T.x}/{T.y}.jpg"]
    assert [h["user-agent"] for h in server.headers] == [USER_AGENT]
    assert parse_qs(server.queries[0])["key"] == [KEY]


def test_tms_rows_with_minus_y(server: TileServer) -> None:
    template = server.template(path="/tms/{z}/{x}/{-y}.jpg")
    with closing(open_provider(template, env=fast_env())) as p:
        for t in (T, Tile(0, 0, 1), Tile(3, 0, 2)):
            assert p.fetch(t) == tile_bytes(t)
    assert server.requests == [
        f"/tms/17/{T.x}/{2**17 - 1 - T.y}.jpg",
        "/tms/1/0/1.jpg",
        "/tms/2/3/3.jpg",
    ]


def test_quadkeys(server: TileServer) -> None:
    template = server.template(path="/q/{q}.jpg")
    with closing(open_provider(template, env=fast_env())) as p:
        assert p.fetch(Tile(3, 5, 3)) == tile_bytes(Tile(3, 5, 3))
        assert p.fetch(T) == tile_bytes(T)
    assert server.requests == ["/q/213.jpg", f"/q/{quadkey(T)}.jpg"]


def test_not_found_and_no_content_mean_no_tile(server: TileServer) -> None:
    gone, blank = Tile(1, 1, 5), Tile(2, 1, 5)
    server.missing.add(gone)
    server.empty.add(blank)
    with closing(xyz(server)) as p:
        assert p.fetch(gone) is None
        assert p.fetch(blank) is None
    assert server.count(gone) == 1 and server.count(blank) == 1  # not retried


def test_server_errors_are_retried(server: TileServer) -> None:
    server.script(T, Reply(500), Reply(503))
    with closing(xyz(server)) as p:
        assert p.fetch(T) == tile_bytes(T)
    assert server.count(T) == 3


def test_retries_run_out(server: TileServer) -> None:
    server.script(T, Reply(500), Reply(502), Reply(500), Reply(200, tile_bytes(T)))
    with closing(xyz(server)) as p, pytest.raises(TileFetchError) as info:
        p.fetch(T)
    err = info.value
    assert server.count(T) == 3
    assert err.tile == T
    assert f"{T.z}/{T.x}/{T.y}" in str(err) and "HTTP 500" in str(err) and "3 attempt" in str(err)
    assert "key={key}" in str(err)  # the URL is shown with the placeholder
    assert err.exit_code == EXIT_DOWNLOAD
    assert_no_key(full_text(err))


def test_backoff_grows(server: TileServer) -> None:
    server.script(T, Reply(500), Reply(500))
    with closing(xyz(server, backoff_s=0.1)) as p:
        start = time.monotonic()
        assert p.fetch(T) == tile_bytes(T)
        elapsed = time.monotonic() - start
    # 0.1 * [0.5, 1.5) + 0.2 * [0.5, 1.5)
    assert 0.15 <= elapsed < 1.5


def test_retry_after_zero_is_honoured_instead_of_backoff(server: TileServer) -> None:
    server.script(T, Reply(429, b"slow down", {"Retry-After": "0"}))
    with closing(xyz(server, backoff_s=30.0)) as p:
        start = time.monotonic()
        assert p.fetch(T) == tile_bytes(T)
        assert time.monotonic() - start < 3.0
    assert server.count(T) == 2


def test_retry_after_seconds_are_waited(server: TileServer) -> None:
    server.script(T, Reply(429, b"", {"Retry-After": "1"}))
    with closing(xyz(server)) as p:
        start = time.monotonic()
        assert p.fetch(T) == tile_bytes(T)
        assert time.monotonic() - start >= 0.95


def test_retry_after_is_capped(server: TileServer) -> None:
    server.script(
        T,
        Reply(503, b"", {"Retry-After": "3600"}),
        Reply(429, b"", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
    )
    with closing(xyz(server, retry_after_max_s=0.1, backoff_s=30.0)) as p:
        start = time.monotonic()
        assert p.fetch(T) == tile_bytes(T)
        assert time.monotonic() - start < 3.0  # capped, and a past date is now
    assert server.count(T) == 3


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (256, 256)).save(buf, format="GIF")
    return buf.getvalue()


BAD_BODIES = {
    "html": (html(), "not an image"),
    "json": (
        Reply(200, b'{"error": "quota exceeded"}', {"Content-Type": "application/json"}),
        "not an image",
    ),
    "empty": (Reply(200, b"", {"Content-Type": "image/jpeg"}), "empty body"),
    "truncated": (Reply(200, tile_bytes(T)[:3000], {"Content-Type": "image/jpeg"}), "broken image"),
    "wrong size": (Reply(200, _png(512), {"Content-Type": "image/png"}), "512x512"),
    "gif": (Reply(200, _gif(), {"Content-Type": "image/gif"}), "GIF"),
}


@pytest.mark.parametrize("kind", list(BAD_BODIES))
def test_bodies_that_are_not_tiles_fail_after_retries(server: TileServer, kind: str) -> None:
    reply, message = BAD_BODIES[kind]
    server.script(T, reply, reply)
    with closing(xyz(server, retries=1)) as p, pytest.raises(TileFetchError, match=message) as info:
        p.fetch(T)
    assert server.count(T) == 2
    assert_no_key(full_text(info.value))


def test_a_bad_body_then_a_good_one_succeeds(server: TileServer) -> None:
    server.script(T, html())
    with closing(xyz(server)) as p:
        assert p.fetch(T) == tile_bytes(T)
    assert server.count(T) == 2


def test_a_png_of_the_right_size_is_a_tile(server: TileServer) -> None:
    server.script(T, Reply(200, _png(256), {"Content-Type": "image/png"}))
    with closing(xyz(server)) as p:
        assert p.fetch(T) == _png(256)


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_fail_at_once_without_the_key(server: TileServer, status: int) -> None:
    server.script(T, Reply(status, b"invalid api key"))
    with (
        closing(open_provider(server.template(), env=fast_env())) as p,
        pytest.raises(DownloadError) as info,
    ):
        p.fetch(T)
    err = info.value
    assert not isinstance(err, TileFetchError)  # fatal: the fetch stops
    assert server.count(T) == 1
    text = full_text(err)
    assert_no_key(text)
    assert f"HTTP {status}" in str(err)
    assert server.template() in str(err)
    assert API_KEY_ENV in err.remedy
    assert err.exit_code == EXIT_DOWNLOAD


def test_a_wrong_key_is_refused_without_showing_either_key(server: TileServer) -> None:
    wrong = "wrong-key-0123456789"
    with closing(open_provider(server.template(), env=fast_env(**{API_KEY_ENV: wrong}))) as p:
        with pytest.raises(DownloadError) as info:
            p.fetch(T)
    text = full_text(info.value)
    assert wrong not in text
    assert_no_key(text)


def test_credentials_wanted_without_a_key_placeholder(server: TileServer) -> None:
    with (
        closing(open_provider(server.template(query=""), env={})) as p,
        pytest.raises(DownloadError) as info,
    ):
        p.fetch(T)
    assert "{key}" in info.value.remedy


def test_other_client_errors_fail_the_tile_without_retry(server: TileServer) -> None:
    server.script(T, Reply(400, b"bad request"))
    with closing(xyz(server)) as p, pytest.raises(TileFetchError, match="HTTP 400"):
        p.fetch(T)
    assert server.count(T) == 1


def test_connection_refused_is_retried_then_fails() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    template = f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.jpg?key={{key}}"
    with closing(
        XyzProvider(template, api_key=KEY, config=HttpConfig(retries=1, backoff_s=0.0))
    ) as p:
        with pytest.raises(TileFetchError, match="ConnectError") as info:
            p.fetch(T)
    assert "2 attempt" in str(info.value)
    assert_no_key(full_text(info.value))


def test_timeouts_are_retried_then_fail(server: TileServer) -> None:
    server.latency_s = 0.5
    with (
        closing(xyz(server, retries=1, timeout_s=0.1)) as p,
        pytest.raises(TileFetchError, match="Timeout") as info,
    ):
        p.fetch(T)
    assert server.count(T) == 2
    assert_no_key(full_text(info.value))


def test_the_key_never_reaches_the_log(
    server: TileServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.script(T, Reply(500))
    with closing(open_provider(server.template(), env=fast_env())) as p:
        assert p.fetch(T) == tile_bytes(T)
        assert p.fetch(Tile(1, 1, 3)) is not None
    text = caplog.text + "".join(str(r.args) + str(r.msg) for r in caplog.records)
    assert "HTTP Request: GET" in text  # httpx did log the URLs...
    assert "key=***" in text  # ...with the key redacted
    assert_no_key(text)
    assert logging.getLogger("httpx").filters == []  # close() took the filter away


def test_an_injected_client_is_used_and_left_open(server: TileServer) -> None:
    seen: list[httpx.Request] = []
    with httpx.Client(event_hooks={"request": [seen.append]}) as client:
        p = open_provider(server.template(), env=fast_env(), client=client)
        assert p.fetch(T) == tile_bytes(T)
        p.close()
        assert not client.is_closed
    assert len(seen) == 1
    assert seen[0].headers["User-Agent"] == USER_AGENT


def test_fetch_is_thread_safe(server: TileServer) -> None:
    wanted = [Tile(T.x + i, T.y + j, T.z) for i in range(8) for j in range(6)]
    with closing(xyz(server)) as p, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(p.fetch, wanted))
    assert got == [tile_bytes(t) for t in wanted]
    assert server.count() == len(wanted)


# ------------------------------------------------------------------ faults the server can play


@pytest.mark.parametrize(
    "fault, message",
    [
        (DROP, "RemoteProtocolError"),
        (DROP_MID_BODY, "RemoteProtocolError"),
        (TRUNCATED, "broken image"),
        (HTML, "not an image"),
        (Reply(503, b"", {"Retry-After": "0"}), "HTTP 503"),
        (Reply(408, b"request timeout"), "HTTP 408"),
        (too_many("0"), "HTTP 429"),
    ],
    ids=["drop", "drop-mid-body", "truncated", "html-200", "503", "408", "429"],
)
def test_each_fault_is_retried_then_the_tile_arrives(
    server: TileServer, fault: Any, message: str
) -> None:
    server.script(T, fault)
    with closing(
        xyz(
            server,
            backoff_s=30.0 if isinstance(fault, Reply) and "Retry-After" in fault.headers else 0.0,
        )
    ) as p:
        assert p.fetch(T) == tile_bytes(T)
        assert p.retries == 1
    assert server.count(T) == 2
    assert server.served(T) == 1

    # and when it keeps happening, the tile fails naming what happened
    server.script(T, fault, fault, fault)
    with closing(xyz(server)) as p, pytest.raises(TileFetchError, match=message) as info:
        p.fetch(T)
    assert "3 attempt" in str(info.value)
    assert_no_key(full_text(info.value))


def test_a_slow_answer_times_out_and_is_asked_again(server: TileServer) -> None:
    server.script(T, Slow(1.0))
    with closing(xyz(server, timeout_s=0.2)) as p:
        assert p.fetch(T) == tile_bytes(T)
        assert p.retries == 1
    assert server.count(T) == 2


def test_faults_at_a_rate_lose_no_tile(server: TileServer) -> None:
    wanted = [Tile(T.x + i, T.y + j, T.z) for i in range(10) for j in range(10)]
    for fault in (DROP, DROP_MID_BODY, TRUNCATED, HTML, too_many("0"), Reply(500)):
        server.fault_rate(fault, 0.05, seed=3)
    with closing(xyz(server)) as p, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(p.fetch, wanted))
        retries = p.retries
    assert got == [tile_bytes(t) for t in wanted]
    assert retries == server.count() - len(wanted) > 0
    assert all(server.served(t) == 1 for t in wanted)


# ------------------------------------------------------------------ {s} subdomains


def test_subdomains_rotate_per_tile_the_same_every_time(server: TileServer) -> None:
    template = server.template(path="/{s}/{z}/{x}/{y}.jpg")
    tiles = [Tile(T.x + i, T.y + j, T.z) for i in range(3) for j in range(2)]
    with closing(open_provider(template, env=fast_env())) as p:
        assert isinstance(p, XyzProvider)
        assert p.identity == "xyz:" + template  # {s} as written: any subdomain serves the same tile
        for t in tiles:
            assert p.fetch(t) == tile_bytes(t)
        first = list(server.requests)
        for t in tiles:
            p.fetch(t)
    assert server.requests[len(tiles) :] == first  # deterministic
    subs = [path.split("/")[1] for path in first]
    assert subs == [("a", "b", "c")[(t.x + t.y) % 3] for t in tiles]
    assert set(subs) == {"a", "b", "c"}


def test_subdomains_from_the_variable(server: TileServer) -> None:
    template = server.template(path="/{s}/{z}/{x}/{y}.jpg")
    with closing(open_provider(template, env=fast_env(SUBDOMAINS="mt0,mt1"))) as p:
        for i in range(4):
            p.fetch(Tile(T.x + i, T.y, T.z))
        assert p.shown_url(T).startswith(f"http://127.0.0.1:{server.port}/mt{(T.x + T.y) % 2}/")
    assert {path.split("/")[1] for path in server.requests} == {"mt0", "mt1"}


def test_subdomains_without_the_placeholder_are_refused(server: TileServer) -> None:
    with pytest.raises(UsageError, match=r"SUBDOMAINS.*\{s\}"):
        open_provider(server.template(), env=fast_env(SUBDOMAINS="a,b"))
    assert server.count() == 0


@pytest.mark.parametrize("raw", ["a,,b", "a b", "x/y", "tiles?"])
def test_bad_subdomains_are_refused(raw: str) -> None:
    with pytest.raises(UsageError, match="SUBDOMAINS"):
        parse_subdomains(raw)


# ------------------------------------------------------------------ extra headers


def test_headers_from_the_environment_are_sent(server: TileServer) -> None:
    server.key = None
    server.require_headers = {"Authorization": f"Bearer {TOKEN}"}
    env = {HEADERS_ENV: f"Authorization: Bearer {TOKEN}\nX-Client: drone-7", "HTTP_RETRIES": "0"}
    with closing(open_provider(server.template(query=""), env=env)) as p:
        assert p.fetch(T) == tile_bytes(T)
        assert TOKEN not in p.identity
    sent = server.headers[0]
    assert sent["authorization"] == f"Bearer {TOKEN}"
    assert sent["x-client"] == "drone-7"
    assert sent["user-agent"] == USER_AGENT


def test_headers_as_json(server: TileServer) -> None:
    server.key = None
    server.require_headers = {"X-Api-Key": TOKEN}
    with closing(
        open_provider(server.template(query=""), env={HEADERS_ENV: f'{{"X-Api-Key": "{TOKEN}"}}'})
    ) as p:
        assert p.fetch(T) == tile_bytes(T)


def test_a_refused_token_fails_at_once_and_is_never_shown(
    server: TileServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.key = None
    server.require_headers = {"Authorization": "Bearer the-right-one"}
    env = {HEADERS_ENV: f"Authorization: Bearer {TOKEN}"}
    with (
        closing(open_provider(server.template(query=""), env=env)) as p,
        pytest.raises(DownloadError) as info,
    ):
        p.fetch(T)
    err = info.value
    assert not isinstance(err, TileFetchError)
    assert "refused the credentials (HTTP 401)" in str(err)
    assert HEADERS_ENV in err.remedy
    assert server.count() == 1
    assert TOKEN not in full_text(err) + caplog.text


def test_a_token_written_into_the_template_is_refused(server: TileServer) -> None:
    with pytest.raises(UsageError, match=HEADERS_ENV) as info:
        open_provider(
            server.template(query=f"?t={TOKEN}"),
            env={HEADERS_ENV: f"Authorization: Bearer {TOKEN}"},
        )
    assert TOKEN not in full_text(info.value)


def test_token_and_key_are_redacted_from_failures(server: TileServer) -> None:
    server.script(T, html(), html(), html())
    env = fast_env(**{HEADERS_ENV: f"X-Api-Key: {TOKEN}"})
    with (
        closing(open_provider(server.template(), env=env)) as p,
        pytest.raises(TileFetchError) as info,
    ):
        p.fetch(T)
    assert TOKEN not in full_text(info.value)
    assert_no_key(full_text(info.value))


@pytest.mark.parametrize(
    "raw, message",
    [
        ("Authorization Bearer SECRETVAL", "no ':'"),
        ("X-Ok: fine\nBad Name: SECRETVAL", "not a header name"),
        ("Host: SECRETVAL.example", "sets Host itself"),
        ("X-A: SECRETVAL\nx-a: SECRETVAL2", "twice"),
        ('{"X-A": 1}', "one line of text"),
        ('{"X-A": "SECRETVAL\\nb"}', "one line of text"),
        ('["X-A", "SECRETVAL"]', "JSON object"),
        ('{"X-A": "SECRETVAL', "not valid JSON"),
    ],
)
def test_bad_headers_are_refused_without_echoing_values(raw: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_headers(raw)
    assert "SECRETVAL" not in full_text(info.value)
    assert HEADERS_ENV in str(info.value)


def test_header_lines_and_blank_lines() -> None:
    assert parse_headers("\n  Authorization:  Bearer a b  \n\nAccept: image/webp\n") == {
        "Authorization": "Bearer a b",
        "Accept": "image/webp",
    }
    assert parse_headers(None) == {} == parse_headers("  ")


# ------------------------------------------------------------------ rate limit


class CountingLimiter:
    def __init__(self) -> None:
        self.calls = 0

    def acquire(self) -> float:
        self.calls += 1
        return 0.0


def test_every_request_takes_a_token_retries_included(server: TileServer) -> None:
    limiter = CountingLimiter()
    server.script(T, Reply(500), too_many("0"))
    p = XyzProvider(
        server.template(), api_key=KEY, config=HttpConfig(backoff_s=0.0), limiter=limiter
    )
    with closing(p):
        assert p.fetch(T) == tile_bytes(T)
        assert p.fetch(Tile(T.x + 1, T.y, T.z)) is not None
    assert limiter.calls == server.count() == 4


def test_rate_limit_variable_sets_the_shared_flow_control_rate(server: TileServer) -> None:
    with closing(open_provider(server.template(), env=fast_env(RATE_LIMIT="12.5"))) as p:
        assert isinstance(p, XyzProvider)
        assert p.flow.rate == p.flow.max_rate == 12.5
    with closing(open_provider(server.template(), env=fast_env(RATE_LIMIT="0"))) as p:
        assert p.flow.rate is None  # type: ignore[attr-defined]
    for bad in ("fast", "-1", "inf"):
        with pytest.raises(UsageError, match="RATE_LIMIT"):
            parse_rate_limit(bad)


def test_concurrent_requests_are_bounded_by_the_pool(server: TileServer) -> None:
    server.latency_s = 0.02
    wanted = [Tile(T.x + i, T.y, T.z) for i in range(24)]
    with closing(xyz(server)) as p, ThreadPoolExecutor(3) as pool:
        list(pool.map(p.fetch, wanted))
    assert server.max_in_flight <= 3


def test_a_proxy_from_the_environment_still_carries_the_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each fetch thread has its own pool, but HTTP_PROXY still routes every request."""
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(1)
    proxy.settimeout(10)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    seen: list[bytes] = []

    def answer() -> None:
        conn, _ = proxy.accept()
        with conn:
            seen.append(conn.recv(4096))
            conn.sendall(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )

    with (
        ThreadPoolExecutor(1) as pool,
        closing(open_provider("http://tiles.example.invalid/{z}/{x}/{y}.png", env=fast_env())) as p,
    ):
        served = pool.submit(answer)
        assert p.fetch(T) is None  # the proxy's 404: no such tile
        served.result(timeout=10)
    proxy.close()
    assert seen and seen[0].startswith(b"GET http://tiles.example.invalid/17/")
