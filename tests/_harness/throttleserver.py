"""A tile server that says "slow down": :class:`TileServer` plus 429 answers by
a policy, for the flow-control tests and bench/bench_flow.py.

- ``ok_first=n``: the first ``n`` requests are served, every later one is a 429;
- ``rate=R``: at most ``R`` requests a second are served (a bucket of
  ``burst`` requests), the others get a 429, as a rate-limited API does;
- ``share=p``: a share ``p`` of requests, picked at random, get a 429.

Every answer is logged with its time (:attr:`ThrottleServer.log`), so a
bench can count throughput and 429s over any window.
"""

from __future__ import annotations

import random
import time
from typing import Any

from tests._harness.tileserver import Fault, Reply, TileServer, too_many

__all__ = ["ThrottleServer"]


class ThrottleServer(TileServer):
    """A :class:`TileServer` that answers 429 (with ``retry_after``, if any) by a policy."""

    def __init__(
        self,
        *,
        ok_first: int | None = None,
        rate: float | None = None,
        burst: float = 1.0,
        share: float = 0.0,
        retry_after: str | None = "1",
        seed: int = 0,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.ok_first = ok_first
        self.rate = rate
        self.burst = burst
        self.share = share
        self.retry_after = retry_after
        self.log: list[tuple[float, bool]] = []  # (monotonic time, throttled)
        self._rng = random.Random(seed)
        self._n = 0
        self._tat = time.monotonic()

    def _throttle(self) -> bool:
        n, self._n = self._n, self._n + 1
        if self.ok_first is not None and n >= self.ok_first:
            return True
        if self.share and self._rng.random() < self.share:
            return True
        if self.rate:
            now = time.monotonic()
            interval = 1.0 / self.rate
            tat = max(self._tat, now)
            if tat - now > (self.burst - 1.0) * interval + 1e-9:
                return True
            self._tat = tat + interval
        return False

    def _pick(self, path: str, t: Any) -> Fault | None:
        fault = super()._pick(path, t)
        with self.lock:
            throttled = fault is None and self._throttle()
            self.log.append((time.monotonic(), throttled))
        if throttled:
            if self.retry_after is None:
                return Reply(429, b"slow down", {"Content-Type": "text/plain"})
            return too_many(self.retry_after)
        return fault

    @property
    def throttled_sent(self) -> int:
        with self.lock:
            return sum(1 for _, th in self.log if th)
