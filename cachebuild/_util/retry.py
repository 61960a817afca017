"""When to give up on a server: the decisions of the HTTP retry policy.

Today one decision lives here: **fail fast when nothing answers**.  When
the first requests of a run all fail the same way, before the server ever
answered (connection refused, a host name that does not resolve, a TLS
handshake that fails), retrying every tile only makes the operator wait:
:class:`FailFast` stops the run after :data:`FAIL_FAST_AFTER` of them,
naming the host (never a key) and what went wrong.  Once any answer came
back (any HTTP status), it stands aside and the per-request retries decide.

The client-wide flow control of 429/503 answers is meant to grow here too
(docs/providers.md, "Retries").
"""

from __future__ import annotations

import errno
import math
import socket
import ssl
import threading
import time
from collections import Counter

__all__ = ["FAIL_FAST_AFTER", "DEAD_KINDS", "failure_kind", "FailFast", "retry_after_s"]

#: Requests that must fail, all before any answer, before the run stops.
FAIL_FAST_AFTER = 4

#: Failure kinds that say the server is not there (as opposed to slow or busy).
DEAD_KINDS = {
    "refused": "connection refused",
    "dns": "the host name does not resolve",
    "tls": "the TLS handshake failed",
    "unreachable": "no route to the host",
}


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 10:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def failure_kind(exc: BaseException) -> str | None:
    """One of :data:`DEAD_KINDS`' keys for an error that says nothing answers there, else None.

    Looks through the exception's causes (httpx wraps the socket's error).

    >>> failure_kind(ConnectionRefusedError(111, "Connection refused")), failure_kind(TimeoutError())
    ('refused', None)
    """
    for e in _chain(exc):
        if isinstance(e, ConnectionRefusedError):
            return "refused"
        if isinstance(e, socket.gaierror):
            return "dns"
        if isinstance(e, ssl.SSLError):
            return "tls"
        if isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "unreachable"
    text = str(exc)  # httpcore re-raises some as its own type with the message only
    if "Connection refused" in text or "[Errno 111]" in text:
        return "refused"
    if "Name or service not known" in text or "nodename nor servname" in text or "[Errno -" in text:
        return "dns"
    if "[SSL" in text or "CERTIFICATE_VERIFY_FAILED" in text or "WRONG_VERSION_NUMBER" in text:
        return "tls"
    return None


class FailFast:
    """Decides, thread-safely, that a server is dead from the first requests.

    Call :meth:`answered` whenever a request got any HTTP answer and
    :meth:`failed` with each transport error; :meth:`failed` returns the
    reason to stop (a sentence naming ``host``) once the first
    :data:`FAIL_FAST_AFTER` requests all failed with one kind of
    :data:`DEAD_KINDS`, else None.

    >>> ff = FailFast(after=2)
    >>> ff.failed("tiles.example", "refused") is None
    True
    >>> ff.failed("tiles.example", "refused")
    'tiles.example: connection refused on each of the first 2 requests, nothing answered'
    """

    def __init__(self, after: int = FAIL_FAST_AFTER):
        self.after = after
        self._lock = threading.Lock()
        self._armed = True
        self._kinds: Counter[str] = Counter()

    def answered(self) -> None:
        """The server answered (any status): the failures so far were not a dead server."""
        if self._armed:
            with self._lock:
                self._armed = False

    def failed(self, host: str, kind: str | None) -> str | None:
        """Count one failed request; the reason to stop the run, or None."""
        with self._lock:
            if not self._armed:
                return None
            if kind not in DEAD_KINDS:  # a timeout, a dropped connection: retries decide
                self._armed = False
                return None
            self._kinds[kind] += 1
            if len(self._kinds) > 1:  # not all the same way
                self._armed = False
                return None
            if self._kinds[kind] < self.after:
                return None
            self._armed = False
            return f"{host}: {DEAD_KINDS[kind]} on each of the first {self.after} requests, nothing answered"


def retry_after_s(value: str | None, cap: float) -> float | None:
    """Seconds a ``Retry-After`` header (seconds or an HTTP date) asks for, capped; None if unusable.

    >>> retry_after_s("2.5", 30.0), retry_after_s("soon", 30.0)
    (2.5, None)
    """
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
