"""Tests for cachebuild._util.progress: a live line on a terminal, one summary line elsewhere."""

from __future__ import annotations

import doctest
import io

from cachebuild._util import progress
from cachebuild._util.progress import Progress, format_duration
from tests.unit.providers.test_providers import public_names


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_all_is_complete_and_doctests() -> None:
    assert set(progress.__all__) == public_names(progress)
    assert doctest.testmod(progress).failed == 0


def test_silent_when_not_a_terminal_unless_a_summary_is_set() -> None:
    out = io.StringIO()
    with Progress("describe", 10, stream=out) as p:
        p.advance(10)
    assert out.getvalue() == ""  # describe's use: unchanged
    with Progress("tiles", 10, stream=out) as p:
        p.advance(10)
        p.summary("tiles: 10 planned")
    assert out.getvalue() == "tiles: 10 planned\n"


def test_on_a_terminal_the_line_has_counts_rate_counters_and_eta() -> None:
    term = Terminal()
    with Progress("tiles", 200, stream=term) as p:
        p.count("retries", 0)
        p.advance(50)
        first = p.line()
        p.count("retries", 7)
        p.advance(150)
        p.summary("done")
    assert "50/200" in first and "/s" in first and "ETA" in first and "retries" not in first
    text = term.getvalue()
    assert text.startswith("\r") and text.endswith("\ndone\n")
    last = text.rstrip("\n").split("\n")[-2].split("\r")[-1]
    assert "200/200" in last and "7 retries" in last and "in 0:0" in last
    assert "#" * 24 in last


def test_notes_follow_the_counters_and_an_empty_one_is_not_shown() -> None:
    p = Progress("tiles", 10, stream=None)
    p.count("retries", 3)
    p.note("flow", "")
    assert "throttled" not in p.line()
    p.note("flow", "4 throttled, 2 in flight, 48.5 req/s")
    line = p.line()
    assert line.index("3 retries") < line.index("4 throttled, 2 in flight, 48.5 req/s")


def test_eta_follows_the_rate() -> None:
    p = Progress("tiles", 1000, stream=None)
    start = p._samples[0][0]
    p.done = 100
    assert p.rate(start + 10.0) == 10.0
    assert p.eta_s(start + 10.0) == 90.0
    fresh = Progress("tiles", 1000, stream=None)
    assert fresh.eta_s(fresh._samples[0][0] + 1.0) is None  # nothing done yet


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 59.6, 61, 3600)] == ["0:00", "1:00", "1:01", "1:00:00"]


def test_summary_counts_outlive_the_work() -> None:
    from cachebuild._util.progress import finished_counts, forget_counts

    forget_counts()
    assert finished_counts("tiles") is None
    try:
        with Progress("tiles", 10, stream=None) as p:
            p.advance(3)
            p.summary("tiles: 3 done", {"planned": 10, "fetched": 3})
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert finished_counts("tiles") == {"planned": 10, "fetched": 3}
    forget_counts()
    assert finished_counts("tiles") is None
