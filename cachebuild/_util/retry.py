"""The HTTP retry and flow-control policy of every client cachebuild has.

Tile providers and the Flights API use it (S3 keeps boto3's own).  Three
decisions live here:

- **Backoff** (:func:`backoff_s`): exponential with jitter, capped; a
  ``Retry-After`` (:func:`retry_after_s`) replaces it.
- **Flow control** (:class:`FlowControl`): a 429 or 503 is the server
  saying "slower", not a failure.  It lowers the client-wide concurrency
  and request rate (additive increase, multiplicative decrease, as TCP
  does), holds every worker until its ``Retry-After``, and success raises
  both back toward their ceilings.  A throttled request does not spend the
  tile's retry budget; the build's deadline bounds the total wait.
- **Fail fast when nothing answers**.  When
the first requests of a run all fail the same way, before the server ever
answered (connection refused, a host name that does not resolve, a TLS
handshake that fails), retrying every tile only makes the operator wait:
:class:`FailFast` stops the run after :data:`FAIL_FAST_AFTER` of them,
naming the host (never a key) and what went wrong.  Once any answer came
back (any HTTP status), it stands aside and the per-request retries decide.

The policy is written as plain functions and one small class, so a library
such as ``stamina`` or ``tenacity`` could take over the backoff loop later;
neither does client-wide AIMD, which is why that part is here.
"""

from __future__ import annotations

import errno
import math
import random
import socket
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

__all__ = [
    "FAIL_FAST_AFTER",
    "DEAD_KINDS",
    "THROTTLE_STATUSES",
    "FREE_THROTTLE_WINDOW_S",
    "BACKOFF_MAX_S",
    "failure_kind",
    "FailFast",
    "FlowControl",
    "backoff_s",
    "retry_after_s",
]

#: Answers that mean "slow down": flow control, not a failure.
THROTTLE_STATUSES = frozenset({429, 503})

#: A throttled answer is free (spends no retry) while the server gave a good
#: answer to anyone within this many seconds: it is busy, not down.
FREE_THROTTLE_WINDOW_S = 30.0
#: Backoff never waits longer than this.
BACKOFF_MAX_S = 30.0
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


def backoff_s(
    attempt: int, first_s: float, rng: random.Random | None = None, cap: float = BACKOFF_MAX_S
) -> float:
    """The wait before retry ``attempt + 1``: ``first_s * 2**attempt`` times jitter in [0.5, 1.5), capped.

    >>> backoff_s(2, 0.5, random.Random(0)) == 0.5 * 4 * (0.5 + random.Random(0).random())
    True
    """
    base = first_s * (2.0 ** min(attempt, 30))
    return min(base * (0.5 + (rng or random).random()), cap)


class FlowControl:
    """Client-wide concurrency and rate that 429/503 lower and success raises (AIMD).

    Every request goes between :meth:`start` (which waits for a hold to end,
    a free slot under the current concurrency and a token at the current
    rate) and :meth:`finish`.  A throttled answer halves the concurrency
    and cuts the rate to 90 % of what the server was seen to serve (over
    the last seconds, holds left out), at most once per round trip and per
    :data:`CUT_INTERVAL_S` (answers to requests sent before the last cut,
    or in the same burst, do not cut again), and holds every worker until its
    ``Retry-After``; each good answer adds back ``1/concurrency`` slots and
    a tenth of the rate before the cut per second, up to ``max_concurrency`` and
    ``max_rate`` (``RATE_LIMIT``; None: no ceiling).  Before the first
    throttle, and with no ``max_rate``, requests are not paced at all.

    ``sleep`` must raise to stop a waiting worker (an interrupt): the
    provider passes its guard's.

    >>> fc = FlowControl(8, None, sleep=lambda s: None)
    >>> t = fc.start(); fc.finish(t, throttled=True, retry_after=None)
    >>> fc.concurrency, fc.lowest_concurrency, fc.throttled
    (4, 4, 1)
    """

    #: Multiplicative decrease of the concurrency and of the rate.
    CONCURRENCY_CUT = 0.5
    RATE_CUT = 0.9
    #: Requests a second the rate never goes below.
    MIN_RATE = 0.5
    #: Additive increase: the rate grows by this share of itself (at the last cut) each second.
    RATE_STEP = 0.1
    #: Seconds the served rate is measured over (holds left out).
    RATE_WINDOW_S = 2.0
    #: At most one cut this often: answers arriving in a burst are one signal.
    CUT_INTERVAL_S = 0.5

    def __init__(
        self,
        max_concurrency: int,
        max_rate: float | None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_rate = max_rate
        self._sleep = sleep
        self._clock = clock
        self._cond = threading.Condition()
        self._limit = float(self.max_concurrency)
        self._rate: float | None = max_rate
        self._step = max(self.MIN_RATE, self.RATE_STEP * max_rate) if max_rate else 1.0
        self._tat = clock()
        self._in_flight = 0
        self._hold_until = 0.0
        self._last_cut = -math.inf
        self._started: float | None = None  # the first request: the measure starts there
        self._oks: deque[float] = deque()  # good answers in the last RATE_WINDOW_S
        self._sent: deque[float] = deque()  # requests let through in the last RATE_WINDOW_S
        self._holds: deque[tuple[float, float]] = deque()  # recent holds, to leave out
        self._limited = False  # the concurrency went below the ceiling once: wake waiters
        self.last_ok = -math.inf
        self.throttled = 0
        self.lowest_concurrency = self.max_concurrency
        self.active = False  # set by the first throttle: progress shows the figures

    @property
    def concurrency(self) -> int:
        """Requests that may be in flight now."""
        return max(1, int(self._limit))

    @property
    def rate(self) -> float | None:
        """Requests a second now; None: not paced."""
        return self._rate

    def start(self) -> float:
        """Wait for a hold, a slot and a token; returns the request's ticket for :meth:`finish`."""
        while True:
            self._wait_hold()
            with self._cond:
                while self._in_flight >= self.concurrency:
                    self._cond.wait(0.05)
                    self._sleep(0)  # raises when stopped
                self._in_flight += 1
                now = self._clock()
                if self._started is None:
                    self._started = now
                self._sent.append(now)
                if len(self._sent) > 4096:  # keep the window's history bounded
                    self._prune(now)
                wait = 0.0
                if self._rate:
                    tat = max(self._tat, now)
                    self._tat = tat + 1.0 / self._rate
                    wait = tat - now
            try:
                if wait > 0:
                    self._sleep(wait)
            except BaseException:
                self._release()
                raise
            if self._clock() >= self._hold_until:
                return self._clock()
            self._release()  # a hold began while this one waited its turn

    def _wait_hold(self) -> None:
        while (left := self._hold_until - self._clock()) > 0:
            self._sleep(left)

    def _release(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify()

    def set_ceiling(self, max_concurrency: int) -> None:
        """The most requests in flight (the fetch's worker count), and where the concurrency starts."""
        with self._cond:
            self.max_concurrency = max(1, int(max_concurrency))
            self._limit = min(self._limit, float(self.max_concurrency))
            self.lowest_concurrency = min(self.lowest_concurrency, self.max_concurrency)

    def finish(
        self,
        ticket: float,
        *,
        throttled: bool = False,
        retry_after: float | None = None,
        answered: bool = True,
    ) -> None:
        """Account for the request :meth:`start` let through.

        ``throttled``: a 429/503; else ``answered``: any other HTTP answer
        (raises the figures); neither: a transport error (changes nothing).
        """
        now = self._clock()
        with self._cond:
            self._in_flight -= 1
            if throttled:
                self._throttle(ticket, now, retry_after)
            elif answered:
                self._good(now)
            if self._limited:
                self._cond.notify_all()  # waiters only exist once the limit fell

    def _good(self, now: float) -> None:
        self.last_ok = now
        self._oks.append(now)
        if len(self._oks) > 4096:
            self._prune(now)
        self._limit = min(float(self.max_concurrency), self._limit + 1.0 / self._limit)
        if self._rate is not None:
            ceiling = self.max_rate or math.inf
            self._rate = min(ceiling, self._rate + self._step / self._rate)

    def _throttle(self, ticket: float, now: float, retry_after: float | None) -> None:
        self.throttled += 1
        self.active = True
        if retry_after:
            start = max(now, self._hold_until)
            self._hold_until = max(self._hold_until, now + retry_after)
            if self._hold_until > start:
                self._holds.append((start, self._hold_until))
            self._tat = max(self._tat, self._hold_until)
        if ticket < self._last_cut or now - self._last_cut < self.CUT_INTERVAL_S:
            return  # sent before the last cut, or in the same burst: that cut answered it
        self._last_cut = now
        self._limit = max(1.0, self._limit * self.CONCURRENCY_CUT)
        self.lowest_concurrency = min(self.lowest_concurrency, self.concurrency)
        self._limited = True
        served, sent = self._measured(now)
        if sent is None:
            return  # too little time sending to judge a rate: the hold and the cut above answer
        if served is not None:
            base = min(served, self._rate or math.inf)
        else:  # nothing good came back lately: keep falling, or half what was sent
            base = self._rate or 0.5 * sent
        self._rate = max(self.MIN_RATE, self.RATE_CUT * base)
        self._step = max(self.MIN_RATE, self.RATE_STEP * base)  # back to base in ~1 s

    def _measured(self, now: float) -> tuple[float | None, float | None]:
        """Good answers and requests a second over the last window, the time held left out."""
        since = self._prune(now)
        held = sum(
            min(e, now) - max(b, since) for b, e in self._holds if min(e, now) > max(b, since)
        )
        start = now if self._started is None else self._started
        span = min(self.RATE_WINDOW_S, now - start) - held
        if span < 0.2:
            return None, None
        served = len(self._oks) / span if len(self._oks) >= 3 else None
        return served, (len(self._sent) / span if self._sent else None)

    def _prune(self, now: float) -> float:
        since = now - self.RATE_WINDOW_S
        for q in (self._oks, self._sent):
            while q and q[0] < since:
                q.popleft()
        while self._holds and self._holds[0][1] < since:
            self._holds.popleft()
        return since

    def busy_not_down(self, window_s: float = FREE_THROTTLE_WINDOW_S) -> bool:
        """Whether the server gave a good answer within ``window_s``: a throttle is then free."""
        return self._clock() - self.last_ok <= window_s
