"""Tests for the second stage: cells kept per place, and the re-ranking of the index's candidates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cachebuild.engine.cells import CELLS_MODEL, CHANNELS, projection
from cachebuild.engine.compile import compile_engine
from cachebuild.engine.features import compile_features, load_head_model
from cachebuild.engine.model import write_default_model
from cachebuild.localize.describe import DESCRIPTOR_IDS_FILE, describe_tiles
from cachebuild.localize.index import build_index
from cachebuild.localize.rerank import (
    CELLS_FILE,
    PlaceCells,
    match,
    open_stage2,
    pack,
    packed_width,
    quantise,
    rerank,
    unpack,
)
from cachebuild.localize.selftest import run_selftest
from cachebuild.localize.windows import WindowDescriber, window_record
from cachebuild.providers.synthetic import synthetic_tile_bytes
from cachebuild.store.objects import TileStore
from cachebuild.tilemath import Tile, tile_id
from cachebuild.tileset import tile_dtype, write_tileset

Z, X0, Y0 = 17, 68640, 45890


def test_packing_is_exact_for_every_int8_value_and_any_width() -> None:
    rng = np.random.default_rng(0)
    for values in (1, 2, 3, 512, 7):
        q = rng.integers(-127, 128, (5, values)).astype(np.int8)
        q[0, 0], q[-1, -1] = -127, 127
        p = pack(q)
        assert p.dtype == np.float32 and p.shape == (5, packed_width(values))
        assert np.array_equal(unpack(p, values), q)
        assert np.array_equal(pack(q), p)  # float32 through any copy: the same bits


def test_a_packed_column_is_its_three_offset_bytes_in_order_padded_with_zero() -> None:
    # the layout stored blocks hold (the store, the bucket, Dask): b0 + 256 b1 + 65536 b2
    q = np.array([[-128, -1, 0, 127, 5], [1, 2, 3, 4, -5]], dtype=np.int8)
    u = np.zeros((2, 6), dtype=np.int64)
    u[:, :5] = q.astype(np.int64) + 128
    want = (u[:, 0::3] + 256 * u[:, 1::3] + 65536 * u[:, 2::3]).astype(np.float32)
    assert pack(q).tobytes() == want.tobytes()
    strided = np.concatenate([np.zeros((2, 1), np.float32), want], axis=1)[:, 1:]  # as _assemble
    assert np.array_equal(unpack(strided, 5), q)


def test_quantise_scales_each_place_to_127_and_keeps_a_blank_one_zero() -> None:
    x = np.array([[[0.5, -2.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=np.float32)
    q = quantise(x)
    assert q.dtype == np.int8 and q.shape == x.shape
    assert q[0].min() == -127 and q[0, 0, 0] == 32 and not q[1].any()


def test_the_projection_is_fixed_signs() -> None:
    p = projection(48)
    assert p.shape == (48, CHANNELS) and set(np.unique(p)) == {-1.0, 1.0}
    assert np.array_equal(p, projection(48))


def test_match_finds_a_place_moved_by_a_cell_and_rerank_puts_it_first() -> None:
    rng = np.random.default_rng(1)
    query = rng.standard_normal((1, 8, 8, 8)).astype(np.float32)
    true = np.zeros_like(query[0])
    true[:, :, 1:] = query[0, :, :, :-1]  # the same layout one cell to the right
    true[:, :, 0] = rng.standard_normal((8, 8))
    other = rng.standard_normal((2, 8, 8, 8)).astype(np.float32)
    places = np.stack([other[0], true, other[1]])[None]
    s = match(query, places)
    assert s.shape == (1, 3) and s[0, 1] > 0.99 and s[0, 1] > s[0, 0] + 0.5
    assert match(query, places, offsets=0)[0, 1] < 0.5  # without the offsets it is missed
    found = np.array([[10, 11, 12]])
    assert rerank(found, query, places).tolist() == [[11, 10, 12]]
    assert rerank(np.array([[-1, 11, 12]]), query, places)[0, -1] == -1  # none stays last


def _match_by_shift(query: np.ndarray, places: np.ndarray, offsets: int) -> np.ndarray:
    """The oracle: each shift's overlap cut out and compared, one at a time."""
    q, p = query[:, None].astype(np.float64), places.astype(np.float64)
    g = q.shape[-1]
    best = np.full(p.shape[:2], -np.inf)
    for dy in range(-offsets, offsets + 1):
        for dx in range(-offsets, offsets + 1):
            qs = q[..., max(dy, 0) : g + min(dy, 0), max(dx, 0) : g + min(dx, 0)]
            ps = p[..., max(-dy, 0) : g + min(-dy, 0), max(-dx, 0) : g + min(-dx, 0)]
            num = (qs * ps).sum(axis=(2, 3, 4))
            den = np.sqrt((qs * qs).sum(axis=(2, 3, 4)) * (ps * ps).sum(axis=(2, 3, 4)))
            best = np.maximum(best, num / np.maximum(den, 1e-12))
    return best


def test_match_is_the_best_cosine_over_each_shifts_overlap() -> None:
    rng = np.random.default_rng(5)
    query = rng.standard_normal((7, 8, 8, 8)).astype(np.float32)
    places = rng.integers(-127, 128, (7, 5, 8, 8, 8)).astype(np.int8)
    places[0, 0] = 0  # a blank place scores 0, not nan
    for offsets in (0, 1, 2):
        got = match(query, places, offsets)
        assert got.dtype == np.float32 and got.shape == (7, 5)
        np.testing.assert_allclose(got, _match_by_shift(query, places, offsets), atol=1e-6)
    assert match(query, places)[0, 0] == 0


def test_place_cells_are_read_by_id(tmp_path: Path) -> None:
    ids = np.array([50, 10, 30], dtype=np.int64)
    cells = np.arange(3 * 2 * 1 * 1, dtype=np.int8).reshape(3, 2, 1, 1)
    np.save(tmp_path / DESCRIPTOR_IDS_FILE, ids)
    np.save(tmp_path / CELLS_FILE, cells)
    got = PlaceCells(tmp_path).get(np.array([[30, -1], [50, 99]]))
    assert got.shape == (2, 2, 2, 1, 1)
    assert np.array_equal(got[0, 0], cells[2]) and np.array_equal(got[1, 0], cells[0])
    assert not got[0, 1].any() and not got[1, 1].any()
    np.save(tmp_path / CELLS_FILE, cells[:2])
    with pytest.raises(ValueError, match="does not match"):
        PlaceCells(tmp_path)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 9 x 9 synthetic area described as windows every quarter tile, indexed."""
    root = tmp_path_factory.mktemp("rerank")
    build, store_root = root / "build", root / "store"
    store = TileStore(store_root)
    rows = []
    for dx in range(9):
        for dy in range(9):
            t = Tile(X0 + dx, Y0 + dy, Z)
            rows.append((tile_id(t), bytes.fromhex(store.put(synthetic_tile_bytes(t)))))
    store.close()
    write_tileset(build, np.array(rows, dtype=tile_dtype()), np.zeros(0, np.int64), {})
    model = write_default_model(root / "model.onnx")
    engine = build / "engine"
    compile_engine(model_path=model, calibration_path=None, precision="fp32", out_dir=engine)
    compile_features(
        model_path=model, calibration_path=None, precision="fp32", backend="auto",
        engine_dir=engine,
    )  # fmt: skip
    (build / "windows.json").write_text(json.dumps(window_record(engine, 4)))
    describe_tiles(
        tileset_dir=build, store_root=store_root, engine_dir=engine, out_dir=build,
        progress=False, reuse=True, window_stride=4,
    )  # fmt: skip
    build_index(descriptors_dir=build, out_path=build / "index.faiss")
    return {"build": build, "store": store_root, "engine": engine}


def test_a_tiles_own_window_has_the_cells_the_frame_model_gives_its_pixels(
    windowed: dict[str, Path],
) -> None:
    """The build side (pooled grids -> cells head) and the client side (cells.onnx) agree."""
    from PIL import Image

    b = windowed["build"]
    ids = np.load(b / DESCRIPTOR_IDS_FILE)
    cells = np.load(b / CELLS_FILE)
    assert cells.dtype == np.int8 and cells.shape == (len(ids), CHANNELS, 8, 8)
    own = ids == ((Z << 58) | ((8 * (X0 + 2)) << 29) | (8 * (Y0 + 3)))  # tile (2, 3)'s own window
    assert own.sum() == 1
    raw = synthetic_tile_bytes(Tile(X0 + 2, Y0 + 3, Z))
    import io

    rgb = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.float32)
    x = (rgb / 255.0 - 0.5).transpose(2, 0, 1)[None].astype(np.float32)
    frame = load_head_model(windowed["engine"] / CELLS_MODEL, 1)(x)
    assert frame.shape == (1, CHANNELS, 8, 8)
    assert np.abs(quantise(frame)[0].astype(int) - cells[own][0]).max() <= 1
    assert match(frame, cells[own][None].astype(np.float32))[0, 0] > 0.999


def test_the_self_test_runs_both_stages_and_reports_each(
    windowed: dict[str, Path], tmp_path: Path
) -> None:
    b = windowed["build"]
    assert open_stage2(b, windowed["engine"], 1) is not None
    kw = dict(
        build_dir=b, store_root=windowed["store"], engine_dir=windowed["engine"],
        index_path=b / "index.faiss", frames_file=tmp_path / "frames.npy",
    )  # fmt: skip
    r = run_selftest(**kw)  # type: ignore[arg-type]
    assert r["rerank"] == {"candidates": 50, "offsets": 1}
    first = r["stage1"]
    assert set(first) == {"recall_at_1", "recall_at_5", "median_error_m", "p95_error_m"}
    assert r["near_centre"]["stage1"] is not None
    # the cells tell the true place from look-alikes: never worse than the index alone here
    assert r["recall_at_1"] >= first["recall_at_1"] and r["recall_at_1"] >= 0.9
    again = run_selftest(**kw)  # type: ignore[arg-type]
    assert again["frames"]["described"] == 0  # the frames' rows (descriptor and cells) are kept
    assert {k: v for k, v in again.items() if k != "frames"} == {
        k: v for k, v in r.items() if k != "frames"
    }
    # a stride-1 cache has no second stage: the index's order is the answer
    (b / "windows.json").write_text(json.dumps(window_record(windowed["engine"], 1)))
    try:
        assert open_stage2(b, windowed["engine"], 1) is None
        plain = run_selftest(**{**kw, "frames_file": None})  # type: ignore[arg-type]
        assert plain["stage1"] is None and plain["rerank"] is None
        assert plain["recall_at_1"] == first["recall_at_1"]
    finally:
        (b / "windows.json").write_text(json.dumps(window_record(windowed["engine"], 4)))


def test_describer_blocks_keep_the_cells_after_each_descriptor(windowed: dict[str, Path]) -> None:
    d = WindowDescriber(windowed["engine"], 4, threads=1)
    rec = window_record(windowed["engine"], 4)
    assert (
        rec["cells"]["shape"] == [CHANNELS, 8, 8] and rec["cells"]["model"] == "engine/cells.onnx"
    )
    x = np.zeros((4, 3, 256, 256), dtype=np.float32)
    blocks = d.blocks(d.run(x), np.array([[0, 1, 2, 3]])).reshape(16, -1)
    assert blocks.shape[1] == 256 + packed_width(CHANNELS * 64)
