"""Tests for cachebuild.release.gc: a size-bounded store that keeps what caches use."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cachebuild.release import gc as gcstore
from cachebuild.release import gcrefs
from cachebuild.release.gc import collect_garbage, gc_store_cmd, store_bytes
from cachebuild.release.gcrefs import known_caches, referenced
from cachebuild.release.lock import CacheLock
from cachebuild.store.descriptors import DescriptorStore, engine_store_dirs
from cachebuild.store.lock import StoreLock, register_cache
from cachebuild.store.objects import TileStore
from cachebuild.tileset import tile_dtype
from tests._harness.surface import assert_public_surface

KEY = "ab" * 32
OLD = "cd" * 32
SIZE = 4096


def blob(i: int) -> bytes:
    return i.to_bytes(4, "big") * (SIZE // 4)


def cache_dir(root: Path, digests: list[str], key: str, *, release: bool = True) -> Path:
    """A cache whose staged build (and one release) references ``digests`` under engine ``key``."""
    rows = np.array([(i, bytes.fromhex(d)) for i, d in enumerate(digests)], dtype=tile_dtype())
    dirs = [root / "state" / "build"] + ([root / "releases" / "r1-v1"] if release else [])
    for d in dirs:
        (d / "engine").mkdir(parents=True)
        np.save(d / "tiles.npy", rows)
        (d / "engine" / "engine.json").write_text(json.dumps({"key": key}))
    return root


@pytest.fixture()
def world(tmp_path: Path) -> dict:
    """20 images (oldest first); a cache uses 0-7 with engine KEY; OLD is a retired engine."""
    store_root = tmp_path / "store"
    store = TileStore(store_root)
    digests = [store.put(blob(i)) for i in range(20)]
    for i, d in enumerate(digests):
        os.utime(store.path(d), (1_000_000 + i, 1_000_000 + i))
    store.record_refs("p", [((17, i, 0), d) for i, d in enumerate(digests)])
    store.close()
    raw = np.array([list(bytes.fromhex(d)) for d in digests], dtype=np.uint8)
    vec = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    for key in (KEY, OLD):
        with DescriptorStore(store_root, key, 8) as ds, ds.writer() as w:
            w.append(raw, vec)
    os.utime(store_root / "descriptors" / OLD / "meta.json", (500_000, 500_000))
    cache = cache_dir(tmp_path / "cache", digests[:8], KEY)
    return {"store": store_root, "digests": digests, "raw": raw, "vec": vec, "cache": cache}


def objects(store_root: Path) -> set[str]:
    return {p.name for p in (store_root / "objects").rglob("*") if p.is_file()}


def test_referenced_reads_releases_and_staged_builds(world: dict, tmp_path: Path) -> None:
    other = cache_dir(tmp_path / "other", world["digests"][5:10], OLD, release=False)
    tiles, per_engine = referenced([world["cache"], other])
    assert len(tiles) == 10
    assert set(per_engine) == {KEY, OLD} and len(per_engine[KEY]) == 8 and len(per_engine[OLD]) == 5


def test_without_a_bound_everything_unused_goes(world: dict) -> None:
    store_root, digests = world["store"], world["digests"]
    result = collect_garbage(store_root, [world["cache"]], None)
    assert objects(store_root) == set(digests[:8])
    assert engine_store_dirs(store_root) == [store_root / "descriptors" / KEY]
    r = result["removed"]
    assert (r["tiles"], r["engines"], r["descriptors"]) == (12, 1, 12)
    assert result["bytes_after"] == store_bytes(store_root) < result["bytes_before"]
    # the kept descriptors are intact after compaction
    with DescriptorStore(store_root, KEY, 8) as ds:
        shard, row = ds.lookup(world["raw"])
        assert (shard[:8] >= 0).all() and (shard[8:] == -1).all()
        np.testing.assert_array_equal(ds.read(shard[:8], row[:8]), world["vec"][:8])
    # refs of removed images are forgotten: a later build fetches them again
    db = sqlite3.connect(store_root / "refs.sqlite")
    assert {r[0] for r in db.execute("SELECT sha256 FROM tile_refs")} == set(digests[:8])


def test_a_bound_removes_the_oldest_unused_first(world: dict) -> None:
    store_root, digests = world["store"], world["digests"]
    before = store_bytes(store_root)
    bound = before - 5 * SIZE - 100
    result = collect_garbage(store_root, [world["cache"]], bound)
    assert result["bytes_after"] <= bound
    # the retired engine was used longest ago: it went first; then images 8, 9, ...
    assert not (store_root / "descriptors" / OLD).exists()
    kept = objects(store_root)
    assert set(digests[:8]) <= kept
    gone = [i for i in range(8, 20) if digests[i] not in kept]
    assert gone == list(range(8, 8 + len(gone)))
    assert digests[19] in kept, "only as much as the bound needs is removed"


def test_what_caches_use_is_kept_even_above_the_bound(world: dict) -> None:
    warnings: list[str] = []
    result = collect_garbage(world["store"], [world["cache"]], 1, warn=warnings.append)
    assert objects(world["store"]) == set(world["digests"][:8])
    assert result["bytes_after"] > 1
    assert warnings and "MAX_STORE_BYTES=1" in warnings[0]


def test_garbage_goes_whatever_the_bound(world: dict) -> None:
    store_root = world["store"]
    ds = DescriptorStore(store_root, KEY, 8)
    (shard,) = ds.shards_dir.iterdir()
    with open(shard, "ab") as fh:
        fh.write(b"\0" * 40)  # a killed writer's uncommitted tail
    orphan = ds.shards_dir / "999999-deadbeef0000.f32"
    orphan.write_bytes(b"\0" * 320)  # a shard the index never heard of
    ds.close()
    tmp = store_root / "tmp" / "999999-leftover"
    tmp.write_bytes(b"x" * 100)
    result = collect_garbage(store_root, [world["cache"]], 10**12)
    assert result["removed"]["garbage_bytes"] == 40 + 320 + 100
    assert not orphan.exists() and not tmp.exists() and shard.stat().st_size == 20 * 32
    assert objects(store_root) == set(world["digests"]), "within the bound: nothing used is touched"


def test_known_caches(tmp_path: Path) -> None:
    store_root, home = tmp_path / "store", tmp_path / "home"
    elsewhere = cache_dir(tmp_path / "elsewhere", [], KEY)
    register_cache(store_root, elsewhere)
    (home / "cache" / "releases").mkdir(parents=True)
    (home / "keys").mkdir()
    found = known_caches(store_root, home / "cache", home)
    assert found == sorted([elsewhere, home / "cache"])


def test_the_command_refuses_while_a_build_runs(world: dict, tmp_path: Path) -> None:
    env = {"CACHEBUILD_HOME": str(tmp_path / "home")}
    vars = {"STORE": str(world["store"]), "CACHE_DIR": str(world["cache"]), "REPORT": "json"}
    with CacheLock(world["cache"] / "build.lock"):
        assert gc_store_cmd(vars, env) == 50
    with StoreLock(world["store"], exclusive=False):
        assert gc_store_cmd(vars, env) == 50
    assert objects(world["store"]) == set(world["digests"])
    assert gc_store_cmd({**vars, "MAX_STORE_BYTES": "1G"}, env) == 0
    assert gc_store_cmd({**vars, "MAX_STORE_BYTES": "lots"}, env) == 2
    assert gc_store_cmd(vars, env) == 0
    assert objects(world["store"]) == set(world["digests"][:8])


def test_public_surface() -> None:
    """``__all__`` lists exactly the public names the module defines."""
    assert_public_surface(gcstore)
    assert_public_surface(gcrefs)


def test_thumbnails_follow_their_images(world: dict) -> None:
    from cachebuild.store.thumbs import THUMB_PX, ThumbStore

    store_root, digests = world["store"], world["digests"]
    px = bytes(THUMB_PX * THUMB_PX * 3)
    with ThumbStore(store_root) as ts:
        ts.put((bytes.fromhex(d), px) for d in digests)
    size_before = (store_root / "thumbs" / "thumbs.sqlite").stat().st_size
    result = collect_garbage(store_root, [world["cache"]], None)
    assert result["removed"]["tiles"] == 12 and result["removed"]["thumbnails"] == 12
    with ThumbStore(store_root) as ts:
        assert set(ts.lookup(bytes.fromhex(d) for d in digests)) == {
            bytes.fromhex(d) for d in digests[:8]
        }
    assert (store_root / "thumbs" / "thumbs.sqlite").stat().st_size < size_before
    assert result["bytes_after"] == store_bytes(store_root)
