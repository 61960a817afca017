"""Resolve a flight by id from the operator's Flights API.

``GET {FLIGHTS_API_URL}/flights/{id}`` with ``Authorization: Bearer
<FLIGHTS_API_TOKEN>``, answered with ``application/json`` whose body is a
flight in the same schema as a flight file (docs/flight-schema.md).  Every
way this can fail ends in its own exit code (90-93) and a message that says
what to do; the token never appears in any of them.

The answer, normalised, is saved under the cache's state so that an
explicit ``OFFLINE=1`` can rebuild from it when the API is unreachable.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cachebuild import __version__
from cachebuild._util import httpsafe
from cachebuild._util.retry import THROTTLE_STATUSES, retry_after_s
from cachebuild._util.retry import backoff_s as backoff_s_for
from cachebuild.errors import (
    FlightInvalidAnswerError,
    FlightNetworkError,
    FlightNotFoundError,
    FlightUnauthorizedError,
    UsageError,
)
from cachebuild.inputs.flight import (
    MAX_FLIGHT_BYTES,
    flight_from_record,
    flight_record,
    looks_like_uuid,
    parse_flight,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_RETRIES",
    "TOKEN_ENV",
    "fetch_flight",
    "save_answer",
    "load_saved_answer",
    "public_url",
]

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF_S = 0.5
#: 429 answers ("slow down") waited out, as their Retry-After says, on top of the retries.
MAX_THROTTLED = 5
#: The longest Retry-After honoured.
RETRY_AFTER_MAX_S = 30.0
TOKEN_ENV = "FLIGHTS_API_TOKEN"
USER_AGENT = f"cachebuild/{__version__}"


def public_url(url: str) -> str:
    """``url`` without user:password and query: safe to show.

    >>> public_url("https://u:p@api.example/v1?token=x")
    'https://api.example/v1'
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def fetch_flight(
    flight_id: str,
    *,
    url: str,
    token: str | None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    client: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Ask the Flights API for ``flight_id``; return ``(Flight, normalised record)``.

    Parameters
    ----------
    flight_id
        A UUID, canonical lowercase form.
    url
        The API's base URL (``FLIGHTS_API_URL``).
    token
        The bearer token, or None to send none.
    client
        An ``httpx.Client`` to use (tests inject one); by default a new one.

    Raises
    ------
    FlightNotFoundError (90), FlightUnauthorizedError (91),
    FlightNetworkError (92), FlightInvalidAnswerError (93)
    """
    import httpx

    if not url.startswith(("http://", "https://")):
        raise UsageError(
            f"FLIGHTS_API_URL={public_url(url)!r} is not an http(s) URL",
            remedy="set FLIGHTS_API_URL to the Flights API's base URL, e.g. https://flights.example/api",
        )
    endpoint = url.rstrip("/") + f"/flights/{flight_id}"
    shown = public_url(endpoint)
    headers = {
        "Accept": "application/json",
        "Accept-Encoding": httpsafe.ACCEPT_ENCODING,
        "User-Agent": USER_AGENT,
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    guard = httpsafe.HttpGuard()
    own = client is None
    if own:
        client = httpx.Client(timeout=timeout_s, follow_redirects=False)
        guard.install(client)  # timeout_s bounds each attempt in all, not only each read
    try:
        status, ctype, body = _ask(client, guard, endpoint, headers, timeout_s, retries, backoff_s)
    finally:
        if own:
            client.close()
    if status == 404:
        raise FlightNotFoundError(f"flight {flight_id} not found at {public_url(url)} (HTTP 404)")
    if status in (401, 403):
        raise FlightUnauthorizedError(
            f"the Flights API at {public_url(url)} refused the token (HTTP {status})",
            remedy=f"set {TOKEN_ENV} to a valid token" if token else f"set {TOKEN_ENV}",
        )
    if status != 200 or body is None:
        raise FlightInvalidAnswerError(f"Flights API {shown} answered HTTP {status}, not a flight")
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise FlightInvalidAnswerError(
            f"Flights API {shown} answered {ctype or 'no content type'}, not application/json"
        )
    flight = parse_flight(_redact_bytes(body, token), shown, error_cls=FlightInvalidAnswerError)
    if flight.flight_id is None:
        from dataclasses import replace

        flight = replace(flight, flight_id=flight_id)
    elif flight.flight_id != flight_id:
        raise FlightInvalidAnswerError(
            f"Flights API {shown}: asked for flight {flight_id}, answered flight_id {flight.flight_id}"
        )
    return flight, flight_record(flight)


def _ask(
    client: Any,
    guard: httpsafe.HttpGuard,
    endpoint: str,
    headers: dict[str, str],
    timeout_s: float,
    retries: int,
    backoff_s: float,
) -> tuple[int, str, bytes | None]:
    """GET ``endpoint`` with retries: ``(status, content type, body of a 200)``.

    The policy is the tile providers' (:mod:`cachebuild._util.retry`): a 429
    or 5xx waits its ``Retry-After`` (capped), else backs off with jitter; a
    429 spends no retry, up to :data:`MAX_THROTTLED` of them (a lone client
    has no concurrency to lower).

    The body is read with a bound (:data:`~cachebuild.inputs.flight.MAX_FLIGHT_BYTES`
    decoded), so a compressed bomb is refused (exit 93) without inflating it.
    """
    import httpx

    shown = public_url(endpoint)
    last = ""
    counted = throttled = 0
    wait: float | None = None
    while counted <= retries and throttled <= MAX_THROTTLED:
        if counted or throttled:
            time.sleep(backoff_s_for(counted - 1, backoff_s) if wait is None else wait)
        wait = None
        try:
            with guard.deadline(timeout_s):
                response = httpsafe.get(
                    client, endpoint, headers=headers, public=(), timeout=timeout_s, max_redirects=0
                )
                try:
                    status = response.status_code
                    if status in THROTTLE_STATUSES or status >= 500:
                        # "slow down": wait as told; a 429 spends no retry (503 may be an outage)
                        throttled += status == 429
                        counted += status != 429
                        last = f"HTTP {status}"
                        wait = retry_after_s(response.headers.get("retry-after"), RETRY_AFTER_MAX_S)
                        continue
                    ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    body = httpsafe.read_body(response, MAX_FLIGHT_BYTES) if status == 200 else None
                    return status, ctype, body
                finally:
                    response.close()
        except (httpx.TimeoutException, httpsafe.DeadlineExceeded):
            last = f"no answer within {timeout_s:g} s"
        except httpx.TransportError as exc:
            # the exception text may hold the full URL; name the type only
            last = f"cannot connect ({type(exc).__name__})"
        except (httpsafe.BodyTooLarge, httpsafe.BadEncoding) as exc:
            raise FlightInvalidAnswerError(
                f"Flights API {shown} answered {exc}, not a flight"
            ) from None
        counted += 1
    raise FlightNetworkError(
        f"Flights API {shown}: {last} after {counted + throttled} attempts",
        remedy="check FLIGHTS_API_URL and the network (FLIGHTS_API_TIMEOUT sets the timeout), "
        "or rebuild from the saved answer with OFFLINE=1",
    )


def _redact_bytes(body: bytes, token: str | None) -> bytes:
    # an API that echoes the token into an error body must not put it in our messages
    if token and len(token) >= 4:
        return body.replace(token.encode(), b"***")
    return body


def _saved_path(state_dir: Path, flight_id: str) -> Path:

    if not looks_like_uuid(flight_id):  # never a path component we did not check
        raise UsageError(f"not a flight id: {flight_id!r}")
    return state_dir / "flights" / f"{flight_id.lower()}.json"


def save_answer(state_dir: Path, flight_id: str, record: Mapping[str, Any]) -> Path:
    """Keep the normalised answer for a later ``OFFLINE=1`` build."""
    path = _saved_path(state_dir, flight_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def load_saved_answer(state_dir: Path, flight_id: str) -> tuple[Any, dict[str, Any]]:
    """The answer saved by an earlier online build (``OFFLINE=1``)."""

    path = _saved_path(state_dir, flight_id)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FlightNetworkError(
            f"OFFLINE=1 but no saved answer for flight {flight_id} (looked in {path})",
            remedy="build once with the Flights API reachable, or use a flight file",
        ) from None
    except (OSError, ValueError) as exc:
        raise FlightInvalidAnswerError(f"saved flight {path} is unreadable: {exc}") from None
    flight = flight_from_record(record, source=str(path), error_cls=FlightInvalidAnswerError)
    return flight, record
