"""Tests for cachebuild.mbtiles, checked with readers we did not write.

Python's sqlite3 reads the schema back; the ``sqlite3`` command-line tool
checks integrity and ``gdalinfo`` (GDAL's MBTiles driver) opens the file as
a raster, when they are installed.
"""

from __future__ import annotations

import doctest
import io
import math
import re
import shutil
import sqlite3
import subprocess
import tracemalloc
import types
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cachebuild import mbtiles
from cachebuild.errors import BuildError, StoreObjectError
from cachebuild.fetch import fetch_tiles
from cachebuild.mbtiles import (
    MBTILES_APPLICATION_ID,
    connect_readonly,
    detect_format,
    read_mbtiles_tile,
    read_tile,
    write_mbtiles,
)
from cachebuild.store import TileStore
from cachebuild.synthetic import synthetic_tile_bytes
from cachebuild.tiles import LngLatBbox, Tile, count_tiles, tile_from_id, tile_id, tiles
from cachebuild.tileset import hex_digests, read_tiles, write_tileset

AREA = LngLatBbox(8.540, 47.370, 8.548, 47.374)
PLANNED = list(tiles(AREA, [17]))


def public_names(mod: types.ModuleType) -> set[str]:
    return {
        n
        for n, v in vars(mod).items()
        if not n.startswith("_")
        and n != "TYPE_CHECKING"
        and not isinstance(v, types.ModuleType)
        and getattr(v, "__module__", mod.__name__) == mod.__name__
    }


def fetched(tmp: Path, area: LngLatBbox = AREA, zooms: list[int] | None = None, spec: str = "synthetic") -> dict[str, Any]:
    return fetch_tiles(
        bbox=area, zooms=zooms or [17], provider_spec=spec, store_root=tmp / "store",
        out_dir=tmp / "build", env={}, progress=False,
    )


def write(tmp: Path, area: LngLatBbox = AREA, zooms: list[int] | None = None, **kw: Any) -> dict[str, int]:
    return write_mbtiles(
        tileset_dir=tmp / "build", store_root=tmp / "store", out_path=tmp / "build" / "tiles.mbtiles",
        name="test cache", bbox=area, zooms=zooms or [17], **kw,
    )


def metadata(path: Path) -> dict[str, str]:
    with closing(sqlite3.connect(path)) as db:
        return dict(db.execute("SELECT name, value FROM metadata"))


def png(colour: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), colour).save(buf, format="PNG")
    return buf.getvalue()


def handmade_tileset(tmp: Path, images: dict[Tile, bytes]) -> None:
    """A tile set whose images are whatever we say, straight into the store."""
    with TileStore(tmp / "store") as store:
        rows = [(tile_id(t), bytes.fromhex(store.put(data))) for t, data in images.items()]
    write_tileset(tmp / "build", np.array(rows, dtype=[("id", "<i8"), ("sha256", "S32")]),
                  np.array([], dtype="<i8"), {})


def test_all_is_complete() -> None:
    assert set(mbtiles.__all__) == public_names(mbtiles)


def test_doctests() -> None:
    assert doctest.testmod(mbtiles).failed == 0


# ------------------------------------------------------------------ the file


def test_schema_metadata_and_tms_rows(tmp_path: Path) -> None:
    fetched(tmp_path)
    out = write(tmp_path)
    path = tmp_path / "build" / "tiles.mbtiles"
    assert out == {"tiles": len(PLANNED), "bytes": path.stat().st_size}

    with closing(sqlite3.connect(path)) as db:
        cols = [r[1] for r in db.execute("PRAGMA table_info(tiles)")]
        assert cols == ["zoom_level", "tile_column", "tile_row", "tile_data"]
        assert [r[1] for r in db.execute("PRAGMA table_info(metadata)")] == ["name", "value"]
        index = {r[1]: r[2] for r in db.execute("PRAGMA index_list(tiles)")}
        assert index == {"tile_index": 1}  # unique
        assert [r[2] for r in db.execute("PRAGMA index_info(tile_index)")] == ["zoom_level", "tile_column", "tile_row"]
        assert db.execute("PRAGMA application_id").fetchone()[0] == MBTILES_APPLICATION_ID
        rows = {(z, x, r): bytes(d) for z, x, r, d in db.execute("SELECT * FROM tiles")}
    assert len(rows) == len(PLANNED)
    for t in PLANNED:
        assert rows[(t.z, t.x, 2**17 - 1 - t.y)] == synthetic_tile_bytes(t)

    meta = metadata(path)
    assert meta["name"] == "test cache"
    assert meta["format"] == "jpg"
    assert meta["bounds"] == "8.54,47.37,8.548,47.374"
    assert meta["center"] == "8.544,47.372,17"
    assert (meta["minzoom"], meta["maxzoom"]) == ("17", "17")
    assert meta["type"] == "baselayer"
    assert meta["scheme"] == "tms"
    assert float(meta["version"]) >= 1  # the tileset's revision, a plain number (spec 1.3)


def test_read_back_through_the_reader(tmp_path: Path) -> None:
    fetched(tmp_path)
    write(tmp_path)
    path = tmp_path / "build" / "tiles.mbtiles"
    for t in PLANNED[:4]:
        assert read_mbtiles_tile(path, t) == synthetic_tile_bytes(t)
    assert read_mbtiles_tile(path, Tile(0, 0, 0)) is None
    with closing(connect_readonly(path)) as db:
        assert read_tile(db, PLANNED[0]) == synthetic_tile_bytes(PLANNED[0])
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db.execute("DELETE FROM tiles")


def test_several_zooms_and_an_antimeridian_box(tmp_path: Path) -> None:
    area = LngLatBbox(179.99, -17.01, -179.99, -17.0)
    fetched(tmp_path, area, [11, 12])
    out = write(tmp_path, area, [12, 11])
    assert out["tiles"] == count_tiles(area, [11, 12])
    meta = metadata(tmp_path / "build" / "tiles.mbtiles")
    assert meta["bounds"] == "-180,-17.01,180,-17"
    lon, lat, zoom = meta["center"].split(",")
    assert abs(float(lon) - 180.0) < 1e-9 or abs(float(lon) + 180.0) < 1e-9
    assert float(lat) == pytest.approx(-17.005)
    assert zoom == "11"
    assert (meta["minzoom"], meta["maxzoom"]) == ("11", "12")


def test_center_of_an_antimeridian_box_lies_inside_it() -> None:
    from cachebuild.mbtiles import _bounds_and_center

    _, center = _bounds_and_center(LngLatBbox(170.0, 0.0, -150.0, 10.0), 5)
    assert center == "-170,5,5"


def test_png_tiles_are_detected(tmp_path: Path) -> None:
    handmade_tileset(tmp_path, {Tile(0, 0, 1): png(), Tile(1, 0, 1): png((9, 9, 9))})
    write(tmp_path, LngLatBbox(-180, 0, 180, 85), [1])
    assert metadata(tmp_path / "build" / "tiles.mbtiles")["format"] == "png"


def test_mixed_formats_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    handmade_tileset(tmp_path, {Tile(0, 0, 1): synthetic_tile_bytes(Tile(0, 0, 1)), Tile(1, 0, 1): png()})
    with pytest.raises(BuildError, match="1/1/0 is png"):
        write(tmp_path, LngLatBbox(-180, 0, 180, 85), [1])
    assert list((tmp_path / "build").glob("*mbtiles*")) == []


def test_a_non_image_is_refused(tmp_path: Path) -> None:
    handmade_tileset(tmp_path, {Tile(0, 0, 1): b"<html>no</html>"})
    with pytest.raises(BuildError, match="not a JPEG"):
        write(tmp_path, LngLatBbox(-180, 0, 180, 85), [1])


def test_a_given_format_is_checked(tmp_path: Path) -> None:
    fetched(tmp_path)
    with pytest.raises(BuildError, match="gif"):
        write(tmp_path, image_format="gif")
    with pytest.raises(BuildError, match="is jpg, the MBTiles file is png"):
        write(tmp_path, image_format="png")


def test_an_empty_tileset_makes_an_empty_file(tmp_path: Path) -> None:
    handmade_tileset(tmp_path, {})
    assert write(tmp_path)["tiles"] == 0
    assert metadata(tmp_path / "build" / "tiles.mbtiles")["format"] == "jpg"


def test_a_missing_or_corrupt_object_is_refused(tmp_path: Path) -> None:
    fetched(tmp_path)
    present = read_tiles(tmp_path / "build")
    t = tile_from_id(int(present["id"][0]))
    with TileStore(tmp_path / "store") as store:
        obj = store.path(hex_digests(present)[0])
    obj.write_bytes(b"bit rot")
    with pytest.raises(StoreObjectError, match=f"{t.z}/{t.x}/{t.y}.*corrupt.*removed"):
        write(tmp_path)
    assert not obj.exists(), "a corrupt object is removed, so the tiles phase fetches it again"
    with pytest.raises(StoreObjectError, match=f"{t.z}/{t.x}/{t.y}.*missing"):
        write(tmp_path)


def test_the_file_is_replaced_atomically(tmp_path: Path) -> None:
    fetched(tmp_path)
    path = tmp_path / "build" / "tiles.mbtiles"
    path.write_bytes(b"the old file")
    write(tmp_path)
    assert metadata(path)["name"] == "test cache"
    assert sorted(p.name for p in path.parent.iterdir() if "mbtiles" in p.name) == ["tiles.mbtiles"]

    # a failed write leaves the previous file as it was
    old = path.read_bytes()
    last = hex_digests(read_tiles(tmp_path / "build"))[-1]
    with TileStore(tmp_path / "store") as store:
        store.path(last).unlink()
    with pytest.raises(BuildError):
        write(tmp_path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in path.parent.iterdir() if "mbtiles" in p.name) == ["tiles.mbtiles"]


def test_tiles_are_streamed_not_held(tmp_path: Path) -> None:
    area = LngLatBbox(8.50, 47.35, 8.53, 47.37)
    fetched(tmp_path, area)
    total = sum(p.stat().st_size for p in (tmp_path / "store" / "objects").rglob("*") if p.is_file())
    tracemalloc.start()
    try:
        out = write(tmp_path, area)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["tiles"] > 100
    assert peak < total / 5, (peak, total)


def test_detect_format() -> None:
    assert detect_format(synthetic_tile_bytes(Tile(0, 0, 0))) == "jpg"
    assert detect_format(png()) == "png"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="WEBP")
    assert detect_format(buf.getvalue()) == "webp"
    assert detect_format(b"") is None


# ------------------------------------------------------------------ other readers


@pytest.fixture
def written(tmp_path: Path) -> Path:
    fetched(tmp_path)
    write(tmp_path)
    return tmp_path / "build" / "tiles.mbtiles"


def test_sqlite3_cli_finds_the_file_sound(written: Path) -> None:
    exe = shutil.which("sqlite3")
    if exe is None:
        pytest.skip("the sqlite3 command-line tool is not installed")
    ok = subprocess.run([exe, str(written), "PRAGMA integrity_check"], capture_output=True, text=True, check=True)
    assert ok.stdout.strip() == "ok"
    n = subprocess.run([exe, str(written), "SELECT count(*) FROM tiles"], capture_output=True, text=True, check=True)
    assert int(n.stdout) == len(PLANNED)


def test_gdal_reads_it_as_mbtiles(written: Path) -> None:
    exe = shutil.which("gdalinfo")
    if exe is None:
        pytest.skip("gdalinfo (GDAL) is not installed")
    info = subprocess.run([exe, str(written)], capture_output=True, text=True, check=True).stdout
    assert "Driver: MBTiles/MBTiles" in info
    size = re.search(r"Size is (\d+), (\d+)", info)
    assert size is not None
    # the raster spans the bounds at zoom 17: pixels = mercator span * 2**17 * 256
    world = 2**17 * 256

    def merc_y(lat: float) -> float:
        s = math.sin(math.radians(lat))
        return (0.5 - math.log((1 + s) / (1 - s)) / (4 * math.pi)) * world

    width = (AREA.east - AREA.west) / 360 * world
    height = merc_y(AREA.south) - merc_y(AREA.north)
    assert abs(int(size.group(1)) - width) <= 2
    assert abs(int(size.group(2)) - height) <= 2
    assert "ZOOM_LEVEL=17" in info or "17" in info


# ------------------------------------------------------------------ as a provider


def test_mbtiles_round_trip_as_a_provider(tmp_path: Path) -> None:
    first = fetched(tmp_path)
    write(tmp_path)
    cache = tmp_path / "build" / "tiles.mbtiles"
    copy = tmp_path / "copy.mbtiles"
    shutil.copyfile(cache, copy)

    again = fetched(tmp_path / "second", spec=str(copy))
    assert again["provider"].startswith("mbtiles:sha256=")
    assert again["fetched"] == len(PLANNED)
    assert again["aggregate_sha256"] == first["aggregate_sha256"]  # same tiles, same hashes
    assert (read_tiles(tmp_path / "second" / "build") == read_tiles(tmp_path / "build")).all()

    # a wider area: what the file lacks is missing, not an error
    wider = LngLatBbox(AREA.west - 0.003, AREA.south, AREA.east, AREA.north)
    s = fetched(tmp_path / "third", wider, spec=str(copy))
    assert s["present"] == len(PLANNED)
    assert s["missing"] == count_tiles(wider, [17]) - len(PLANNED) > 0
