"""Tests for cachebuild.tiles.mbtiles, checked with readers we did not write.

Python's sqlite3 reads the schema back; the ``sqlite3`` command-line tool
checks integrity and ``gdalinfo`` (GDAL's MBTiles driver) opens the file as
a raster, when they are installed.
"""

from __future__ import annotations

import doctest
import hashlib
import io
import json
import math
import os
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

from cachebuild.errors import BuildError, CacheBuildWarning, StoreObjectError
from cachebuild.providers.mbtilesfile import connect_readonly, read_mbtiles_tile, read_tile
from cachebuild.providers.synthetic import synthetic_tile_bytes
from cachebuild.store.objects import TileStore
from cachebuild.tilemath import LngLatBbox, Tile, count_tiles, tile_from_id, tile_id, tiles
from cachebuild.tiles import mbtiles
from cachebuild.tiles.fetch import fetch_tiles
from cachebuild.tiles.mbtiles import MBTILES_APPLICATION_ID, detect_format, write_mbtiles
from cachebuild.tileset import hex_digests, read_tiles, write_tileset
from tests._harness.surface import own_public_names

AREA = LngLatBbox(8.540, 47.370, 8.548, 47.374)
RECORD = ".tiles.mbtiles.rows"  # the writer's record beside the file
PLANNED = list(tiles(AREA, [17]))


def public_names(mod: types.ModuleType) -> set[str]:
    return own_public_names(mod)


def fetched(
    tmp: Path, area: LngLatBbox = AREA, zooms: list[int] | None = None, spec: str = "synthetic"
) -> dict[str, Any]:
    return fetch_tiles(
        bbox=area,
        zooms=zooms or [17],
        provider_spec=spec,
        store_root=tmp / "store",
        out_dir=tmp / "build",
        env={},
        progress=False,
    )


def write(
    tmp: Path, area: LngLatBbox = AREA, zooms: list[int] | None = None, **kw: Any
) -> dict[str, int]:
    return write_mbtiles(
        tileset_dir=tmp / "build",
        store_root=tmp / "store",
        out_path=tmp / "build" / "tiles.mbtiles",
        name="test cache",
        bbox=area,
        zooms=zooms or [17],
        **kw,
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
    write_tileset(
        tmp / "build",
        np.array(rows, dtype=[("id", "<i8"), ("sha256", "S32")]),
        np.array([], dtype="<i8"),
        {},
    )


def test_all_is_complete() -> None:
    assert set(mbtiles.__all__) == public_names(mbtiles)


def test_doctests() -> None:
    assert doctest.testmod(mbtiles).failed == 0


# ------------------------------------------------------------------ the file


def test_schema_metadata_and_tms_rows(tmp_path: Path) -> None:
    fetched(tmp_path)
    out = write(tmp_path)
    path = tmp_path / "build" / "tiles.mbtiles"
    assert out == {
        "tiles": len(PLANNED),
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "mode": "full",
        "inserted": len(PLANNED),
        "deleted": 0,
    }

    with closing(sqlite3.connect(path)) as db:
        cols = [r[1] for r in db.execute("PRAGMA table_info(tiles)")]
        assert cols == ["zoom_level", "tile_column", "tile_row", "tile_data"]
        assert [r[1] for r in db.execute("PRAGMA table_info(metadata)")] == ["name", "value"]
        index = {r[1]: r[2] for r in db.execute("PRAGMA index_list(tiles)")}
        assert index == {"tile_index": 1}  # unique
        assert [r[2] for r in db.execute("PRAGMA index_info(tile_index)")] == [
            "zoom_level",
            "tile_column",
            "tile_row",
        ]
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
    from cachebuild.tiles.mbtiles import _bounds_and_center

    _, center = _bounds_and_center(LngLatBbox(170.0, 0.0, -150.0, 10.0), 5)
    assert center == "-170,5,5"


def test_png_tiles_are_detected(tmp_path: Path) -> None:
    handmade_tileset(tmp_path, {Tile(0, 0, 1): png(), Tile(1, 0, 1): png((9, 9, 9))})
    write(tmp_path, LngLatBbox(-180, 0, 180, 85), [1])
    assert metadata(tmp_path / "build" / "tiles.mbtiles")["format"] == "png"


def test_mixed_formats_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    handmade_tileset(
        tmp_path, {Tile(0, 0, 1): synthetic_tile_bytes(Tile(0, 0, 1)), Tile(1, 0, 1): png()}
    )
    with pytest.raises(BuildError, match="1/1/0 is png"):
        write(tmp_path, LngLatBbox(-180, 0, 180, 85), [1])
    assert list((tmp_path / "build").glob("*mbtiles*")) == []
    assert list((tmp_path / "build").glob(".*mbtiles*")) == []


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
    assert sorted(p.name for p in path.parent.iterdir() if "mbtiles" in p.name) == [
        RECORD,
        "tiles.mbtiles",
    ]

    # a failed write leaves the previous file as it was
    old = path.read_bytes()
    last = hex_digests(read_tiles(tmp_path / "build"))[-1]
    with TileStore(tmp_path / "store") as store:
        store.path(last).unlink()
    with pytest.raises(BuildError):
        write(tmp_path, incremental=False)  # an update would not read the unchanged tile
    assert path.read_bytes() == old
    assert sorted(p.name for p in path.parent.iterdir() if "mbtiles" in p.name) == [
        RECORD,
        "tiles.mbtiles",
    ]


def test_tiles_are_streamed_not_held(tmp_path: Path) -> None:
    area = LngLatBbox(8.50, 47.35, 8.53, 47.37)
    fetched(tmp_path, area)
    total = sum(
        p.stat().st_size for p in (tmp_path / "store" / "objects").rglob("*") if p.is_file()
    )
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
    ok = subprocess.run(
        [exe, str(written), "PRAGMA integrity_check"], capture_output=True, text=True, check=True
    )
    assert ok.stdout.strip() == "ok"
    n = subprocess.run(
        [exe, str(written), "SELECT count(*) FROM tiles"],
        capture_output=True,
        text=True,
        check=True,
    )
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


# ------------------------------------------------------------------ updating the previous file


def grid(x0: int, y0: int, w: int, h: int, z: int = 17) -> list[Tile]:
    return [Tile(x, y, z) for x in range(x0, x0 + w) for y in range(y0, y0 + h)]


def other_image(t: Tile) -> bytes:
    """Another JPEG for the same tile: new imagery at the same z/x/y."""
    return synthetic_tile_bytes(Tile(t.x + 5000, t.y, t.z))


def all_rows(path: Path) -> list[tuple[int, int, int, bytes]]:
    with closing(sqlite3.connect(path)) as db:
        return [
            (z, x, r, bytes(d))
            for z, x, r, d in db.execute(
                "SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles ORDER BY 1, 2, 3"
            )
        ]


def scratch(tmp: Path, area: LngLatBbox = AREA, zooms: list[int] | None = None) -> Path:
    """The same tile set written from scratch elsewhere: what an update must equal."""
    out = tmp / "scratch" / "tiles.mbtiles"
    write_mbtiles(
        tileset_dir=tmp / "build",
        store_root=tmp / "store",
        out_path=out,
        name="test cache",
        bbox=area,
        zooms=zooms or [17],
        incremental=False,
    )
    return out


def assert_same_as_scratch(
    tmp: Path, area: LngLatBbox = AREA, zooms: list[int] | None = None
) -> None:
    path = tmp / "build" / "tiles.mbtiles"
    ref = scratch(tmp, area, zooms)
    assert all_rows(path) == all_rows(ref)
    assert metadata(path) == metadata(ref)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA application_id").fetchone()[0] == MBTILES_APPLICATION_ID
        assert {r[1]: r[2] for r in db.execute("PRAGMA index_list(tiles)")} == {"tile_index": 1}


X0, Y0 = 68640, 45900


def test_an_update_equals_a_write_from_scratch(tmp_path: Path) -> None:
    """Removed tiles, added tiles and new imagery at the same z/x/y: only those rows change."""
    first = grid(X0, Y0, 10, 8)
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in first})
    assert write(tmp_path)["mode"] == "full"
    path = tmp_path / "build" / "tiles.mbtiles"
    published = tmp_path / "published.mbtiles"
    os.link(path, published)  # what publish does: the old file must not change
    old_bytes = published.read_bytes()

    shifted = grid(X0 + 1, Y0, 10, 8)  # one column gone, one new
    changed = set(shifted[20:23])
    handmade_tileset(
        tmp_path, {t: other_image(t) if t in changed else synthetic_tile_bytes(t) for t in shifted}
    )
    area = LngLatBbox(8.541, 47.370, 8.549, 47.374)
    out = write(tmp_path, area)
    assert out["mode"] == "updated"
    assert (out["inserted"], out["deleted"]) == (8 + 3, 8 + 3)
    assert out["tiles"] == len(shifted)
    assert out["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_same_as_scratch(tmp_path, area)
    rows = {(z, x, r): d for z, x, r, d in all_rows(path)}
    t = next(iter(changed))
    assert rows[(t.z, t.x, 2**17 - 1 - t.y)] == other_image(t)
    assert metadata(path)["bounds"] == "8.541,47.37,8.549,47.374"
    assert published.read_bytes() == old_bytes and not os.path.samefile(published, path)

    # and again: the record of the updated file is right too
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0 + 2, Y0, 10, 8)})
    assert write(tmp_path)["mode"] == "updated"
    assert_same_as_scratch(tmp_path)


def test_an_unchanged_tile_set_reads_nothing_from_the_store(tmp_path: Path) -> None:
    fetched(tmp_path)
    write(tmp_path)
    shutil.rmtree(tmp_path / "store" / "objects")
    out = write(tmp_path, zooms=[17, 18])  # other zooms: only the metadata changes
    assert (out["mode"], out["inserted"], out["deleted"]) == ("updated", 0, 0)
    assert metadata(tmp_path / "build" / "tiles.mbtiles")["maxzoom"] == "18"


def _damage_keeping_stat(path: Path, where: str = "blob") -> None:
    """Flip a byte in a tile's blob (or garble the tiles table's root page), in place, and put the mtime back."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    if where == "blob":
        i = data.rfind(b"\xff\xd9")  # the end of the last JPEG in the file
        data[i - 100] ^= 0x40
    else:  # every page but the schema's: the update's own DELETE then fails on a malformed file
        page = int.from_bytes(data[16:18], "big")
        data[page:] = bytes(len(data) - page)
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize(
    "damage", ["truncated", "same-stat", "same-stat-pages", "foreign", "no-record", "bad-record"]
)
def test_a_file_that_is_not_the_recorded_one_is_written_in_full(
    tmp_path: Path, damage: str
) -> None:
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0, Y0, 6, 6)})
    write(tmp_path)
    path = tmp_path / "build" / "tiles.mbtiles"
    record = tmp_path / "build" / RECORD
    if damage == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "same-stat":
        _damage_keeping_stat(path)
    elif damage == "same-stat-pages":
        _damage_keeping_stat(path, "pages")
    elif damage == "foreign":
        shutil.copyfile(path, tmp_path / "copy")
        os.replace(tmp_path / "copy", path)  # same bytes, but not the file written here
    elif damage == "no-record":
        record.unlink()
    else:
        record.write_bytes(record.read_bytes()[:-7] + b"garbage")
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0 + 1, Y0, 6, 6)})
    if damage.startswith("same-stat"):
        with pytest.warns(CacheBuildWarning, match="does not hash to what was written there"):
            out = write(tmp_path)
    else:
        out = write(tmp_path)
    assert out["mode"] == "full"
    assert_same_as_scratch(tmp_path)
    assert [p.name for p in path.parent.iterdir() if ".tmp-" in p.name] == []


def test_an_update_without_copy_file_range_copies_through_python(
    tmp_path: Path, monkeypatch
) -> None:
    """A filesystem without copy_file_range (ENOSYS, EXDEV...): the update copies by read and write."""
    import errno

    from cachebuild.tiles import mbtiles as mbtiles_module

    calls = []
    real = os.copy_file_range

    def unsupported(*args: object) -> int:
        calls.append(args)
        if len(calls) > 1:  # the first call copied part of the file: the rest is copied by Python
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(*args[:2], 4096)  # type: ignore[arg-type]

    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0, Y0, 6, 6)})
    write(tmp_path)
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0 + 1, Y0, 6, 6)})
    monkeypatch.setattr(mbtiles_module.os, "copy_file_range", unsupported, raising=True)
    try:
        out = write(tmp_path)
    finally:
        monkeypatch.undo()
    assert len(calls) == 2 and out["mode"] == "updated"
    assert_same_as_scratch(tmp_path)


def test_an_update_where_os_has_no_copy_file_range(tmp_path: Path, monkeypatch) -> None:
    """macOS and other systems without os.copy_file_range: the copy goes through Python."""
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0, Y0, 6, 6)})
    write(tmp_path)
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0 + 1, Y0, 6, 6)})
    monkeypatch.delattr(os, "copy_file_range")
    try:
        out = write(tmp_path)
    finally:
        monkeypatch.undo()
    assert out["mode"] == "updated"
    assert_same_as_scratch(tmp_path)


def test_when_most_tiles_are_new_the_file_is_written_in_full(tmp_path: Path) -> None:
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0, Y0, 6, 6)})
    write(tmp_path)
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0 + 4, Y0, 6, 6)})
    assert write(tmp_path)["mode"] == "full"
    assert_same_as_scratch(tmp_path)


def test_an_area_that_shrank_is_written_in_full_not_left_large(tmp_path: Path) -> None:
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0, Y0, 10, 6)})
    write(tmp_path)
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0, Y0, 7, 6)})
    assert write(tmp_path)["mode"] == "full"  # 30% of the pages would be free
    assert_same_as_scratch(tmp_path)
    path = tmp_path / "build" / "tiles.mbtiles"
    assert path.stat().st_size == (tmp_path / "scratch" / "tiles.mbtiles").stat().st_size


def test_a_new_tile_of_another_format_gets_the_full_writes_error(tmp_path: Path) -> None:
    first = grid(X0, Y0, 6, 6)
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in first})
    write(tmp_path)
    images = {t: synthetic_tile_bytes(t) for t in first}
    images[first[-1]] = png()
    handmade_tileset(tmp_path, images)
    t = first[-1]
    with pytest.raises(BuildError, match=f"{t.z}/{t.x}/{t.y} is png, the MBTiles file is jpg"):
        write(tmp_path)
    with pytest.raises(BuildError, match="is jpg, the MBTiles file is png"):
        write(tmp_path, image_format="png")  # another format asked for: written in full


def test_many_shifts_keep_the_file_the_size_of_a_fresh_one(tmp_path: Path) -> None:
    """Free pages are reused by the next inserts: twelve shifts, no growth."""
    path = tmp_path / "build" / "tiles.mbtiles"
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0, Y0, 8, 8)})
    write(tmp_path)
    for step in range(1, 13):
        handmade_tileset(
            tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0 + step, Y0 + step % 2, 8, 8)}
        )
        assert write(tmp_path)["mode"] == "updated"
        with closing(sqlite3.connect(path)) as db:
            pages, free = (
                db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count")
            )
        assert free <= mbtiles.MAX_FREE_SHARE * pages
    assert_same_as_scratch(tmp_path)
    fresh = (tmp_path / "scratch" / "tiles.mbtiles").stat().st_size
    assert path.stat().st_size <= 1.1 * fresh, (path.stat().st_size, fresh)


def test_the_hash_is_remembered_for_the_manifest(tmp_path: Path) -> None:
    from cachebuild._util.statcache import HASH_CACHE_NAME, HashCache, stat_key

    fetched(tmp_path)
    cache_file = tmp_path / "build" / HASH_CACHE_NAME
    write(tmp_path, hash_cache=cache_file)
    path = tmp_path / "build" / "tiles.mbtiles"
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    # remembered with the file's stat (a lookup trusts it once the mtime is older than the record's tick)
    entry = json.loads(cache_file.read_text())["entries"]["tiles.mbtiles"]
    assert entry[6] == want and entry[:5] == stat_key(path.stat())
    st = path.stat()
    os.utime(
        path, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10)
    )  # settled (a new ctime: hashed once more)
    cache = HashCache(cache_file)
    cache.sha256(path)
    cache.save()
    assert HashCache(cache_file).lookup(path) == (want, path.stat().st_size)
    os.utime(path)  # any change to the file: no longer remembered
    assert HashCache(cache_file).lookup(path) is None


def test_gdal_and_sqlite3_read_an_updated_file(tmp_path: Path) -> None:
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0, Y0, 8, 8)})
    write(tmp_path)
    handmade_tileset(tmp_path, {t: synthetic_tile_bytes(t) for t in grid(X0 + 1, Y0, 8, 8)})
    assert write(tmp_path)["mode"] == "updated"
    path = tmp_path / "build" / "tiles.mbtiles"
    if exe := shutil.which("sqlite3"):
        ok = subprocess.run(
            [exe, str(path), "PRAGMA integrity_check"], capture_output=True, text=True, check=True
        )
        assert ok.stdout.strip() == "ok"
    if exe := shutil.which("gdalinfo"):
        info = subprocess.run([exe, str(path)], capture_output=True, text=True, check=True).stdout
        assert "Driver: MBTiles/MBTiles" in info
    if not (shutil.which("sqlite3") or shutil.which("gdalinfo")):
        pytest.skip("neither sqlite3 nor gdalinfo is installed")


# ------------------------------------------------------------------ in a real build


def test_a_shifted_build_updates_the_file_and_publishes_a_cache_that_verifies(
    cb: Any, tmp_path: Path
) -> None:
    from tests.conftest import write_flight

    args = ("BUFFER_M=300", "ZOOM=17", "REPORT=json")
    first = cb.build(f"FLIGHT={write_flight(tmp_path / 'a.json')}", *args)
    assert first.code == 0, first.stderr
    build = cb.cache_dir / "state" / "build"
    published = (cb.current / "tiles.mbtiles").resolve()
    old = published.read_bytes()
    moved = cb.build(f"FLIGHT={write_flight(tmp_path / 'b.json', lon=8.5430)}", *args)
    assert moved.code == 0, moved.stderr
    head = (build / RECORD).read_bytes().split(b"\n", 1)[0]
    written = json.loads(head)["written"]
    assert written["mode"] == "updated" and 0 < written["inserted"] < 100, written
    assert published.read_bytes() == old, "the previous release's file is never written"
    verify = cb.run("verify-cache")
    assert verify.code == 0, verify.stderr
    assert_same_as_scratch_of(build, cb.home / "store", tmp_path)
    # the manifest took the writer's hash: the signed hash is the file's
    signed = json.loads((cb.current / "manifest.json").read_text())["signed"]
    current = cb.current / "tiles.mbtiles"
    assert (
        signed["targets"]["tiles.mbtiles"]["hashes"]["sha256"]
        == hashlib.sha256(current.read_bytes()).hexdigest()
    )


def assert_same_as_scratch_of(build: Path, store: Path, tmp: Path) -> None:
    summary = json.loads((build / "tileset.json").read_text())
    out = tmp / "scratch" / "tiles.mbtiles"
    write_mbtiles(
        tileset_dir=build,
        store_root=store,
        out_path=out,
        name="cachebuild tiles",
        bbox=LngLatBbox(*summary["bbox"]),
        zooms=summary["zooms"],
        incremental=False,
    )
    assert all_rows(build / "tiles.mbtiles") == all_rows(out)
    assert metadata(build / "tiles.mbtiles") == metadata(out)


def test_writeback_is_started_not_awaited(tmp_path: Path) -> None:
    """Linux: sync_file_range(WRITE) is there and takes the file; publish's fsync makes it durable."""
    import sys

    from cachebuild._util.fileio import start_writeback

    path = tmp_path / "f"
    with open(path, "wb") as fh:
        fh.write(b"x" * 100_000)
        fh.flush()
        assert start_writeback(fh.fileno()) is sys.platform.startswith("linux")
    assert start_writeback(-1) is False  # a bad descriptor: advice refused, no exception
