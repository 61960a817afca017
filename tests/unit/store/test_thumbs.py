"""Tile thumbnails: made from image bytes, box-averaged, kept in the store by hash."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cachebuild.store.thumbs import THUMB_PX, ThumbStore, downsample, make_thumbnail


def _image(fmt: str, seed: int = 0) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    # smooth content (8x8 blocks of one colour), so JPEG keeps it closely
    blocks = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    rgb = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue(), rgb


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_thumbnail_is_the_tile_box_averaged(fmt: str) -> None:
    data, rgb = _image(fmt)
    th = make_thumbnail(data)
    assert th.shape == (THUMB_PX, THUMB_PX, 3) and th.dtype == np.uint8
    k = 256 // THUMB_PX
    expected = rgb.reshape(THUMB_PX, k, THUMB_PX, k, 3).mean(axis=(1, 3))
    assert np.abs(th.astype(float) - expected).mean() < (4 if fmt == "JPEG" else 1)


def test_downsample_matches_a_block_mean() -> None:
    rng = np.random.default_rng(1)
    thumbs = rng.integers(0, 256, size=(5, THUMB_PX, THUMB_PX, 3), dtype=np.uint8)
    for px in (16, 8, 4, 2, 1):
        k = THUMB_PX // px
        mean = thumbs.reshape(5, px, k, px, k, 3).astype(float).mean(axis=(2, 4))
        got = downsample(thumbs, px)
        assert got.shape == (5, px, px, 3)
        assert np.abs(got - mean).max() <= 1, px  # rounding only; no bleeding between thumbnails
    assert downsample(thumbs, THUMB_PX) is thumbs
    assert downsample(thumbs[:0], 4).shape == (0, 4, 4, 3)
    with pytest.raises(ValueError, match="does not divide"):
        downsample(thumbs, 3)


def test_not_an_image_is_an_error() -> None:
    with pytest.raises((OSError, ValueError)):
        make_thumbnail(b"<html>rate limited</html>")


def test_store_keeps_the_first_and_ignores_damaged_rows(tmp_path: Path) -> None:
    a, b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    px_a = make_thumbnail(_image("PNG", 1)[0]).tobytes()
    with ThumbStore(tmp_path) as ts:
        assert ts.lookup([a, b]) == {}
        assert ts.put([(a, px_a)]) == 1
        ts.put([(a, bytes(len(px_a)))])  # a second writer's copy of the same image: the first stays
    with ThumbStore(tmp_path) as ts:  # reopened: it persisted
        assert ts.lookup([a, b, a]) == {a: px_a}
        assert ts.count() == 1
        ts.conn().execute("INSERT INTO thumbs (sha256, px) VALUES (?, ?)", (b, b"short"))
        assert ts.lookup([b]) == {}, "a row of the wrong size is not a thumbnail"
    assert (tmp_path / "thumbs" / "thumbs.sqlite").is_file()


def test_lookup_many(tmp_path: Path) -> None:
    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(2500)]  # several query chunks
    px = bytes(THUMB_PX * THUMB_PX * 3)
    with ThumbStore(tmp_path) as ts:
        ts.put((k, px) for k in keys[::2])
        found = ts.lookup(keys)
    assert set(found) == set(keys[::2])


def test_thumbnail_batches_round_trip_and_refuse_another_format() -> None:
    from cachebuild.localize.s3desc import _decode_thumbs, _encode_thumbs

    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(3)]
    px = [bytes([i]) * (THUMB_PX * THUMB_PX * 3) for i in range(3)]
    data = _encode_thumbs(keys, px)
    assert _decode_thumbs(data) == list(zip(keys, px))
    assert _decode_thumbs(data[:-1]) is None
    assert _decode_thumbs(b"CBDESC1\n" + data[8:]) is None


def test_thumbnails_travel_through_the_bucket(tmp_path: Path) -> None:
    """pull/push around describe, against a real S3 server (moto) on 127.0.0.1."""
    import json
    import secrets

    pytest.importorskip("moto.server")
    from cachebuild.localize.s3desc import pull_descriptors, push_descriptors
    from cachebuild.store.s3 import S3Store, StoreURL
    from cachebuild.tileset import tile_dtype, write_tileset
    from tests._harness.s3server import S3Server

    build = tmp_path / "build"
    (build / "engine").mkdir(parents=True)
    (build / "engine" / "engine.json").write_text(
        json.dumps({"key": "ab" * 32, "descriptor_dim": 8})
    )
    # three images in two cells (cells are 32 x 32 tiles)
    digests = [hashlib.sha256(b"img%d" % i).digest() for i in range(3)]
    ids = [(17 << 58) | (x << 29) | 7 for x in (1, 2, 40)]
    write_tileset(
        build, np.array(list(zip(ids, digests)), dtype=tile_dtype()), np.zeros(0, "<i8"), {}
    )
    pixels = {d: make_thumbnail(_image("PNG", i)[0]).tobytes() for i, d in enumerate(digests)}

    s3 = S3Server(tmp_path, bucket=f"maps-{secrets.token_hex(4)}")
    try:
        remote = S3Store(StoreURL(s3.bucket, "p"), client=s3.client())

        def cycle(store: Path) -> None:  # what a build's describe does around the engine
            push_descriptors(remote, store, build, pull_descriptors(remote, store, build))

        # machine A has every thumbnail, the bucket none: all go up, one batch per cell
        with ThumbStore(tmp_path / "a") as ts:
            ts.put(pixels.items())
        cycle(tmp_path / "a")
        batches = s3.keys("p/thumbs/")
        assert len(batches) == 2 and all(k.endswith(".bin") for k in batches)
        # machine B has none: it gets them all, and uploads nothing
        cycle(tmp_path / "b")
        with ThumbStore(tmp_path / "b") as ts:
            assert ts.lookup(digests) == pixels
        # machine C has them all: it reads no batch, uploads nothing
        with ThumbStore(tmp_path / "c") as ts:
            ts.put(pixels.items())
        cycle(tmp_path / "c")
        assert s3.keys("p/thumbs/") == batches
        # a damaged batch is never used: removed, and the next machine that has them uploads them anew
        from cachebuild.localize.s3desc import _decode_thumbs

        lost = {d for d, _ in _decode_thumbs(s3.read(batches[0])) or []}
        s3.write(batches[0], s3.read(batches[0])[:-1] + b"!")
        cycle(tmp_path / "d")
        with ThumbStore(tmp_path / "d") as ts:
            got = ts.lookup(digests)
        assert (
            lost
            and set(got) == set(digests) - lost
            and all(pixels[d] == px for d, px in got.items())
        )
        assert batches[0] not in s3.keys("p/thumbs/")
        cycle(tmp_path / "a")
        assert sorted(s3.keys("p/thumbs/")) == sorted(
            batches
        )  # the same thumbnails, the same names
    finally:
        s3.close()
