"""Tiles from an XYZ/TMS/quadkey URL template over HTTP(S), politely.

One pooled ``httpx.Client``; at most ``RATE_LIMIT`` requests a second
(a token bucket shared by the worker threads); a User-Agent that names
cachebuild; per-request timeouts; retries with exponential backoff and
jitter after connection errors, timeouts, HTTP 5xx and 429 (``Retry-After``
honoured), and after a body that is not a whole image.

Secrets (the API key, the values of the extra headers) never reach an
exception, a log record (a filter redacts them from httpx's request log),
the provider's identity or a file.

httpx is imported when a provider is made.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..errors import DownloadError, UsageError
from ..tiles import Tile
from .base import (
    DEFAULT_TILE_SIZE,
    USER_AGENT,
    TileFetchError,
    check_image,
    fill_template,
    template_placeholders,
)

if TYPE_CHECKING:
    import httpx


__all__ = [
    "API_KEY_ENV",
    "HEADERS_ENV",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_RETRIES",
    "DEFAULT_BACKOFF_S",
    "DEFAULT_BACKOFF_MAX_S",
    "DEFAULT_RETRY_AFTER_MAX_S",
    "DEFAULT_HTTP_CONCURRENCY",
    "DEFAULT_SUBDOMAINS",
    "MAX_RATE_LIMIT",
    "HttpConfig",
    "XyzProvider",
    "parse_headers",
    "parse_subdomains",
    "parse_rate_limit",
]

API_KEY_ENV = "CACHEBUILD_API_KEY"
#: Extra request headers, environment only: ``Name: value`` lines or a JSON object.
HEADERS_ENV = "CACHEBUILD_HTTP_HEADERS"
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.2
DEFAULT_BACKOFF_MAX_S = 30.0
DEFAULT_RETRY_AFTER_MAX_S = 30.0
DEFAULT_HTTP_CONCURRENCY = 64
#: What ``{s}`` rotates through unless ``SUBDOMAINS`` says otherwise (Leaflet's default).
DEFAULT_SUBDOMAINS = ("a", "b", "c")
MAX_RATE_LIMIT = 100_000.0

_REDACTED = "***"
# Secrets shorter than this are not looked for in templates: a short one
# would match innocent text (a digit in a host name).  Redaction takes any
# length: too much of it in a log line does no harm.
_MIN_LITERAL_SECRET_LEN = 6
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SUBDOMAIN_RE = re.compile(r"[A-Za-z0-9._-]+")
# Header values that are not secrets; every other header's value is treated
# as one (an Authorization, a Cookie, an X-Api-Key, anything unknown).
_PUBLIC_HEADERS = frozenset(
    {"accept", "accept-language", "accept-encoding", "cache-control", "origin", "referer", "user-agent"}
)
_FORBIDDEN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
# A logger's filters see only the records made on that logger, not its
# children's: name each.  httpx logs every request URL at INFO; httpcore
# logs no URL today, but its trace messages include request details.
_LOGGERS_WITH_URLS = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy")


class _Limiter(Protocol):
    """What paces requests: :class:`~cachebuild.ratelimit.TokenBucket`, or a test's counter."""

    def acquire(self) -> object: ...


# -- configuration -----------------------------------------------------------


def _env_number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number", remedy=f"set {name} to a number") from None
    if not (math.isfinite(value) and lo <= value <= hi):
        raise UsageError(
            f"{name}={raw} is outside {lo:g}..{hi:g}", remedy=f"set {name} within {lo:g}..{hi:g}"
        )
    return value


def parse_rate_limit(raw: str | None) -> float | None:
    """``RATE_LIMIT`` in requests a second; None (no limit) when unset or 0.

    >>> parse_rate_limit("2.5"), parse_rate_limit("0"), parse_rate_limit(None)
    (2.5, None, None)
    """
    value = _env_number({"RATE_LIMIT": raw or ""}, "RATE_LIMIT", 0.0, 0.0, MAX_RATE_LIMIT)
    return value or None


def parse_subdomains(raw: str | None) -> tuple[str, ...] | None:
    """``SUBDOMAINS``: a comma-separated list for ``{s}``; None when unset.

    >>> parse_subdomains("a, b,c")
    ('a', 'b', 'c')
    """
    if raw is None or not raw.strip():
        return None
    parts = tuple(p.strip() for p in raw.split(","))
    bad = [p for p in parts if not _SUBDOMAIN_RE.fullmatch(p)]
    if bad:
        raise UsageError(
            f"SUBDOMAINS={raw!r}: {bad[0]!r} is not a subdomain",
            remedy="list the values {s} takes, comma-separated: SUBDOMAINS=a,b,c",
        )
    return parts


def parse_headers(raw: str | None) -> dict[str, str]:
    """Extra request headers from ``CACHEBUILD_HTTP_HEADERS``.

    Either ``Name: value`` lines or a JSON object of strings.  Errors name
    the header, never its value (it may be a token).

    >>> parse_headers("Authorization: Bearer abc\\nX-Client: drone-7")
    {'Authorization': 'Bearer abc', 'X-Client': 'drone-7'}
    >>> parse_headers('{"X-Api-Key": "k123"}')
    {'X-Api-Key': 'k123'}
    """
    if raw is None or not raw.strip():
        return {}
    remedy = f"set {HEADERS_ENV} to 'Name: value' lines or a JSON object of strings"
    items: list[tuple[str, object]]
    if raw.lstrip().startswith("{"):
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            # the position, not the message: json's message quotes the text
            raise UsageError(
                f"{HEADERS_ENV} is not valid JSON (at character {getattr(exc, 'pos', '?')})", remedy=remedy
            ) from None
        if not isinstance(obj, dict):
            raise UsageError(f"{HEADERS_ENV} must be a JSON object", remedy=remedy)
        items = list(obj.items())
    else:
        items = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise UsageError(f"{HEADERS_ENV} line {n} has no ':' between name and value", remedy=remedy)
            items.append((name.strip(), value.strip()))
    headers: dict[str, str] = {}
    for name, value in items:
        if not isinstance(name, str) or not _HEADER_NAME_RE.fullmatch(name):
            raise UsageError(f"{HEADERS_ENV}: {str(name)[:40]!r} is not a header name", remedy=remedy)
        if name.lower() in _FORBIDDEN_HEADERS:
            raise UsageError(f"{HEADERS_ENV}: cachebuild sets {name} itself", remedy=remedy)
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise UsageError(f"{HEADERS_ENV}: the value of {name} must be one line of text", remedy=remedy)
        if any(k.lower() == name.lower() for k in headers):
            raise UsageError(f"{HEADERS_ENV} names {name} twice", remedy=remedy)
        headers[name] = value
    return headers


def _header_secrets(headers: Mapping[str, str]) -> list[str]:
    """The values to redact: every non-public header's value, and its credential part."""
    out = set()
    for name, value in headers.items():
        if name.lower() in _PUBLIC_HEADERS or not value:
            continue
        out.add(value)
        scheme, _, credential = value.partition(" ")
        if credential.strip() and scheme.isalpha():
            out.add(credential.strip())  # "Bearer <token>": the token alone too
    return sorted(out, key=len, reverse=True)


@dataclass(frozen=True)
class HttpConfig:
    """How an HTTP provider talks to its server.

    Attributes
    ----------
    timeout_s
        Per-request timeout (connect, read, write, pool), seconds.
    retries
        Further attempts after a connection error, timeout, HTTP 5xx, 408
        or 429, or a body that is not a whole image.
    backoff_s
        First retry delay; doubled each retry, times a random factor in
        [0.5, 1.5), capped at :data:`DEFAULT_BACKOFF_MAX_S`.
    retry_after_max_s
        Cap on a server's ``Retry-After``.
    tile_size
        Edge in pixels a tile must have; None accepts any size.
    rate_limit
        Requests a second at most, over all threads (retries included);
        None for no limit.
    subdomains
        What ``{s}`` takes; None: :data:`DEFAULT_SUBDOMAINS`.
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S
    retry_after_max_s: float = DEFAULT_RETRY_AFTER_MAX_S
    tile_size: int | None = DEFAULT_TILE_SIZE
    rate_limit: float | None = None
    subdomains: tuple[str, ...] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HttpConfig:
        """Read ``HTTP_TIMEOUT`` (s), ``HTTP_RETRIES``, ``HTTP_BACKOFF`` (s),
        ``RATE_LIMIT`` (requests/s) and ``SUBDOMAINS``.

        >>> cfg = HttpConfig.from_env({"HTTP_TIMEOUT": "5", "RATE_LIMIT": "10"})
        >>> cfg.timeout_s, cfg.rate_limit
        (5.0, 10.0)
        """
        retries = _env_number(env, "HTTP_RETRIES", DEFAULT_RETRIES, 0, 20)
        if retries != int(retries):
            raise UsageError(f"HTTP_RETRIES={env['HTTP_RETRIES']} is not a whole number")
        return cls(
            timeout_s=_env_number(env, "HTTP_TIMEOUT", DEFAULT_TIMEOUT_S, 0.001, 3600.0),
            retries=int(retries),
            backoff_s=_env_number(env, "HTTP_BACKOFF", DEFAULT_BACKOFF_S, 0.0, 60.0),
            rate_limit=parse_rate_limit(env.get("RATE_LIMIT")),
            subdomains=parse_subdomains(env.get("SUBDOMAINS")),
        )


# -- logging and Retry-After ----------------------------------------------------


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


def _retry_after_s(value: str | None, cap: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (capped), or None if unusable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), cap)


def _quote(key: str) -> str:
    from urllib.parse import quote

    return quote(key, safe="")


def _key_forms(key: str | None) -> list[str]:
    """The key as given and as it appears in a URL."""
    if not key:
        return []
    return sorted({key, _quote(key)}, key=len, reverse=True)


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
        Anything with an ``acquire()`` called before every request; by
        default a :class:`~cachebuild.ratelimit.TokenBucket` at
        ``config.rate_limit``, or none.
    client
        An ``httpx.Client`` to use (and leave open); by default one pooled
        client is made and closed by :meth:`close`.

    Attributes
    ----------
    retries
        Requests repeated so far, over all threads.

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
        key_forms = _key_forms(api_key)
        secrets = tuple(sorted({*key_forms, *_header_secrets(headers)}, key=len, reverse=True))
        if any(len(s) >= _MIN_LITERAL_SECRET_LEN and s in template for s in secrets):
            # checked first: every later message shows the template
            literal = "the value of " + (
                API_KEY_ENV if any(k in template for k in key_forms) else HEADERS_ENV
            )
            raise UsageError(
                f"PROVIDER holds {literal} literally",
                remedy="write {key} where the key goes; cachebuild fills it in from the environment",
            )
        placeholders = template_placeholders(template)
        if "key" in placeholders and not api_key:
            raise UsageError(
                f"PROVIDER template has {{key}} but {API_KEY_ENV} is not set",
                remedy=f"export {API_KEY_ENV}=<your API key>",
            )
        self.config = config or HttpConfig()
        if self.config.subdomains is not None and "s" not in placeholders:
            raise UsageError(
                "SUBDOMAINS is set but the PROVIDER template has no {s}",
                remedy="put {s} where the subdomain goes, or unset SUBDOMAINS",
            )
        self.template = template
        self.identity = f"xyz:{template}"
        self.concurrency = DEFAULT_HTTP_CONCURRENCY
        self.subdomains = (self.config.subdomains or DEFAULT_SUBDOMAINS) if "s" in placeholders else ()
        self.retries = 0
        self._count_lock = threading.Lock()
        self._key = api_key or ""
        self._key_in_url = _quote(self._key)
        self._secrets = secrets
        self._has_headers = bool(headers)
        try:
            sample = httpx.URL(self._url(Tile(0, 0, 0), "{key}"))
            host = sample.host  # decodes an xn-- host: may raise too
        except (httpx.InvalidURL, ValueError) as exc:  # ValueError: a host IDNA refuses (UnicodeError)
            raise UsageError(
                f"PROVIDER template {template} is not a valid URL: {self._redact(str(exc))}"
            ) from None
        if not host:
            raise UsageError(f"PROVIDER template {template} names no host")
        self._headers = {"User-Agent": USER_AGENT, **headers}
        self.limiter = limiter
        if limiter is None and self.config.rate_limit:
            from ..ratelimit import TokenBucket

            self.limiter = TokenBucket(self.config.rate_limit)
        self._own_client = client is None
        self._client = client or httpx.Client(
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=DEFAULT_HTTP_CONCURRENCY),
            follow_redirects=True,
        )
        self._rng = random.Random()
        self._filter: _RedactSecrets | None = None
        if self._secrets:
            self._filter = _RedactSecrets(self._secrets)
            for name in _LOGGERS_WITH_URLS:
                logging.getLogger(name).addFilter(self._filter)

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
        base = self.config.backoff_s * (2.0**attempt)
        return min(base * (0.5 + self._rng.random()), DEFAULT_BACKOFF_MAX_S)

    def _refused(self, status: int, tile: Tile) -> DownloadError:
        if self._has_headers and self._key:
            remedy = f"check {API_KEY_ENV} and the credentials in {HEADERS_ENV}: the server refused them"
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
        import httpx

        url = self._url(tile, self._key_in_url)
        name = f"{tile.z}/{tile.x}/{tile.y}"
        attempts = self.config.retries + 1
        problem = ""
        for attempt in range(attempts):
            delay: float | None = None
            if self.limiter is not None:
                self.limiter.acquire()
            try:
                response = self._client.get(url, headers=self._headers, timeout=self.config.timeout_s)
            except httpx.RequestError as exc:
                # the exception's text and its request hold the URL, key
                # included: keep neither (no `from exc`)
                problem = f"{type(exc).__name__}: {self._redact(str(exc)) or 'no detail'}"
            else:
                status = response.status_code
                if status in (204, 404):
                    return None
                if 200 <= status < 300:
                    data = response.content
                    why = check_image(data, self.config.tile_size)
                    if why is None:
                        return data
                    ctype = response.headers.get("content-type", "no content-type")
                    problem = f"HTTP {status} with {self._redact(why)} ({self._redact(ctype)})"
                elif status in (401, 403, 407):
                    raise self._refused(status, tile)
                elif status in (408, 429) or status >= 500:
                    problem = f"HTTP {status}"
                    delay = _retry_after_s(response.headers.get("retry-after"), self.config.retry_after_max_s)
                else:
                    raise TileFetchError(f"tile {name}: HTTP {status} from {self.shown_url(tile)}", tile=tile)
            if attempt + 1 < attempts:
                with self._count_lock:
                    self.retries += 1
                time.sleep(self._backoff_s(attempt) if delay is None else delay)
        raise TileFetchError(
            f"tile {name}: {problem} after {attempts} attempt(s) from {self.shown_url(tile)}", tile=tile
        )

    def close(self) -> None:
        if self._own_client:
            self._client.close()
        if self._filter is not None:
            for name in _LOGGERS_WITH_URLS:
                logging.getLogger(name).removeFilter(self._filter)
            self._filter = None
