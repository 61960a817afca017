"""The client-wide flow control of cachebuild._util.retry: AIMD over concurrency
and rate, holds for Retry-After, the one-cut-per-round-trip rule; on a fake clock."""

from __future__ import annotations

import math
import threading

import pytest

from cachebuild._util.retry import FlowControl, backoff_s


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += max(s, 0.0)


def flow(concurrency: int = 8, rate: float | None = None) -> tuple[FlowControl, Clock]:
    c = Clock()
    return FlowControl(concurrency, rate, sleep=c.sleep, clock=c), c


def test_unthrottled_requests_are_not_paced_and_figures_stay_at_the_ceiling() -> None:
    fc, c = flow()
    for _ in range(100):
        fc.finish(fc.start())
    assert c.now == 0.0 and fc.rate is None and not fc.active
    assert fc.concurrency == fc.lowest_concurrency == 8 and fc.throttled == 0


def test_a_throttle_halves_concurrency_and_holds_everyone_until_retry_after() -> None:
    fc, c = flow()
    t = fc.start()
    fc.finish(t, throttled=True, retry_after=1.5)
    assert fc.concurrency == 4 and fc.lowest_concurrency == 4 and fc.active
    fc.start()  # any worker: held until the Retry-After ends
    assert c.now == pytest.approx(1.5)


def test_answers_to_requests_sent_before_a_cut_do_not_cut_again() -> None:
    fc, c = flow()
    tickets = [fc.start() for _ in range(6)]  # all on the wire at t=0
    c.now = 0.01
    for t in tickets:
        fc.finish(t, throttled=True, retry_after=None)
    assert fc.throttled == 6
    assert fc.concurrency == 4  # one cut for one round trip, not 8 -> 1
    c.now = 0.3
    fc.finish(fc.start(), throttled=True, retry_after=None)  # sent after, but the same burst
    assert fc.concurrency == 4
    c.now = 1.0
    fc.finish(fc.start(), throttled=True, retry_after=None)  # a new signal
    assert fc.concurrency == 2


def test_success_raises_concurrency_additively_back_to_the_ceiling() -> None:
    fc, _ = flow()
    fc.finish(fc.start(), throttled=True, retry_after=None)
    assert fc.concurrency == 4
    grown = []
    for _ in range(40):
        fc.finish(fc.start())
        grown.append(fc.concurrency)
    assert grown[0] == 4 and grown == sorted(grown) and grown[-1] == 8
    assert fc.lowest_concurrency == 4


def test_the_rate_is_cut_to_what_the_server_was_seen_to_serve_then_grows() -> None:
    fc, c = flow()
    for _ in range(300):  # 100 answers a second for three seconds
        c.now += 0.01
        fc.finish(fc.start())
    fc.finish(fc.start(), throttled=True, retry_after=None)
    assert fc.rate == pytest.approx(0.9 * 100, rel=0.02)
    before = fc.rate
    for _ in range(200):
        fc.finish(fc.start())  # paced: the clock advances by 1/rate a request
    assert fc.rate is not None and fc.rate > before  # additive increase
    assert c.now > 1.0  # and requests were spaced at the rate


def test_held_time_is_left_out_of_the_served_rate() -> None:
    fc, c = flow()
    for _ in range(100):  # 100 good answers a second for a second
        c.now += 0.01
        fc.finish(fc.start())
    fc.finish(fc.start(), throttled=True, retry_after=None)  # the first cut: 90/s
    c.now += 0.1
    fc.finish(fc.start(), throttled=True, retry_after=1.0)  # same burst: a hold, no cut
    oks = 45
    for _ in range(oks):  # after the hold, paced at 90/s: half a second
        fc.finish(fc.start())
    c.now += 0.01
    fc.finish(fc.start(), throttled=True, retry_after=None)  # the second cut
    # over the last 2 s, 1 s was held: the served rate is ~85/s over the second not held
    # (counting the held second too would halve it)
    assert fc.rate == pytest.approx(0.9 * 85, rel=0.15)


def test_a_throttle_with_nothing_served_lately_paces_at_half_what_was_sent() -> None:
    fc, c = flow()
    for _ in range(100):
        c.now += 0.01
        fc.finish(fc.start(), throttled=True, retry_after=None)
    assert fc.rate is not None and fc.rate <= 0.9 * 0.5 * 100


def test_rate_limit_is_the_ceiling_and_paces_from_the_start() -> None:
    fc, c = flow(rate=10.0)
    for _ in range(11):
        fc.finish(fc.start())
    assert c.now == pytest.approx(1.0)
    assert fc.rate == 10.0


def test_concurrency_bounds_requests_in_flight_across_threads() -> None:
    fc, c = flow()
    fc.finish(fc.start(), throttled=True, retry_after=None)
    c.now = 1.0
    fc.finish(fc.start(), throttled=True, retry_after=None)
    assert fc.concurrency == 2
    fc._sleep = lambda s: None  # real threads: no fake time passes while they wait
    held = [fc.start(), fc.start()]
    got: list[float] = []
    th = threading.Thread(target=lambda: got.append(fc.start()))
    th.start()
    th.join(0.3)
    assert th.is_alive() and not got  # a third waits for a slot
    fc.finish(held[0])
    th.join(5)
    assert got


def test_a_stopped_wait_raises_and_frees_its_slot() -> None:
    class Stop(Exception):
        pass

    def sleep(s: float) -> None:
        raise Stop

    fc = FlowControl(2, 1.0, sleep=sleep)
    fc.finish(fc.start())  # the first token is free
    with pytest.raises(Stop):
        fc.start()  # the next must wait a second: interrupted
    assert fc._in_flight == 0


def test_set_ceiling_follows_the_worker_count() -> None:
    fc, _ = flow(64)
    fc.set_ceiling(3)
    assert fc.concurrency == fc.lowest_concurrency == 3


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    import random

    rng = random.Random(1)
    waits = [backoff_s(a, 0.2, rng) for a in range(12)]
    for a, w in enumerate(waits):
        assert 0.5 * 0.2 * 2**a <= w < max(1.5 * 0.2 * 2**a, 0) or w == 30.0
    assert max(waits) <= 30.0 and not any(math.isnan(w) for w in waits)
