"""Tests for cachebuild.providers, against a real HTTP server on 127.0.0.1.

:class:`ScriptedTileServer` serves synthetic tiles under ``/{z}/{x}/{y}.jpg``
(TMS rows under ``/tms/``, quadkeys under ``/q/``), checks ``?key=``, and
answers scripted replies (errors, HTML, Retry-After) when told to; it counts
every request server-side.  tests/test_fetch.py uses it too.
"""

from __future__ import annotations

import doctest
import functools
import hashlib
import io
import logging
import socket
import sqlite3
import threading
import time
import traceback
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from PIL import Image

from cachebuild import __version__, providers
from cachebuild.errors import EXIT_DOWNLOAD, EXIT_USAGE, CacheBuildError, DownloadError, UsageError
from cachebuild.providers import (
    API_KEY_ENV,
    USER_AGENT,
    HttpConfig,
    MBTilesProvider,
    Provider,
    SyntheticProvider,
    TileFetchError,
    XyzProvider,
    check_image,
    open_provider,
    template_placeholders,
)
from cachebuild.synthetic import synthetic_tile_bytes
from cachebuild.tiles import Tile, quadkey

#: Has characters a URL must escape, so quoting and redaction are exercised.
KEY = "s3cret-Key/+value"
KEY_FORMS = (KEY, quote(KEY, safe=""))
T = Tile(68645, 45903, 17)


@functools.lru_cache(maxsize=4096)
def tile_bytes(t: Tile) -> bytes:
    return synthetic_tile_bytes(t)


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def html(status: int = 200) -> Reply:
    return Reply(status, b"<html><body>Too many requests, slow down</body></html>", {"Content-Type": "text/html"})


def _decode_quadkey(qk: str) -> Tile:
    x = y = 0
    for i, digit in enumerate(qk):
        bit = len(qk) - 1 - i
        d = int(digit)
        x |= (d & 1) << bit
        y |= (d >> 1) << bit
    return Tile(x, y, len(qk))


class ScriptedTileServer:
    """A real tile server on 127.0.0.1 (stdlib ThreadingHTTPServer, HTTP/1.1).

    Attributes
    ----------
    key
        ``?key=`` must equal this (None: not checked); else 401.
    missing, empty
        Tiles that answer 404, or 204.
    delay_s
        Sleep before answering.
    requests
        Every request's path, in order (server-side count).
    """

    def __init__(self, key: str | None = KEY) -> None:
        self.key = key
        self.missing: set[Tile] = set()
        self.empty: set[Tile] = set()
        self.delay_s = 0.0
        self.requests: list[str] = []
        self.queries: list[str] = []
        self.user_agents: list[str | None] = []
        self._scripts: dict[str, list[Reply]] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in two writes: without this, Nagle
            # holds the body for the client's delayed ACK (40 ms a tile)
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, reply: Reply) -> None:
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def do_GET(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                with server.lock:
                    server.requests.append(url.path)
                    server.queries.append(url.query)
                    server.user_agents.append(self.headers.get("User-Agent"))
                    queued = server._scripts.get(url.path)
                    scripted = queued.pop(0) if queued else None
                if server.delay_s:
                    time.sleep(server.delay_s)
                try:
                    self._send(scripted or server.answer(url.path, url.query))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def answer(self, path: str, query: str) -> Reply:
        if self.key is not None and parse_qs(query).get("key") != [self.key]:
            return Reply(401, b"bad key")
        parts = path.strip("/").removesuffix(".jpg").split("/")
        try:
            if parts[0] == "tms":
                z, x, ty = map(int, parts[1:])
                t = Tile(x, (1 << z) - 1 - ty, z)
            elif parts[0] == "q":
                t = _decode_quadkey(parts[1])
            else:
                z, x, y = map(int, parts)
                t = Tile(x, y, z)
        except (ValueError, IndexError):
            return Reply(400, b"bad path")
        if t in self.missing:
            return Reply(404, b"no such tile")
        if t in self.empty:
            return Reply(204)
        return Reply(200, tile_bytes(t), {"Content-Type": "image/jpeg"})

    def script(self, t: Tile, *replies: Reply) -> None:
        """Answer the next requests for ``t`` (XYZ path) with ``replies``, in order."""
        with self.lock:
            self._scripts[f"/{t.z}/{t.x}/{t.y}.jpg"] = list(replies)

    def count(self, t: Tile | None = None) -> int:
        with self.lock:
            if t is None:
                return len(self.requests)
            return self.requests.count(f"/{t.z}/{t.x}/{t.y}.jpg")

    def template(self, path: str = "/{z}/{x}/{y}.jpg", query: str = "?key={key}") -> str:
        return f"http://127.0.0.1:{self.port}{path}{query}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[ScriptedTileServer]:
    srv = ScriptedTileServer()
    yield srv
    srv.close()


def fast_env(**extra: str) -> dict[str, str]:
    """The key, and retries with no waiting."""
    return {API_KEY_ENV: KEY, "HTTP_BACKOFF": "0", "HTTP_RETRIES": "2", "HTTP_TIMEOUT": "5", **extra}


def xyz(server: ScriptedTileServer, **config: Any) -> XyzProvider:
    cfg = {"retries": 2, "backoff_s": 0.0, "timeout_s": 5.0, **config}
    return XyzProvider(server.template(), api_key=KEY, config=HttpConfig(**cfg))


def assert_no_key(text: str) -> None:
    for form in KEY_FORMS:
        assert form not in text


def full_text(exc: BaseException) -> str:
    """Everything an operator could see of an exception: message, traceback, causes."""
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(vars(exc))


def public_names(mod: types.ModuleType) -> set[str]:
    return {
        n
        for n, v in vars(mod).items()
        if not n.startswith("_")
        and n != "TYPE_CHECKING"
        and not isinstance(v, types.ModuleType)
        and getattr(v, "__module__", mod.__name__) == mod.__name__
    }


# ------------------------------------------------------------------ module


def test_all_is_complete() -> None:
    assert set(providers.__all__) == public_names(providers)


def test_doctests() -> None:
    assert doctest.testmod(providers).failed == 0


def test_user_agent_names_the_version() -> None:
    assert USER_AGENT == f"cachebuild/{__version__} (+https://example.invalid/cachebuild)"


# ------------------------------------------------------------------ specs


def test_synthetic_is_the_default(server: ScriptedTileServer) -> None:
    for spec in ("synthetic", "", "  synthetic "):
        p = open_provider(spec, env={})
        assert isinstance(p, SyntheticProvider)
        assert isinstance(p, Provider)
        assert p.identity == "synthetic:v1"
        assert p.concurrency >= 1
        assert p.fetch(T) == synthetic_tile_bytes(T)
        p.close()


@pytest.mark.parametrize("spec", ["ftp://host/{z}/{x}/{y}", "tiles/", "bing", "C:/maps/area.sqlite"])
def test_unknown_spec_lists_the_accepted_forms(spec: str) -> None:
    with pytest.raises(UsageError) as info:
        open_provider(spec, env={})
    text = str(info.value)
    assert repr(spec) in text
    for form in ("synthetic", "http", "{z}", ".mbtiles"):
        assert form in text
    assert info.value.exit_code == EXIT_USAGE


def test_unknown_spec_does_not_echo_the_key() -> None:
    with pytest.raises(UsageError) as info:
        open_provider(f"htps://host/{{z}}/{{x}}/{{y}}?key={KEY}", env={API_KEY_ENV: KEY})
    assert_no_key(full_text(info.value))


def test_identity_is_the_template_without_the_key(server: ScriptedTileServer) -> None:
    with closing(open_provider(server.template(), env=fast_env())) as p:
        assert isinstance(p, XyzProvider)
        assert isinstance(p, Provider)
        assert p.identity == "xyz:" + server.template()
        assert "{key}" in p.identity
        assert_no_key(p.identity)


@pytest.mark.parametrize(
    "template, names",
    [
        ("https://t/{z}/{x}/{y}.png", {"z", "x", "y"}),
        ("https://t/{z}/{x}/{-y}.png", {"z", "x", "-y"}),
        ("https://t/a{q}.jpeg?g=1&k={key}", {"q", "key"}),
    ],
)
def test_template_placeholders(template: str, names: set[str]) -> None:
    assert template_placeholders(template) == names


@pytest.mark.parametrize(
    "template, message",
    [
        ("/{z}/{x}/{y}.jpg?s={s}", "{s}"),
        ("/{z}/{x}/{y}.jpg?{KEY}", "{KEY}"),
        ("/{z}/{x}/{y}.jpg?r={r}&v={ver}", "{r}, {ver}"),
        ("/{z}/{x}/{y.jpg", "unbalanced"),
        ("/{z}/{x}/tile.jpg", "names no tile"),
    ],
)
def test_bad_templates_are_refused_before_any_request(
    server: ScriptedTileServer, template: str, message: str
) -> None:
    with pytest.raises(UsageError, match=message.replace("{", r"\{").replace("}", r"\}")):
        open_provider(f"http://127.0.0.1:{server.port}{template}", env=fast_env())
    assert server.count() == 0


def test_key_placeholder_without_the_variable_is_refused(server: ScriptedTileServer) -> None:
    with pytest.raises(UsageError, match=API_KEY_ENV):
        open_provider(server.template(), env={})
    with pytest.raises(UsageError, match=API_KEY_ENV):
        open_provider(server.template(), env={API_KEY_ENV: ""})
    assert server.count() == 0


def test_a_key_written_into_the_template_is_refused(server: ScriptedTileServer) -> None:
    for form in KEY_FORMS:
        with pytest.raises(UsageError, match=r"\{key\}") as info:
            open_provider(server.template(query=f"?key={form}"), env=fast_env())
        assert_no_key(full_text(info.value))
    assert server.count() == 0


def test_a_template_without_a_host_is_refused() -> None:
    with pytest.raises(UsageError, match="host"):
        open_provider("http:///{z}/{x}/{y}.png", env={})


def test_http_settings_from_the_environment() -> None:
    cfg = HttpConfig.from_env({})
    assert (cfg.timeout_s, cfg.retries, cfg.backoff_s) == (20.0, 3, 0.2)
    cfg = HttpConfig.from_env({"HTTP_TIMEOUT": "2.5", "HTTP_RETRIES": "0", "HTTP_BACKOFF": "0.01"})
    assert (cfg.timeout_s, cfg.retries, cfg.backoff_s) == (2.5, 0, 0.01)
    for name, bad in [("HTTP_TIMEOUT", "soon"), ("HTTP_TIMEOUT", "0"), ("HTTP_RETRIES", "1.5"),
                      ("HTTP_RETRIES", "-1"), ("HTTP_BACKOFF", "nan")]:
        with pytest.raises(UsageError, match=name):
            HttpConfig.from_env({name: bad})


# ------------------------------------------------------------------ XYZ over HTTP


def test_fetch_returns_the_servers_bytes(server: ScriptedTileServer) -> None:
    with closing(open_provider(server.template(), env=fast_env())) as p:
        assert p.fetch(T) == tile_bytes(T)
    assert server.requests == [f"/{T.z}/{T.x}/{T.y}.jpg"]
    assert server.user_agents == [USER_AGENT]
    assert parse_qs(server.queries[0])["key"] == [KEY]


def test_tms_rows_with_minus_y(server: ScriptedTileServer) -> None:
    template = server.template(path="/tms/{z}/{x}/{-y}.jpg")
    with closing(open_provider(template, env=fast_env())) as p:
        for t in (T, Tile(0, 0, 1), Tile(3, 0, 2)):
            assert p.fetch(t) == tile_bytes(t)
    assert server.requests == [
        f"/tms/17/{T.x}/{2**17 - 1 - T.y}.jpg",
        "/tms/1/0/1.jpg",
        "/tms/2/3/3.jpg",
    ]


def test_quadkeys(server: ScriptedTileServer) -> None:
    template = server.template(path="/q/{q}.jpg")
    with closing(open_provider(template, env=fast_env())) as p:
        assert p.fetch(Tile(3, 5, 3)) == tile_bytes(Tile(3, 5, 3))
        assert p.fetch(T) == tile_bytes(T)
    assert server.requests == ["/q/213.jpg", f"/q/{quadkey(T)}.jpg"]


def test_not_found_and_no_content_mean_no_tile(server: ScriptedTileServer) -> None:
    gone, blank = Tile(1, 1, 5), Tile(2, 1, 5)
    server.missing.add(gone)
    server.empty.add(blank)
    with closing(xyz(server)) as p:
        assert p.fetch(gone) is None
        assert p.fetch(blank) is None
    assert server.count(gone) == 1 and server.count(blank) == 1  # not retried


def test_server_errors_are_retried(server: ScriptedTileServer) -> None:
    server.script(T, Reply(500), Reply(503))
    with closing(xyz(server)) as p:
        assert p.fetch(T) == tile_bytes(T)
    assert server.count(T) == 3


def test_retries_run_out(server: ScriptedTileServer) -> None:
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


def test_backoff_grows(server: ScriptedTileServer) -> None:
    server.script(T, Reply(500), Reply(500))
    with closing(xyz(server, backoff_s=0.1)) as p:
        start = time.monotonic()
        assert p.fetch(T) == tile_bytes(T)
        elapsed = time.monotonic() - start
    # 0.1 * [0.5, 1.5) + 0.2 * [0.5, 1.5)
    assert 0.15 <= elapsed < 1.5


def test_retry_after_zero_is_honoured_instead_of_backoff(server: ScriptedTileServer) -> None:
    server.script(T, Reply(429, b"slow down", {"Retry-After": "0"}))
    with closing(xyz(server, backoff_s=30.0)) as p:
        start = time.monotonic()
        assert p.fetch(T) == tile_bytes(T)
        assert time.monotonic() - start < 3.0
    assert server.count(T) == 2


def test_retry_after_seconds_are_waited(server: ScriptedTileServer) -> None:
    server.script(T, Reply(429, b"", {"Retry-After": "1"}))
    with closing(xyz(server)) as p:
        start = time.monotonic()
        assert p.fetch(T) == tile_bytes(T)
        assert time.monotonic() - start >= 0.95


def test_retry_after_is_capped(server: ScriptedTileServer) -> None:
    server.script(T, Reply(503, b"", {"Retry-After": "3600"}), Reply(429, b"", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    with closing(xyz(server, retry_after_max_s=0.1, backoff_s=30.0)) as p:
        start = time.monotonic()
        assert p.fetch(T) == tile_bytes(T)
        assert time.monotonic() - start < 3.0  # capped, and a past date is now
    assert server.count(T) == 3


def _png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (256, 256)).save(buf, format="GIF")
    return buf.getvalue()


BAD_BODIES = {
    "html": (html(), "not an image"),
    "json": (Reply(200, b'{"error": "quota exceeded"}', {"Content-Type": "application/json"}), "not an image"),
    "empty": (Reply(200, b"", {"Content-Type": "image/jpeg"}), "empty body"),
    "truncated": (Reply(200, tile_bytes(T)[:3000], {"Content-Type": "image/jpeg"}), "broken image"),
    "wrong size": (Reply(200, _png(512), {"Content-Type": "image/png"}), "512x512"),
    "gif": (Reply(200, _gif(), {"Content-Type": "image/gif"}), "GIF"),
}


@pytest.mark.parametrize("kind", list(BAD_BODIES))
def test_bodies_that_are_not_tiles_fail_after_retries(server: ScriptedTileServer, kind: str) -> None:
    reply, message = BAD_BODIES[kind]
    server.script(T, reply, reply)
    with closing(xyz(server, retries=1)) as p, pytest.raises(TileFetchError, match=message) as info:
        p.fetch(T)
    assert server.count(T) == 2
    assert_no_key(full_text(info.value))


def test_a_bad_body_then_a_good_one_succeeds(server: ScriptedTileServer) -> None:
    server.script(T, html())
    with closing(xyz(server)) as p:
        assert p.fetch(T) == tile_bytes(T)
    assert server.count(T) == 2


def test_a_png_of_the_right_size_is_a_tile(server: ScriptedTileServer) -> None:
    server.script(T, Reply(200, _png(256), {"Content-Type": "image/png"}))
    with closing(xyz(server)) as p:
        assert p.fetch(T) == _png(256)


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_fail_at_once_without_the_key(server: ScriptedTileServer, status: int) -> None:
    server.script(T, Reply(status, b"invalid api key"))
    with closing(open_provider(server.template(), env=fast_env())) as p, pytest.raises(DownloadError) as info:
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


def test_a_wrong_key_is_refused_without_showing_either_key(server: ScriptedTileServer) -> None:
    wrong = "wrong-key-0123456789"
    with closing(open_provider(server.template(), env=fast_env(**{API_KEY_ENV: wrong}))) as p:
        with pytest.raises(DownloadError) as info:
            p.fetch(T)
    text = full_text(info.value)
    assert wrong not in text
    assert_no_key(text)


def test_credentials_wanted_without_a_key_placeholder(server: ScriptedTileServer) -> None:
    with closing(open_provider(server.template(query=""), env={})) as p, pytest.raises(DownloadError) as info:
        p.fetch(T)
    assert "{key}" in info.value.remedy


def test_other_client_errors_fail_the_tile_without_retry(server: ScriptedTileServer) -> None:
    server.script(T, Reply(400, b"bad request"))
    with closing(xyz(server)) as p, pytest.raises(TileFetchError, match="HTTP 400"):
        p.fetch(T)
    assert server.count(T) == 1


def test_connection_refused_is_retried_then_fails() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    template = f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.jpg?key={{key}}"
    with closing(XyzProvider(template, api_key=KEY, config=HttpConfig(retries=1, backoff_s=0.0))) as p:
        with pytest.raises(TileFetchError, match="ConnectError") as info:
            p.fetch(T)
    assert "2 attempt" in str(info.value)
    assert_no_key(full_text(info.value))


def test_timeouts_are_retried_then_fail(server: ScriptedTileServer) -> None:
    server.delay_s = 0.5
    with closing(xyz(server, retries=1, timeout_s=0.1)) as p, pytest.raises(TileFetchError, match="Timeout") as info:
        p.fetch(T)
    assert server.count(T) == 2
    assert_no_key(full_text(info.value))


def test_the_key_never_reaches_the_log(server: ScriptedTileServer, caplog: pytest.LogCaptureFixture) -> None:
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


def test_an_injected_client_is_used_and_left_open(server: ScriptedTileServer) -> None:
    seen: list[httpx.Request] = []
    with httpx.Client(event_hooks={"request": [seen.append]}) as client:
        p = open_provider(server.template(), env=fast_env(), client=client)
        assert p.fetch(T) == tile_bytes(T)
        p.close()
        assert not client.is_closed
    assert len(seen) == 1
    assert seen[0].headers["User-Agent"] == USER_AGENT


def test_fetch_is_thread_safe(server: ScriptedTileServer) -> None:
    wanted = [Tile(T.x + i, T.y + j, T.z) for i in range(8) for j in range(6)]
    with closing(xyz(server)) as p, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(p.fetch, wanted))
    assert got == [tile_bytes(t) for t in wanted]
    assert server.count() == len(wanted)


# ------------------------------------------------------------------ images


def test_check_image() -> None:
    assert check_image(tile_bytes(T)) is None
    assert check_image(_png(512), None) is None
    assert check_image(_png(512)) == "image is 512x512, not 256x256"
    assert check_image(b"") == "empty body"
    assert (check_image(tile_bytes(T)[:-200]) or "").startswith("broken image")


# ------------------------------------------------------------------ MBTiles


def make_mbtiles(path: Path, rows: dict[Tile, bytes]) -> Path:
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE metadata (name text, value text)")
        db.execute("CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob)")
        db.executemany(
            "INSERT INTO tiles VALUES (?, ?, ?, ?)",
            [(t.z, t.x, (1 << t.z) - 1 - t.y, data) for t, data in rows.items()],
        )
    db.close()
    return path


def test_mbtiles_provider_reads_tms_rows(tmp_path: Path) -> None:
    path = make_mbtiles(tmp_path / "a.mbtiles", {T: tile_bytes(T), Tile(0, 0, 1): tile_bytes(Tile(0, 0, 1))})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    mtime = path.stat().st_mtime_ns
    with closing(open_provider(str(path), env={})) as p:
        assert isinstance(p, MBTilesProvider)
        assert isinstance(p, Provider)
        assert p.identity == f"mbtiles:sha256={digest}"
        assert p.fetch(T) == tile_bytes(T)
        assert p.fetch(Tile(0, 0, 1)) == tile_bytes(Tile(0, 0, 1))
        assert p.fetch(Tile(0, 1, 1)) is None  # would be row 0 without the flip
        assert p.fetch(Tile(T.x + 1, T.y, T.z)) is None
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(p.fetch, [T] * 16)) == [tile_bytes(T)] * 16
    assert path.stat().st_mtime_ns == mtime


def test_mbtiles_provider_refuses_a_broken_tile(tmp_path: Path) -> None:
    path = make_mbtiles(tmp_path / "a.mbtiles", {T: b"<html>oops</html>"})
    with closing(open_provider(str(path), env={})) as p, pytest.raises(TileFetchError, match="not an image"):
        p.fetch(T)


def test_mbtiles_provider_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.mbtiles"
    with pytest.raises(UsageError, match="no such MBTiles file") as info:
        open_provider(str(path), env={})
    assert str(path) in str(info.value)


def test_mbtiles_provider_not_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "text.mbtiles"
    path.write_text("just some text, long enough to not be an empty database file" * 20)
    with pytest.raises(UsageError, match="not an MBTiles file"):
        open_provider(str(path), env={})


def test_mbtiles_provider_no_tiles_table(tmp_path: Path) -> None:
    path = tmp_path / "other.mbtiles"
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE something (a int)")
        db.commit()
    with pytest.raises(UsageError, match="no tiles table"):
        open_provider(str(path), env={})


def test_every_error_is_a_cachebuild_error() -> None:
    assert issubclass(TileFetchError, DownloadError)
    assert issubclass(DownloadError, CacheBuildError)
