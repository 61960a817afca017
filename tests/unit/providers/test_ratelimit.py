"""Tests for cachebuild.providers.ratelimit, on a fake clock: the schedule, not the wall time."""

from __future__ import annotations

import doctest
import threading

import pytest

from cachebuild.providers import ratelimit
from cachebuild.providers.ratelimit import TokenBucket
from tests.unit.providers.test_providers import public_names


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def bucket(rate: float, burst: float = 1.0) -> tuple[TokenBucket, FakeClock]:
    clock = FakeClock()
    return TokenBucket(rate, burst=burst, clock=clock, sleep=clock.sleep), clock


def test_all_is_complete_and_doctests() -> None:
    assert set(ratelimit.__all__) == public_names(ratelimit)
    assert doctest.testmod(ratelimit).failed == 0


def test_steady_rate() -> None:
    b, clock = bucket(4.0)
    waits = [b.acquire() for _ in range(9)]
    assert waits[0] == 0.0
    assert waits[1:] == pytest.approx([0.25] * 8)
    assert clock.now == pytest.approx(102.0)  # 9 requests at 4/s: 2 s after the first


def test_burst_then_rate() -> None:
    b, clock = bucket(2.0, burst=3)
    assert [b.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.acquire() == pytest.approx(0.5)
    clock.now += 60  # idle: the bucket refills, but only to its size
    assert [b.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.acquire() == pytest.approx(0.5)


def test_threads_share_one_bucket() -> None:
    b, clock = bucket(10.0)
    start = clock.now
    threads = [threading.Thread(target=lambda: [b.acquire() for _ in range(10)]) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 50 tokens at 10/s: the last one 4.9 s after the first, whoever took them
    assert b._tat - start == pytest.approx(5.0)


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 1), (float("inf"), 1), (1, 0.5)])
def test_bad_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst=burst)
