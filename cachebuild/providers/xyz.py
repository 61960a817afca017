"""Tiles from an XYZ/TMS/quadkey URL template over HTTP(S), politely.

One pooled ``httpx.Client``; client-wide flow control
(:class:`cachebuild._util.retry.FlowControl`): a 429 or 503 slows every
worker and holds them until its ``Retry-After``, at most ``RATE_LIMIT``
requests a second; a User-Agent that names cachebuild; per-request
timeouts; retries with exponential backoff and jitter after connection
errors, timeouts, HTTP 5xx, and after a body that is not a whole image.  The server is not
trusted (:mod:`cachebuild._util.httpsafe`): bodies are capped at
:data:`MAX_TILE_BYTES` decoded, each request has an overall deadline,
credentials never follow a redirect to another origin, and a server that
nothing answers from stops the run after a few requests
(:mod:`cachebuild._util.retry`).

Secrets (the API key, the values of the extra headers) never reach an
exception, a log record (a filter redacts them from httpx's request log),
the provider's identity or a file.

httpx is imported when a provider is made.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple, Protocol

from cachebuild._util import httpsafe
from cachebuild._util.retry import (
    THROTTLE_STATUSES,
    FailFast,
    FlowControl,
    backoff_s,
    failure_kind,
    retry_after_s,
)
from cachebuild.errors import DownloadError
from cachebuild.providers.base import USER_AGENT, TileFetchError, check_image, fill_template
from cachebuild.providers.xyzconfig import (
    API_KEY_ENV,
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_HTTP_CONCURRENCY,
    DEFAULT_SUBDOMAINS,
    HEADERS_ENV,
    MAX_TILE_BYTES,
    PUBLIC_HEADERS,
    HttpConfig,
    check_template,
    header_secrets,
    key_forms,
    quote_key,
)
from cachebuild.tilemath import Tile

if TYPE_CHECKING:
    import httpx


# the settings' names (xyzconfig) are importable from here too, as before
__all__ = ["XyzProvider", "Fetched"]
#: A validator longer than this, or not printable ASCII, is not kept.
_MAX_VALIDATOR_LEN = 256

_REDACTED = "***"
_key_forms = key_forms  # the name cachebuild.providers imports
# A logger's filters see only the records made on that logger, not its
# children's: name each.  httpx logs every request URL at INFO; httpcore
# logs no URL today, but its trace messages include request details.
_LOGGERS_WITH_URLS = (
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
)


class Fetched(NamedTuple):
    """What :meth:`XyzProvider.fetch_validated` got: the tile, or "not modified", and its validators."""

    data: bytes | None  # None: no tile here (404, 204), or not modified
    not_modified: bool = False  # a 304: the stored tile is current
    etag: str | None = None
    last_modified: str | None = None


class _Got(NamedTuple):
    fetched: Fetched


class _Answer(NamedTuple):
    status: int
    ctype: str
    retry_after: str | None
    data: bytes | None
    etag: str | None
    last_modified: str | None


def _validator(value: str | None) -> str | None:
    """An ``ETag`` or ``Last-Modified`` worth keeping: short printable ASCII, else None."""
    if not value or len(value) > _MAX_VALIDATOR_LEN or not value.isascii():
        return None
    return value if value.isprintable() else None


class _Retry(NamedTuple):
    problem: str
    throttled: bool = False  # 429/503: flow control
    retry_after: float | None = None


class _Limiter(Protocol):
    """What paces requests: :class:`~cachebuild.providers.ratelimit.TokenBucket`, or a test's counter."""

    def acquire(self) -> object: ...


# -- logging -------------------------------------------------------------------


class _RedactSecrets(logging.Filter):
    """Replace secret values in log records (httpx logs every request URL)."""

    def __init__(self, secrets: tuple[str, ...]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to fix
            return True
        if any(s in message for s in self.secrets):
            for s in self.secrets:
                message = message.replace(s, _REDACTED)
            record.msg, record.args = message, ()
        return True


# -- the provider ------------------------------------------------------------------


class XyzProvider:
    """Tiles from an XYZ/TMS/quadkey URL template over HTTP(S).

    Parameters
    ----------
    template
        URL with placeholders: ``{z}``, ``{x}``, ``{y}``, ``{-y}``, ``{q}``,
        ``{s}`` and ``{key}``.
    api_key
        Value for ``{key}``; required when the template has it.
    config
        Timeouts, retries, rate limit, subdomains.
    headers
        Extra request headers (e.g. ``Authorization``); their values are
        secrets.
    limiter
        Anything with an ``acquire()`` called before every request (a
        test's counter); none by default: :attr:`flow` paces requests.
    client
        An ``httpx.Client`` to use (and leave open); by default one pooled
        client is made and closed by :meth:`close`.

    Attributes
    ----------
    retries
        Requests repeated so far, over all threads.
    flow
        The client-wide flow control (:class:`~cachebuild._util.retry.FlowControl`):
        429/503 answers lower its concurrency and rate, success raises them
        back toward ``CONCURRENCY`` and ``RATE_LIMIT``.

    Raises
    ------
    UsageError
        For a bad template, a missing key, ``SUBDOMAINS`` without ``{s}``,
        or a template that holds a secret's value literally (it would end
        up in the identity).
    """

    def __init__(
        self,
        template: str,
        *,
        api_key: str | None = None,
        config: HttpConfig | None = None,
        headers: Mapping[str, str] | None = None,
        limiter: _Limiter | None = None,
        client: httpx.Client | None = None,
    ):
        import httpx

        headers = dict(headers or {})
        self.config = config or HttpConfig()
        placeholders = check_template(
            template, api_key=api_key, headers=headers, config=self.config
        )
        self.template = template
        self.identity = f"xyz:{template}"
        self.concurrency = DEFAULT_HTTP_CONCURRENCY
        self.subdomains = (
            (self.config.subdomains or DEFAULT_SUBDOMAINS) if "s" in placeholders else ()
        )
        self.retries = 0
        self._count_lock = threading.Lock()
        self._key = api_key or ""
        self._key_in_url = quote_key(self._key)
        self._secrets = tuple(
            sorted({*key_forms(api_key), *header_secrets(headers)}, key=len, reverse=True)
        )
        self._has_headers = bool(headers)
        self._headers = {"User-Agent": USER_AGENT, **headers}
        if not any(k.lower() == "accept-encoding" for k in headers):
            self._headers["Accept-Encoding"] = (
                httpsafe.ACCEPT_ENCODING
            )  # what read_body decodes, bounded
        self._guard = httpsafe.HttpGuard()
        self._failfast = FailFast()
        self._fatal: DownloadError | None = None
        self.limiter = limiter
        # client-wide AIMD over concurrency and rate; RATE_LIMIT is its ceiling
        self.flow = FlowControl(
            DEFAULT_HTTP_CONCURRENCY, self.config.rate_limit, sleep=self._guard.sleep
        )
        self._own_client = client is None
        if client is None:
            self._tls = httpx.create_ssl_context()  # tens of ms to make: one for every pool
            client = httpx.Client(
                verify=self._tls,
                limits=httpx.Limits(
                    max_connections=256, max_keepalive_connections=DEFAULT_HTTP_CONCURRENCY
                ),
                follow_redirects=False,  # httpsafe.get follows them, credentials kept at home
            )
            httpsafe.pool_per_thread(client, self._thread_pool)  # each pool guarded as it is made
            self._guard.install(client)  # the proxies' mounts (from the environment), shared
        self._client = client
        self._rng = random.Random()
        self._filter: _RedactSecrets | None = None
        if self._secrets:
            self._filter = _RedactSecrets(self._secrets)
            for name in _LOGGERS_WITH_URLS:
                logging.getLogger(name).addFilter(self._filter)

    def _thread_pool(self) -> httpx.HTTPTransport:
        """One worker thread's connections (a redirect's hop may open a second), guarded."""
        import httpx

        limits = httpx.Limits(max_connections=8, max_keepalive_connections=2)
        return self._guard.guard(httpx.HTTPTransport(verify=self._tls, limits=limits))

    def subdomain(self, t: Tile) -> str:
        """What ``{s}`` is for ``t``: the same every time, spread evenly
        over neighbours (Leaflet's ``(x + y) mod n``)."""
        if not self.subdomains:
            return ""
        return self.subdomains[(t.x + t.y) % len(self.subdomains)]

    def _url(self, t: Tile, key: str) -> str:
        return fill_template(self.template, t, key=key, s=self.subdomain(t))

    def shown_url(self, t: Tile) -> str:
        """The URL of ``t`` as it may be shown: ``{key}`` left as written."""
        return self._url(t, "{key}")

    def _redact(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, _REDACTED)
        return text

    def _backoff_s(self, attempt: int) -> float:
        return backoff_s(attempt, self.config.backoff_s, self._rng, DEFAULT_BACKOFF_MAX_S)

    def _refused(self, status: int, tile: Tile) -> DownloadError:
        if self._has_headers and self._key:
            remedy = (
                f"check {API_KEY_ENV} and the credentials in {HEADERS_ENV}: the server refused them"
            )
        elif self._has_headers:
            remedy = f"check the credentials in {HEADERS_ENV}: the server refused them"
        elif self._key:
            remedy = f"check {API_KEY_ENV}: the server refused the key"
        else:
            remedy = (
                f"the server wants credentials: put {{key}} in the template and set {API_KEY_ENV}, "
                f"or give a token in {HEADERS_ENV}"
            )
        return DownloadError(
            f"the tile server refused the credentials (HTTP {status}) for {self.template} "
            f"(tile {tile.z}/{tile.x}/{tile.y})",
            remedy=remedy,
        )

    def fetch(self, tile: Tile) -> bytes | None:
        """GET the tile; see :class:`~cachebuild.providers.Provider`.  404 and 204 mean no tile."""
        return self.fetch_validated(tile).data

    def fetch_validated(
        self, tile: Tile, *, etag: str | None = None, last_modified: str | None = None
    ) -> Fetched:
        """GET the tile, conditionally when a validator of the stored copy is given.

        With ``etag`` the request carries ``If-None-Match``, else with
        ``last_modified`` ``If-Modified-Since``: a 304 answer is
        ``Fetched(None, not_modified=True)`` and costs no download.  The
        answer's own ``ETag`` and ``Last-Modified`` come back for the store.
        """
        cond: dict[str, str] = {}
        if etag:
            cond["If-None-Match"] = etag
        elif last_modified:
            cond["If-Modified-Since"] = last_modified
        try:
            return self._fetch(tile, cond)
        except httpsafe.Stopped:
            # stopped by cancel() (an interrupt: nobody reads this) or by a dead server
            raise self._fatal or DownloadError("the fetch was stopped") from None

    def _fetch(self, tile: Tile, cond: Mapping[str, str]) -> Fetched:
        url = self._url(tile, self._key_in_url)
        counted = free = 0
        while True:
            answer = self._attempt(url, tile, cond)
            if not isinstance(answer, _Retry):
                return answer.fetched
            if answer.throttled and self.flow.busy_not_down():
                free += 1  # flow control: the server is busy, not failing this tile
            else:
                counted += 1
            if counted > self.config.retries:
                raise TileFetchError(
                    f"tile {tile.z}/{tile.x}/{tile.y}: {answer.problem} after {counted + free} "
                    f"attempt(s) from {self.shown_url(tile)}",
                    tile=tile,
                )
            with self._count_lock:
                self.retries += 1
            if answer.throttled and answer.retry_after is not None:
                continue  # the flow control holds every worker until then
            if answer.retry_after is not None:
                self._guard.sleep(answer.retry_after)
            else:
                self._guard.sleep(self._backoff_s(max(counted, min(free, 3)) - 1))

    def _attempt(self, url: str, tile: Tile, cond: Mapping[str, str]) -> _Got | _Retry:
        """One request through the flow control: the tile (or None), or why to ask again."""
        import httpx

        self._guard.check()
        if self.limiter is not None:
            self.limiter.acquire()
        ticket = self.flow.start()
        try:
            with self._guard.deadline(self.config.deadline_s):
                a = self._get(url, cond)
        except (httpx.RequestError, httpsafe.DeadlineExceeded) as exc:
            self.flow.finish(ticket, answered=False)
            self._dead_server(exc, tile)
            # the exception's text and its request hold the URL, key
            # included: keep neither (no `from exc`)
            if isinstance(exc, httpsafe.DeadlineExceeded):
                return _Retry(f"no whole answer within HTTP_DEADLINE={self.config.deadline_s:g} s")
            return _Retry(f"{type(exc).__name__}: {self._redact(str(exc)) or 'no detail'}")
        except (
            httpsafe.BodyTooLarge,
            httpsafe.BadEncoding,
        ) as exc:  # hostile or broken: not retried
            self.flow.finish(ticket)
            raise TileFetchError(
                f"tile {tile.z}/{tile.x}/{tile.y}: refused {self._redact(str(exc))} "
                f"from {self.shown_url(tile)}",
                tile=tile,
            ) from None
        except BaseException:  # stopped, or a bug: the slot is given back all the same
            self.flow.finish(ticket, answered=False)
            raise
        self._failfast.answered()
        delay = retry_after_s(a.retry_after, self.config.retry_after_max_s)
        throttled = a.status in THROTTLE_STATUSES
        self.flow.finish(ticket, throttled=throttled, retry_after=delay)
        if a.status == 304 and cond:
            return _Got(Fetched(None, True, a.etag, a.last_modified))
        return self._judge(tile, a, delay, throttled)

    def _judge(self, tile: Tile, a: _Answer, delay: float | None, throttled: bool) -> _Got | _Retry:
        status = a.status
        if status in (204, 404):
            return _Got(Fetched(None))
        if 200 <= status < 300:
            assert a.data is not None
            why = check_image(a.data, self.config.tile_size)
            if why is None:
                return _Got(Fetched(a.data, False, a.etag, a.last_modified))
            return _Retry(f"HTTP {status} with {self._redact(why)} ({self._redact(a.ctype)})")
        if status in (401, 403, 407):
            raise self._refused(status, tile)
        if status == 408 or status >= 500 or throttled:
            return _Retry(f"HTTP {status}", throttled=throttled, retry_after=delay)
        raise TileFetchError(
            f"tile {tile.z}/{tile.x}/{tile.y}: HTTP {status} from {self.shown_url(tile)}",
            tile=tile,
        )

    def _get(self, url: str, cond: Mapping[str, str]) -> _Answer:
        """One GET (redirects followed): the status, headers that matter, and the body of a 2xx."""
        response = httpsafe.get(
            self._client,
            url,
            headers={**self._headers, **cond},
            public=PUBLIC_HEADERS,
            timeout=self.config.timeout_s,
        )
        try:
            status = response.status_code
            h = response.headers
            if 200 <= status < 300:
                data: bytes | None = httpsafe.read_body(response, MAX_TILE_BYTES)
            else:
                data = None
                httpsafe.drain(response)
            return _Answer(
                status,
                h.get("content-type", "no content-type"),
                h.get("retry-after"),
                data,
                _validator(h.get("etag")),
                _validator(h.get("last-modified")),
            )
        finally:
            response.close()

    def _dead_server(self, exc: BaseException, tile: Tile) -> None:
        """Stop every worker when the first requests all found nothing listening (retrypolicy)."""
        import httpx

        host = httpx.URL(self.shown_url(tile)).netloc.decode("ascii", "replace")
        reason = self._failfast.failed(self._redact(host), failure_kind(exc))
        if reason is None:
            return
        self._fatal = DownloadError(
            f"the tile server does not answer: {reason}; stopped",
            remedy="check the host in PROVIDER, that the server is up and reachable from here "
            "(DNS, proxy, firewall, https:// vs http://), then build again",
        )
        self._guard.stop()
        raise self._fatal

    def cancel(self) -> None:
        """Stop every fetch in flight at once (an interrupt): each raises instead of finishing."""
        self._guard.stop()

    def close(self) -> None:
        if self._own_client:
            self._client.close()
        if self._filter is not None:
            for name in _LOGGERS_WITH_URLS:
                logging.getLogger(name).removeFilter(self._filter)
            self._filter = None
