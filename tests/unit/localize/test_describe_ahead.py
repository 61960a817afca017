"""Tests for the describe-ahead's back-pressure: only batches with tiles downloaded now hold the fetch.

The describer thread is replaced by one that takes nothing until told:
what is under test is how the fetch's side queues batches, not describing.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cachebuild.localize import describe_ahead
from cachebuild.localize.describe_ahead import DescribeAhead
from cachebuild.tilemath import Tile, bounds, tile_id

SIDE = 16  # a 16 x 16 tile area: 256 anchors, several batches
QUEUE_BATCHES = 2  # the bound, for these tests (the area has 8 batches)


def area() -> tuple[list[Tile], list[float]]:
    ts = [Tile(68640 + x, 45900 + y, 17) for x in range(SIDE) for y in range(SIDE)]
    a, b = bounds(ts[0]), bounds(ts[-1])
    eps = 1e-9  # inside the corner tiles: the plan is exactly these
    return ts, [a.west + eps, b.south + eps, b.east - eps, a.north - eps]


@pytest.fixture()
def held(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list]:
    """The describer takes nothing until the event is set, then every batch."""
    gate, taken = threading.Event(), []

    def held_describer(self: DescribeAhead) -> None:
        gate.wait(60)
        while (item := self._get()) is not None:
            taken.append(item)

    monkeypatch.setattr(DescribeAhead, "_describe", held_describer)
    monkeypatch.setattr(describe_ahead, "QUEUE_BATCHES", QUEUE_BATCHES)
    return gate, taken


def start(tmp_path: Path) -> tuple[DescribeAhead, list[Tile]]:
    ts, box = area()
    (tmp_path / "store").mkdir(exist_ok=True)
    ahead = DescribeAhead(
        tmp_path / "store", tmp_path / "engine", bbox=box, zooms=[17], stride=4, batch_size=64
    )
    return ahead, ts


def feed(ahead: DescribeAhead, ts: list[Tile], new: bool) -> None:
    for t in ts:
        digest = tile_id(t).to_bytes(32, "little")
        if new:
            ahead.fetched(tile_id(t), digest)
        ahead.present(tile_id(t), digest)
    ahead.finish()


def fetch_new(ahead: DescribeAhead, ts: list[Tile]) -> threading.Thread:
    """A fetch of new tiles on its own thread, once the describer's queue holds what it may."""
    fetch = threading.Thread(target=feed, args=(ahead, ts, True), daemon=True)
    fetch.start()
    deadline = time.monotonic() + 30
    while ahead._queue.qsize() < QUEUE_BATCHES and time.monotonic() < deadline:
        time.sleep(0.01)
    return fetch


def test_stored_tiles_never_hold_the_fetch(tmp_path: Path, held: tuple) -> None:
    gate, taken = held
    ahead, ts = start(tmp_path)
    feed(ahead, ts, new=False)  # returns though the describer has taken nothing
    assert ahead._queue.qsize() > QUEUE_BATCHES + 1  # every batch queued, and the end
    gate.set()
    ahead.join()
    anchors = sum(len(covers) for covers, _, _ in taken)
    assert anchors == SIDE * SIDE and not any(flag for _, _, flag in taken)


def test_new_tiles_hold_the_fetch_until_the_describer_takes_them(
    tmp_path: Path, held: tuple
) -> None:
    gate, taken = held
    ahead, ts = start(tmp_path)
    fetch = fetch_new(ahead, ts)
    fetch.join(0.5)
    # held: QUEUE_BATCHES batches wait, the fetch waits for room
    assert fetch.is_alive() and ahead._queue.qsize() == QUEUE_BATCHES
    gate.set()
    fetch.join(30)
    ahead.join()
    assert not fetch.is_alive()
    assert sum(len(covers) for covers, _, _ in taken) == SIDE * SIDE
    assert all(flag for _, _, flag in taken) and ahead.stats["fetch_waited_s"] > 0


def test_an_abort_frees_a_held_fetch(tmp_path: Path, held: tuple) -> None:
    gate, _ = held
    ahead, ts = start(tmp_path)
    fetch = fetch_new(ahead, ts)
    ahead.abort()
    fetch.join(30)
    assert not fetch.is_alive()
    gate.set()
    ahead.join()


def test_a_hungry_describer_gets_small_batches_only_of_new_tiles(
    tmp_path: Path, held: tuple
) -> None:
    """Waiting for work, the describer is sent what there is when a tile downloaded now readied
    it; stored tiles (304s) still go in whole bands, so it is not woken for every few lookups."""
    gate, taken = held
    ahead, ts = start(tmp_path)
    ahead._hungry = True  # as the describer sets it while it waits
    half = len(ts) // 2
    for t in ts[:half]:  # stored: whole bands only (2 x 32 ready anchors before each)
        ahead.present(tile_id(t), tile_id(t).to_bytes(32, "little"))
    stored = ahead._queue.qsize()
    t = ts[half]
    ahead.fetched(tile_id(t), b"n" * 32)
    ahead.present(tile_id(t), b"n" * 32)  # new: what is ready goes at once
    assert ahead._queue.qsize() == stored + 1
    for t in ts[half + 1 :]:
        ahead.present(tile_id(t), tile_id(t).to_bytes(32, "little"))
    ahead.finish()
    gate.set()
    ahead.join()
    sizes = [len(covers) for covers, _, _ in taken]
    assert all(n == ahead.batch for n in sizes[:stored]) and sum(sizes) == SIDE * SIDE
