"""Tests for overlapping windows: keys and ids (store.windowkeys), pooling (localize.windows), describe."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import numpy as np
import pytest

from cachebuild._util.hashing import sha256_file
from cachebuild._util.statcache import HASH_CACHE_NAME, HashCache
from cachebuild.engine.compile import compile_engine, load_engine
from cachebuild.engine.features import compile_features, load_head_model, poolable, read_head
from cachebuild.engine.model import write_default_model
from cachebuild.errors import UsageError
from cachebuild.localize import describe_store
from cachebuild.localize.describe import DESCRIPTOR_IDS_FILE, DESCRIPTORS_FILE, describe_tiles
from cachebuild.localize.places import place_boxes, positions
from cachebuild.localize.rerank import CELLS_FILE
from cachebuild.localize.windows import WindowDescriber, engine_blocks, pooled_blocks
from cachebuild.store.windowkeys import (
    block_digests,
    namespace,
    neighbours,
    tile_place_ids,
    tile_windows,
    window_ids,
    window_valid,
)
from tests.unit.localize.test_describe import encode, make_tileset, tile_id, tile_image

Z = 17
X0, Y0 = 70000, 42000


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wengine")
    model = write_default_model(root / "model.onnx")
    out = root / "engine"
    compile_engine(model_path=model, calibration_path=None, precision="fp32", out_dir=out)
    assert compile_features(
        model_path=model, calibration_path=None, precision="fp32", backend="auto", engine_dir=out
    )
    return out


def grid_images(n: int, seed: int = 0) -> dict[tuple[int, int, int], bytes]:
    return {
        (Z, X0 + i, Y0 + j): encode(tile_image(seed + j * n + i), "PNG")
        for i in range(n)
        for j in range(n)
    }


# -- names and keys -------------------------------------------------------------


def test_neighbours_and_valid_windows() -> None:
    ids = np.sort(
        np.array([tile_id(Z, X0 + i, Y0 + j) for i, j in [(0, 0), (1, 0), (0, 1)]], np.int64)
    )
    nb = neighbours(ids)
    a = int(np.flatnonzero(ids == tile_id(Z, X0, Y0))[0])
    assert nb[a, 0] == a and ids[nb[a, 1]] == tile_id(Z, X0 + 1, Y0)
    assert ids[nb[a, 2]] == tile_id(Z, X0, Y0 + 1) and nb[a, 3] == -1  # no lower-right tile
    valid = window_valid(nb, 4).reshape(-1, 4, 4)
    # the anchor lacks its lower-right neighbour: only the first row and column of windows
    assert valid[a, 0].all() and valid[a, :, 0].all() and not valid[a, 1:, 1:].any()
    lone = int(np.flatnonzero(ids == tile_id(Z, X0 + 1, Y0))[0])
    assert valid[lone].sum() == 1  # its own window only


def test_place_ids_name_the_window_footprints() -> None:
    ids = np.array([tile_id(Z, X0, Y0)], np.int64)
    w = window_ids(ids, 4)[0]
    z, x0, y0 = place_boxes(w)
    assert set(z.tolist()) == {Z}
    assert sorted(set(x0.tolist())) == [X0, X0 + 0.25, X0 + 0.5, X0 + 0.75]
    # k = oy * stride + ox
    assert (x0[5], y0[5]) == (X0 + 0.25, Y0 + 0.25) and (x0[2], y0[2]) == (X0 + 0.5, Y0)
    assert tile_place_ids(ids)[0] == w[0] and tile_windows(w).tolist() == [True] + [False] * 15
    p = positions(w[:1])
    assert p["west"][0] < p["lon"][0] < p["east"][0] and p["south"][0] < p["lat"][0] < p["north"][0]


def test_block_keys_follow_the_covered_images_only() -> None:
    rng = np.random.default_rng(1)
    ids = np.sort(np.array([tile_id(Z, X0 + i, Y0 + j) for i in range(3) for j in range(3)]))
    raw = rng.integers(0, 256, (9, 32), dtype=np.uint8)
    nb = neighbours(ids)
    before = block_digests(raw, nb, 4, "pooled")
    changed = raw.copy()
    far = int(np.flatnonzero(ids == tile_id(Z, X0 + 2, Y0 + 2))[0])
    changed[far] ^= 1
    after = block_digests(changed, nb, 4, "pooled")
    covers = (nb == far).any(axis=1)
    assert covers.sum() == 4  # itself, left, above, above-left
    assert (before != after).any(axis=1).tolist() == covers.tolist()
    assert (block_digests(raw, nb, 2, "pooled") != before).any(axis=1).all()  # stride is keyed
    assert (block_digests(raw, nb, 4, "engine") != before).any(axis=1).all()  # so is the mode
    assert namespace("a" * 64, 4, "pooled") != namespace("a" * 64, 4, "engine")
    with pytest.raises(ValueError):
        namespace("a" * 64, 3, "pooled")


# -- describing -------------------------------------------------------------------


def test_builtin_model_is_poolable_and_an_edited_one_is_not(tmp_path: Path) -> None:
    import onnx

    model = write_default_model(tmp_path / "m.onnx")
    assert poolable(model)
    m = onnx.load(str(model))
    m.producer_name = "someone-else"
    onnx.save(m, str(tmp_path / "other.onnx"))
    assert not poolable(tmp_path / "other.onnx")
    assert not poolable(tmp_path / "missing.onnx")


def test_pooled_windows_match_the_whole_network(engine_dir: Path) -> None:
    """Offset 0 is the tile's own descriptor; other windows agree with the engine run on their pixels."""
    images = [tile_image(i) for i in range(4)]
    x = np.stack([im.astype(np.float32).transpose(2, 0, 1) / 255.0 - 0.5 for im in images])
    full = load_engine(engine_dir).run(x)
    describer = WindowDescriber(engine_dir, 4, threads=1)
    assert describer.mode == "pooled"
    cover = np.array([[0, 1, 2, 3], [1, -1, 3, -1]])
    pooled = describer.blocks(describer.run(x), cover).reshape(2, 16, -1)[..., :256]
    assert np.allclose(pooled[0, 0], full[0], atol=1e-5)
    assert np.allclose(pooled[1, 0], full[1], atol=1e-5)
    assert np.allclose(np.linalg.norm(pooled[0], axis=1), 1.0, atol=1e-5)
    assert not pooled[1, 1].any() and pooled[1, 4].any()  # no right tile; a lower one
    run = engine_blocks(load_engine(engine_dir), x, cover[:1], 4).reshape(16, -1)
    cos = np.sum(run * pooled[0], axis=1)
    assert cos.min() > 0.95, cos  # the maps are cut per tile, the pixels across tiles


def test_pooled_blocks_for_every_stride_and_the_same_bits_in_any_batch(engine_dir: Path) -> None:
    """A stored block is reused by later builds: its bits must not depend on its batch."""
    head = read_head(engine_dir / "features" / "head.npz")
    run_head = load_head_model(engine_dir / "features" / "head.onnx", threads=2)
    run_cells = load_head_model(engine_dir / "features" / "cells-head.onnx", threads=2)
    rng = np.random.default_rng(0)
    maps = rng.random((12, 48, 64, 64), dtype=np.float32)
    for stride in (1, 2, 4, 8):
        b = pooled_blocks(maps[:4], np.array([[0, 1, 2, 3]]), stride, head, run_head, run_cells)
        assert b.shape == (1, stride * stride * (256 + 171)) and np.isfinite(b).all()
    cover = rng.integers(-1, 12, (20, 4))
    cover[:, 0] = np.arange(20) % 12
    every = pooled_blocks(maps, cover, 4, head, run_head, run_cells)
    for pick in (np.array([7]), np.array([3, 19, 0]), np.arange(20)[::-1]):
        perm = rng.permutation(12)  # the same tiles in another order
        inv = np.argsort(perm)
        part = pooled_blocks(
            maps[perm], np.where(cover[pick] >= 0, inv[cover[pick]], -1), 4, head, run_head,
            run_cells,
        )  # fmt: skip
        assert np.array_equal(part, every[pick])


def test_describe_windows_reuses_blocks_and_redescribes_only_what_a_tile_covers(
    tmp_path: Path, engine_dir: Path
) -> None:
    images = grid_images(4)
    store_root = tmp_path / "store"
    ts = make_tileset(tmp_path, images, store_root)
    kw = dict(
        tileset_dir=ts, store_root=store_root, engine_dir=engine_dir, out_dir=tmp_path / "out",
        progress=False, reuse=True, window_stride=4,
    )  # fmt: skip
    first = describe_tiles(**kw)  # type: ignore[arg-type]
    # 9 anchors with all 16 windows, 3 + 3 on the last column and row with 4, the corner 1
    assert first["computed"] == 16 and first["windows"] == 9 * 16 + 6 * 4 + 1
    d = np.load(tmp_path / "out" / DESCRIPTORS_FILE)
    places = np.load(tmp_path / "out" / DESCRIPTOR_IDS_FILE)
    assert len(d) == len(places) == first["windows"] and len(np.unique(places)) == len(places)
    assert int(tile_windows(places).sum()) == 16
    again = describe_tiles(**kw)  # type: ignore[arg-type]
    assert again["computed"] == 0
    assert np.array_equal(np.load(tmp_path / "out" / DESCRIPTORS_FILE), d)
    # one tile's imagery changes: the anchors whose windows cover it, and nothing else
    images[(Z, X0 + 2, Y0 + 2)] = encode(tile_image(999), "PNG")
    ts2 = make_tileset(tmp_path / "b", images, store_root)
    third = describe_tiles(**{**kw, "tileset_dir": ts2})  # type: ignore[arg-type]
    assert third["computed"] == 4


def test_the_assembled_arrays_hashes_are_remembered_as_they_are_written(
    tmp_path: Path, engine_dir: Path
) -> None:
    """descriptors.npy and cells.npy are hashed by the thread that writes them: the build reads neither again."""
    store_root = tmp_path / "store"
    ts = make_tileset(tmp_path, grid_images(4), store_root)
    out = tmp_path / "out"
    cache_file = out / HASH_CACHE_NAME
    for _ in range(2):  # described, then assembled from the store
        describe_tiles(
            tileset_dir=ts, store_root=store_root, engine_dir=engine_dir, out_dir=out,
            progress=False, reuse=True, window_stride=4, hash_cache=cache_file,
        )  # fmt: skip
        cache = HashCache(cache_file)
        for name in (DESCRIPTORS_FILE, CELLS_FILE):
            assert cache.lookup(out / name) == sha256_file(out / name)  # remembered, and not racy
        assert np.load(out / CELLS_FILE).shape[0] == np.load(out / DESCRIPTORS_FILE).shape[0]


def test_a_failed_write_in_the_writer_thread_fails_describe_and_leaves_no_file(
    tmp_path: Path, engine_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk met by the thread that writes descriptors.npy is describe's error; no temp file stays."""
    store_root = tmp_path / "store"
    ts = make_tileset(tmp_path, grid_images(4), store_root)
    out = tmp_path / "out"
    kw = dict(
        tileset_dir=ts, store_root=store_root, engine_dir=engine_dir, out_dir=out,
        progress=False, reuse=True, window_stride=4,
    )  # fmt: skip
    describe_tiles(**kw)  # type: ignore[arg-type]
    before = (out / DESCRIPTORS_FILE).read_bytes()

    def full(self: object, rows: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(describe_store.NpyRowWriter, "write", full)
    with pytest.raises(OSError, match="No space"):
        describe_tiles(**kw)  # type: ignore[arg-type]
    assert (out / DESCRIPTORS_FILE).read_bytes() == before
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert not (out / DESCRIPTOR_IDS_FILE).exists()  # the pair is not claimed complete


def test_window_stride_needs_the_store(tmp_path: Path, engine_dir: Path) -> None:
    with pytest.raises(UsageError, match="window_stride"):
        describe_tiles(
            tileset_dir=tmp_path, store_root=tmp_path, engine_dir=engine_dir, out_dir=tmp_path,
            window_stride=4, reuse=False,
        )  # fmt: skip
    with pytest.raises(UsageError, match="window_stride"):
        describe_tiles(
            tileset_dir=tmp_path, store_root=tmp_path, engine_dir=engine_dir, out_dir=tmp_path,
            window_stride=3, reuse=True,
        )  # fmt: skip


_BLOCKS_IN_A_CHILD = """
import sys, numpy as np
from pathlib import Path
from cachebuild.engine.features import load_head_model, read_head
from cachebuild.localize.windows import pooled_blocks
d = Path(sys.argv[1])
maps = np.random.default_rng(5).random((4, 48, 64, 64), dtype=np.float32)
b = pooled_blocks(maps, np.array([[0, 1, 2, 3]]), 4, read_head(d / "head.npz"),
                  load_head_model(d / "head.onnx", 1), load_head_model(d / "cells-head.onnx", 1))
np.save(sys.argv[2], b)
"""


@pytest.mark.parametrize("coretype", ["Prescott", "Haswell"])
def test_blocks_do_not_depend_on_the_shells_blas_settings(
    engine_dir: Path, tmp_path: Path, coretype: str
) -> None:
    """A companion's shell lacked the OPENBLAS_* variables of the workstation's: other bits (found
    by the sequence test). The products do not go through numpy's BLAS."""
    import os
    import subprocess
    import sys

    out = []
    for env in ({"OPENBLAS_CORETYPE": coretype, "OPENBLAS_L2_SIZE": "512"}, {}):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS")}
        path = tmp_path / f"b{len(out)}.npy"
        subprocess.run(
            [sys.executable, "-c", _BLOCKS_IN_A_CHILD, str(engine_dir / "features"), str(path)],
            env={**clean, **env}, check=True, timeout=120,
        )  # fmt: skip
        out.append(np.load(path))
    assert np.array_equal(out[0], out[1])


def test_pooling_products_need_no_onnx_import(engine_dir: Path, tmp_path: Path) -> None:
    """The matrix product's graph is kept as bytes (onnx's import is about 0.8 s of a rebuild
    whose engine is up to date), and they are what onnx.helper makes of it."""
    import subprocess
    import sys

    import onnx
    from onnx import helper

    from cachebuild.engine.features import _MATMUL_ONNX

    vi = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in "aby"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "mm", vi[:2], vi[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert model.SerializeToString() == _MATMUL_ONNX
    code = _BLOCKS_IN_A_CHILD + "\nassert 'onnx' not in sys.modules, 'onnx was imported'\n"
    path = tmp_path / "b.npy"
    subprocess.run(
        [sys.executable, "-c", code, str(engine_dir / "features"), str(path)],
        check=True, timeout=120,
    )  # fmt: skip


def test_kept_halo_tiles_give_the_same_blocks_and_thumbnails_with_fewer_runs(
    tmp_path: Path, engine_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's halo (the tiles right of and below its anchors) is kept for the batches after it
    instead of being decoded and run again: the same bits, the same thumbnails, fewer engine runs.
    Two tiles share an image (a repeated image is one key)."""
    from cachebuild.localize import describe_windows as dw
    from cachebuild.store.thumbs import ThumbStore

    images = grid_images(6)
    images[(Z, X0 + 5, Y0 + 5)] = images[(Z, X0 + 1, Y0 + 1)]
    got = {}
    for keep in (0, dw.KEEP_TILES):
        monkeypatch.setattr(dw, "KEEP_TILES", keep)
        root = tmp_path / f"keep{keep}"
        ts = make_tileset(root, images, root / "store")
        r = describe_tiles(
            tileset_dir=ts, store_root=root / "store", engine_dir=engine_dir, out_dir=root / "out",
            progress=False, reuse=True, window_stride=4, batch_size=4,
        )  # fmt: skip
        with ThumbStore(root / "store") as th:
            thumbs = th.lookup(sorted({hashlib.sha256(d).digest() for d in images.values()}))
        got[keep] = (r, (root / "out" / DESCRIPTORS_FILE).read_bytes(), thumbs)
    (run, blocks, thumbs), (kept, kept_blocks, kept_thumbs) = got[0], got[dw.KEEP_TILES]
    assert kept_blocks == blocks and kept_thumbs == thumbs and len(thumbs) == 35
    assert run["computed"] == kept["computed"] == 36
    assert kept["engine_runs"] < run["engine_runs"]
