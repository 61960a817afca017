"""HTTP against a server that may be hostile: bounded bodies, an overall
deadline per request, redirects that keep credentials at home, and a stop
that reaches every worker at once.

- :class:`HttpGuard` wraps the sockets of an ``httpx.Client`` (through
  httpcore's network backend): every connect and read is clamped to the
  request's overall deadline (a server that drips one byte every few
  seconds passes any per-read timeout), and :meth:`HttpGuard.stop` shuts
  every socket down, so a worker blocked in a read returns at once (SIGTERM,
  or a provider found dead).
- :func:`get` follows redirects itself: a hop to another origin (scheme,
  host, port) carries only the public headers, never a credential; no
  redirect body is read.
- :func:`read_body` streams a body and decodes ``gzip``/``deflate`` itself,
  a bounded chunk at a time, so a decompression bomb is refused at the
  limit instead of being inflated in memory.

httpx and httpcore are imported when a guard is made or a request sent.
"""

from __future__ import annotations

import socket
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import httpx

__all__ = [
    "ACCEPT_ENCODING",
    "MAX_REDIRECTS",
    "DRAIN_BYTES",
    "Stopped",
    "DeadlineExceeded",
    "BodyTooLarge",
    "BadEncoding",
    "HttpGuard",
    "ThreadPools",
    "pool_per_thread",
    "origin",
    "get",
    "read_body",
    "drain",
]

#: What cachebuild asks for: the encodings :func:`read_body` decodes with a bound.
ACCEPT_ENCODING = "gzip, deflate"
#: Redirects followed at most, per request.
MAX_REDIRECTS = 5
#: An answer not wanted (an error page, a redirect) is read up to this, so
#: its keep-alive connection is reused; a longer one closes the connection.
DRAIN_BYTES = 64 << 10
_CHUNK = 64 << 10


class Stopped(Exception):
    """The guard was stopped (an interrupt, or the provider was found dead)."""


class DeadlineExceeded(Exception):
    """The request took longer than its overall deadline."""


class BodyTooLarge(Exception):
    """A body (decoded) is larger than its limit."""


class BadEncoding(Exception):
    """A ``Content-Encoding`` that was not asked for, or a broken compressed body."""


# -- the guard: deadline and stop at the socket ------------------------------------


class HttpGuard:
    """Deadlines and a stop for every request an ``httpx.Client`` makes.

    :meth:`install` puts the guard between the client's connection pools
    and their sockets.  :meth:`deadline` (a context manager, per thread) sets
    the overall deadline of the requests made inside it; :meth:`stop` makes
    every request in flight, and every later one, raise :class:`Stopped`.
    """

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()

    def install(self, client: httpx.Client) -> None:
        """Guard ``client``'s sockets (its own transport and any proxy mounts)."""
        for transport in [client._transport, *client._mounts.values()]:  # noqa: SLF001 - no public hook
            self.guard(transport)

    def guard(self, transport: Any) -> Any:
        """Guard the sockets of one transport's connection pool; returns ``transport``."""
        import httpcore

        pool = getattr(transport, "_pool", None)
        if isinstance(pool, httpcore.ConnectionPool):
            guarded = _Backend(pool._network_backend, self)  # noqa: SLF001
            pool._network_backend = guarded  # type: ignore[assignment]  # duck-typed backend
        return transport

    @contextmanager
    def deadline(self, seconds: float | None) -> Iterator[None]:
        """Requests made by this thread inside the block end within ``seconds`` in all."""
        previous = getattr(self._local, "deadline", None)
        self._local.deadline = None if seconds is None else time.monotonic() + seconds
        try:
            yield
        finally:
            self._local.deadline = previous

    def check(self) -> None:
        """Raise :class:`Stopped` once :meth:`stop` was called."""
        if self.stopped.is_set():
            raise Stopped("stopped")

    def sleep(self, seconds: float) -> None:
        """Sleep, or raise :class:`Stopped` as soon as the guard stops."""
        if self.stopped.wait(max(0.0, seconds)):
            raise Stopped("stopped")

    def stop(self) -> None:
        """Stop every request now: shut down every socket in use."""
        self.stopped.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed already
                pass

    def _track(self, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            with self._lock:
                self._sockets.add(sock)
        if self.stopped.is_set():
            self.stop()

    def _timeout(self, timeout: float | None) -> float | None:
        """``timeout`` clamped to what is left of this thread's deadline."""
        self.check()
        deadline = getattr(self._local, "deadline", None)
        if deadline is None:
            return timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline")
        return left if timeout is None else min(timeout, left)

    def _after(self, exc: BaseException) -> None:
        """Translate an I/O error caused by the stop or the deadline."""
        self.check()
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline") from None
        raise exc


class _Stream:
    """An httpcore network stream whose reads and writes the guard bounds."""

    def __init__(self, inner: Any, guard: HttpGuard):
        self._inner = inner
        self._guard = guard
        guard._track(inner.get_extra_info("socket"))

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            data = self._inner.read(max_bytes, self._guard._timeout(timeout))
        except (Stopped, DeadlineExceeded):
            raise
        except Exception as exc:
            self._guard._after(exc)
            raise
        self._guard.check()
        return bytes(data)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._inner.write(buffer, self._guard._timeout(timeout))
        except (Stopped, DeadlineExceeded):
            raise
        except Exception as exc:
            self._guard._after(exc)
            raise

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> Any:
        try:
            inner = self._inner.start_tls(
                ssl_context, server_hostname, self._guard._timeout(timeout)
            )
        except (Stopped, DeadlineExceeded):
            raise
        except Exception as exc:
            self._guard._after(exc)
            raise
        return _Stream(inner, self._guard)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend:
    """An httpcore network backend that hands out guarded streams."""

    def __init__(self, inner: Any, guard: HttpGuard):
        self._inner = inner
        self._guard = guard

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, **kw: Any) -> _Stream:
        stream = self._inner.connect_tcp(host, port, self._guard._timeout(timeout), **kw)
        return _Stream(stream, self._guard)

    def connect_unix_socket(self, path: str, timeout: float | None = None, **kw: Any) -> _Stream:
        stream = self._inner.connect_unix_socket(path, self._guard._timeout(timeout), **kw)
        return _Stream(stream, self._guard)

    def sleep(self, seconds: float) -> None:
        self._guard.sleep(seconds)


class ThreadPools:
    """An httpx transport that gives each thread its own connection pool.

    httpcore's pool takes one lock for all its connections and polls every
    idle one on each request and each response closed: 64 workers sharing
    one pool spend more on that than on a 304 itself (docs/design/http-pools.md).
    ``make()`` builds one thread's transport; a pool whose thread has ended is
    closed when the next one is made, and all of them by :meth:`close`.
    """

    def __init__(self, make: Callable[[], Any]):
        self._make = make
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pools: list[tuple[threading.Thread, Any]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        mine = getattr(self._local, "pool", None)
        if mine is None:
            mine = self._local.pool = self._make()
            with self._lock:
                ended = [p for t, p in self._pools if not t.is_alive()]
                self._pools = [(t, p) for t, p in self._pools if t.is_alive()]
                self._pools.append((threading.current_thread(), mine))
            for pool in ended:
                pool.close()
        response: httpx.Response = mine.handle_request(request)
        return response

    def close(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, []
        for _, pool in pools:
            pool.close()

    def __enter__(self) -> ThreadPools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pool_per_thread(client: httpx.Client, make: Callable[[], Any]) -> None:
    """Give ``client``'s own transport (not a proxy's mount) one pool per thread: :class:`ThreadPools`.

    httpx takes its proxies from the environment only when it makes the
    transport itself, so the client is made first and its transport replaced.
    """
    shared = client._transport  # noqa: SLF001 - no public hook
    client._transport = cast("httpx.BaseTransport", ThreadPools(make))  # noqa: SLF001
    shared.close()


# -- requests: redirects and bodies ---------------------------------------------------


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """``(scheme, host, port)``, the port made explicit: what the same-origin rule compares."""
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


def get(
    client: httpx.Client,
    url: str,
    *,
    headers: Mapping[str, str],
    public: Collection[str],
    timeout: float,
    max_redirects: int = MAX_REDIRECTS,
) -> httpx.Response:
    """GET ``url`` as a stream, following up to ``max_redirects`` redirects.

    A hop to another origin than ``url``'s keeps only the headers named in
    ``public`` (lower case): credentials never leave for another host.  The
    caller reads the returned response (:func:`read_body`) and closes it.
    """
    import httpx

    first = origin(httpx.URL(url))
    send_headers = dict(headers)
    target: httpx.URL | str = url
    for hop in range(max_redirects + 1):
        request = client.build_request("GET", target, headers=send_headers, timeout=timeout)
        response = client.send(request, stream=True, follow_redirects=False)
        location = response.headers.get("location")
        if not (response.is_redirect and location) or hop == max_redirects:
            return response
        drain(response)  # a redirect's body is never kept
        target = response.url.join(location)
        if origin(target) != first:
            send_headers = {k: v for k, v in send_headers.items() if k.lower() in public}
    raise AssertionError("unreachable")  # pragma: no cover


def _decoder(encoding: str) -> Any:
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return None
    if enc in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if enc == "deflate":
        return "deflate"  # zlib-wrapped or raw: decided on the first bytes
    raise BadEncoding(
        f"Content-Encoding {encoding.strip()[:40]!r}, which was not asked for ({ACCEPT_ENCODING})"
    )


def read_body(response: httpx.Response, limit: int) -> bytes:
    """The body of ``response``, decoded, refusing more than ``limit`` bytes.

    ``gzip`` and ``deflate`` are decoded here, at most ``limit + 1`` bytes
    out of each step, so a small compressed body that inflates to gigabytes
    costs no more than ``limit``.  A declared ``Content-Length`` over the
    limit is refused before anything is read.

    Raises
    ------
    BodyTooLarge, BadEncoding
    """
    declared = response.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"a body of {int(declared):,} bytes (at most {limit:,} are read)")
    decoder = _decoder(response.headers.get("content-encoding", ""))
    out = bytearray()
    raw_total = 0

    def add(data: bytes) -> None:
        out.extend(data)
        if len(out) > limit:
            raise BodyTooLarge(f"a body of more than {limit:,} bytes decoded")

    for chunk in response.iter_raw(_CHUNK):
        raw_total += len(chunk)
        if raw_total > limit:
            raise BodyTooLarge(f"a body of more than {limit:,} bytes")
        if decoder is None:
            add(chunk)
            continue
        if decoder == "deflate":
            raw = chunk[:1] and (chunk[0] & 0x0F) != 8  # RFC 1950 header: method 8
            decoder = zlib.decompressobj(-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
        data = chunk
        try:
            while data and not decoder.eof:
                add(decoder.decompress(data, limit - len(out) + 1))
                data = decoder.unconsumed_tail
        except zlib.error as exc:
            raise BadEncoding(f"a broken compressed body ({exc})") from None
    if decoder is not None and decoder != "deflate":
        try:
            add(decoder.flush())
        except zlib.error as exc:
            raise BadEncoding(f"a broken compressed body ({exc})") from None
    return bytes(out)


def drain(response: httpx.Response, limit: int = DRAIN_BYTES) -> None:
    """Read and drop a small unwanted body (its connection is then reused); close the response."""
    try:
        read_body(response, limit)
    except (BodyTooLarge, BadEncoding):
        pass  # closing drops the connection instead
    finally:
        response.close()
