"""The settings of an XYZ provider, read and checked before any request.

``HTTP_*``, ``RATE_LIMIT`` and ``SUBDOMAINS`` (:class:`HttpConfig`), the
extra headers of ``CACHEBUILD_HTTP_HEADERS`` (:func:`parse_headers`) and the
URL template itself (:func:`check_template`): everything here can be checked
from the arguments and the environment, so the build does it before the
lock.  Errors name a variable or header, never a secret's value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cachebuild.errors import UsageError
from cachebuild.providers.base import DEFAULT_TILE_SIZE, fill_template, template_placeholders
from cachebuild.tilemath import Tile

__all__ = [
    "API_KEY_ENV",
    "HEADERS_ENV",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_DEADLINE_S",
    "MAX_TILE_BYTES",
    "DEFAULT_RETRIES",
    "DEFAULT_BACKOFF_S",
    "DEFAULT_BACKOFF_MAX_S",
    "DEFAULT_RETRY_AFTER_MAX_S",
    "DEFAULT_HTTP_CONCURRENCY",
    "DEFAULT_SUBDOMAINS",
    "MAX_RATE_LIMIT",
    "PUBLIC_HEADERS",
    "HttpConfig",
    "parse_headers",
    "parse_subdomains",
    "parse_rate_limit",
    "parse_duration",
    "DEFAULT_FETCH_DEADLINE_S",
    "check_template",
    "refuse_userinfo",
    "header_secrets",
    "key_forms",
    "quote_key",
]

API_KEY_ENV = "CACHEBUILD_API_KEY"
#: Extra request headers, environment only: ``Name: value`` lines or a JSON object.
HEADERS_ENV = "CACHEBUILD_HTTP_HEADERS"
DEFAULT_TIMEOUT_S = 20.0
#: Overall seconds a tile request may take, connect to last byte (``HTTP_DEADLINE``).
DEFAULT_DEADLINE_S = 60.0
#: A tile body larger than this (decoded) is refused: a 256-pixel tile is far smaller.
MAX_TILE_BYTES = 4 << 20
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.2
DEFAULT_BACKOFF_MAX_S = 30.0
DEFAULT_RETRY_AFTER_MAX_S = 30.0
DEFAULT_HTTP_CONCURRENCY = 64
#: What ``{s}`` rotates through unless ``SUBDOMAINS`` says otherwise (Leaflet's default).
DEFAULT_SUBDOMAINS = ("a", "b", "c")
MAX_RATE_LIMIT = 100_000.0
#: How long the fetch of one build may go on (``FETCH_DEADLINE``): bounds the
#: waiting a server's 429/503 answers cause, which spends no tile's retries.
DEFAULT_FETCH_DEADLINE_S = 6 * 3600.0
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}

_REDACTED = "***"
# Secrets shorter than this are not looked for in templates: a short one
# would match innocent text (a digit in a host name).  Redaction takes any
# length: too much of it in a log line does no harm.
_MIN_LITERAL_SECRET_LEN = 6
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SUBDOMAIN_RE = re.compile(r"[A-Za-z0-9._-]+")
# Header values that are not secrets; every other header's value is treated
# as one (an Authorization, a Cookie, an X-Api-Key, anything unknown).
PUBLIC_HEADERS = frozenset(
    {
        "accept",
        "accept-language",
        "accept-encoding",
        "cache-control",
        "origin",
        "referer",
        "user-agent",
    }
)
_FORBIDDEN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def _env_number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(
            f"{name}={raw!r} is not a number", remedy=f"set {name} to a number"
        ) from None
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


def parse_duration(name: str, raw: str) -> float:
    """A duration in seconds: ``90``, ``90s``, ``15m``, ``6h``, ``30d``, ``2w``; ``0`` is zero.

    >>> parse_duration("TILE_MAX_AGE", "30d"), parse_duration("FETCH_DEADLINE", "1.5h")
    (2592000.0, 5400.0)
    """
    m = _DURATION_RE.fullmatch(raw.lower())
    if m is None:
        raise UsageError(
            f"{name}={raw!r} is not a duration",
            remedy=f"set {name} to a number and a unit: 90s, 15m, 6h, 30d, 2w (a bare number is seconds)",
        )
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


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
    items: list[tuple[object, object]]  # JSON gives any types: each is checked below
    if raw.lstrip().startswith("{"):
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            # the position, not the message: json's message quotes the text
            raise UsageError(
                f"{HEADERS_ENV} is not valid JSON (at character {getattr(exc, 'pos', '?')})",
                remedy=remedy,
            ) from None
        if not isinstance(obj, dict):
            raise UsageError(f"{HEADERS_ENV} must be a JSON object", remedy=remedy)
        items = list(obj.items())
    else:
        items = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            left, sep, right = line.partition(":")
            if not sep:
                raise UsageError(
                    f"{HEADERS_ENV} line {n} has no ':' between name and value", remedy=remedy
                )
            items.append((left.strip(), right.strip()))
    headers: dict[str, str] = {}
    for name, value in items:
        if not isinstance(name, str) or not _HEADER_NAME_RE.fullmatch(name):
            raise UsageError(
                f"{HEADERS_ENV}: {str(name)[:40]!r} is not a header name", remedy=remedy
            )
        if name.lower() in _FORBIDDEN_HEADERS:
            raise UsageError(f"{HEADERS_ENV}: cachebuild sets {name} itself", remedy=remedy)
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise UsageError(
                f"{HEADERS_ENV}: the value of {name} must be one line of text", remedy=remedy
            )
        if any(k.lower() == name.lower() for k in headers):
            raise UsageError(f"{HEADERS_ENV} names {name} twice", remedy=remedy)
        headers[name] = value
    return headers


def header_secrets(headers: Mapping[str, str]) -> list[str]:
    """The values to redact: every non-public header's value, and its credential part."""
    out = set()
    for name, value in headers.items():
        if name.lower() in PUBLIC_HEADERS or not value:
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
    deadline_s
        Overall seconds a request may take, redirects included: a server
        that drips a byte now and then passes every per-read timeout.
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
    deadline_s: float = DEFAULT_DEADLINE_S
    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S
    retry_after_max_s: float = DEFAULT_RETRY_AFTER_MAX_S
    tile_size: int | None = DEFAULT_TILE_SIZE
    rate_limit: float | None = None
    subdomains: tuple[str, ...] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HttpConfig:
        """Read ``HTTP_TIMEOUT`` (s), ``HTTP_DEADLINE`` (s), ``HTTP_RETRIES``, ``HTTP_BACKOFF`` (s),
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
            deadline_s=_env_number(env, "HTTP_DEADLINE", DEFAULT_DEADLINE_S, 0.001, 86400.0),
            retries=int(retries),
            backoff_s=_env_number(env, "HTTP_BACKOFF", DEFAULT_BACKOFF_S, 0.0, 60.0),
            rate_limit=parse_rate_limit(env.get("RATE_LIMIT")),
            subdomains=parse_subdomains(env.get("SUBDOMAINS")),
        )


def quote_key(key: str) -> str:
    from urllib.parse import quote

    return quote(key, safe="")


def key_forms(key: str | None) -> list[str]:
    """The key as given and as it appears in a URL."""
    if not key:
        return []
    return sorted({key, quote_key(key)}, key=len, reverse=True)


def refuse_userinfo(spec: str, name: str = "PROVIDER") -> None:
    """Refuse a URL with ``user:password@`` in it: it would be stored in the manifest,
    tileset.json and the store's database.  The message shows neither part.

    >>> refuse_userinfo("https://tiles.example/{z}/{x}/{y}.png")
    """
    # the authority by hand, not urlsplit: that raises on a malformed URL
    # ("[::1/..."), which check_template refuses with its own message later
    _, sep, rest = spec.strip().partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if sep and "@" in authority:
        raise UsageError(
            f"{name} has a user name or password in its URL (user:password@host); "
            "it would be written into the signed cache",
            remedy=f"take it out of {name} and give the credentials in the environment: "
            f"{HEADERS_ENV}='Authorization: Basic <base64 of user:password>', "
            f"or {{key}} in the template with {API_KEY_ENV}",
        )


def check_template(
    template: str, *, api_key: str | None, headers: Mapping[str, str], config: HttpConfig
) -> set[str]:
    """Everything about a URL template that can be checked without a request; its placeholders.

    Raises
    ------
    UsageError
        For user:password in the URL, a template that holds a secret's value
        literally, an unknown placeholder, no tile in it, ``{key}`` without
        :data:`API_KEY_ENV`, ``SUBDOMAINS`` without ``{s}``, or no valid URL.
    """
    import httpx

    refuse_userinfo(template)
    forms = key_forms(api_key)
    secrets = tuple(sorted({*forms, *header_secrets(headers)}, key=len, reverse=True))
    if any(len(s) >= _MIN_LITERAL_SECRET_LEN and s in template for s in secrets):
        # checked first: every later message shows the template
        literal = "the value of " + (
            API_KEY_ENV if any(k in template for k in forms) else HEADERS_ENV
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
    if config.subdomains is not None and "s" not in placeholders:
        raise UsageError(
            "SUBDOMAINS is set but the PROVIDER template has no {s}",
            remedy="put {s} where the subdomain goes, or unset SUBDOMAINS",
        )
    s = (config.subdomains or DEFAULT_SUBDOMAINS)[0] if "s" in placeholders else ""
    try:
        host = httpx.URL(
            fill_template(template, Tile(0, 0, 0), key="{key}", s=s)
        ).host  # decodes xn--
    except (httpx.InvalidURL, ValueError) as exc:  # ValueError: a host IDNA refuses (UnicodeError)
        text = str(exc)
        for secret in secrets:
            text = text.replace(secret, _REDACTED)
        raise UsageError(f"PROVIDER template {template} is not a valid URL: {text}") from None
    if not host:
        raise UsageError(f"PROVIDER template {template} names no host")
    return placeholders
