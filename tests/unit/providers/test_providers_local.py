"""Tests for cachebuild.providers.local: synthetic, MBTiles and directory trees,
and the stamps the no-op check uses for local sources."""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
from PIL import Image

from cachebuild.errors import UsageError
from cachebuild.providers import open_provider, source_stamp
from cachebuild.providers.base import Provider, TileFetchError
from cachebuild.providers.local import DirectoryProvider, MBTilesProvider
from cachebuild.providers.synthetic import synthetic_tile_bytes
from cachebuild.tilemath import Tile
from tests._harness.tileserver import tile_bytes

T = Tile(68645, 45903, 17)
NEIGHBOURS = [T, Tile(T.x + 1, T.y, T.z), Tile(T.x, T.y + 1, T.z), Tile(0, 0, 1)]


def png(colour: tuple[int, int, int] = (10, 20, 30), size: int = 256) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ MBTiles


def make_mbtiles(path: Path, rows: dict[Tile, bytes]) -> Path:
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE metadata (name text, value text)")
        db.execute(
            "CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob)"
        )
        db.executemany(
            "INSERT INTO tiles VALUES (?, ?, ?, ?)",
            [(t.z, t.x, (1 << t.z) - 1 - t.y, data) for t, data in rows.items()],
        )
    db.close()
    return path


def test_mbtiles_provider_reads_tms_rows(tmp_path: Path) -> None:
    path = make_mbtiles(
        tmp_path / "a.mbtiles", {T: tile_bytes(T), Tile(0, 0, 1): tile_bytes(Tile(0, 0, 1))}
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    mtime = path.stat().st_mtime_ns
    with closing(open_provider(str(path), env={})) as p:
        assert isinstance(p, MBTilesProvider)
        assert isinstance(p, Provider)
        assert p.identity == f"mbtiles:sha256={digest}"
        assert p.fetch(T) == tile_bytes(T)
        assert p.fetch(Tile(0, 0, 1)) == tile_bytes(Tile(0, 0, 1))
        assert p.fetch(Tile(0, 1, 1)) is None  # would be row 0 without the flip
        assert p.fetch(Tile(T.x + 1, T.y, T.z)) is None
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(p.fetch, [T] * 16)) == [tile_bytes(T)] * 16
    assert path.stat().st_mtime_ns == mtime


def test_mbtiles_provider_refuses_a_broken_tile(tmp_path: Path) -> None:
    path = make_mbtiles(tmp_path / "a.mbtiles", {T: b"<html>oops</html>"})
    with (
        closing(open_provider(str(path), env={})) as p,
        pytest.raises(TileFetchError, match="not an image"),
    ):
        p.fetch(T)


def test_mbtiles_provider_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.mbtiles"
    with pytest.raises(UsageError, match="no such MBTiles file") as info:
        open_provider(str(path), env={})
    assert str(path) in str(info.value)


def test_mbtiles_provider_not_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "text.mbtiles"
    path.write_text("just some text, long enough to not be an empty database file" * 20)
    with pytest.raises(UsageError, match="not an MBTiles file"):
        open_provider(str(path), env={})


def test_mbtiles_provider_no_tiles_table(tmp_path: Path) -> None:
    path = tmp_path / "other.mbtiles"
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE something (a int)")
        db.commit()
    with pytest.raises(UsageError, match="no tiles table"):
        open_provider(str(path), env={})


# ------------------------------------------------------------------ directory trees


def write_tree(
    root: Path, tiles: dict[Tile, bytes], *, tms: bool = False, ext: str = "jpg"
) -> Path:
    for t, data in tiles.items():
        y = (1 << t.z) - 1 - t.y if tms else t.y
        path = root / str(t.z) / str(t.x) / f"{y}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_a_bare_directory_is_a_z_x_y_tree(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "tiles", {t: tile_bytes(t) for t in NEIGHBOURS[:3]})
    with closing(open_provider(str(root), env={})) as p:
        assert isinstance(p, DirectoryProvider)
        assert isinstance(p, Provider)
        assert p.identity.startswith(f"dir:{root}/{{z}}/{{x}}/{{y}}.{{jpg,jpeg,png,webp}}@")
        for t in NEIGHBOURS[:3]:
            assert p.fetch(t) == tile_bytes(t)
        assert p.fetch(NEIGHBOURS[3]) is None
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(p.fetch, [T] * 8)) == [tile_bytes(T)] * 8


def test_any_of_the_image_extensions(tmp_path: Path) -> None:
    write_tree(tmp_path / "t", {T: png()}, ext="png")
    buf = io.BytesIO()
    Image.new("RGB", (256, 256)).save(buf, format="WEBP")
    write_tree(tmp_path / "t", {NEIGHBOURS[1]: buf.getvalue()}, ext="webp")
    with closing(open_provider(f"dir:{tmp_path / 't'}", env={})) as p:
        assert p.fetch(T) == png()
        assert p.fetch(NEIGHBOURS[1]) == buf.getvalue()


def test_a_tms_template(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "tms", {t: tile_bytes(t) for t in NEIGHBOURS}, tms=True, ext="png")
    with closing(open_provider(f"dir:{root}/{{z}}/{{x}}/{{-y}}.png", env={})) as p:
        for t in NEIGHBOURS:
            assert p.fetch(t) == tile_bytes(t)
        assert p.fetch(Tile(0, 1, 1)) is None  # where the unflipped row would be
    # a template without the dir: prefix works too
    with closing(open_provider(f"{root}/{{z}}/{{x}}/{{-y}}.png", env={})) as p:
        assert p.fetch(T) == tile_bytes(T)


def test_quadkey_file_names(tmp_path: Path) -> None:
    from cachebuild.tilemath import quadkey

    (tmp_path / "q").mkdir()
    (tmp_path / "q" / f"{quadkey(T)}.jpeg").write_bytes(tile_bytes(T))
    with closing(open_provider(f"dir:{tmp_path}/q/{{q}}.jpeg", env={})) as p:
        assert p.fetch(T) == tile_bytes(T)


def test_an_empty_file_is_no_tile_and_a_broken_one_fails(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "t",
        {T: b"", NEIGHBOURS[1]: b"<html>404</html>", NEIGHBOURS[2]: tile_bytes(T)[:999]},
    )
    with closing(open_provider(str(root), env={})) as p:
        assert p.fetch(T) is None
        with pytest.raises(TileFetchError, match="not an image") as info:
            p.fetch(NEIGHBOURS[1])
        assert str(root) in str(info.value)
        with pytest.raises(TileFetchError, match="broken image"):
            p.fetch(NEIGHBOURS[2])


@pytest.mark.parametrize(
    "template, message",
    [
        ("{z}/{x}/{y}.png?k={key}", r"\{key\}"),
        ("{s}/{z}/{x}/{y}.png", r"\{s\}"),
        ("{z}/{x}/{row}.png", r"\{row\}"),
        ("{z}/{x}.png", "names no tile"),
    ],
)
def test_directory_templates_take_only_tile_placeholders(
    tmp_path: Path, template: str, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        open_provider(f"dir:{tmp_path}/{template}", env={})


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such directory"):
        open_provider(f"dir:{tmp_path / 'nope'}", env={})
    with pytest.raises(UsageError, match="no such directory"):
        open_provider(f"{tmp_path / 'nope'}/{{z}}/{{x}}/{{y}}.png", env={})


def test_the_identity_follows_the_tree(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "t", {T: tile_bytes(T)})
    first = DirectoryProvider(root).identity
    assert DirectoryProvider(root).identity == first
    other = Tile(T.x + 5, T.y, T.z)
    write_tree(root, {T: tile_bytes(other)})  # a tile rewritten in place
    os.utime(root / "17" / str(T.x) / f"{T.y}.jpg", ns=(1, 1))
    assert DirectoryProvider(root).identity != first
    assert (
        DirectoryProvider(f"{root}/{{z}}/{{x}}/{{y}}.jpg").identity
        != DirectoryProvider(root).identity
    )


# ------------------------------------------------------------------ stamps


def test_source_stamps_are_cheap_and_change_with_the_source(tmp_path: Path) -> None:
    assert source_stamp("synthetic") is None
    assert source_stamp("https://t.example/{z}/{x}/{y}.png") is None
    assert source_stamp(str(tmp_path / "a.mbtiles")) is None  # the plan stamps MBTiles files

    root = write_tree(tmp_path / "t", {T: tile_bytes(T)})
    stamp = source_stamp(str(root))
    assert stamp is not None and stamp == source_stamp(f"dir:{root}")
    write_tree(root, {NEIGHBOURS[1]: tile_bytes(T)})  # a new file: its directory changes
    assert source_stamp(str(root)) != stamp
    templated = source_stamp(f"dir:{root}/{{z}}/{{x}}/{{y}}.jpg")
    assert templated is not None and templated != source_stamp(str(root))

    tif = tmp_path / "o.tif"
    assert source_stamp(str(tif)) == f"geotiff:{tif}:missing"  # never raises
    tif.write_bytes(b"x")
    first = source_stamp(f"geotiff:{tif}")
    tif.write_bytes(b"xy")
    assert source_stamp(str(tif)) != first


def test_synthetic_tiles_come_from_the_synthetic_module() -> None:
    with closing(open_provider("synthetic", env={})) as p:
        assert p.fetch(T) == synthetic_tile_bytes(T)


def test_tile_length_of_a_huge_view_value_allocates_nothing(tmp_path: Path) -> None:
    """Python 3.10 has no Connection.setlimit: the provider asks each tile's length first.

    ``length(zeroblob(n))`` is computed without making the blob, so a hostile
    view's 900 MB value is measured, not allocated, and refused by size.
    """
    import sqlite3

    from cachebuild.providers.mbtilesfile import connect_readonly, tile_length
    from cachebuild.tilemath import Tile

    path = tmp_path / "view.mbtiles"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE metadata (name TEXT, value TEXT);"
        "CREATE VIEW tiles AS SELECT 17 AS zoom_level, 1 AS tile_column, 131070 AS tile_row,"
        " zeroblob(900000000) AS tile_data;"
    )
    db.close()
    conn = connect_readonly(path)
    try:
        assert tile_length(conn, Tile(1, 1, 17)) == 900_000_000
        assert tile_length(conn, Tile(2, 1, 17)) is None
    finally:
        conn.close()
