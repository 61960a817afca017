"""End to end, with real doit processes: work proportional to the change, the
self-test gate, and store garbage collection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from cachebuild.providers.synthetic import synthetic_tile_bytes
from cachebuild.tilemath import Tile
from tests._harness.tileserver import Reply
from tests.conftest import REPO, Cb, write_flight

SMALL = ("BUFFER_M=200", "ZOOM=17")

#: Runs a no-op build in-process and reports every file it opened (an audit
#: hook sees each open()) and whether numpy was imported at all.
NOOP_PROBE = """
import json, sys
opened = []
sys.addaudithook(lambda ev, args: opened.append(str(args[0])) if ev == "open" and args and isinstance(args[0], (str, bytes)) else None)
from cachebuild.cli.console import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "opened": opened, "numpy": "numpy" in sys.modules}))
"""


def objects(cb: Cb) -> set[str]:
    return {p.name for p in (cb.home / "store" / "objects").rglob("*") if p.is_file()}


def test_shifted_bbox_describes_only_the_new_tiles_and_the_noop_reads_no_tile_data(
    cb: Cb, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json")
    first = cb.build(f"FLIGHT={f}", *SMALL)
    assert first.code == 0, first.stderr
    rep = first.report
    n = rep["tiles"]["planned"]
    assert rep["descriptors"] == {"computed": n, "reused": 0}
    st = rep["selftest"]
    assert (
        st["queries"] > 0 and 0 <= st["recall_at_5"] <= 1 and st["recall_at_1"] <= st["recall_at_5"]
    )
    signed = json.loads((cb.current / "manifest.json").read_text())["signed"]
    assert signed["info"]["selftest"]["recall_at_1"] == st["recall_at_1"]
    assert (
        signed["info"]["index"]["recall_at_10"] == 1.0 and signed["info"]["index"]["kind"] == "flat"
    )
    assert "selftest.json" in signed["targets"]

    # the warm no-op opens no per-tile file and never imports numpy
    p = subprocess.run(
        [sys.executable, "-c", NOOP_PROBE, "build-cache", f"FLIGHT={f}", *SMALL, "REPORT=json"],
        cwd=REPO, env=cb.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    probe = json.loads(p.stdout.splitlines()[-1])
    noop = json.loads(p.stdout.splitlines()[-2])
    assert probe["code"] == 0 and noop["outcome"] == "up_to_date" and noop["tasks"]["run"] == []
    assert {"describe", "index", "selftest"} <= set(noop["tasks"]["up_to_date"])
    assert noop["descriptors"] == {"computed": 0, "reused": n} and noop["selftest"] == st
    assert not probe["numpy"]
    store = str(cb.home / "store")
    assert [o for o in probe["opened"] if o.endswith(".npy") or o.startswith(store)] == []

    # the route moved east by about one tile: only the new column is fetched, and described
    # are the new tiles' windows and those of the old last column, which now reach into it
    moved = write_flight(tmp_path / "g.json", lon=8.5400 + 0.0028)
    second = cb.build(f"FLIGHT={moved}", *SMALL)
    assert second.code == 0, second.stderr
    t, d = second.report["tiles"], second.report["descriptors"]
    assert 0 < t["fetched"] < t["planned"]
    assert d == {"computed": 2 * t["fetched"], "reused": t["planned"] - 2 * t["fetched"]}
    assert {"describe", "index", "selftest", "manifest"} <= set(second.report["tasks"]["run"])
    assert cb.run("verify-cache").code == 0


def test_another_model_invalidates_exactly_its_descriptors(cb: Cb, tmp_path: Path) -> None:
    from cachebuild.engine.model import build_default_model

    other = tmp_path / "other.onnx"
    other.write_bytes(build_default_model(seed=1))
    f = write_flight(tmp_path / "f.json")
    first = cb.build(f"FLIGHT={f}", *SMALL)
    assert first.code == 0, first.stderr
    n = first.report["tiles"]["planned"]
    swapped = cb.build(f"FLIGHT={f}", *SMALL, f"MODEL={other}")
    assert swapped.code == 0, swapped.stderr
    assert swapped.report["descriptors"] == {"computed": n, "reused": 0}
    assert swapped.report["tiles"]["fetched"] == 0
    back = cb.build(f"FLIGHT={f}", *SMALL)
    assert back.code == 0, back.stderr
    assert {"engine", "describe"} <= set(back.report["tasks"]["run"])
    # the coverage map draws imagery and route, and the self-test's headline in its legend:
    # another engine redraws it only when those figures change
    for before, after in ((first, swapped), (swapped, back)):
        redrawn = "preview" in after.report["tasks"]["run"]
        assert redrawn == (after.report["selftest"] != before.report["selftest"])
    assert back.report["descriptors"] == {"computed": 0, "reused": n}, (
        "the first engine's are still stored"
    )
    engines = sorted(p.name for p in (cb.home / "store" / "descriptors").iterdir())
    assert len(engines) == 2


def test_min_recall_gate_exits_22_and_keeps_the_published_cache(
    cb: Cb, tmp_path: Path, tile_server
) -> None:
    from cachebuild.inputs.flight import flight_area, load_flight_file
    from cachebuild.tilemath import tiles

    f = write_flight(tmp_path / "f.json")
    area = ("BUFFER_M=350", "ZOOM=17")  # about 7 x 7 tiles: 25 have all their neighbours
    good = cb.build(f"FLIGHT={f}", *area, "MIN_RECALL=0.5")
    assert good.code == 0, good.stderr
    before = (cb.current / "manifest.json").read_bytes()

    # a provider that serves one picture for every tile: nothing can be localised
    same = synthetic_tile_bytes(Tile(1, 2, 17))
    for t in tiles(flight_area(load_flight_file(f), 350), [17]):
        tile_server.answers[Tile(t.x, t.y, t.z)] = Reply(200, same, {"Content-Type": "image/jpeg"})
    r = cb.build(f"FLIGHT={f}", *area, f"PROVIDER={tile_server.template()}", "MIN_RECALL=0.5")
    assert r.code == 22, r.stderr
    rep = r.report
    assert rep["failure_phase"] == "selftest" and "MIN_RECALL=0.5" in rep["error"]
    assert rep["selftest"]["recall_at_1"] < 0.5 and rep["selftest"]["queries"] > 0
    assert (cb.current / "manifest.json").read_bytes() == before
    assert cb.run("verify-cache").code == 0
    # without the gate the same cache is published (the test is a measurement)
    ungated = cb.build(f"FLIGHT={f}", *area, f"PROVIDER={tile_server.template()}")
    assert ungated.code == 0 and ungated.report["tasks"]["run"] == []


def test_gc_store_keeps_what_published_caches_use(cb: Cb, tmp_path: Path) -> None:
    a = write_flight(tmp_path / "a.json")
    b = write_flight(tmp_path / "b.json", lat=47.40, lon=8.60)
    ra = cb.build(f"FLIGHT={a}", *SMALL)
    rb = cb.build(f"FLIGHT={b}", *SMALL, f"CACHE_DIR={tmp_path / 'elsewhere'}")
    assert ra.code == 0 and rb.code == 0, ra.stderr + rb.stderr
    both = objects(cb)
    assert len(both) == ra.report["tiles"]["planned"] + rb.report["tiles"]["planned"]

    gc = cb.run("gc-store")
    assert gc.code == 0, gc.stderr
    assert objects(cb) == both, "every published cache's tiles are kept"
    assert gc.report["gc"]["removed"]["tiles"] == 0 and len(gc.report["gc"]["caches"]) == 2

    shutil.rmtree(tmp_path / "elsewhere")  # cache b is gone: its tiles are garbage now
    gc = cb.run("gc-store", "MAX_STORE_BYTES=1K")
    assert gc.code == 0, gc.stderr
    assert len(objects(cb)) == ra.report["tiles"]["planned"]
    assert gc.report["gc"]["removed"]["tiles"] == rb.report["tiles"]["planned"]
    assert any("MAX_STORE_BYTES" in w for w in gc.report["warnings"])
    assert cb.run("verify-cache").code == 0
    again = cb.build(f"FLIGHT={a}", *SMALL)
    assert again.code == 0 and again.report["outcome"] == "up_to_date"
