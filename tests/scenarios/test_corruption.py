"""Corrupted build state is detected, named, repaired, and never published.

Real ``doit build-cache`` processes against the real tile server
(tests/_harness/tileserver.py), each damaging one thing between two builds: a tile
image in the store (a flipped byte), the staged MBTiles file (truncated in
place: the published release shares its inode), a descriptor shard
(deleted), doit's database (garbage), the staged manifest (garbage).  The
next build must say what it found (a warning naming the file), repair it by
fetching or rebuilding only that, and publish a cache that verifies.
Unit tests of :mod:`cachebuild.cli.repair` follow.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachebuild.cli.repair import check_doit_db, check_staged, push_repairing, run_repairing
from cachebuild.inputs.config import Paths
from cachebuild.providers.mbtilesfile import read_mbtiles_tile
from cachebuild.store.objects import sha256_hex
from cachebuild.tilemath import tile_from_id
from cachebuild.tileset import hex_digests, read_tiles
from tests._harness.tileserver import Reply, TileServer, tile_bytes
from tests.conftest import Cb, CbResult, write_flight

SMALL = ("BUFFER_M=200", "ZOOM=17")


@pytest.fixture
def server() -> Iterator[TileServer]:
    srv = TileServer()
    yield srv
    srv.close()


class Setup:
    """A home with one published cache built from ``server``."""

    def __init__(self, cb: Cb, server: TileServer, tmp_path: Path):
        self.cb = cb
        self.server = server
        self.flight = write_flight(tmp_path / "f.json")
        self.first = self.build()
        assert self.first.code == 0, self.first.stderr
        self.published = self.manifest()

    def build(self, *args: str) -> CbResult:
        return self.cb.build(
            f"FLIGHT={self.flight}", *SMALL, f"PROVIDER={self.server.template(query='')}", *args
        )

    @property
    def build_dir(self) -> Path:
        return self.cb.cache_dir / "state" / "build"

    def manifest(self) -> bytes:
        return (self.cb.current / "manifest.json").read_bytes()

    def verify(self) -> CbResult:
        return self.cb.run("verify-cache")

    def a_tile(self, i: int = 3) -> tuple[object, Path]:
        """The ``i``-th tile of the cache and its object in the store."""
        tiles = read_tiles(self.build_dir)
        digest = hex_digests(tiles)[i]
        return tile_from_id(int(tiles["id"][i])), self.cb.home / "store" / "objects" / digest[
            :2
        ] / digest


@pytest.fixture
def setup(cb: Cb, server: TileServer, tmp_path: Path) -> Setup:
    return Setup(cb, server, tmp_path)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _warned(r: CbResult, *words: str) -> str:
    hits = [w for w in r.report["warnings"] if all(word in w for word in words)]
    assert hits, (words, r.report["warnings"])
    return hits[0]


# -- a tile image in the store ---------------------------------------------------


def test_a_flipped_byte_in_a_store_object_is_fetched_again(setup: Setup) -> None:
    tile, obj = setup.a_tile()
    _flip(obj)
    assert setup.cb.run("clean").code == 0  # the next build reads every image again
    before = setup.server.count()
    r = setup.build()
    assert r.code == 0, r.stderr
    warning = _warned(r, str(obj), "corrupt", f"{tile.z}/{tile.x}/{tile.y}", "fetching it again")
    assert "WARNING" in r.stderr and obj.name in r.stderr
    # exactly that tile was asked for again, and only once
    assert setup.server.count() - before == 1 and setup.server.count(tile) == 2, warning
    assert r.report["tiles"]["fetched"] == 1
    assert sha256_hex(obj.read_bytes()) == obj.name
    # what was published holds the provider's bytes, and verifies
    assert read_mbtiles_tile(setup.cb.current / "tiles.mbtiles", tile) == tile_bytes(tile)
    assert setup.verify().code == 0
    again = setup.build()
    assert again.code == 0 and again.report["outcome"] == "up_to_date"


def test_several_corrupt_objects_are_all_fetched_again_in_one_build(setup: Setup) -> None:
    """Bit rot seldom strikes one file: the first found, the whole tile set is checked."""
    flipped = [setup.a_tile(i) for i in (1, 4, 7)]
    for _, obj in flipped:
        _flip(obj)
    assert setup.cb.run("clean").code == 0
    before = setup.server.count()
    r = setup.build()
    assert r.code == 0, r.stderr
    _warned(r, "corrupt", "2 more of the tile set's images", "fetching them again")
    assert setup.server.count() - before == 3
    for tile, obj in flipped:
        assert sha256_hex(obj.read_bytes()) == obj.name
        assert setup.server.count(tile) == 2
    assert setup.verify().code == 0


def test_a_corrupt_object_met_by_describe_is_fetched_again_not_described(setup: Setup) -> None:
    """Only describe reads the images here (mbtiles is up to date): it checks their hashes too."""
    tile, obj = setup.a_tile(5)
    _flip(obj)
    import shutil

    shutil.rmtree(setup.cb.home / "store" / "descriptors")
    (setup.build_dir / "descriptors.npy").unlink()
    before = setup.server.count()
    r = setup.build()
    assert r.code == 0, r.stderr
    _warned(r, str(obj), "corrupt", "fetching it again")
    assert "mbtiles" not in r.report["tasks"]["run"] and "describe" in r.report["tasks"]["run"]
    assert setup.server.count() - before == 1
    assert sha256_hex(obj.read_bytes()) == obj.name
    # the descriptors are those of the true image: the cache is the first build's
    assert r.report["build_id"] == setup.first.report["build_id"]
    assert setup.verify().code == 0


def test_a_corrupt_object_the_provider_cannot_replace_is_never_published(setup: Setup) -> None:
    tile, obj = setup.a_tile()
    _flip(obj)
    assert setup.cb.run("clean").code == 0
    setup.server.answers[tile] = Reply(500, b"down")
    r = setup.build("HTTP_RETRIES=0")
    assert r.code == 20, r.stderr
    assert f"{tile.z}/{tile.x}/{tile.y}" in r.report["error"]
    _warned(r, str(obj), "corrupt")
    assert setup.manifest() == setup.published
    assert setup.verify().code == 0
    # once the provider answers, the next build repairs it
    del setup.server.answers[tile]
    r2 = setup.build()
    assert r2.code == 0, r2.stderr
    assert sha256_hex(obj.read_bytes()) == obj.name


# -- the staged (and published) MBTiles file ------------------------------------------


def test_a_truncated_mbtiles_file_is_rebuilt_and_published_again(setup: Setup) -> None:
    staged = setup.build_dir / "tiles.mbtiles"
    size = staged.stat().st_size
    os.truncate(staged, size // 2)  # in place: the published release's hard link too
    v = setup.verify()
    assert v.code == 23 and "tiles.mbtiles" in v.report["error"]
    before = setup.server.count()
    r = setup.build()
    assert r.code == 0, r.stderr
    _warned(r, str(staged), "damaged", str(size))
    _warned(r, "published cache", "damaged")
    assert r.report["tasks"]["run"][:1] == ["mbtiles"]
    assert setup.server.count() == before and r.report["descriptors"]["computed"] == 0
    assert (setup.cb.current / "tiles.mbtiles").stat().st_size == size
    assert setup.verify().code == 0


def test_a_garbage_staged_manifest_is_signed_again(setup: Setup) -> None:
    (setup.build_dir / "manifest.json").write_bytes(b"\x00garbage")
    r = setup.build()
    assert r.code == 0, r.stderr
    _warned(r, "staged manifest", "damaged")
    assert "manifest" in r.report["tasks"]["run"]
    assert setup.verify().code == 0


# -- the descriptor store --------------------------------------------------------------


def test_a_deleted_descriptor_shard_is_described_again_once(setup: Setup) -> None:
    shards = list((setup.cb.home / "store" / "descriptors").glob("*/shards/*.f32"))
    assert shards
    for s in shards:
        s.unlink()
    assert setup.cb.run("clean").code == 0
    r = setup.build()
    assert r.code == 0, r.stderr
    n = r.report["descriptors"]["computed"]
    assert n == r.report["tiles"]["planned"] > 0
    _warned(r, "descriptor store", shards[0].stem, "computed again")
    assert r.report["build_id"] == setup.first.report["build_id"]
    # repaired: the next build from scratch finds every descriptor
    assert setup.cb.run("clean").code == 0
    r2 = setup.build()
    assert r2.code == 0 and r2.report["descriptors"] == {"computed": 0, "reused": n}
    assert not [w for w in r2.report["warnings"] if "descriptor store" in w]


# -- doit's database ---------------------------------------------------------------------


def _garbage_rows(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("UPDATE doit SET task_data = '{not json'")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("damage", ["random bytes", "rows that are not JSON"])
def test_a_garbage_doit_database_is_moved_aside_and_rebuilt(setup: Setup, damage: str) -> None:
    db = setup.cb.cache_dir / "state" / "doit.sqlite3"
    if damage == "random bytes":
        db.write_bytes(os.urandom(4096))
    else:
        _garbage_rows(db)
    before = setup.server.count()
    r = setup.build()
    assert r.code == 0, r.stderr
    _warned(r, str(db), "damaged", "moved it to")
    assert (db.parent / "doit.sqlite3.corrupt").exists()
    assert "manifest" in r.report["tasks"]["run"]
    # rebuilt from the store: nothing fetched, nothing described again
    assert setup.server.count() == before
    assert r.report["descriptors"]["computed"] == 0
    assert r.report["build_id"] == setup.first.report["build_id"]
    assert setup.verify().code == 0
    assert setup.build().report["outcome"] == "up_to_date"


# -- cachebuild.cli.repair, unit ---------------------------------------------------------------


def test_check_doit_db_keeps_a_sound_database(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.state.mkdir()
    warnings: list[str] = []
    assert check_doit_db(paths, warnings.append) is False  # none yet
    conn = sqlite3.connect(paths.dep_file)
    conn.execute("CREATE TABLE doit (task_id text not null primary key, task_data json)")
    conn.execute("INSERT INTO doit VALUES ('tiles', ?)", (json.dumps({"a": 1}),))
    conn.commit()
    conn.close()
    assert check_doit_db(paths, warnings.append) is False
    assert warnings == [] and paths.dep_file.exists()


def test_check_doit_db_moves_a_garbage_one_aside_with_its_journal(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.state.mkdir()
    paths.dep_file.write_bytes(b"SQLite format 3\x00" + os.urandom(2000))
    journal = paths.dep_file.with_name("doit.sqlite3-journal")
    journal.write_bytes(b"hot journal")
    warnings: list[str] = []
    assert check_doit_db(paths, warnings.append) is True
    assert not paths.dep_file.exists() and not journal.exists()
    assert (paths.state / "doit.sqlite3.corrupt-journal").read_bytes() == b"hot journal"
    assert str(paths.dep_file) in warnings[0]


def test_check_staged_removes_only_what_does_not_match(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.build.mkdir(parents=True)
    (paths.build / "a.bin").write_bytes(b"12345")
    (paths.build / "b.bin").write_bytes(b"123")
    signed = {"targets": {"a.bin": {"length": 5}, "b.bin": {"length": 4}, "c.bin": {"length": 1}}}
    (paths.build / "manifest.json").write_text(json.dumps({"signed": signed}))
    warnings: list[str] = []
    assert check_staged(paths, warnings.append) == ["b.bin", "c.bin"]
    assert (paths.build / "a.bin").exists() and not (paths.build / "b.bin").exists()
    assert any("b.bin" in w and "3 bytes" in w for w in warnings)
    assert any("c.bin" in w and "missing" in w for w in warnings)
    assert check_staged(Paths(tmp_path / "none"), warnings.append) == []


def test_run_repairing_runs_again_once_after_a_store_object_error(tmp_path: Path) -> None:
    from cachebuild.errors import StoreObjectError

    paths = Paths(tmp_path)
    paths.build.mkdir(parents=True)
    (paths.build / "tileset.json").write_text("{}")

    class Reporter:
        ran: list[str] = []
        up_to_date: list[str] = []
        failed: list[str] = []
        errors: list[str] = []

    reporter = Reporter()
    failures: list[object] = []
    runs: list[bool] = []

    def run() -> int:
        runs.append((paths.build / "tileset.json").exists())
        if len(runs) <= 2:  # fails twice: the second failure is final
            reporter.ran.append("tiles")
            failures.append(
                StoreObjectError("tile 1/2/3: store object x is corrupt", digest="ab" * 32)
            )
            return 1
        return 0

    warnings: list[str] = []
    assert run_repairing(paths, warnings.append, run, reporter, failures) == 1
    assert runs == [True, False], "the tile set is marked stale before the second run"
    assert reporter.ran == ["tiles"]
    assert any("fetching it again" in w for w in warnings)
    assert isinstance(failures[-1], StoreObjectError)


def test_push_repairing_fetches_a_corrupt_image_again_and_pushes_once_more(tmp_path: Path) -> None:
    """A companion build's push that finds an image corrupt (issue 24): the tile set is marked
    stale, this machine's tasks run once more, the push runs once more; a second failure is final."""
    from types import SimpleNamespace

    from cachebuild.errors import StoreObjectError

    paths = Paths(tmp_path)
    paths.build.mkdir(parents=True)
    stale = paths.build / "tileset.json"
    stale.write_text("{}")
    reporter = SimpleNamespace(ran=["tiles"], up_to_date=["flight"], failed=[], errors=[])
    pushes: list[bool] = []
    runs: list[bool] = []

    def push(fails: int) -> None:
        pushes.append(stale.exists())
        if len(pushes) <= fails:
            raise StoreObjectError("the push: store object x is corrupt", digest="ab" * 32)

    def run() -> None:
        runs.append(stale.exists())
        reporter.up_to_date.append("flight")
        reporter.ran.append("tiles")

    warnings: list[str] = []
    push_repairing(paths, warnings.append, lambda: push(1), run, reporter)
    assert (pushes, runs) == ([True, False], [False]), "stale before the run, pushed after it"
    assert (reporter.ran, reporter.up_to_date) == (["tiles"], ["flight"])
    assert any("is corrupt" in w and "fetching it again" in w for w in warnings)
    pushes.clear()
    with pytest.raises(StoreObjectError):
        push_repairing(paths, warnings.append, lambda: push(2), run, reporter)
    assert len(pushes) == 2


# -- the long sweep: every staged artifact, every store object -----------------------------

LONG = os.environ.get("CACHEBUILD_LONG") == "1"


@pytest.mark.skipif(not LONG, reason="the long corruption sweep: set CACHEBUILD_LONG=1")
def test_long_every_artifact_truncated_and_every_object_flipped(setup: Setup) -> None:
    """Each staged artifact truncated in place, then each store object of the cache flipped."""
    signed = json.loads((setup.build_dir / "manifest.json").read_bytes())["signed"]
    tried = published_bad = 0
    for rel, meta in sorted(signed["targets"].items()):
        path = setup.build_dir / rel
        os.truncate(path, meta["length"] // 2)
        r = setup.build()
        tried += 1
        ok = r.code == 0 and setup.verify().code == 0
        published_bad += not ok
        assert ok, (rel, r.report.get("error"))
        _warned(r, str(path), "damaged")
        print(f"truncated {rel}: rebuilt {r.report['tasks']['run']}", flush=True)
    tiles = read_tiles(setup.build_dir)
    for i in range(len(tiles)):
        tile, obj = setup.a_tile(i)
        _flip(obj)
        assert setup.cb.run("clean").code == 0
        before = setup.server.count()
        r = setup.build()
        tried += 1
        ok = r.code == 0 and setup.verify().code == 0 and sha256_hex(obj.read_bytes()) == obj.name
        published_bad += not ok
        assert ok, (str(obj), r.report.get("error"))
        assert setup.server.count() - before == 1
        _warned(r, str(obj), "corrupt")
        print(
            f"flipped {obj.name[:12]} (tile {tile.z}/{tile.x}/{tile.y}): fetched again", flush=True
        )
    print(f"{tried} corruptions tried, {published_bad} published")
