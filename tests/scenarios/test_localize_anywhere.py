"""End to end (issue 21): the self-test in front of the operator, and an onboard client that
localizes frames through only the published cache's documented files.

The client reads ``engine/engine.json`` (how to prepare a frame), runs
``engine/engine.onnx`` with onnxruntime, searches ``index.faiss`` with faiss,
re-ranks the first candidates by their cells (``windows.json``'s ``cells``:
``engine/cells.onnx``, ``cells.npy``, ``descriptor_ids.npy``; its own code,
not cachebuild's) and turns the id into latitude and longitude with
``positions.npy``; it cuts
its own frames from imagery it fetches itself (the synthetic provider's
images; the same on a real NAIP orthophoto, where one is placed:
test_localize_real.py).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from cachebuild.providers.synthetic import synthetic_tile_bytes
from cachebuild.tilemath import Tile, tile
from tests.conftest import Cb, write_flight

SMALL = ("BUFFER_M=200", "ZOOM=17")
#: 11 x 12 tiles at z17: 90 tiles have all eight neighbours.
WIDE = ("BUFFER_M=1000", "ZOOM=17")


def test_the_self_test_headline_is_frames_centred_anywhere_and_warns_below_recall_warn(
    cb: Cb, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={f}", *WIDE, "SELFTEST_QUERIES=60")
    assert r.code == 0, r.stderr
    st = r.report["selftest"]
    assert st["queries"] == 60 and st["too_few_frames"] is False
    assert st["median_error_m"] is not None and "frames centred anywhere (60 frames)" in st["text"]
    # windows every quarter tile (the default) find frames centred anywhere: no warning
    assert st["recall_at_1"] >= 0.9 and st["median_error_m"] < 40
    assert not any("RECALL_WARN" in w for w in r.report["warnings"])
    first = r.report
    # one descriptor per tile does not, and the build says so
    grid = cb.build(f"FLIGHT={f}", *WIDE, "SELFTEST_QUERIES=60", "WINDOW_STRIDE=1")
    assert grid.code == 0, grid.stderr
    assert grid.report["selftest"]["recall_at_1"] < 0.5
    warning = [w for w in grid.report["warnings"] if "RECALL_WARN=0.9" in w]
    assert warning and "WARNING: self-test: recall@1" in grid.stderr
    r = cb.build(f"FLIGHT={f}", *WIDE, "SELFTEST_QUERIES=60")  # back to windows: the same cache
    assert r.code == 0 and r.report["selftest"] == st
    # selftest.json is content; what this run described is in the report
    doc = json.loads((cb.current / "selftest.json").read_text())
    assert "frames" not in doc and doc["recall_at_1"] == st["recall_at_1"]
    assert doc["near_centre"]["recall_at_1"] >= 0.85
    assert r.report["selftest_frames"]["described"] == 0  # kept from the first build
    index_doc = json.loads((cb.current / "index.json").read_text())
    assert not {"seconds", "quantizer"} & set(index_doc) and "seconds" in first["index_run"]
    assert index_doc["positions"] == "positions.npy"
    info = cb.run("cache-info", "REPORT=text")
    assert info.code == 0 and f"recall@1 {st['recall_at_1']:.3f}" in info.stdout
    assert "error median" in info.stdout
    # a lower threshold: no warning; the gate is MIN_RECALL's alone
    quiet = cb.build(
        f"FLIGHT={f}", *WIDE, "SELFTEST_QUERIES=60", "RECALL_WARN=0.05", "WINDOW_STRIDE=1"
    )
    assert quiet.code == 0 and not any("RECALL_WARN" in w for w in quiet.report["warnings"])
    assert quiet.report["selftest_frames"] == {"described": 0}


def test_too_few_frames_give_no_figure(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={f}", *SMALL, "REPORT=text")
    assert r.code == 0, r.stderr
    assert "  self-test too few frames for a figure (" in r.stdout
    assert "1.000" not in r.stdout and "RECALL_WARN" not in r.stderr


def _prepare(rgb: np.ndarray, spec: dict) -> np.ndarray:
    """A frame as engine.json's ``input`` says: size, channel order, scaling, layout."""
    from PIL import Image

    assert spec["channel_order"] == "RGB" and spec["layout"] == "NCHW"
    h, w = spec["size"]
    im = Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR)
    x = np.asarray(im, dtype=np.float32) * np.float32(spec["scale"]) + np.float32(spec["offset"])
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.dtype(spec["dtype"]))


def _mosaic(x0: int, y0: int, n: int, z: int) -> np.ndarray:
    """The client's own imagery: n x n tiles from (x0, y0), as one RGB array."""
    from PIL import Image

    rows = []
    for y in range(y0, y0 + n):
        row = [
            np.asarray(Image.open(io.BytesIO(synthetic_tile_bytes(Tile(x, y, z)))).convert("RGB"))
            for x in range(x0, x0 + n)
        ]
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)


def _ground(x: float, y: float, z: int) -> tuple[float, float]:
    n = 2.0**z
    return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * y / n)))), x / n * 360 - 180


def test_an_onboard_client_localizes_frames_with_only_the_documented_files(
    cb: Cb, tmp_path: Path
) -> None:
    import faiss
    import onnxruntime as ort

    f = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={f}", *WIDE, "SELFTEST_QUERIES=0")
    assert r.code == 0, r.stderr
    c = cb.current
    spec = json.loads((c / "engine" / "engine.json").read_text())["input"]
    session = ort.InferenceSession(
        str(c / "engine" / "engine.onnx"), providers=["CPUExecutionProvider"]
    )
    index = faiss.read_index(str(c / "index.faiss"))
    pos = np.load(c / "positions.npy", allow_pickle=False)
    assert len(pos) == index.ntotal and set(pos.dtype.names) >= {"id", "lat", "lon", "west"}
    stage2 = json.loads((c / "windows.json").read_text())["cells"]
    signed = json.loads((c / "manifest.json").read_text())["signed"]["targets"]
    assert {stage2["file"], stage2["model"], "descriptor_ids.npy"} <= set(signed)
    cells_session = ort.InferenceSession(
        str(c / stage2["model"]), providers=["CPUExecutionProvider"]
    )
    cells = np.load(c / stage2["file"], mmap_mode="r")
    row_of = {int(p): i for i, p in enumerate(np.load(c / "descriptor_ids.npy"))}

    z = 17
    centre = tile(8.5405, 47.3705, z)
    x0, y0, n = centre.x - 3, centre.y - 3, 7
    ground = _mosaic(x0, y0, n, z)
    t = ground.shape[0] // n
    rng = np.random.default_rng(7)
    errors, hits = [], 0
    for _ in range(40):
        # a frame centred anywhere in the middle of the area
        cx, cy = (rng.uniform(1.5, n - 1.5, 2) * t).tolist()
        frame = ground[int(cy - t / 2) : int(cy + t / 2), int(cx - t / 2) : int(cx + t / 2)]
        x = _prepare(frame, spec)
        d = session.run(None, {session.get_inputs()[0].name: x})[0]
        d = d / np.linalg.norm(d, axis=1, keepdims=True)
        _, found = index.search(np.ascontiguousarray(d, dtype=np.float32), stage2["candidates"])
        q = cells_session.run(None, {cells_session.get_inputs()[0].name: x})[0][0]
        best = max(
            found[0], key=lambda i: _cells_score(q, cells[row_of[int(i)]], stage2["offsets"])
        )
        row = pos[np.searchsorted(pos["id"], best)]
        assert row["id"] == best
        lat, lon = _ground(x0 + cx / t, y0 + cy / t, z)
        dy = (row["lat"] - lat) * 111_320
        dx = (row["lon"] - lon) * 111_320 * math.cos(math.radians(lat))
        errors.append(math.hypot(dx, dy))
        # a hit: the place's footprint (positions.npy) holds half the frame's ground
        west = (row["west"] + 180.0) / 360.0 * 2**z - x0
        north = _unit_y(row["north"], z) - y0
        share = max(0.0, 1 - abs(west + 0.5 - cx / t)) * max(0.0, 1 - abs(north + 0.5 - cy / t))
        hits += share >= 0.5
    frame_m = 2 * math.pi * 6_378_137 * math.cos(math.radians(47.37)) / 2**z
    assert hits >= 0.85 * 40
    assert float(np.median(errors)) <= frame_m / 4


def _cells_score(q: np.ndarray, p: np.ndarray, offsets: int) -> float:
    """cache-layout.md's stage 2: the best cosine over the shared cells, q moved by up to ``offsets``."""
    g, best = q.shape[-1], -2.0
    p = p.astype(np.float32)
    for dy in range(-offsets, offsets + 1):
        for dx in range(-offsets, offsets + 1):
            a = q[:, max(dy, 0) : g + min(dy, 0), max(dx, 0) : g + min(dx, 0)]
            b = p[:, max(-dy, 0) : g + min(-dy, 0), max(-dx, 0) : g + min(-dx, 0)]
            best = max(best, float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
    return best


def _unit_y(lat: float, z: int) -> float:
    """Web-Mercator tile-unit y of a latitude at zoom z."""
    r = math.radians(lat)
    return (1 - math.log(math.tan(r) + 1 / math.cos(r)) / math.pi) / 2 * 2**z


def test_the_coverage_maps_legend_gives_the_headline(tmp_path: Path) -> None:
    from cachebuild.tiles.preview import _selftest_legend

    st = tmp_path / "selftest.json"
    assert _selftest_legend(st) == ""  # no self-test: nothing said
    st.write_text(json.dumps({"queries": 200, "recall_at_1": 0.9312, "median_error_m": 21.4}))
    assert _selftest_legend(st) == "  |  recall@1 0.93, median error 21 m"
    st.write_text(json.dumps({"queries": 12, "recall_at_1": 1.0, "median_error_m": 3.0}))
    assert "too few frames (12)" in _selftest_legend(st) and "1.0" not in _selftest_legend(st)
