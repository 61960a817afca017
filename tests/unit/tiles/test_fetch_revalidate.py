"""TILE_MAX_AGE: stored tiles are revalidated with conditional requests; a 304
downloads nothing, a changed tile is stored under its new hash.  Real loopback
server (tests/_harness/etagserver.py), counting downloads and 304s server-side."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachebuild.store.objects import TileStore, sha256_hex
from cachebuild.tileset import hex_digests, read_tiles
from tests._harness.etagserver import EtagServer, changed_bytes
from tests.unit.providers.test_providers import fast_env
from tests.unit.tiles.test_fetch import PLANNED, run


@pytest.fixture
def server() -> Iterator[EtagServer]:
    srv = EtagServer()
    yield srv
    srv.close()


def digests(tmp: Path) -> dict[tuple[int, int, int], str]:
    from cachebuild.tilemath import tile_from_id

    rows = read_tiles(tmp / "out")
    return {
        (t.z, t.x, t.y): d
        for t, d in zip((tile_from_id(int(i)) for i in rows["id"]), hex_digests(rows), strict=True)
    }


def again(tmp: Path, server: EtagServer, **env: str) -> dict[str, Any]:
    return run(tmp, server.template(), env=fast_env(**env))


def test_max_age_0_downloads_exactly_the_changed_tiles(tmp_path: Path, server: EtagServer) -> None:
    first = again(tmp_path, server)
    assert first["fetched"] == len(PLANNED) and sum(server.downloads.values()) == len(PLANNED)
    changed = PLANNED[::3]
    new = {t: server.change(t) for t in changed}
    server.downloads.clear()

    got = again(tmp_path, server, TILE_MAX_AGE="0")
    assert set(server.downloads) == set(changed)  # only those came down...
    assert all(n == 1 for n in server.downloads.values())
    assert sum(server.not_modified.values()) == len(PLANNED) - len(changed)  # ...the rest: 304
    assert server.conditional["If-None-Match"] == len(PLANNED)
    assert got["refreshed"] == len(changed)
    assert got["not_modified"] == len(PLANNED) - len(changed)
    assert got["fetched"] == len(changed) and got["missing"] == 0
    d = digests(tmp_path)
    for t in PLANNED:  # the tile set names the new objects, the rest unchanged
        want = new[t] if t in new else changed_bytes(t, 0)
        assert d[(t.z, t.x, t.y)] == sha256_hex(want)
    with TileStore(tmp_path / "store") as store:
        for t in changed:
            assert store.get(sha256_hex(new[t])) == new[t]


def test_without_an_etag_it_asks_if_modified_since(tmp_path: Path) -> None:
    server = EtagServer(etags=False)
    try:
        again(tmp_path, server)
        server.change(PLANNED[0])
        got = again(tmp_path, server, TILE_MAX_AGE="0")
        assert server.conditional["If-Modified-Since"] == len(PLANNED)
        assert got["refreshed"] == 1 and got["not_modified"] == len(PLANNED) - 1
    finally:
        server.close()


def test_tiles_younger_than_max_age_and_no_max_age_ask_nothing(
    tmp_path: Path, server: EtagServer
) -> None:
    again(tmp_path, server)
    before = server.count()
    for env in ({}, {"TILE_MAX_AGE": "30d"}):
        got = again(tmp_path, server, **env)
        assert server.count() == before and got["fetched"] == 0
    assert "not_modified" not in again(tmp_path, server)


def test_a_store_without_validators_is_migrated_and_its_tiles_are_due(
    tmp_path: Path, server: EtagServer
) -> None:
    again(tmp_path, server)
    db = tmp_path / "store" / "refs.sqlite"
    # the store as an older cachebuild left it: refs, no validators table
    with sqlite3.connect(db) as c:
        c.execute("DROP TABLE tile_validators")
    refs_before = _refs(db)
    server.downloads.clear()
    got = again(tmp_path, server, TILE_MAX_AGE="30d")
    # no validator: as old as can be, and nothing to be conditional with: a plain GET,
    # whose same bytes count as not modified
    assert sum(server.downloads.values()) == len(PLANNED) and not server.conditional
    assert got["not_modified"] == len(PLANNED) and got["refreshed"] == 0
    assert _refs(db) == refs_before
    server.downloads.clear()
    again(tmp_path, server, TILE_MAX_AGE="0")  # validators kept this time: all 304
    assert not server.downloads and sum(server.not_modified.values()) == len(PLANNED)


def _refs(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as c:
        return sorted(c.execute("SELECT * FROM tile_refs"))
