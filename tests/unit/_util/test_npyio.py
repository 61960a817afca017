"""Tests for cachebuild._util.npyio: .npy files written and read in row chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cachebuild._util import npyio
from cachebuild._util.npyio import NpyRowWriter, gather_npy_rows, iter_npy_rows, npy_shape
from tests._harness.surface import assert_public_surface


def test_written_in_chunks_numpy_reads_it(tmp_path: Path) -> None:
    a = np.random.default_rng(0).standard_normal((1000, 7)).astype(np.float32)
    path = tmp_path / "a.npy"
    with NpyRowWriter(path, "<f4", a.shape) as w:
        for s in range(0, 1000, 333):
            w.write(a[s : s + 333])
    np.testing.assert_array_equal(np.load(path), a)
    assert npy_shape(path) == ((1000, 7), np.dtype("<f4"))
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_short_or_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.arange(3))
    with pytest.raises(ValueError, match="2 of 3 rows"):
        with NpyRowWriter(path, "<i8", (3,)) as w:
            w.write(np.arange(2))
    with pytest.raises(RuntimeError):
        with NpyRowWriter(path, "<i8", (3,)) as w:
            w.write(np.arange(3))
            raise RuntimeError("interrupted")
    assert np.load(path).tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]
    w = NpyRowWriter(path, "<i8", (1,))
    with pytest.raises(ValueError, match="more than 1 rows"):
        w.write(np.arange(2))
    with pytest.raises(ValueError, match="rows of shape"):
        w.write(np.zeros((1, 2)))
    w.abort()


@pytest.mark.parametrize("chunk", [1, 3, 10, 1000])
def test_iter_rows_in_chunks(tmp_path: Path, chunk: int) -> None:
    a = np.arange(30, dtype=np.int64).reshape(10, 3)
    np.save(tmp_path / "a.npy", a)
    parts = [(s, c.copy()) for s, c in iter_npy_rows(tmp_path / "a.npy", chunk_rows=chunk)]
    assert [s for s, _ in parts] == list(range(0, 10, chunk))
    np.testing.assert_array_equal(np.concatenate([c for _, c in parts]), a)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((100, 4), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        list(iter_npy_rows(path, chunk_rows=30))


def test_gather_rows_any_order_with_repeats(tmp_path: Path) -> None:
    a = np.random.default_rng(1).standard_normal((5000, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    rows = np.array([4999, 0, 17, 17, 2500, 1])
    np.testing.assert_array_equal(gather_npy_rows(tmp_path / "a.npy", rows), a[rows])
    assert gather_npy_rows(tmp_path / "a.npy", []).shape == (0, 4)
    with pytest.raises(IndexError):
        gather_npy_rows(tmp_path / "a.npy", [5000])


def test_public_surface() -> None:
    """``__all__`` lists exactly the public names the module defines."""
    assert_public_surface(npyio)
