"""A token bucket shared by threads: at most ``rate`` requests a second.

Each :meth:`TokenBucket.acquire` takes one token; the bucket holds at most
``burst`` tokens and refills at ``rate`` tokens a second.  A thread that
finds it empty reserves the next token under the lock and sleeps outside
it, so waiting threads are served in turn and none spins.

The clock and the sleep are injected: tests drive a fake clock and check
the schedule without timing anything.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """At most ``rate`` acquisitions a second, in bursts of at most ``burst``.

    Parameters
    ----------
    rate
        Tokens a second, > 0.
    burst
        Most tokens held at once (>= 1); the bucket starts full.
    clock, sleep
        ``time.monotonic`` and ``time.sleep`` unless injected.

    >>> now = [0.0]
    >>> bucket = TokenBucket(2.0, burst=1, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    >>> [bucket.acquire() for _ in range(3)]
    [0.0, 0.5, 0.5]
    >>> now[0]
    1.0
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number, got {rate!r}")
        if not (math.isfinite(burst) and burst >= 1):
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        # GCRA: the theoretical arrival time of the next token at the steady rate
        self._tat = clock()

    def acquire(self) -> float:
        """Take a token, sleeping until there is one; returns the seconds slept."""
        interval = 1.0 / self.rate
        with self._lock:
            now = self._clock()
            tat = max(self._tat, now)
            ready_at = tat - (self.burst - 1.0) * interval
            self._tat = tat + interval
        wait = max(0.0, ready_at - now)
        if wait > 0:
            self._sleep(wait)
        return wait
