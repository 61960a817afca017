"""A real XYZ tile server on 127.0.0.1 for the tests, with faults on demand.

It serves the synthetic imagery under ``…/{z}/{x}/{y}.jpg`` (the last three
path parts; ``/tms/`` anywhere before them flips the row, ``/q/<quadkey>.jpg``
is a quadkey), checks ``?key=`` and required headers, and counts every
request and every good tile it served, server-side: "fetched exactly once"
and "nothing fetched again" are checked where they happen.

Faults, per tile (:meth:`TileServer.script`) or at a rate over all tiles
(:meth:`TileServer.fault_rate`):

- a :class:`Reply`: any status, body and headers (429 + ``Retry-After``,
  500, 503, an HTML page with 200, a JSON error...);
- :data:`DROP`: close the connection without answering;
- :data:`DROP_MID_BODY`: send the headers and half the body, then close;
- :data:`TRUNCATED`: a 200 whose body is the first half of the JPEG (the
  length header agrees: only the image check can tell);
- :data:`HTML`: a 200 with an HTML error page;
- ``Slow(s)``: answer correctly after ``s`` seconds.

A rate fault picks requests by a hash of (seed, path, attempt), so a run is
reproducible, and by default only a tile's first attempt: retries succeed.
"""

from __future__ import annotations

import functools
import hashlib
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from cachebuild.providers.synthetic import synthetic_tile_bytes
from cachebuild.tilemath import Tile

__all__ = [
    "Reply",
    "Slow",
    "Fault",
    "DROP",
    "DROP_MID_BODY",
    "TRUNCATED",
    "HTML",
    "TileServer",
    "tile_bytes",
    "html",
    "too_many",
    "decode_quadkey",
    "parse_tile_path",
    "KEY",
    "KEY_FORMS",
]

#: An API key with characters a URL must escape, so quoting and redaction are exercised.
KEY = "s3cret-Key/+value"
KEY_FORMS = (KEY, quote(KEY, safe=""))


@functools.lru_cache(maxsize=8192)
def tile_bytes(t: Tile) -> bytes:
    """What the server serves for ``t``: the synthetic imagery."""
    return synthetic_tile_bytes(t)


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Slow:
    """Answer correctly, after ``seconds``."""

    seconds: float


DROP = "drop"
DROP_MID_BODY = "drop-mid-body"
TRUNCATED = "truncated"
HTML = "html"
Fault = Reply | Slow | str


def html(status: int = 200) -> Reply:
    return Reply(
        status,
        b"<html><body>Too many requests, slow down</body></html>",
        {"Content-Type": "text/html"},
    )


def too_many(retry_after: str = "0") -> Reply:
    return Reply(429, b"slow down", {"Retry-After": retry_after, "Content-Type": "text/plain"})


def decode_quadkey(qk: str) -> Tile:
    x = y = 0
    for i, digit in enumerate(qk):
        bit = len(qk) - 1 - i
        d = int(digit)
        x |= (d & 1) << bit
        y |= (d >> 1) << bit
    return Tile(x, y, len(qk))


def parse_tile_path(path: str) -> Tile | None:
    """The tile a request path names, or None."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return None
    parts[-1] = parts[-1].rsplit(".", 1)[0]
    try:
        if len(parts) >= 2 and parts[-2] == "q":
            return decode_quadkey(parts[-1])
        z, x, y = map(int, parts[-3:])
    except ValueError:
        return None
    if "tms" in parts[:-3]:
        y = (1 << z) - 1 - y
    return Tile(x, y, z)


class TileServer:
    """A real tile server on 127.0.0.1 (stdlib ThreadingHTTPServer, HTTP/1.1 keep-alive).

    Parameters
    ----------
    key
        ``?key=`` must equal this (None: not checked); else ``key_status``.
    key_status
        The status a wrong or missing key gets.

    Attributes
    ----------
    missing, empty
        Tiles that answer 404, or 204.
    answers
        Tiles that always get this reply instead of their image.
    require_headers
        Headers a request must carry (else ``key_status``).
    latency_s
        Every answer waits this long (a CDN's round trip).
    requests, queries, headers
        Every request's path, query and headers, in order.
    served_ok
        Path -> how many times a good tile went out whole.
    max_in_flight
        The most requests it was answering at once.
    """

    def __init__(self, key: str | None = None, *, key_status: int = 401) -> None:
        self.key = key
        self.key_status = key_status
        self.missing: set[Any] = set()
        self.empty: set[Tile] = set()
        self.answers: dict[Tile, Reply] = {}
        self.require_headers: dict[str, str] = {}
        self.latency_s = 0.0
        self.requests: list[str] = []
        self.queries: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.served_ok: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self._scripts: dict[Tile, list[Fault]] = {}
        self._rates: list[tuple[Fault, float, int, int]] = []
        self._attempts: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in two writes: without this, Nagle
            # holds the body for the client's delayed ACK (40 ms a tile)
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server._handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (timeout tests)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False
            request_queue_size = 128

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    # -- telling it what to do ----------------------------------------------

    def script(self, t: Tile, *faults: Fault) -> None:
        """Answer the next requests for ``t`` with ``faults``, in order, then normally."""
        with self.lock:
            self._scripts[t] = list(faults)

    def fault_rate(self, fault: Fault, rate: float, *, seed: int = 0, attempts: int = 1) -> None:
        """Answer a share ``rate`` of requests with ``fault``, among each tile's first ``attempts`` attempts."""
        with self.lock:
            self._rates.append((fault, rate, seed, attempts))

    def is_missing(self, t: Tile) -> bool:
        return t in self.missing

    # -- what happened -------------------------------------------------------

    def count(self, t: Tile | None = None) -> int:
        """Requests so far, for ``t`` (by the XYZ path ``/{z}/{x}/{y}.jpg``) or in all."""
        with self.lock:
            if t is None:
                return len(self.requests)
            return sum(1 for p in self.requests if parse_tile_path(p) == t)

    def served(self, t: Tile) -> int:
        """How many times the whole good image of ``t`` went out."""
        with self.lock:
            return sum(n for p, n in self.served_ok.items() if parse_tile_path(p) == t)

    def template(self, path: str = "/{z}/{x}/{y}.jpg", query: str = "?key={key}") -> str:
        return f"http://127.0.0.1:{self.port}{path}{query}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- answering -----------------------------------------------------------

    def _pick(self, path: str, t: Tile | None) -> Fault | None:
        with self.lock:
            attempt = self._attempts[path]
            self._attempts[path] += 1
            queued = self._scripts.get(t) if t is not None else None
            if queued:
                return queued.pop(0)
            for fault, rate, seed, attempts in self._rates:
                if attempt >= attempts:
                    continue
                h = hashlib.sha256(f"{seed}:{path}:{attempt}:{fault!r}".encode()).digest()
                if int.from_bytes(h[:8], "big") / 2**64 < rate:
                    return fault
        return None

    def _answer(self, path: str, query: str, headers: dict[str, str], t: Tile | None) -> Reply:
        if self.key is not None and parse_qs(query).get("key") != [self.key]:
            return Reply(self.key_status, b"bad key")
        for name, value in self.require_headers.items():
            if headers.get(name.lower()) != value:
                return Reply(self.key_status, b"bad credentials")
        if t is None:
            return Reply(400, b"bad path")
        if self.is_missing(t):
            return Reply(404, b"no such tile")
        if t in self.empty:
            return Reply(204)
        if t in self.answers:
            return self.answers[t]
        return Reply(200, tile_bytes(t), {"Content-Type": "image/jpeg"})

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        headers = {k.lower(): v for k, v in h.headers.items()}
        t = parse_tile_path(url.path)
        with self.lock:
            self.requests.append(url.path)
            self.queries.append(url.query)
            self.headers.append(headers)
        fault = self._pick(url.path, t)
        if self.latency_s:
            time.sleep(self.latency_s)
        if isinstance(fault, Slow):
            time.sleep(fault.seconds)
            fault = None
        if fault == DROP:
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        reply = self._answer(url.path, url.query, headers, t)
        if reply.status == 200 and fault in (DROP_MID_BODY, TRUNCATED, HTML):
            if fault == HTML:
                reply = html()
            elif fault == TRUNCATED:
                reply = Reply(200, reply.body[: len(reply.body) // 2], reply.headers)
            else:
                h.send_response(200)
                h.send_header("Content-Type", "image/jpeg")
                h.send_header("Content-Length", str(len(reply.body)))
                h.end_headers()
                h.wfile.write(reply.body[: len(reply.body) // 2])
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
        elif isinstance(fault, Reply):
            reply = fault
        h.send_response(reply.status)
        for k, v in reply.headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(reply.body)))
        h.end_headers()
        # Counted before the body goes out (and taken back if it cannot be
        # written): a client that has the tile may ask served() at once,
        # before this thread would run again.
        good = reply.status == 200 and t is not None and reply.body == tile_bytes(t)
        if good:
            with self.lock:
                self.served_ok[url.path] += 1
        try:
            h.wfile.write(reply.body)
            h.wfile.flush()
        except OSError:
            if good:
                with self.lock:
                    self.served_ok[url.path] -= 1
            raise
