"""Describe while fetching (PIPELINE, issue 23): real `doit build-cache` processes against the
loopback tile server; the cache is the one a build without the pipeline makes, bit for bit."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from cachebuild.inputs.flight import flight_area, load_flight_file
from cachebuild.store.descriptors import engine_store_dirs
from cachebuild.tilemath import tiles
from tests.conftest import Cb, TileServer, write_flight

WIDE = ("BUFFER_M=600", "ZOOM=17")


def _files(cb: Cb) -> dict[str, bytes]:
    return {n: (cb.current / n).read_bytes() for n in ("descriptors.npy", "descriptor_ids.npy")}


def _stored(store: Path) -> int:
    """Descriptors (tile descriptors or window blocks) committed in the store, every engine."""
    import sqlite3

    n = 0
    for d in engine_store_dirs(store):
        if (d / "index.sqlite").exists():
            db = sqlite3.connect(d / "index.sqlite", timeout=5)
            try:
                n += int(db.execute("SELECT COUNT(*) FROM descriptors").fetchone()[0])
            except sqlite3.OperationalError:  # the schema is not there yet
                pass
            finally:
                db.close()
    return n


def _pair(tmp_path: Path, tile_server: TileServer, *extra: str) -> tuple[Any, Any, Cb, Cb]:
    f = write_flight(tmp_path / "f.json")
    args = (f"FLIGHT={f}", *WIDE, f"PROVIDER={tile_server.template()}", "BATCH=8", *extra)
    on, off = Cb(home=tmp_path / "on"), Cb(home=tmp_path / "off")
    for c in (on, off):
        c.home.mkdir()
    r_on = on.build(*args, "PIPELINE=1")
    r_off = off.build(*args, "PIPELINE=0")
    assert r_on.code == 0, r_on.stderr
    assert r_off.code == 0, r_off.stderr
    return r_on.report, r_off.report, on, off


@pytest.mark.parametrize("stride", ["4", "1"])
def test_pipeline_describes_during_the_fetch_and_makes_the_same_cache(
    tmp_path: Path, tile_server: TileServer, stride: str
) -> None:
    f = write_flight(tmp_path / "f.json")
    planned = list(tiles(flight_area(load_flight_file(f), 600), [17]))
    gone = {(p.z, p.x, p.y) for p in planned[5:40:9]}  # holes: absent neighbours
    tile_server.missing.update(gone)
    tile_server.latency_s = 0.01
    on, off, cb_on, cb_off = _pair(tmp_path, tile_server, f"WINDOW_STRIDE={stride}", "STRICT=0")
    present = len(planned) - len(gone)
    assert on["tiles"]["missing"] == len(gone) == off["tiles"]["missing"]
    p = on["pipeline"]
    assert p["enabled"] and p["error"] is None
    assert p["described_ahead"] == present  # one block (or descriptor) per present anchor
    # the describe task found them all: this run computed them, ahead of it
    assert on["describe"]["tiles_per_s"] == 0.0
    assert on["descriptors"] == off["descriptors"] == {"computed": present, "reused": 0}
    assert off["descriptors"]["computed"] == present
    assert not off["pipeline"]["enabled"] and off["pipeline"]["described_ahead"] == 0
    assert set(p["stages"]) >= {"tiles", "describe_ahead", "describe", "engine"}
    assert p["sum_s"] == pytest.approx(sum(p["stages"].values()), abs=0.01)
    assert p["overlap_s"] == pytest.approx(max(0.0, p["sum_s"] - p["wall_s"]), abs=0.01)
    assert _files(cb_on) == _files(cb_off)
    # the warm no-op is unchanged: nothing runs, nothing is described
    again = cb_on.build(
        f"FLIGHT={f}", *WIDE, f"PROVIDER={tile_server.template()}", "BATCH=8",
        f"WINDOW_STRIDE={stride}", "STRICT=0", "PIPELINE=1",
    )  # fmt: skip
    assert again.code == 0 and again.report["outcome"] == "up_to_date", again.stderr
    assert again.report["tasks"]["run"] == []
    assert again.report["pipeline"]["described_ahead"] == 0


def test_interrupted_fetch_keeps_what_was_described(
    tmp_path: Path, tile_server: TileServer
) -> None:
    f = write_flight(tmp_path / "f.json")
    planned = list(tiles(flight_area(load_flight_file(f), 600), [17]))
    tile_server.latency_s = 0.1  # about 10 tiles a second: the fetch outlasts the first batches
    args = (f"FLIGHT={f}", *WIDE, f"PROVIDER={tile_server.template()}", "BATCH=8", "CONCURRENCY=1")
    cb = Cb(home=tmp_path / "home")
    cb.home.mkdir()
    store = cb.home / "store"
    p = cb.popen("build-cache", *args, "PIPELINE=1")
    deadline = time.monotonic() + 120
    while _stored(store) == 0 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    served = sum(tile_server.served_ok.values())
    assert p.poll() is None and served < len(planned), (
        "the fetch ended before any block was described"
    )
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    kept = _stored(store)
    assert 0 < kept < len(planned)
    # the next build describes only what was not described before the interrupt
    tile_server.latency_s = 0.0
    r = cb.build(*args, "PIPELINE=0")
    assert r.code == 0, r.stderr
    assert r.report["descriptors"]["computed"] == len(planned) - kept
    assert _stored(store) == len(planned)
