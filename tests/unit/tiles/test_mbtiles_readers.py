"""Every reader of an MBTiles file the project ships opens it read-only and immutable.

A hot journal (``tiles.mbtiles-journal``) planted beside a published file is
replayed by the next read-write open, which then serves the attacker's
tile; a ``mode=ro`` open fails on it.  The project's readers (the preview,
``read_mbtiles_tile``, the MBTiles provider) read the file's own bytes and
leave both files as they were.  Paths with characters a URI must escape
(``#``, ``?``, ``%``, spaces, non-ASCII) reach SQLite whole.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cachebuild._util.sqliteuri import sqlite_uri
from cachebuild.providers.local import MBTilesProvider
from cachebuild.providers.mbtilesfile import read_mbtiles_tile
from cachebuild.tilemath import Tile
from tests.conftest import write_flight

FIRST = "SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles ORDER BY zoom_level, tile_column, tile_row"


def plant_hot_journal(path: Path, work: Path) -> tuple[Tile, bytes, bytes]:
    """A hot journal beside ``path`` whose rollback changes 64 bytes of its first tile.

    A copy of the file with those bytes changed in place (same pages) is
    opened by a child that rewrites the tile's row and exits without
    committing: its journal holds the changed pages.  Returns the tile, its
    bytes and the bytes a replay makes of them.
    """
    with sqlite3.connect(sqlite_uri(path, mode="ro", immutable="1"), uri=True) as c:
        z, x, row, data = c.execute(FIRST).fetchone()
    raw = path.read_bytes()
    for start in range(64, len(data) - 128, 97):
        chunk = data[start : start + 64]
        at = raw.find(chunk)
        if at >= 0 and raw.count(chunk) == 1:
            break
    else:
        raise AssertionError("no 64 bytes of the tile lie within one page")
    copy = work / "copy.mbtiles"
    copy.write_bytes(raw[:at] + bytes(64) + raw[at + 64 :])
    code = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA synchronous = OFF')\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "c.execute('UPDATE tiles SET tile_data = tile_data || x\\'00\\' "
        f"WHERE zoom_level = {z} AND tile_column = {x} AND tile_row = {row}')\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(copy)], check=True)
    shutil.copyfile(copy.with_name(copy.name + "-journal"), path.with_name(path.name + "-journal"))
    return (
        Tile(x, (1 << z) - 1 - row, z),
        bytes(data),
        bytes(data[:start] + bytes(64) + data[start + 64 :]),
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache built by a real doit run, in a home whose path needs escaping in a URI."""
    from tests.conftest import Cb

    top = tmp_path_factory.mktemp("readers")
    cb = Cb(home=top / "home #1?x=%41 é")
    cb.home.mkdir()
    built = cb.build(f"FLIGHT={write_flight(top / 'f.json')}", "BUFFER_M=200", "ZOOM=17")
    assert built.code == 0, built.stderr
    return cb.home


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_planted_journal_is_a_real_attack(published: Path, tmp_path: Path) -> None:
    """A read-write open of a copy replays it: the attacker's bytes are served."""
    victim = tmp_path / "victim.mbtiles"
    shutil.copyfile(published / "cache" / "current" / "tiles.mbtiles", victim)
    tile, _, attacked = plant_hot_journal(victim, tmp_path)
    with sqlite3.connect(victim) as c:
        got = c.execute(
            "SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
            (tile.z, tile.x, (1 << tile.z) - 1 - tile.y),
        ).fetchone()[0]
    assert got == attacked


@pytest.mark.parametrize("reader", ["read_mbtiles_tile", "provider"])
def test_readers_ignore_a_hot_journal(published: Path, tmp_path: Path, reader: str) -> None:
    where = tmp_path / "odd #dir?a=1 é"
    where.mkdir()
    victim = where / "tiles.mbtiles"
    shutil.copyfile(published / "cache" / "current" / "tiles.mbtiles", victim)
    tile, original, _ = plant_hot_journal(victim, tmp_path)
    journal = victim.with_name("tiles.mbtiles-journal")
    before = digest(victim), digest(journal)
    if reader == "provider":
        provider = MBTilesProvider(victim)
        try:
            assert provider.fetch(tile) == original
        finally:
            provider.close()
    else:
        assert read_mbtiles_tile(victim, tile) == original
    assert (digest(victim), digest(journal)) == before


def test_preview_cache_reads_the_published_file_not_a_journal_beside_it(
    published: Path, tmp_path: Path
) -> None:
    from tests.conftest import Cb

    cb = Cb(home=published)
    current = (cb.current / "tiles.mbtiles").resolve()
    plant_hot_journal(current, tmp_path)
    journal = current.with_name("tiles.mbtiles-journal")
    before = digest(current), digest(journal)
    try:
        # an empty store: no thumbnail to reuse, every tile is read from the file
        shown = cb.run(
            "preview-cache", f"STORE={tmp_path / 'empty store #?'}", f"OUT={tmp_path / 'p.png'}"
        )
        assert shown.code == 0, shown.stderr
        preview = shown.report["preview"]
        assert preview["mode"] == "decoded" or preview["thumbnails_made"] > 0, preview
        assert (digest(current), digest(journal)) == before
    finally:
        journal.unlink()
