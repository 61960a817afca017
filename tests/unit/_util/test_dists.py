"""Tests for cachebuild._util.dists: the one lookup of an installed distribution's version."""

from __future__ import annotations

from importlib import metadata

from cachebuild._util.dists import installed_version


def test_the_first_installed_name_answers_with_its_version() -> None:
    numpy = metadata.version("numpy")
    assert installed_version("numpy") == ("numpy", numpy)
    assert installed_version("no-such-dist-cachebuild", "numpy", "pillow") == ("numpy", numpy)


def test_none_when_no_name_is_installed() -> None:
    assert installed_version("no-such-dist-cachebuild") is None
    assert installed_version() is None
