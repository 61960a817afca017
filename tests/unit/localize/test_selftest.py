"""Tests for cachebuild.localize.selftest: camera-like frames searched against the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cachebuild.engine.compile import compile_engine
from cachebuild.engine.model import write_default_model
from cachebuild.localize import selftest
from cachebuild.localize.describe import DESCRIPTOR_IDS_FILE, describe_tiles
from cachebuild.localize.index import build_index
from cachebuild.localize.selftest import (
    MAX_OFFSET,
    SelfTestError,
    check_recall,
    interior_tiles,
    make_frame,
    run_selftest,
    summary,
)
from cachebuild.localize.selftest_score import low_recall_warning
from cachebuild.providers.synthetic import synthetic_tile_bytes
from cachebuild.store.objects import TileStore
from cachebuild.tilemath import Tile, tile_id
from cachebuild.tileset import tile_dtype, write_tileset
from tests._harness.surface import assert_public_surface

Z = 17
X0, Y0 = 68640, 45890


def tid(x: int, y: int, z: int = Z) -> int:
    return tile_id(Tile(x, y, z))


def area(root: Path, build: Path, x0: int) -> None:
    """A 9 x 9 synthetic area from column x0, described and indexed with the default model."""
    store = TileStore(root / "store")
    rows = []
    for dx in range(9):
        for dy in range(9):
            t = Tile(x0 + dx, Y0 + dy, Z)
            rows.append((tile_id(t), bytes.fromhex(store.put(synthetic_tile_bytes(t)))))
    store.close()
    write_tileset(build, np.array(rows, dtype=tile_dtype()), np.zeros(0, np.int64), {})
    model = root / "model.onnx"
    if not model.exists():
        write_default_model(model)
    compile_engine(
        model_path=model, calibration_path=None, precision="fp32", out_dir=build / "engine"
    )
    describe_tiles(
        tileset_dir=build,
        store_root=root / "store",
        engine_dir=build / "engine",
        out_dir=build,
        progress=False,
    )
    build_index(descriptors_dir=build, out_path=build / "index.faiss")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 9 x 9 synthetic area, described and indexed with the default model."""
    root = tmp_path_factory.mktemp("selftest")
    area(root, root / "build", X0)
    return {"build": root / "build", "store": root / "store", "root": root}


def run(world: dict[str, Path], index: Path | None = None, **kw: object) -> dict:
    b = world["build"]
    return run_selftest(
        build_dir=b,
        store_root=world["store"],
        engine_dir=b / "engine",
        index_path=index or b / "index.faiss",
        **kw,  # type: ignore[arg-type]
    )


def test_interior_tiles_have_all_eight_neighbours() -> None:
    ids = np.sort(
        np.array([tid(x, y) for x in range(10, 14) for y in range(20, 23)], dtype=np.int64)
    )
    inner = {int(ids[i]) for i in interior_tiles(ids)}
    assert inner == {tid(11, 21), tid(12, 21)}
    # a hole removes the tiles around it
    holed = ids[ids != tid(10, 20)]
    assert {int(holed[i]) for i in interior_tiles(holed)} == {tid(12, 21)}
    assert len(interior_tiles(np.zeros(0, np.int64))) == 0


def test_neighbours_wrap_at_the_antimeridian() -> None:
    z = 3  # x runs 0..7
    ids = np.sort(np.array([tid(x, y, z) for x in (7, 0, 1) for y in (2, 3, 4)], dtype=np.int64))
    assert {int(ids[i]) for i in interior_tiles(ids)} == {tid(0, 3, z)}
    # the world's top row has no northern neighbours
    top = np.sort(np.array([tid(x, y, z) for x in (1, 2, 3) for y in (0, 1)], dtype=np.int64))
    assert len(interior_tiles(top)) == 0


class Still:
    """A generator that always draws the middle of the range: no shift, turn or light change."""

    def uniform(self, lo: float, hi: float) -> float:
        return (lo + hi) / 2


def test_a_still_frame_is_the_middle_tile() -> None:
    rng = np.random.default_rng(0)
    mosaic = rng.integers(0, 256, (768, 768, 3), dtype=np.uint8)
    frame = make_frame(mosaic, Still(), MAX_OFFSET)
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, mosaic[256:512, 256:512])


def test_frames_are_shifted_turned_and_relit_within_bounds() -> None:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:768, 0:768]
    # a ramp image: the frame's centre pixel tells where the frame was cut
    mosaic = np.stack([xx // 3, yy // 3, np.full_like(xx, 128)], axis=2).astype(np.uint8)
    for _ in range(50):
        f = make_frame(mosaic, rng, MAX_OFFSET).astype(float)
        cx, cy = f[128, 128, 0] * 3, f[128, 128, 1] * 3
        gain_bias = f[128, 128, 2] / 128
        # brightness changes the grey channel by up to 20 % and 10 levels
        assert 0.7 < gain_bias < 1.3
        # so the centre estimate is loose, but it stays near the middle tile
        assert 256 - 140 < cx < 512 + 140 and 256 - 140 < cy < 512 + 140


def test_recall_on_synthetic_terrain(world: dict[str, Path]) -> None:
    r = run(world)
    assert r["candidates"] == 49 and r["queries"] == 49
    # the headline: frames centred anywhere in the tile
    assert r["max_offset_px"] == 128.0 and r["rotation_deg"] == 10.0 and r["min_overlap"] == 0.5
    assert r["too_few_frames"] is True  # 49 < 50: the figure is there, nobody prints it
    assert 0 <= r["recall_at_1"] <= r["recall_at_5"] <= 1
    assert r["median_error_m"] is not None and r["p95_error_m"] >= r["median_error_m"]
    # the sampled tiles whose hash is 0 mod 4: about a quarter, near a tile centre
    near = r["near_centre"]
    assert 5 <= near["queries"] <= 20 and near["max_offset_px"] == 32.0
    assert near["recall_at_1"] >= 0.85 and near["recall_at_1"] >= r["recall_at_1"]
    # a near-centre frame found is within its shift of the truth (tile ~240 m here)
    assert near["median_error_m"] < 0.25 * 240
    assert r["frames"] == {"described": 49 + near["queries"], "reused": 0}
    # the same tile set gives the same frames and the same figures
    assert run(world) == r


def test_one_descriptor_per_tile_does_not_find_frames_centred_anywhere(
    world: dict[str, Path],
) -> None:
    """The honest headline: a tile-grid index misses frames centred near tile borders."""
    r = run(world)
    assert r["recall_at_1"] < 0.5 < r["near_centre"]["recall_at_1"]


def test_a_cache_whose_ids_are_scrambled_fails_the_test(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """The self-test catches a broken cache: descriptors filed under the wrong tiles."""
    b = world["build"]
    bad = tmp_path / "bad"
    bad.mkdir()
    ids = np.load(b / DESCRIPTOR_IDS_FILE)
    (bad / "descriptors.npy").symlink_to(b / "descriptors.npy")
    np.save(bad / DESCRIPTOR_IDS_FILE, np.random.default_rng(0).permutation(ids))
    build_index(descriptors_dir=bad, out_path=bad / "index.faiss")
    r = run(world, index=bad / "index.faiss")
    assert r["recall_at_1"] < 0.5


def test_no_frames_when_no_tile_has_all_neighbours(world: dict[str, Path]) -> None:
    r = run(world, queries=0)
    assert r["queries"] == 0 and r["recall_at_1"] is None
    assert r["near_centre"]["recall_at_1"] is None and r["median_error_m"] is None


def test_the_gate() -> None:
    info = {
        "recall_at_1": 0.92,
        "recall_at_5": 0.99,
        "median_error_m": 12.0,
        "p95_error_m": 80.5,
        "queries": 200,
    }
    check_recall(info, None)
    check_recall(info, 0.9)
    with pytest.raises(SelfTestError) as err:
        check_recall(info, 0.95)
    assert err.value.exit_code == 22 and err.value.phase == "selftest"
    assert "0.920" in err.value.message and "MIN_RECALL=0.95" in err.value.message
    with pytest.raises(SelfTestError, match="no frames"):
        check_recall(None, 0.5)
    s = summary(info)
    assert {k: s[k] for k in info} == info and s["too_few_frames"] is False
    assert s["text"] == (
        "recall@1 0.920, recall@5 0.990, error median 12 m, p95 80 m, "
        "frames centred anywhere (200 frames)"
    )
    assert summary(None)["recall_at_1"] is None and summary(None)["queries"] == 0


def test_too_few_frames_print_no_figure() -> None:
    info = {"recall_at_1": 1.0, "recall_at_5": 1.0, "median_error_m": 3.0, "queries": 9}
    line = summary(info)["text"]
    assert "too few frames for a figure (9 < 50 frames)" in line and "1.000" not in line
    assert low_recall_warning({**info, "recall_at_1": 0.1}, 0.9) is None


def test_low_recall_warns_below_the_threshold() -> None:
    info = {"recall_at_1": 0.5, "recall_at_5": 0.7, "median_error_m": 300.0, "queries": 200}
    msg = low_recall_warning(info, 0.9)
    assert msg is not None and "0.500" in msg and "RECALL_WARN=0.9" in msg
    assert low_recall_warning(info, 0.4) is None and low_recall_warning(info, None) is None
    assert "inf" in summary({**info, "p95_error_m": None})["text"]


def test_written_file_holds_content_and_the_run_goes_beside_it(tmp_path: Path) -> None:
    selftest.write_selftest(
        tmp_path / "s.json", {"recall_at_1": 1.0, "frames": {"described": 3, "reused": 4}}
    )
    assert json.loads((tmp_path / "s.json").read_text()) == {"recall_at_1": 1.0}
    assert selftest.read_run(tmp_path) == {"frames": {"described": 3, "reused": 4}}
    assert selftest.read_run(tmp_path / "nowhere") is None


def test_public_surface() -> None:
    """``__all__`` lists exactly the public names the module defines."""
    assert_public_surface(selftest)


def test_import_is_light() -> None:
    code = (
        "import sys, cachebuild.localize.selftest; "
        "print(sorted(m for m in ('numpy', 'onnxruntime', 'faiss', 'PIL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- frames kept between builds ------------------------------------------------


def test_kept_frames_are_reused_and_give_the_same_figures(
    world: dict[str, Path], tmp_path: Path
) -> None:
    kept = tmp_path / "frames.npy"
    first = run(world, frames_file=kept)
    n = first["queries"] + first["near_centre"]["queries"]
    assert first["frames"] == {"described": n, "reused": 0} and kept.is_file()
    inode = kept.stat().st_ino
    again = run(world, frames_file=kept)
    assert again["frames"] == {"described": 0, "reused": n}
    # the same frames, the same descriptors: the same figures as describing every frame
    strip = lambda r: {k: v for k, v in r.items() if k != "frames"}  # noqa: E731
    assert strip(again) == strip(first) == strip(run(world))
    assert kept.stat().st_ino == inode, "nothing new: the kept file is left as it was"


def test_a_moved_area_describes_only_its_new_frames(world: dict[str, Path], tmp_path: Path) -> None:
    """One column east: the 42 tiles that stay candidates with the same blocks keep their frames."""
    kept = tmp_path / "frames.npy"
    before = run(world, frames_file=kept)
    moved = tmp_path / "moved"
    area(world["root"], moved, X0 + 1)
    old_bytes = kept.read_bytes()
    link = tmp_path / "published-frames.npy"
    link.hardlink_to(kept)
    r = run_selftest(
        build_dir=moved, store_root=world["store"], engine_dir=moved / "engine",
        index_path=moved / "index.faiss", frames_file=kept,
    )  # fmt: skip
    assert r["candidates"] == 49 and r["queries"] == 49
    total = r["frames"]["described"] + r["frames"]["reused"]
    assert total == 49 + r["near_centre"]["queries"]
    # 42 of the 49 sampled tiles are the same tiles with the same neighbours
    assert r["frames"]["reused"] >= 0.8 * total and r["frames"]["described"] >= 7
    assert r["near_centre"]["recall_at_1"] >= 0.85
    # searched in the new index: the same as describing every frame afresh
    fresh = run_selftest(
        build_dir=moved,
        store_root=world["store"],
        engine_dir=moved / "engine",
        index_path=moved / "index.faiss",
    )
    assert fresh["recall_at_1"] == r["recall_at_1"] and fresh["recall_at_5"] == r["recall_at_5"]
    # the kept file was replaced, never written in place
    assert link.read_bytes() == old_bytes and kept.read_bytes() != old_bytes
    assert before["frames"]["reused"] == 0


def test_the_sample_is_stable_when_the_area_moves() -> None:
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(2**40, 5_000, replace=False)).astype(np.int64)
    digests = rng.integers(0, 256, (5_000, 32), dtype=np.uint8)
    h = selftest._frame_hashes(ids, digests, 0)
    first = set(ids[np.argsort(h)[:200]].tolist())
    # a tenth of the tiles go, a tenth come: about 90% of the sample stays
    keep = np.arange(500, 5_000)
    new_ids = np.concatenate([ids[keep], ids[:500] + 2**41])
    new_h = np.concatenate([h[keep], selftest._frame_hashes(new_ids[-500:], digests[:500], 0)])
    second = set(new_ids[np.argsort(new_h)[:200]].tolist())
    assert len(first & second) >= 0.8 * 200
    # another image under the same tile, or another seed, is another draw
    changed = digests.copy()
    changed[:, 0] ^= 1
    assert np.mean(selftest._frame_hashes(ids, changed, 0) == h) == 0
    assert np.mean(selftest._frame_hashes(ids, digests, 1) == h) == 0


def test_a_frame_key_covers_everything_its_descriptor_depends_on() -> None:
    block = [bytes([i]) * 32 for i in range(9)]
    params = (0.1, -0.05, 0.02, 1.03, 0.9, 4.0)
    key = selftest._frame_key("e" * 64, (256, 256), block, params)
    assert len(key) == 32
    assert selftest._frame_key("f" * 64, (256, 256), block, params) != key
    assert selftest._frame_key("e" * 64, (224, 224), block, params) != key
    assert selftest._frame_key("e" * 64, (256, 256), block[::-1], params) != key
    assert selftest._frame_key("e" * 64, (256, 256), block, (*params[:5], 4.0001)) != key


def test_a_damaged_frames_file_is_described_again(world: dict[str, Path], tmp_path: Path) -> None:
    kept = tmp_path / "frames.npy"
    first = run(world, frames_file=kept)
    n = first["frames"]["described"]
    for damage in (kept.read_bytes()[:500], b"garbage", b""):
        kept.unlink()
        kept.write_bytes(damage)
        r = run(world, frames_file=kept)
        assert (
            r["frames"] == {"described": n, "reused": 0}
            and r["recall_at_1"] == first["recall_at_1"]
        )
    # descriptors of another dimension are not ours
    np.save(kept, np.zeros(3, dtype=[("key", "u1", (32,)), ("d", "<f4", (8,))]))
    assert run(world, frames_file=kept)["frames"]["reused"] == 0


def test_frames_in_centre_order_decode_each_tile_once_and_give_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames go in the order of their centre tile, a batch's decoded tiles handed to the next:
    each tile is decoded once, and every frame's row is the bits it gets described alone."""
    from cachebuild.localize import decode
    from cachebuild.localize.selftest_frames import _BATCH, _describe_frames

    store = TileStore(tmp_path / "store")
    cols, rows_ = 20, 4
    paths = {}
    for dx in range(cols):
        for dy in range(rows_):
            t = Tile(X0 + dx, Y0 + dy, Z)
            paths[tile_id(t)] = store.path(store.put(synthetic_tile_bytes(t)))
    store.close()
    rng = np.random.default_rng(3)
    jobs = [
        ([tid(X0 + x + i, Y0 + y + j) for j in (-1, 0, 1) for i in (-1, 0, 1)], p)
        for x in range(1, cols - 1)
        for y in range(1, rows_ - 1)
        for p in [selftest._draw(rng, 0.5)]
    ]
    jobs = [jobs[i] for i in rng.permutation(len(jobs))]  # not in centre order
    assert len(jobs) > 2 * _BATCH

    def run(batch: np.ndarray) -> np.ndarray:  # row by row: a row's result is its pixels'
        return np.stack([np.float32(1) + b.reshape(8, -1).sum(axis=1) for b in batch])

    decoded: list[int] = []
    real = decode.decode_tile
    monkeypatch.setattr(decode, "decode_tile", lambda *a: decoded.append(1) or real(*a))
    together = _describe_frames(jobs, paths, (256, 256), 2, run, 4)
    assert len(decoded) == len(paths)  # once each, not once per batch that needs it
    alone = np.concatenate([_describe_frames([j], paths, (256, 256), 1, run, 4) for j in jobs])
    assert together.dtype == np.float32 and together.shape == (len(jobs), 8)
    assert together.tobytes() == alone.tobytes()
