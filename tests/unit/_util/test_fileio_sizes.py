"""Tests for cachebuild._util.fileio and cachebuild._util.sizes: their surface, and a copy both ways."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachebuild._util import dists, fileio, sizes
from cachebuild._util.fileio import copy_file
from cachebuild._util.sizes import human_bytes
from tests._harness.surface import assert_public_surface


def test_public_surface() -> None:
    for module in (fileio, sizes, dists):
        assert_public_surface(module)


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_file_copies_every_byte(tmp_path: Path, monkeypatch, kernel: bool) -> None:
    """In the kernel where os.copy_file_range exists, else through Python: the same bytes."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * fileio.CHUNK + 17))
    if not kernel:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    copy_file(src, tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
    with pytest.raises(FileExistsError):  # a new file only
        copy_file(src, tmp_path / "dst")


def test_human_bytes_past_the_last_unit() -> None:
    assert human_bytes(2 * 1024**5) == "2.0 PiB"
    assert human_bytes(3 * 1024**6) == "3072.0 PiB"
