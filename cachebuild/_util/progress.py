"""Progress on stderr: a live line on a terminal, one summary line elsewhere.

On a terminal the line shows done/total, the rate, any counters and notes
the caller keeps (retries; the flow control's concurrency and rate) and the
time left, redrawn at most 10 times a second.  When
the stream is not a terminal (CI logs, pipes) nothing is drawn while the
work runs, so the JSON report on stdout and captured logs stay clean; a
caller that sets a :meth:`Progress.summary` gets that one line at the end,
and may leave the counts behind it for :func:`finished_counts` (an
interrupted build reports what its tiles phase had done).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Mapping
from typing import TextIO

__all__ = ["RATE_WINDOW_S", "Progress", "format_duration", "finished_counts", "forget_counts"]

#: The counts each label's last summary was given with (this process).
_FINISHED: dict[str, dict[str, int]] = {}


def finished_counts(label: str) -> dict[str, int] | None:
    """The counts the last :meth:`Progress.summary` of ``label`` gave, or None."""
    counts = _FINISHED.get(label)
    return dict(counts) if counts is not None else None


def forget_counts() -> None:
    """Drop every label's counts (a new run starts)."""
    _FINISHED.clear()


#: Seconds of history the rate behind the ETA is measured over: recent
#: enough to follow a change of pace, long enough to be steady.
RATE_WINDOW_S = 10.0


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``.

    >>> format_duration(75.4), format_duration(3725)
    ('1:15', '1:02:05')
    """
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """Count work done; redraw one line on ``stream`` when it is a terminal.

    Parameters
    ----------
    label
        What is counted (``tiles``).
    total
        How many there are.
    stream
        Where to draw; None for silence.

    >>> with Progress("describe", total=3, stream=None) as p:
    ...     p.advance(3)
    >>> p.done
    3
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = sys.stderr):
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream
        self.counters: dict[str, int] = {}
        self.notes: dict[str, str] = {}
        self.enabled = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._summary: str | None = None
        self._last = 0.0
        self._start = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque([(self._start, 0)])

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more done."""
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= 0.1 or self.done >= self.total:
            self._last = now
            self._draw(now)

    def count(self, name: str, value: int) -> None:
        """Set a counter shown after the rate (``12 retries``); 0 is not shown."""
        self.counters[name] = value

    def note(self, name: str, text: str) -> None:
        """Set a short text shown after the counters (the flow control's concurrency and rate)."""
        self.notes[name] = text

    def summary(self, line: str, counts: Mapping[str, int] | None = None) -> None:
        """The one line written when the work ends (on a terminal too, under the bar).

        ``counts`` (what the line says, as numbers) stay readable through
        :func:`finished_counts` after the work ends, even by an interrupt.
        """
        self._summary = line
        if counts is not None:
            _FINISHED[self.label] = {k: int(v) for k, v in counts.items()}

    def rate(self, now: float | None = None) -> float:
        """Items a second over the last :data:`RATE_WINDOW_S` seconds."""
        now = time.monotonic() if now is None else now
        while len(self._samples) > 1 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()
        t0, d0 = self._samples[0]
        return (self.done - d0) / max(now - t0, 1e-9)

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left at the recent rate; None while nothing has been done."""
        r = self.rate(now)
        if r <= 0:
            return None
        return max(self.total - self.done, 0) / r

    def line(self, now: float | None = None) -> str:
        """The progress line as drawn (without the carriage return)."""
        now = time.monotonic() if now is None else now
        width = 24
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        bar = "#" * int(frac * width)
        parts = [
            f"{self.label:>9} [{bar:<{width}}] {self.done}/{self.total}",
            f"{self.rate(now):,.0f}/s",
        ]
        parts += [f"{v} {k}" for k, v in self.counters.items() if v]
        parts += [text for text in self.notes.values() if text]
        eta = self.eta_s(now)
        if self.done < self.total:
            parts.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA --")
        else:
            parts.append(f"in {format_duration(now - self._start)}")
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        assert self.stream is not None
        if now - self._samples[-1][0] >= 0.5:
            self._samples.append((now, self.done))
        # pad: a shorter line must cover the longer one before it
        self.stream.write("\r" + self.line(now).ljust(79))
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stream is None:
            return
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
        if self._summary is not None:
            self.stream.write(self._summary + "\n")
        self.stream.flush()
