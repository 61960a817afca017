"""A build whose tiles were all missing, then one that has them: real doit runs.

The first build fails the coverage check (exit 22) with an empty MBTiles
file staged; the next one, with a provider that has the tiles, must update
or rewrite that file and publish, whatever kind of provider it is.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachebuild.tilemath import Tile
from tests._harness import tileserver
from tests.conftest import write_flight

ARGS = ("BUFFER_M=200", "ZOOM=17")


def assert_published(result: Any, cb: Any) -> None:
    assert result.code == 0, result.stderr
    assert result.report["outcome"] == "success"
    assert result.report["tiles"]["missing"] == 0
    assert "Traceback" not in result.stderr
    verify = cb.run("verify-cache")
    assert verify.code == 0, verify.stderr


def first_build_finds_nothing(cb: Any, flight: Path, provider: str) -> None:
    first = cb.build(f"FLIGHT={flight}", f"PROVIDER={provider}", *ARGS)
    assert first.code == 22, first.stderr
    assert first.report["tiles"]["planned"] == first.report["tiles"]["missing"] > 0


def test_a_wrong_area_mbtiles_then_the_right_one(cb: Any, tmp_path: Path) -> None:
    # two MBTiles providers made by cachebuild itself: one of another area, one of this one
    maker = type(cb)(home=tmp_path / "maker")
    maker.home.mkdir()
    made = {}
    for name, lat in (("far", 46.0), ("here", 47.37)):
        built = maker.build(f"FLIGHT={write_flight(tmp_path / f'{name}.json', lat=lat)}", *ARGS)
        assert built.code == 0, built.stderr
        made[name] = tmp_path / f"{name}.mbtiles"
        shutil.copyfile(maker.current / "tiles.mbtiles", made[name])
    flight = write_flight(tmp_path / "flight.json")
    first_build_finds_nothing(cb, flight, str(made["far"]))
    second = cb.build(f"FLIGHT={flight}", f"PROVIDER={made['here']}", *ARGS)
    assert_published(second, cb)
    again = cb.build(f"FLIGHT={flight}", f"PROVIDER={made['here']}", *ARGS)
    assert again.code == 0 and again.report["outcome"] == "up_to_date", again.stderr


def test_an_empty_tile_directory_filled_later(cb: Any, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    flight = write_flight(tmp_path / "flight.json")
    first_build_finds_nothing(cb, flight, str(tree))
    planned = json.loads((cb.cache_dir / "state" / "build" / "tileset.json").read_text())["planned"]
    from cachebuild.tileset import read_missing

    ids = read_missing(cb.cache_dir / "state" / "build")
    assert len(ids) == planned
    from cachebuild.tilemath import tile_from_id

    for tid in ids.tolist():
        t = tile_from_id(int(tid))
        path = tree / str(t.z) / str(t.x) / f"{t.y}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tileserver.tile_bytes(t))
    assert_published(cb.build(f"FLIGHT={flight}", f"PROVIDER={tree}", *ARGS), cb)


class _EmptyAtFirst(tileserver.TileServer):
    """A tile server that has no tile until ``filled`` is set."""

    filled = False

    def is_missing(self, t: Tile) -> bool:
        return not self.filled


@pytest.fixture
def empty_server() -> Iterator[_EmptyAtFirst]:
    srv = _EmptyAtFirst()
    yield srv
    srv.close()


def test_an_xyz_server_without_the_tiles_then_with_them(
    cb: Any, tmp_path: Path, empty_server: Any
) -> None:
    template = f"http://127.0.0.1:{empty_server.port}/{{z}}/{{x}}/{{y}}.jpg"
    flight = write_flight(tmp_path / "flight.json")
    first_build_finds_nothing(cb, flight, template)
    empty_server.filled = True
    assert_published(
        cb.build(f"FLIGHT={flight}", f"PROVIDER={template}", "RETRY_MISSING=1", *ARGS), cb
    )
