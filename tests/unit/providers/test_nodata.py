"""Tests for cachebuild.providers.nodata: which images count as "no data"."""

from __future__ import annotations

import doctest
import io

import numpy as np
import pytest
from PIL import Image

from cachebuild.errors import UsageError
from cachebuild.providers import nodata
from cachebuild.providers.nodata import NoDataRule, is_uniform
from cachebuild.providers.synthetic import synthetic_tile_bytes
from cachebuild.store.objects import sha256_hex
from cachebuild.tilemath import Tile
from tests.unit.providers.test_providers import public_names


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_all_is_complete_and_doctests() -> None:
    assert set(nodata.__all__) == public_names(nodata)
    assert doctest.testmod(nodata).failed == 0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_flat_images_are_uniform(fmt: str) -> None:
    for colour in [(0, 0, 0), (255, 255, 255), (241, 238, 232)]:
        assert is_uniform(encode(Image.new("RGB", (256, 256), colour), fmt))


def test_transparent_palette_and_grey_images() -> None:
    noisy = np.random.default_rng(1).integers(0, 255, (256, 256, 4), dtype=np.uint8)
    noisy[..., 3] = 0
    assert is_uniform(encode(Image.fromarray(noisy), "PNG"))  # transparent, whatever the colours
    noisy[0, 0, 3] = 255
    assert not is_uniform(encode(Image.fromarray(noisy), "PNG"))
    assert is_uniform(encode(Image.new("P", (256, 256), 3), "PNG"))
    assert is_uniform(encode(Image.new("L", (256, 256), 90), "JPEG"))


def test_imagery_is_not_uniform() -> None:
    assert not is_uniform(synthetic_tile_bytes(Tile(68645, 45903, 17)))
    # a faint gradient beyond the tolerance is imagery, however dull
    ramp = np.tile(np.linspace(100, 106, 256).astype(np.uint8), (256, 1))
    assert not is_uniform(encode(Image.fromarray(ramp), "PNG"))
    ramp2 = np.tile(np.linspace(100, 102, 256).astype(np.uint8), (256, 1))
    assert is_uniform(encode(Image.fromarray(ramp2), "PNG"))
    assert not is_uniform(b"<html>")


def test_rules_from_the_environment() -> None:
    assert NoDataRule.from_env({}) == NoDataRule() and not NoDataRule().active
    assert NoDataRule.from_env({"NODATA": "OFF"}) == NoDataRule()
    digest = "AB" * 32
    rule = NoDataRule.from_env({"NODATA": "uniform", "NODATA_SHA256": f"{digest}, {'cd' * 32}"})
    assert rule.uniform and rule.sha256 == {"ab" * 32, "cd" * 32}
    assert rule.as_value() == {"uniform": True, "sha256": ["ab" * 32, "cd" * 32]}
    for bad in ({"NODATA": "blank"}, {"NODATA_SHA256": "xyz"}, {"NODATA_SHA256": "ab" * 31}):
        with pytest.raises(UsageError, match="NODATA"):
            NoDataRule.from_env(bad)


def test_matching() -> None:
    flat = encode(Image.new("RGB", (256, 256), (9, 9, 9)), "PNG")
    real = synthetic_tile_bytes(Tile(1, 1, 3))
    assert NoDataRule(uniform=True).matches(flat) and not NoDataRule(uniform=True).matches(real)
    by_hash = NoDataRule(sha256=frozenset({sha256_hex(real)}))
    assert by_hash.matches(real) and not by_hash.matches(flat)
    assert by_hash.matches(real, sha256_hex(real))
    assert not NoDataRule().matches(flat)
