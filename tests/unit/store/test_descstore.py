"""Tests for cachebuild.store.descriptors: descriptors keyed by (image hash, engine key)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cachebuild.errors import CacheBuildWarning
from cachebuild.store import descriptors as descstore
from cachebuild.store.descriptors import COMMIT_ROWS, DescriptorStore, engine_store_dirs
from tests._harness.surface import assert_public_surface, heavy_imports

KEY = "ab" * 32
OTHER = "cd" * 32


def digests(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32), dtype=np.uint8)


def vectors(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_append_lookup_read_round_trip(tmp_path: Path) -> None:
    d, v = digests(10), vectors(10)
    with DescriptorStore(tmp_path, KEY, 8) as ds:
        assert (ds.lookup(d)[0] == -1).all()
        with ds.writer() as w:
            w.append(d[:6], v[:6])
            w.append(d[6:], v[6:])
        shard, row = ds.lookup(d[::-1])
        assert (shard >= 0).all()
        np.testing.assert_array_equal(ds.read(shard, row), v[::-1])
        assert ds.count() == 10
    assert engine_store_dirs(tmp_path) == [tmp_path / "descriptors" / KEY]


def test_read_takes_any_order_runs_and_outputs_and_refuses_what_is_not_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(descstore, "SHARD_ROWS", 4)  # rows across three shards
    d, v = digests(10), vectors(10)
    with DescriptorStore(tmp_path, KEY, 8) as ds:
        with ds.writer() as w:
            w.append(d, v)
        order = np.array([2, 3, 4, 5, 9, 0, 1, 1, 7, 6])  # runs, a jump, a repeat, backwards
        shard, row = ds.lookup(d[order])
        assert len(np.unique(shard)) == 3
        np.testing.assert_array_equal(ds.read(shard, row), v[order])
        out = np.zeros((10, 16), dtype=np.float32)[:, ::2]  # not contiguous
        ds.read(shard, row, out=out)
        np.testing.assert_array_equal(out, v[order])
        assert ds.read(shard[:0], row[:0]).shape == (0, 8)
        with pytest.raises(ValueError, match="does not have"):
            ds.read(np.array([-1]), np.array([0]))
        with pytest.raises(ValueError, match="past the end"):
            ds.read(shard[:1], np.array([4]))


def test_another_engine_sees_nothing(tmp_path: Path) -> None:
    d = digests(5)
    with DescriptorStore(tmp_path, KEY, 8) as ds, ds.writer() as w:
        w.append(d, vectors(5))
    with DescriptorStore(tmp_path, OTHER, 8) as other:
        assert (other.lookup(d)[0] == -1).all()


def test_dimension_is_fixed_per_engine(tmp_path: Path) -> None:
    DescriptorStore(tmp_path, KEY, 8).close()
    with pytest.raises(ValueError, match="dim"):
        DescriptorStore(tmp_path, KEY, 16)
    with pytest.raises(ValueError, match="engine key"):
        DescriptorStore(tmp_path, "not-a-key", 8)


def test_rows_are_visible_to_others_only_once_committed(tmp_path: Path) -> None:
    d, v = digests(COMMIT_ROWS + 5), vectors(COMMIT_ROWS + 5)
    ds = DescriptorStore(tmp_path, KEY, 8)
    reader = DescriptorStore(tmp_path, KEY, 8)
    w = ds.writer()
    w.append(d[:5], v[:5])
    assert (reader.lookup(d[:5])[0] == -1).all(), "not committed yet"
    w.append(d[5:], v[5:])  # crosses COMMIT_ROWS: committed
    assert (reader.lookup(d[:COMMIT_ROWS])[0] >= 0).all()
    w.close()
    shard, row = reader.lookup(d)
    np.testing.assert_array_equal(reader.read(shard, row), v)


def test_first_descriptor_of_an_image_wins(tmp_path: Path) -> None:
    d = digests(3)
    with DescriptorStore(tmp_path, KEY, 8) as ds:
        with ds.writer() as a, ds.writer() as b:
            a.append(d, vectors(3, seed=1))
            b.append(d, vectors(3, seed=2))  # another build described the same images
            a.commit()  # the first to commit is kept; b's rows are unreachable garbage
        shard, row = ds.lookup(d)
        np.testing.assert_array_equal(ds.read(shard, row), vectors(3, seed=1))
        assert ds.count() == 3


def test_a_torn_shard_is_described_again(tmp_path: Path) -> None:
    d, v = digests(4), vectors(4)
    with DescriptorStore(tmp_path, KEY, 8) as ds:
        with ds.writer() as w:
            w.append(d, v)
        (shard_file,) = ds.shards_dir.iterdir()
        data = shard_file.read_bytes()
        shard_file.write_bytes(data[: 2 * 32 + 5])  # rows 0 and 1 whole, row 2 torn
        with pytest.warns(CacheBuildWarning, match=f"2 in shard {shard_file.stem}.*computed again"):
            shard, _ = ds.lookup(d)
        assert (shard[:2] >= 0).all() and (shard[2:] == -1).all()
        # the dead rows are dropped from the index: described again, they are found
        with ds.writer() as w:
            w.append(d[2:], v[2:])
        shard, row = ds.lookup(d)
        assert (shard >= 0).all()
        assert np.array_equal(ds.read(shard, row), v)


def test_killed_writer_keeps_committed_rows(tmp_path: Path) -> None:
    code = f"""
import os, numpy as np
from cachebuild.store.descriptors import DescriptorStore, COMMIT_ROWS
ds = DescriptorStore({str(tmp_path)!r}, {KEY!r}, 8)
w = ds.writer()
rng = np.random.default_rng(0)
d = rng.integers(0, 256, (COMMIT_ROWS + 10, 32), dtype=np.uint8)
w.append(d[:COMMIT_ROWS], np.ones((COMMIT_ROWS, 8), np.float32))  # a full batch: committed
w.append(d[COMMIT_ROWS:], np.ones((10, 8), np.float32))
os._exit(9)  # no close: the last 10 rows were never committed
"""
    subprocess.run([sys.executable, "-c", code], check=False)
    with DescriptorStore(tmp_path, KEY, 8) as ds:
        d = np.random.default_rng(0).integers(0, 256, (COMMIT_ROWS + 10, 32), dtype=np.uint8)
        shard, row = ds.lookup(d)
        assert (shard[:COMMIT_ROWS] >= 0).all() and (shard[COMMIT_ROWS:] == -1).all()
        assert (ds.read(shard[:COMMIT_ROWS], row[:COMMIT_ROWS]) == 1).all()


def test_shards_roll_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(descstore, "SHARD_ROWS", 7)
    d, v = digests(20), vectors(20)
    with DescriptorStore(tmp_path, KEY, 8) as ds:
        with ds.writer() as w:
            shard, row = w.append(d, v)
        assert len(set(shard.tolist())) == 3 and row.max() == 6
        assert len(list(ds.shards_dir.iterdir())) == 3
        np.testing.assert_array_equal(ds.read(*ds.lookup(d)), v)


def test_import_is_light() -> None:
    assert (
        heavy_imports("cachebuild.store.descriptors", heavy=("numpy", "onnxruntime", "faiss")) == []
    )


def test_public_surface() -> None:
    """``__all__`` lists exactly the public names the module defines."""
    assert_public_surface(descstore)
