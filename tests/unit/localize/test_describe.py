"""Tests for cachebuild.localize.describe: one descriptor per tile, decoding overlapped."""

from __future__ import annotations

import io
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cachebuild.engine.compile import compile_engine, load_engine
from cachebuild.engine.model import write_default_model
from cachebuild.errors import BuildError, StoreObjectError, UsageError
from cachebuild.localize import decode_ahead, describe
from cachebuild.localize.decode import decode_tile, default_decode_threads, tile_zxy
from cachebuild.localize.describe import DESCRIPTOR_IDS_FILE, DESCRIPTORS_FILE, describe_tiles
from cachebuild.localize.index import build_index, search
from cachebuild.localize.rerank import CELLS_FILE
from cachebuild.store.objects import TileStore
from cachebuild.store.windowkeys import PLACE_UNITS
from cachebuild.tilemath import Tile
from cachebuild.tilemath import tile_id as tiles_tile_id
from cachebuild.tileset import TILES_FILE, tile_dtype, write_tileset
from tests._harness.surface import assert_public_surface, heavy_imports

Z = 17


def tile_id(z: int, x: int, y: int) -> int:
    return (z << 58) | (x << 29) | y


def tiles_of(places: np.ndarray) -> np.ndarray:
    """The tile ids of tiles' own windows' place ids (descriptor_ids.npy at WINDOW_STRIDE=1)."""
    m = (1 << 29) - 1
    z, x, y = places >> 58, (places >> 29) & m, places & m
    assert not (x % PLACE_UNITS).any() and not (y % PLACE_UNITS).any()
    return (z << 58) | ((x // PLACE_UNITS) << 29) | (y // PLACE_UNITS)


def tile_image(seed: int, size: int = 256) -> np.ndarray:
    """Blocky colour noise with some fine grain: distinct, JPEG-friendly tiles."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    img = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC)).astype(np.int16)
    img = img + rng.integers(-12, 13, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    im = Image.fromarray(rgb)
    if mode is not None:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_tileset(root: Path, images: dict[tuple[int, int, int], bytes], store_root: Path) -> Path:
    """Put ``images`` in the store and write a tile set listing them."""
    store = TileStore(store_root)
    rows = [(tile_id(*zxy), bytes.fromhex(store.put(data))) for zxy, data in images.items()]
    tileset_dir = root / "tileset"
    write_tileset(tileset_dir, np.array(rows, dtype=tile_dtype()), np.zeros(0, np.int64), {})
    store.close()
    return tileset_dir


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engine")
    model = write_default_model(root / "model.onnx")
    out = root / "engine"
    compile_engine(model_path=model, calibration_path=None, precision="fp32", out_dir=out)
    return out


@pytest.fixture(scope="module")
def tiles_images() -> dict[tuple[int, int, int], np.ndarray]:
    # listed out of id order on purpose; x and y large enough to use many bits
    coords = [(Z, 70000 + dx, 42000 + dy) for dx in (3, 0, 2, 1) for dy in (2, 0, 1)]
    return {zxy: tile_image(i) for i, zxy in enumerate(coords)}


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, tiles_images: dict[tuple[int, int, int], np.ndarray]
) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("world")
    images = {zxy: encode(rgb) for zxy, rgb in tiles_images.items()}
    return make_tileset(root, images, root / "store"), root / "store"


@pytest.fixture(scope="module")
def described(
    world: tuple[Path, Path], engine_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    tileset_dir, store_root = world
    out = tmp_path_factory.mktemp("described")
    result = describe_tiles(
        tileset_dir=tileset_dir,
        store_root=store_root,
        engine_dir=engine_dir,
        out_dir=out,
        batch_size=4,
        threads=2,
        progress=False,
        decode_threads=2,
    )
    return out, result


def run(world: tuple[Path, Path], engine_dir: Path, out: Path, **kw: object) -> dict:
    return describe_tiles(
        tileset_dir=world[0],
        store_root=world[1],
        engine_dir=engine_dir,
        out_dir=out,
        progress=False,
        **kw,
    )


@pytest.mark.parametrize(
    "z, x, y", [(0, 0, 0), (17, 70000, 42000), (28, 2**28 - 1, 2**28 - 1), (19, 1, 5)]
)
def test_tile_zxy_agrees_with_the_tiles_module(z: int, x: int, y: int) -> None:
    t = Tile(x, y, z)
    assert tile_zxy(tiles_tile_id(t)) == (z, x, y)
    assert tile_id(z, x, y) == tiles_tile_id(t)


def test_default_decode_threads() -> None:
    assert default_decode_threads(1) == 1
    assert default_decode_threads(16) == 16
    assert default_decode_threads(0) == 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_decode_threads() == usable


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_decoders_yield_to_the_engine(
    world: tuple[Path, Path], engine_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: set[tuple[str, int]] = set()
    real = decode_ahead.decode_batch

    def spy(*args: Any) -> Any:
        tid = threading.get_native_id()
        seen.add((threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, tid)))
        return real(*args)

    monkeypatch.setattr(decode_ahead, "decode_batch", spy)
    run(world, engine_dir, tmp_path, batch_size=4, decode_threads=2)
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen and all(name.startswith("describe-decode") for name, _ in seen)
    assert {nice for _, nice in seen} == {min(19, main + 5)}


def test_shapes_norms_ids(described: tuple[Path, dict], tiles_images: dict) -> None:
    out, result = described
    d = np.load(out / DESCRIPTORS_FILE)
    ids = tiles_of(np.load(out / DESCRIPTOR_IDS_FILE))
    n = len(tiles_images)
    assert d.shape == (n, 256) and d.dtype == np.float32
    assert ids.dtype == np.int64
    assert ids.tolist() == sorted(tile_id(*zxy) for zxy in tiles_images)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    assert result["tiles"] == n and result["dim"] == 256
    assert result["seconds"] > 0 and result["tiles_per_s"] == pytest.approx(n / result["seconds"])
    # cells.npy: empty, no second stage for the tile grid
    assert sorted(p.name for p in out.iterdir()) == [
        CELLS_FILE,
        DESCRIPTOR_IDS_FILE,
        DESCRIPTORS_FILE,
    ]


def test_row_i_describes_tile_i(
    described: tuple[Path, dict], world: tuple[Path, Path], engine_dir: Path
) -> None:
    out, _ = described
    d = np.load(out / DESCRIPTORS_FILE)
    ids = tiles_of(np.load(out / DESCRIPTOR_IDS_FILE))
    tiles = np.load(world[0] / TILES_FILE)
    store = TileStore(world[1])
    runner = load_engine(engine_dir, threads=1)
    for i in (0, 5, len(ids) - 1):
        assert tiles["id"][i] == ids[i]
        digest = (
            np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(-1, 32)[i].tobytes().hex()
        )
        rgb = decode_tile(store.path(digest), (256, 256))
        x = (rgb.astype(np.float32) / 255 - 0.5).transpose(2, 0, 1)[None]
        np.testing.assert_allclose(d[i], runner.run(np.ascontiguousarray(x))[0], atol=1e-5)
    # and rows are distinct tiles, not one tile repeated
    assert np.max((d @ d.T)[~np.eye(len(d), dtype=bool)]) < 0.95


def test_each_tile_matches_itself_through_the_index(
    described: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = described
    info = build_index(descriptors_dir=out, out_path=tmp_path / "index.faiss")
    d = np.load(out / DESCRIPTORS_FILE)
    ids = tiles_of(np.load(out / DESCRIPTOR_IDS_FILE))
    assert info["ntotal"] == len(ids)
    scores, found = search(tmp_path / "index.faiss", d, 2)
    assert tiles_of(found[:, 0]).tolist() == ids.tolist()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert np.all(scores[:, 1] < scores[:, 0] - 0.05)


def test_overlapped_pipeline_equals_one_at_a_time(
    described: tuple[Path, dict], world: tuple[Path, Path], engine_dir: Path, tmp_path: Path
) -> None:
    run(world, engine_dir, tmp_path, batch_size=1, threads=1, decode_threads=1)
    one = np.load(tmp_path / DESCRIPTORS_FILE)
    overlapped = np.load(described[0] / DESCRIPTORS_FILE)
    np.testing.assert_allclose(overlapped, one, atol=1e-5)
    # a batch that does not divide the tile count, more decoders than batches
    run(world, engine_dir, tmp_path, batch_size=5, decode_threads=4)
    np.testing.assert_allclose(np.load(tmp_path / DESCRIPTORS_FILE), one, atol=1e-5)


def test_corrupt_tile_names_zxy_and_path(tmp_path: Path, engine_dir: Path) -> None:
    good = {(Z, 10 + i, 20): encode(tile_image(i)) for i in range(6)}
    jpeg = encode(tile_image(99))
    images = {**good, (Z, 12345, 54321): jpeg[: len(jpeg) // 3]}  # truncated JPEG
    tileset_dir = make_tileset(tmp_path, images, tmp_path / "store")
    digest = TileStore(tmp_path / "store").put(jpeg[: len(jpeg) // 3])
    with pytest.raises(BuildError) as err:
        describe_tiles(
            tileset_dir=tileset_dir,
            store_root=tmp_path / "store",
            engine_dir=engine_dir,
            out_dir=tmp_path / "out",
            batch_size=2,
            progress=False,
        )
    message = str(err.value)
    assert err.value.phase == "describe"
    assert f"z={Z} x=12345 y=54321" in message
    assert str(TileStore(tmp_path / "store").path(digest)) in message
    assert not (tmp_path / "out" / DESCRIPTOR_IDS_FILE).exists()


def test_missing_store_object_is_named(tmp_path: Path, engine_dir: Path) -> None:
    digest = "ab" * 32
    tiles = np.array([(tile_id(Z, 7, 8), bytes.fromhex(digest))], dtype=tile_dtype())
    write_tileset(tmp_path / "ts", tiles, np.zeros(0, np.int64), {})
    with pytest.raises(BuildError, match=f"z={Z} x=7 y=8.*{digest}"):
        describe_tiles(
            tileset_dir=tmp_path / "ts",
            store_root=tmp_path / "store",
            engine_dir=engine_dir,
            out_dir=tmp_path / "out",
            progress=False,
        )


@pytest.mark.parametrize("reuse", [False, True])
def test_zero_tiles(tmp_path: Path, engine_dir: Path, reuse: bool) -> None:
    write_tileset(tmp_path / "ts", np.zeros(0, tile_dtype()), np.zeros(0, np.int64), {})
    result = describe_tiles(
        tileset_dir=tmp_path / "ts",
        store_root=tmp_path / "store",
        engine_dir=engine_dir,
        out_dir=tmp_path / "out",
        progress=False,
        reuse=reuse,
    )
    assert result["tiles"] == 0 and result["dim"] == 256 and result["computed"] == 0
    d = np.load(tmp_path / "out" / DESCRIPTORS_FILE)
    ids = tiles_of(np.load(tmp_path / "out" / DESCRIPTOR_IDS_FILE))
    assert d.shape == (0, 256) and d.dtype == np.float32
    assert ids.shape == (0,) and ids.dtype == np.int64


def test_digest_ending_in_a_zero_byte(tmp_path: Path, engine_dir: Path) -> None:
    """numpy drops trailing NUL bytes of S32 items; the store path must not."""
    digest = "cd" * 31 + "00"
    store = TileStore(tmp_path / "store")
    store.path(digest).parent.mkdir(parents=True, exist_ok=True)
    store.path(digest).write_bytes(encode(tile_image(5)))
    tiles = np.array([(tile_id(Z, 1, 1), bytes.fromhex(digest))], dtype=tile_dtype())
    write_tileset(tmp_path / "ts", tiles, np.zeros(0, np.int64), {})
    # the object is found under its full name (not "missing"); its bytes do not
    # hash to that made-up name, which describe checks
    with pytest.raises(StoreObjectError, match=f"{digest} is corrupt"):
        describe_tiles(
            tileset_dir=tmp_path / "ts",
            store_root=tmp_path / "store",
            engine_dir=engine_dir,
            out_dir=tmp_path / "out",
            progress=False,
        )


def test_unsorted_tiles_file_is_described_in_id_order(
    tmp_path: Path, world: tuple[Path, Path], engine_dir: Path, described: tuple[Path, dict]
) -> None:
    tiles = np.load(world[0] / TILES_FILE)
    (tmp_path / "ts").mkdir()
    np.save(tmp_path / "ts" / TILES_FILE, tiles[::-1])
    run((tmp_path / "ts", world[1]), engine_dir, tmp_path / "out")
    assert np.array_equal(tiles_of(np.load(tmp_path / "out" / DESCRIPTOR_IDS_FILE)), tiles["id"])
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / DESCRIPTORS_FILE),
        np.load(described[0] / DESCRIPTORS_FILE),
        atol=1e-5,
    )


def test_duplicate_tile_ids_are_refused(
    tmp_path: Path, world: tuple[Path, Path], engine_dir: Path
) -> None:
    tiles = np.load(world[0] / TILES_FILE)
    (tmp_path / "ts").mkdir()
    np.save(tmp_path / "ts" / TILES_FILE, np.concatenate([tiles[2:3], tiles]))
    zxy = tile_zxy(int(tiles["id"][2]))
    with pytest.raises(BuildError, match=f"z={zxy[0]} x={zxy[1]} y={zxy[2]} more than once"):
        run((tmp_path / "ts", world[1]), engine_dir, tmp_path / "out")


def test_missing_tileset(tmp_path: Path, engine_dir: Path) -> None:
    with pytest.raises(BuildError, match="no tiles.npy"):
        run((tmp_path, tmp_path / "store"), engine_dir, tmp_path / "out")


def test_other_sizes_and_modes(tmp_path: Path, engine_dir: Path) -> None:
    """512 px JPEG, 128 px PNG, grayscale JPEG and RGBA PNG are all described."""
    big = tile_image(7, size=512)
    small = np.asarray(Image.fromarray(big).resize((256, 256), Image.Resampling.BILINEAR))
    images = {
        (Z, 0, 0): encode(small),
        (Z, 0, 1): encode(big),
        (Z, 0, 2): encode(tile_image(8, size=128), "PNG"),
        (Z, 0, 3): encode(tile_image(9), "JPEG", mode="L"),
        (Z, 0, 4): encode(tile_image(10), "PNG", mode="RGBA"),
    }
    tileset_dir = make_tileset(tmp_path, images, tmp_path / "store")
    result = run((tileset_dir, tmp_path / "store"), engine_dir, tmp_path / "out")
    assert result["tiles"] == 5
    d = np.load(tmp_path / "out" / DESCRIPTORS_FILE)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    # the 512 px tile reduced by the decoder looks like the 256 px one
    assert float(d[0] @ d[1]) > 0.9


def test_decode_tile_modes(tmp_path: Path) -> None:
    rgb = tile_image(3)
    (tmp_path / "g.jpg").write_bytes(encode(rgb, "JPEG", mode="L"))
    (tmp_path / "p.png").write_bytes(encode(rgb, "PNG"))
    grey = decode_tile(tmp_path / "g.jpg", (256, 256))
    assert grey.shape == (256, 256, 3) and grey.dtype == np.uint8
    assert np.array_equal(grey[..., 0], grey[..., 2])
    assert np.array_equal(decode_tile(tmp_path / "p.png", (256, 256)), rgb)
    assert decode_tile(tmp_path / "p.png", (224, 200)).shape == (224, 200, 3)


def test_outputs_are_replaced_atomically(
    world: tuple[Path, Path], engine_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / DESCRIPTORS_FILE).write_bytes(b"stale")
    (tmp_path / DESCRIPTOR_IDS_FILE).write_bytes(b"stale")
    run(world, engine_dir, tmp_path, batch_size=8)
    assert (
        np.load(tmp_path / DESCRIPTORS_FILE).shape[0]
        == np.load(tmp_path / DESCRIPTOR_IDS_FILE).shape[0]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        CELLS_FILE,
        DESCRIPTOR_IDS_FILE,
        DESCRIPTORS_FILE,
    ]


def test_bad_arguments(world: tuple[Path, Path], engine_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        run(world, engine_dir, tmp_path, batch_size=0)
    with pytest.raises(UsageError):
        run(world, engine_dir, tmp_path, decode_threads=0)


def test_no_progress_output_when_disabled(
    world: tuple[Path, Path], engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(world, engine_dir, tmp_path)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_public_surface() -> None:
    """``__all__`` lists exactly the public names the module defines."""
    assert_public_surface(describe)


def test_import_is_light() -> None:
    assert heavy_imports("cachebuild.localize.describe") == []


# -- reuse through the descriptor store ----------------------------------------


def store_world(root: Path, images: dict[tuple[int, int, int], bytes]) -> tuple[Path, Path]:
    return make_tileset(root, images, root / "store"), root / "store"


def test_reuse_describes_each_image_once(
    tiles_images: dict, engine_dir: Path, tmp_path: Path, described: tuple[Path, dict]
) -> None:
    images = {zxy: encode(rgb) for zxy, rgb in tiles_images.items()}
    w = store_world(tmp_path, images)
    first = run(w, engine_dir, tmp_path / "a", reuse=True)
    assert (first["computed"], first["reused"], first["engine_runs"]) == (12, 0, 12)
    again = run(w, engine_dir, tmp_path / "b", reuse=True)
    assert (again["computed"], again["reused"], again["engine_runs"]) == (0, 12, 0)
    a = np.load(tmp_path / "a" / DESCRIPTORS_FILE)
    np.testing.assert_array_equal(a, np.load(tmp_path / "b" / DESCRIPTORS_FILE))
    # the same vectors as without the store, row for row
    np.testing.assert_allclose(a, np.load(described[0] / DESCRIPTORS_FILE), atol=1e-5)
    np.testing.assert_array_equal(
        np.load(tmp_path / "b" / DESCRIPTOR_IDS_FILE), np.load(described[0] / DESCRIPTOR_IDS_FILE)
    )


def test_a_shifted_tile_set_describes_only_the_new_tiles(
    tiles_images: dict, engine_dir: Path, tmp_path: Path
) -> None:
    images = {zxy: encode(rgb) for zxy, rgb in tiles_images.items()}
    old = dict(sorted(images.items())[:9])
    run(store_world(tmp_path / "old", old), engine_dir, tmp_path / "o", reuse=True)
    # the same store, a tile set moved by one column: 3 tiles new, 6 shared
    new = dict(sorted(images.items())[3:])
    root = tmp_path / "old"
    w = (make_tileset(tmp_path / "new", new, root / "store"), root / "store")
    result = run(w, engine_dir, tmp_path / "n", reuse=True)
    assert (result["computed"], result["reused"]) == (3, 6)


def test_duplicate_images_run_through_the_engine_once(
    tiles_images: dict, engine_dir: Path, tmp_path: Path
) -> None:
    blank = encode(np.full((256, 256, 3), 40, np.uint8))
    images = {(Z, 10, y): blank for y in range(5)}
    images[(Z, 11, 0)] = encode(next(iter(tiles_images.values())))
    w = store_world(tmp_path, images)
    result = run(w, engine_dir, tmp_path / "o", reuse=True, batch_size=2)
    assert (result["computed"], result["engine_runs"]) == (6, 2)
    d = np.load(tmp_path / "o" / DESCRIPTORS_FILE)
    assert all(np.array_equal(d[0], d[i]) for i in range(1, 5))


def test_another_engine_key_describes_everything_again(
    tiles_images: dict, engine_dir: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    w = store_world(tmp_path, {zxy: encode(rgb) for zxy, rgb in list(tiles_images.items())[:4]})
    run(w, engine_dir, tmp_path / "a", reuse=True)
    other = tmp_path / "engine2"
    shutil.copytree(engine_dir, other)
    record = json.loads((other / "engine.json").read_text())
    record["key"] = "0" * 64  # e.g. a new calibration: another key, the same network
    (other / "engine.json").write_text(json.dumps(record))
    result = run(w, other, tmp_path / "b", reuse=True)
    assert (result["computed"], result["reused"]) == (4, 0)
    assert run(w, engine_dir, tmp_path / "c", reuse=True)["computed"] == 0


def test_engine_failure_with_reuse_keeps_what_was_described(
    tiles_images: dict, engine_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = store_world(tmp_path, {zxy: encode(rgb) for zxy, rgb in tiles_images.items()})
    real = describe.load_engine

    class Flaky:
        def __init__(self, runner: Any):
            self.runner, self.calls = runner, 0
            self.descriptor_dim, self.input_hw = runner.descriptor_dim, runner.input_hw

        def run(self, batch: np.ndarray) -> np.ndarray:
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("device lost")
            return self.runner.run(batch)

    monkeypatch.setattr(describe, "load_engine", lambda d, threads=None: Flaky(real(d, threads)))
    with pytest.raises(BuildError, match="device lost"):
        run(w, engine_dir, tmp_path / "o", reuse=True, batch_size=4)
    monkeypatch.setattr(describe, "load_engine", real)
    result = run(w, engine_dir, tmp_path / "o", reuse=True, batch_size=4)
    assert (result["computed"], result["reused"]) == (4, 8)


# -- coverage-map thumbnails made from the pixels decoded for the engine --------


def _thumb_mismatch(store_root: Path, digests: list[bytes]) -> tuple[float, int]:
    """Mean and largest |describe's thumbnail - the preview's decode fallback| over ``digests``."""
    from cachebuild.store.objects import read_object
    from cachebuild.store.thumbs import THUMB_PX, ThumbStore, make_thumbnail

    store = TileStore(store_root)
    with ThumbStore(store_root) as ts:
        kept = ts.lookup(digests)
    assert set(kept) == set(digests)
    diffs = []
    for d in digests:
        mine = np.frombuffer(kept[d], np.uint8).reshape(THUMB_PX, THUMB_PX, 3).astype(int)
        fallback = make_thumbnail(read_object(store.path(d.hex()), what="tile")).astype(int)
        diffs.append(np.abs(mine - fallback))
    all_diffs = np.stack(diffs)
    return float(all_diffs.mean()), int(all_diffs.max())


def test_describe_keeps_a_thumbnail_per_described_image_equal_to_the_decode_fallback(
    tiles_images: dict, engine_dir: Path, tmp_path: Path
) -> None:
    from cachebuild.store.thumbs import ThumbStore

    images = {zxy: encode(rgb) for zxy, rgb in tiles_images.items()}
    images[(Z, 70010, 42010)] = images[
        (Z, 70000, 42000)
    ]  # one image under two tiles: one thumbnail
    w = store_world(tmp_path, images)
    first = run(w, engine_dir, tmp_path / "a", reuse=True, batch_size=5, decode_threads=2)
    assert first["engine_runs"] == first["thumbnails"] == 12
    digests = [bytes.fromhex(TileStore(w[1]).put(data)) for data in images.values()]
    # within rounding and chroma upsampling of libjpeg's 1/8-scale decode (the preview's fallback)
    mean, worst = _thumb_mismatch(w[1], list(dict.fromkeys(digests)))
    assert mean <= 1.5 and worst <= 12, (mean, worst)
    # every descriptor reused: nothing decoded, nothing made again
    again = run(w, engine_dir, tmp_path / "b", reuse=True)
    assert again["engine_runs"] == again["thumbnails"] == 0
    with ThumbStore(w[1]) as ts:
        assert ts.count() == 12


def test_describe_without_thumbnails_or_without_the_store_keeps_none(
    tiles_images: dict, engine_dir: Path, tmp_path: Path
) -> None:
    from cachebuild.store.thumbs import ThumbStore

    images = {zxy: encode(rgb) for zxy, rgb in list(tiles_images.items())[:4]}
    w = store_world(tmp_path, images)
    assert run(w, engine_dir, tmp_path / "n", reuse=False)["thumbnails"] == 0
    off = run(w, engine_dir, tmp_path / "a", reuse=True, thumbnails=False)
    assert off["engine_runs"] == 4 and off["thumbnails"] == 0
    with ThumbStore(w[1]) as ts:
        assert ts.count() == 0


def test_thumbnail_of_a_png_tile_and_an_engine_of_another_size(tmp_path: Path) -> None:
    """Pixels decoded at another size (an engine with a smaller input) are box-resized."""
    from cachebuild.store.thumbs import THUMB_PX, make_thumbnail, thumbnail_of

    rgb = tile_image(7)
    png = encode(rgb, "PNG")
    exact = make_thumbnail(png)
    same = thumbnail_of(decode_tile(io.BytesIO(png), (256, 256))).astype(int)
    assert (
        np.abs(same - exact.astype(int)).max() <= 1
    )  # both an 8x8 box mean of the same pixels; rounding
    small = thumbnail_of(decode_tile(io.BytesIO(png), (200, 224)))
    assert small.shape == (THUMB_PX, THUMB_PX, 3) and small.dtype == np.uint8
    assert np.abs(small.astype(int) - exact.astype(int)).mean() < 6


def test_dask_workers_return_the_thumbnails_the_wrapper_keeps(
    tiles_images: dict, engine_dir: Path, tmp_path: Path
) -> None:
    """DASK_SCHEDULER=local:1: the worker makes each thumbnail from its decode; the same bytes as here."""
    pytest.importorskip("distributed")
    from cachebuild.store.thumbs import ThumbStore

    images = {zxy: encode(rgb) for zxy, rgb in list(tiles_images.items())[:6]}
    here = store_world(tmp_path / "here", images)
    there = store_world(tmp_path / "there", images)
    run(here, engine_dir, tmp_path / "a", reuse=True, batch_size=4)
    result = run(
        there, engine_dir, tmp_path / "b", reuse=True, batch_size=4, dask_scheduler="local:1"
    )
    assert result["executor"] == "dask" and result["engine_runs"] == result["thumbnails"] == 6
    digests = [bytes.fromhex(TileStore(here[1]).put(data)) for data in images.values()]
    with ThumbStore(here[1]) as a, ThumbStore(there[1]) as b:
        kept = b.lookup(digests)
        assert len(kept) == 6 and kept == a.lookup(digests)
