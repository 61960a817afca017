"""Tile providers behind one interface: synthetic, XYZ over HTTP, MBTiles.

A provider turns a tile into its image bytes, or ``None`` when it has no
image for that tile.  :func:`open_provider` reads the ``PROVIDER`` spec:

``synthetic``
    The built-in offline imagery (:mod:`cachebuild.synthetic`).
``http://…`` or ``https://…``
    A URL template with ``{z}``, ``{x}``, ``{y}``; also ``{-y}`` (the TMS
    row), ``{q}`` (the Bing quadkey) and ``{key}`` (the API key, read from
    ``CACHEBUILD_API_KEY``).
``….mbtiles``
    An MBTiles file, read-only.

Each provider has an :attr:`~Provider.identity`: a stable, secret-free
string that is the tile store's ref namespace and a dependency of the tiles
phase.  A URL template is identified by its text, where the key is the
``{key}`` placeholder, never its value.  The key never reaches an exception,
a log record (a filter redacts it from httpx's request log), the identity or
a file.

httpx, Pillow and sqlite3 are imported when a provider is opened.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from . import __version__
from .errors import DownloadError, UsageError
from .tiles import Tile, quadkey

if TYPE_CHECKING:
    import sqlite3

    import httpx

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_RETRIES",
    "DEFAULT_BACKOFF_S",
    "DEFAULT_BACKOFF_MAX_S",
    "DEFAULT_RETRY_AFTER_MAX_S",
    "DEFAULT_HTTP_CONCURRENCY",
    "DEFAULT_MBTILES_CONCURRENCY",
    "DEFAULT_TILE_SIZE",
    "USER_AGENT",
    "PLACEHOLDERS",
    "Provider",
    "TileFetchError",
    "HttpConfig",
    "SyntheticProvider",
    "XyzProvider",
    "MBTilesProvider",
    "open_provider",
    "check_image",
    "template_placeholders",
]

API_KEY_ENV = "CACHEBUILD_API_KEY"
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.2
DEFAULT_BACKOFF_MAX_S = 30.0
DEFAULT_RETRY_AFTER_MAX_S = 30.0
DEFAULT_TILE_SIZE = 256
DEFAULT_HTTP_CONCURRENCY = 64
DEFAULT_MBTILES_CONCURRENCY = 4
USER_AGENT = f"cachebuild/{__version__} (+https://example.invalid/cachebuild)"

#: The placeholders a URL template may use.
PLACEHOLDERS = ("z", "x", "y", "-y", "q", "key")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
_ACCEPTED_SPECS = (
    "synthetic (built-in, offline); "
    "an http:// or https:// URL template with {z}, {x} and {y} or {-y} (or {q}), "
    "optionally {key} for CACHEBUILD_API_KEY; "
    "or the path of a .mbtiles file"
)
_REDACTED = "***"
# Keys shorter than this are not looked for in templates: a short key would
# match innocent text (a digit in a host name).  Redaction takes any length:
# too much of it in a log line does no harm.
_MIN_LITERAL_KEY_LEN = 6


@runtime_checkable
class Provider(Protocol):
    """What the tiles phase needs from a provider.

    Attributes
    ----------
    identity
        Stable, secret-free name of what the provider serves; the tile
        store's ref namespace.
    concurrency
        How many :meth:`fetch` calls are worth running at once.
    """

    identity: str
    concurrency: int

    def fetch(self, tile: Tile) -> bytes | None:
        """The tile's image bytes, or None when the provider has no image for it.

        Thread-safe.  Raises :class:`TileFetchError` when this tile failed
        (after retries) and any other :class:`~cachebuild.errors.DownloadError`
        when no tile can succeed (credentials refused).
        """
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


class TileFetchError(DownloadError):
    """One tile could not be fetched after retries; the fetch goes on without it.

    Parameters
    ----------
    message
        What failed, naming the tile and the URL template (never the key).
    tile
        The tile.
    """

    def __init__(self, message: str, *, tile: Tile, remedy: str | None = None):
        super().__init__(message, remedy=remedy)
        self.tile = tile


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
        raise UsageError(f"{name}={raw} is outside {lo:g}..{hi:g}", remedy=f"set {name} within {lo:g}..{hi:g}")
    return value


@dataclass(frozen=True)
class HttpConfig:
    """How an HTTP provider talks to its server.

    Attributes
    ----------
    timeout_s
        Per-request timeout (connect, read, write, pool), seconds.
    retries
        Further attempts after a connection error, timeout, HTTP 5xx or
        429, or a body that is not a whole image.
    backoff_s
        First retry delay; doubled each retry, times a random factor in
        [0.5, 1.5), capped at :data:`DEFAULT_BACKOFF_MAX_S`.
    retry_after_max_s
        Cap on a server's ``Retry-After``.
    tile_size
        Edge in pixels a tile must have; None accepts any size.
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S
    retry_after_max_s: float = DEFAULT_RETRY_AFTER_MAX_S
    tile_size: int | None = DEFAULT_TILE_SIZE

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HttpConfig:
        """Read ``HTTP_TIMEOUT`` (s), ``HTTP_RETRIES`` and ``HTTP_BACKOFF`` (s).

        >>> HttpConfig.from_env({"HTTP_TIMEOUT": "5"}).timeout_s
        5.0
        """
        retries = _env_number(env, "HTTP_RETRIES", DEFAULT_RETRIES, 0, 20)
        if retries != int(retries):
            raise UsageError(f"HTTP_RETRIES={env['HTTP_RETRIES']} is not a whole number")
        return cls(
            timeout_s=_env_number(env, "HTTP_TIMEOUT", DEFAULT_TIMEOUT_S, 0.001, 3600.0),
            retries=int(retries),
            backoff_s=_env_number(env, "HTTP_BACKOFF", DEFAULT_BACKOFF_S, 0.0, 60.0),
        )


# -- image check -------------------------------------------------------------


def check_image(data: bytes, tile_size: int | None = DEFAULT_TILE_SIZE) -> str | None:
    """Why ``data`` is not a whole tile image, or None when it is one.

    The image must be JPEG, PNG or WebP, decode completely (a truncated
    body fails) and, unless ``tile_size`` is None, be ``tile_size`` pixels
    square.  Error pages (HTML, JSON) and empty bodies fail.

    >>> check_image(b"<html>rate limited</html>")
    'not an image (25 bytes)'
    """
    if not data:
        return "empty body"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in _IMAGE_FORMATS:
                return f"unexpected image format {im.format}"
            if tile_size is not None and im.size != (tile_size, tile_size):
                return f"image is {im.size[0]}x{im.size[1]}, not {tile_size}x{tile_size}"
            if im.format == "JPEG":
                # decode at 1/8 scale: every byte is still read (a truncated
                # body still fails), at half the cost
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except UnidentifiedImageError:
        return f"not an image ({len(data)} bytes)"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return f"broken image ({type(exc).__name__}: {exc})"
    return None


# -- synthetic -------------------------------------------------------------------


class SyntheticProvider:
    """The built-in offline imagery; no network, never missing a tile."""

    def __init__(self) -> None:
        from .synthetic import SYNTHETIC_VERSION

        self.identity = f"synthetic:v{SYNTHETIC_VERSION}"
        self.concurrency = os.cpu_count() or 1

    def fetch(self, tile: Tile) -> bytes | None:
        from .synthetic import synthetic_tile_bytes

        return synthetic_tile_bytes(tile)

    def close(self) -> None:
        pass


# -- XYZ over HTTP ---------------------------------------------------------------


def template_placeholders(template: str) -> set[str]:
    """The placeholders of a URL template; UsageError for unknown or malformed ones.

    >>> sorted(template_placeholders("https://t.example/{z}/{x}/{-y}.png?k={key}"))
    ['-y', 'key', 'x', 'z']
    """
    found = set(_PLACEHOLDER_RE.findall(template))
    unknown = sorted(found - set(PLACEHOLDERS))
    remedy = "placeholders: " + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    if unknown:
        names = ", ".join("{" + u + "}" for u in unknown)
        raise UsageError(f"PROVIDER template has unknown placeholder(s) {names}", remedy=remedy)
    if "{" in _PLACEHOLDER_RE.sub("", template) or "}" in _PLACEHOLDER_RE.sub("", template):
        raise UsageError("PROVIDER template has an unbalanced { or }", remedy=remedy)
    if "q" not in found and not ({"z", "x"} <= found and found & {"y", "-y"}):
        raise UsageError(
            "PROVIDER template names no tile: it needs {z}, {x} and {y} (or {-y}), or {q}",
            remedy=remedy,
        )
    return found


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


# A logger's filters see only the records made on that logger, not its
# children's: name each.  httpx logs every request URL at INFO; httpcore
# logs no URL today, but its trace messages include request details.
_LOGGERS_WITH_URLS = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy")


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


class XyzProvider:
    """Tiles from an XYZ/TMS/quadkey URL template over HTTP(S).

    Parameters
    ----------
    template
        URL with placeholders (see :data:`PLACEHOLDERS`).
    api_key
        Value for ``{key}``; required when the template has it.
    config
        Timeouts and retries.
    client
        An ``httpx.Client`` to use (and leave open); by default one pooled
        client is made and closed by :meth:`close`.

    Raises
    ------
    UsageError
        For a bad template, a missing key, or a template that holds the
        key's value literally (it would end up in the identity).
    """

    def __init__(
        self,
        template: str,
        *,
        api_key: str | None = None,
        config: HttpConfig | None = None,
        client: httpx.Client | None = None,
    ):
        import httpx

        secrets = tuple(_key_forms(api_key))
        if any(len(s) >= _MIN_LITERAL_KEY_LEN and s in template for s in secrets):
            # checked first: every later message shows the template
            raise UsageError(
                f"PROVIDER holds the value of {API_KEY_ENV} literally",
                remedy="write {key} where the key goes; cachebuild fills it in from the environment",
            )
        placeholders = template_placeholders(template)
        if "key" in placeholders and not api_key:
            raise UsageError(
                f"PROVIDER template has {{key}} but {API_KEY_ENV} is not set",
                remedy=f"export {API_KEY_ENV}=<your API key>",
            )
        self.template = template
        self.identity = f"xyz:{template}"
        self.concurrency = DEFAULT_HTTP_CONCURRENCY
        self.config = config or HttpConfig()
        self._key = api_key or ""
        self._key_in_url = _quote(self._key)
        self._secrets = secrets
        try:
            sample = httpx.URL(self._url(Tile(0, 0, 0), "{key}"))
        except httpx.InvalidURL as exc:
            raise UsageError(f"PROVIDER template {template} is not a valid URL: {exc}") from None
        if not sample.host:
            raise UsageError(f"PROVIDER template {template} names no host")
        self._headers = {"User-Agent": USER_AGENT}
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

    def _url(self, t: Tile, key: str) -> str:
        values = {
            "z": str(t.z),
            "x": str(t.x),
            "y": str(t.y),
            "-y": str((1 << t.z) - 1 - t.y),
            "q": quadkey(t),
            "key": key,
        }
        return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], self.template)

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

    def fetch(self, tile: Tile) -> bytes | None:
        """GET the tile; see :class:`Provider`.  404 and 204 mean no tile."""
        import httpx

        url = self._url(tile, self._key_in_url)
        name = f"{tile.z}/{tile.x}/{tile.y}"
        attempts = self.config.retries + 1
        problem = ""
        for attempt in range(attempts):
            delay: float | None = None
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
                    raise DownloadError(
                        f"the tile server refused the credentials (HTTP {status}) for "
                        f"{self.template} (tile {name})",
                        remedy=(
                            f"check {API_KEY_ENV}: the server refused the key"
                            if self._key
                            else f"the server wants credentials: put {{key}} in the template "
                            f"and set {API_KEY_ENV}"
                        ),
                    )
                elif status == 429 or status >= 500:
                    problem = f"HTTP {status}"
                    delay = _retry_after_s(response.headers.get("retry-after"), self.config.retry_after_max_s)
                else:
                    raise TileFetchError(f"tile {name}: HTTP {status} from {self.shown_url(tile)}", tile=tile)
            if attempt + 1 < attempts:
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


def _quote(key: str) -> str:
    from urllib.parse import quote

    return quote(key, safe="")


def _key_forms(key: str | None) -> list[str]:
    """The key as given and as it appears in a URL."""
    if not key:
        return []
    return sorted({key, _quote(key)}, key=len, reverse=True)


# -- MBTiles ---------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class MBTilesProvider:
    """Tiles read from an MBTiles file (read-only, one connection per thread).

    Raises
    ------
    UsageError
        When the file is missing or is not an MBTiles file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        import sqlite3

        from .mbtiles import connect_readonly

        self.path = Path(path).expanduser().absolute()
        if not self.path.is_file():
            raise UsageError(f"PROVIDER={self.path}: no such MBTiles file", remedy="check the PROVIDER path")
        try:
            conn = connect_readonly(self.path)
            try:
                row = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE name = 'tiles' AND type IN ('table', 'view')"
                ).fetchone()
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"PROVIDER={self.path} is not an MBTiles file ({exc})") from None
        if row is None:
            raise UsageError(f"PROVIDER={self.path} is not an MBTiles file: it has no tiles table")
        self.identity = f"mbtiles:sha256={_file_sha256(self.path)}"
        self.concurrency = DEFAULT_MBTILES_CONCURRENCY
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            from .mbtiles import connect_readonly

            # closed by close() from another thread, once the workers are done
            conn = connect_readonly(self.path, check_same_thread=False)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def fetch(self, tile: Tile) -> bytes | None:
        import sqlite3

        from .mbtiles import read_tile

        try:
            data = read_tile(self._conn(), tile)
        except sqlite3.Error as exc:
            raise TileFetchError(f"tile {tile.z}/{tile.x}/{tile.y}: {self.path}: {exc}", tile=tile) from exc
        if data is None:
            return None
        why = check_image(data, None)
        if why is not None:
            raise TileFetchError(f"tile {tile.z}/{tile.x}/{tile.y} in {self.path}: {why}", tile=tile)
        return data

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()


# -- the factory -------------------------------------------------------------------


def open_provider(spec: str, *, env: Mapping[str, str], client: httpx.Client | None = None) -> Provider:
    """The provider a ``PROVIDER`` spec names.

    Parameters
    ----------
    spec
        ``synthetic`` (or empty), an ``http(s)://`` URL template, or a path
        ending in ``.mbtiles``.
    env
        The environment: ``CACHEBUILD_API_KEY``, ``HTTP_TIMEOUT``,
        ``HTTP_RETRIES``, ``HTTP_BACKOFF``.
    client
        An ``httpx.Client`` for URL templates (tests inject one).

    Raises
    ------
    UsageError
        For a spec of no accepted form, a bad template, a missing key or a
        missing or invalid MBTiles file; before any request is made.

    >>> open_provider("synthetic", env={}).identity
    'synthetic:v1'
    """
    spec = spec.strip()
    if spec.startswith("pushed:"):  # companion mode (cachebuild.companion.pushed)
        from .companion.pushed import open_pushed

        return open_pushed(spec)
    if spec in ("", "synthetic"):
        return SyntheticProvider()
    if spec.lower().startswith(("http://", "https://")):
        return XyzProvider(
            spec,
            api_key=env.get(API_KEY_ENV) or None,
            config=HttpConfig.from_env(env),
            client=client,
        )
    if spec.lower().endswith(".mbtiles"):
        return MBTilesProvider(spec)
    shown = spec
    for s in _key_forms(env.get(API_KEY_ENV)):
        shown = shown.replace(s, _REDACTED)
    raise UsageError(f"PROVIDER={shown!r} is not a tile provider", remedy=f"use {_ACCEPTED_SPECS}")
