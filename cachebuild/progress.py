"""A minimal progress line on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Count work done and redraw one line on ``stream`` at most 10 times a second.

    Silent when the stream is not a terminal (CI logs, pipes), so the JSON
    report on stdout and captured logs stay clean.

    >>> with Progress("describe", total=3, stream=None) as p:
    ...     p.advance(3)
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = sys.stderr):
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream
        self._enabled = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._last = 0.0
        self._start = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._last >= 0.1 or self.done >= self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        assert self.stream is not None
        elapsed = max(now - self._start, 1e-9)
        width = 30
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * width)
        self.stream.write(
            f"\r{self.label:>9} [{bar:<{width}}] {self.done}/{self.total} "
            f"{self.done / elapsed:,.0f}/s"
        )
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._enabled and self.stream is not None:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
