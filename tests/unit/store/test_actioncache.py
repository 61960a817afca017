"""Tests for cachebuild.store.actioncache: derived artifacts served by the key of their inputs."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from cachebuild._util.fs import atomic_write
from cachebuild._util.hashing import sha256_file
from cachebuild._util.statcache import HASH_CACHE_NAME, HashCache
from cachebuild.release.gc import collect_garbage
from cachebuild.store import actioncache
from cachebuild.store.actioncache import Action, ActionCache, action_key
from targets.cached import cached
from tests._harness.surface import assert_public_surface
from tests.conftest import Cb, write_flight

SMALL = ("BUFFER_M=150", "ZOOM=17", "SELFTEST_QUERIES=20")


def action(build: Path, *, kind: str = "flat", version: str = "v1") -> Action:
    return Action(
        name="index",
        version=version,
        inputs={
            "descriptors.npy": build / "descriptors.npy",
            "descriptor_ids.npy": build / "descriptor_ids.npy",
        },
        values={"kind": kind},
        engine_key="e" * 64,
        outputs=("index.faiss", "index.json"),
        build=build,
    )


@pytest.fixture()
def build(tmp_path: Path) -> Path:
    b = tmp_path / "build"
    b.mkdir()
    (b / "descriptors.npy").write_bytes(b"descriptors" * 100)
    (b / "descriptor_ids.npy").write_bytes(b"ids" * 10)
    return b


def compute(b: Path, tag: bytes = b"") -> None:
    """The outputs written as the build's tasks write them: by rename, never in place."""
    for name, data in (
        ("index.faiss", b"faiss index " * 1000 + tag),
        ("index.json", b'{"kind": "flat"}\n'),
        ("positions.npy", b"positions " + tag),
    ):
        atomic_write(b / name, data, durable=False)


def test_the_key_follows_every_input_setting_and_version(build: Path) -> None:
    k = action_key(action(build))
    assert k == action_key(action(build)) and len(k) == 64
    assert action_key(action(build, kind="ivf")) != k
    assert action_key(action(build, version="v2")) != k
    (build / "descriptor_ids.npy").write_bytes(b"other ids")
    assert action_key(action(build)) != k


def test_a_recorded_action_is_served_byte_for_byte_and_a_miss_stays_a_miss(
    build: Path, tmp_path: Path
) -> None:
    notes: list[str] = []
    cache = ActionCache(tmp_path / "store", warn=notes.append)
    a = action(build)
    assert not cache.lookup(a)
    compute(build)
    want = {n: (build / n).read_bytes() for n in a.outputs}
    cache.record(a)
    for n in a.outputs:
        (build / n).unlink()
    assert cache.lookup(a) and cache.served_from == "local"
    assert {n: (build / n).read_bytes() for n in a.outputs} == want
    assert not cache.lookup(action(build, kind="ivf"))
    assert notes == []
    # the record holds hashes and names only: no path, no setting values beyond the key's hash
    (rec,) = (tmp_path / "store" / "actions" / "ac").glob("*/*.json")
    body = json.loads(rec.read_text())
    assert set(body) == {"format", "key", "action", "outputs", "created", "check"}
    assert str(tmp_path) not in rec.read_text()


def test_records_are_written_once(build: Path, tmp_path: Path) -> None:
    cache = ActionCache(tmp_path / "store", warn=lambda m: None)
    a = action(build)
    compute(build, b"first")
    cache.record(a)
    first = (build / "index.faiss").read_bytes()
    compute(build, b"second")  # a non-deterministic action: the first record stays
    cache.record(a)
    assert cache.lookup(a) and (build / "index.faiss").read_bytes() == first


def test_an_object_is_a_link_to_the_output_and_its_hash_stays_remembered(
    build: Path, tmp_path: Path
) -> None:
    cache = ActionCache(tmp_path / "store", warn=lambda m: None)
    compute(build)
    out = build / "index.faiss"
    os.utime(out, (1e9, 1e9))  # written long ago: a remembered hash is not racy
    cache.record(action(build))
    obj = cache.object_path(sha256_file(out)[0])
    assert os.path.samestat(os.stat(obj), os.stat(out))  # no copy of the bytes
    assert not list(cache.tmp.iterdir())
    # the links moved the output's ctime: the hash is remembered for the new stat
    hashes = HashCache(build / HASH_CACHE_NAME)
    assert hashes.lookup(out) == (sha256_file(out)[0], out.stat().st_size)


def test_a_hit_links_the_checked_object_into_the_build_and_leaves_no_temp_file(
    build: Path, tmp_path: Path
) -> None:
    cache = ActionCache(tmp_path / "store", warn=lambda m: None)
    a = action(build)
    compute(build)
    cache.record(a)
    assert cache.lookup(a)  # the outputs are already links to the objects: renamed onto themselves
    for n in a.outputs:
        (build / n).unlink()
    assert cache.lookup(a)
    out = build / "index.faiss"
    assert os.path.samestat(os.stat(out), os.stat(cache.object_path(sha256_file(out)[0])))
    assert sorted(p.name for p in build.iterdir() if ".tmp-" in p.name) == []
    os.utime(out, (1e9, 1e9))  # not racy: the hash is remembered for the file as it is
    assert cache.lookup(a)
    assert HashCache(build / HASH_CACHE_NAME).lookup(out) == sha256_file(out)


def test_without_hard_links_the_object_is_a_copy(
    build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(actioncache.os, "link", no_links)
    cache = ActionCache(tmp_path / "store", warn=lambda m: None)
    compute(build)
    want = (build / "index.faiss").read_bytes()
    cache.record(action(build))
    obj = cache.object_path(sha256_file(build / "index.faiss")[0])
    assert obj.read_bytes() == want and not os.path.samestat(
        os.stat(obj), os.stat(build / "index.faiss")
    )
    for n in action(build).outputs:
        (build / n).unlink()
    assert cache.lookup(action(build)) and (build / "index.faiss").read_bytes() == want


def test_an_output_rewritten_in_place_after_recording_is_never_served(
    build: Path, tmp_path: Path
) -> None:
    """Outputs are written by rename; one written in place changes its object too: a miss, not a wrong file."""
    notes: list[str] = []
    cache = ActionCache(tmp_path / "store", warn=notes.append)
    a = action(build)
    compute(build)
    cache.record(a)
    with open(build / "index.faiss", "r+b") as fh:
        fh.write(b"X")
    for n in a.outputs:
        (build / n).unlink()
    assert not cache.lookup(a)
    assert any("corrupt" in n for n in notes)
    assert not (build / "index.faiss").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_object_is_never_used(build: Path, tmp_path: Path, damage: str) -> None:
    notes: list[str] = []
    cache = ActionCache(tmp_path / "store", warn=notes.append)
    a = action(build)
    compute(build)
    cache.record(a)
    obj = cache.object_path(sha256_file(build / "index.faiss")[0])
    data = obj.read_bytes()
    if damage == "flip":
        obj.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    elif damage == "truncate":
        obj.write_bytes(data[:-100])
    else:
        obj.unlink()
    (build / "index.faiss").write_bytes(b"left as it was")
    assert not cache.lookup(a)
    assert (build / "index.faiss").read_bytes() == b"left as it was"
    assert not obj.exists() and not cache.record_path(action_key(a)).exists()
    assert (damage == "delete") or any("corrupt" in n for n in notes)
    compute(build)
    cache.record(a)  # recorded anew, and sound again
    assert cache.lookup(a)


def test_recording_replaces_a_damaged_object_of_the_same_name(build: Path, tmp_path: Path) -> None:
    cache = ActionCache(tmp_path / "store", warn=lambda m: None)
    compute(build)
    obj = cache.object_path(sha256_file(build / "index.faiss")[0])
    obj.parent.mkdir(parents=True)
    obj.write_bytes(b"damaged before anyone recorded it")
    cache.record(action(build))
    assert obj.read_bytes() == (build / "index.faiss").read_bytes()
    assert cache.lookup(action(build))


@pytest.mark.parametrize("damage", ["garbage", "truncate", "edit"])
def test_a_damaged_record_is_never_used(build: Path, tmp_path: Path, damage: str) -> None:
    notes: list[str] = []
    cache = ActionCache(tmp_path / "store", warn=notes.append)
    a = action(build)
    compute(build)
    cache.record(a)
    rec = cache.record_path(action_key(a))
    raw = rec.read_text()
    if damage == "garbage":
        rec.write_bytes(os.urandom(64))
    elif damage == "truncate":
        rec.write_text(raw[: len(raw) // 2])
    else:  # a hash edited to name another object: the record's checksum no longer matches
        body = json.loads(raw)
        body["outputs"]["index.json"]["sha256"] = sha256_file(build / "index.faiss")[0]
        rec.write_text(json.dumps(body))
    assert not cache.lookup(a)
    assert any("damaged" in n for n in notes) and not rec.exists()


def test_recording_into_an_unwritable_store_is_a_warning(build: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "actions").mkdir(parents=True)
    (store / "actions" / "cas").write_text("not a directory")
    notes: list[str] = []
    a = action(build)
    compute(build)
    ActionCache(store, warn=notes.append).record(a)
    assert notes and "could not record index" in notes[0]


def test_gc_keeps_what_caches_hold_and_drops_the_rest(build: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cache = ActionCache(store, warn=lambda m: None)
    kept = action(build)
    compute(build)
    cache.record(kept)
    cache_root = tmp_path / "cache"
    release = cache_root / "releases" / "r1"
    release.mkdir(parents=True)
    for n in kept.outputs:  # a published cache holds these very files
        (release / n).write_bytes((build / n).read_bytes())
    old = action(build, kind="ivf")
    compute(build, b"an older index")
    cache.record(old)
    orphan = cache.object_path("0" * 64)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"a killed recording's object")
    assert cache.lookup(old)
    result = collect_garbage(store, [cache_root], None)
    assert result["removed"]["action_outputs"] == 1  # the older index (its index.json is shared)
    assert not orphan.exists()
    assert not cache.lookup(old)
    assert cache.lookup(kept)
    assert result["kept"]["action_outputs"] == 2


def test_gc_takes_a_releases_hashes_from_its_manifest(build: Path, tmp_path: Path) -> None:
    """A release's outputs are known by its manifest's hashes: gc-store does not read them again."""
    store = tmp_path / "store"
    cache = ActionCache(store, warn=lambda m: None)
    a = action(build)
    compute(build, b"the published index")
    cache.record(a)
    digest = sha256_file(build / "index.faiss")[0]
    release = tmp_path / "cache" / "releases" / "r1"
    release.mkdir(parents=True)
    # the manifest names the index; the file there is not read (here: another file's bytes)
    (release / "index.faiss").write_bytes(b"not what the manifest says")
    (release / "index.json").write_bytes((build / "index.json").read_bytes())
    targets = {"index.faiss": {"hashes": {"sha256": digest}, "length": 1}}
    (release / "manifest.json").write_text(json.dumps({"signed": {"targets": targets}}))
    for n in a.outputs:
        (build / n).unlink()  # nothing staged: only the release holds them
    result = collect_garbage(store, [tmp_path / "cache"], None)
    assert result["removed"]["action_outputs"] == 0
    assert cache.lookup(a)


def test_cached_serves_a_second_run_and_runs_the_action_when_an_input_is_missing(
    build: Path, tmp_path: Path
) -> None:
    calls: list[dict] = []

    def index(**kw: str) -> None:  # stands for actions.index
        calls.append(kw)
        compute(Path(kw["build"]))

    stats: dict[str, list[str]] = {"hits": [], "misses": [], "from_bucket": []}
    run = cached("index", index, lambda: {"store": str(tmp_path / "store"), "action_cache": stats})
    run(build=str(build), kind="flat")
    (build / "index.faiss").unlink()
    run(build=str(build), kind="flat")
    assert len(calls) == 1 and stats == {"hits": ["index"], "misses": ["index"], "from_bucket": []}
    assert (build / "index.faiss").read_bytes().startswith(b"faiss index")

    (build / "descriptors.npy").unlink()  # the action's own error, not a hashing one
    run(build=str(build), kind="flat")
    assert len(calls) == 2 and stats["misses"] == ["index"]


def test_public_surface() -> None:
    """``__all__`` lists exactly the public names the module defines."""
    assert_public_surface(actioncache)


def test_a_second_cache_on_one_store_is_served_and_a_corrupt_output_is_rebuilt(
    tmp_path: Path,
) -> None:
    """Two homes share one local store: the second build computes no index, self-test or map."""
    f = write_flight(tmp_path / "f.json")
    store = tmp_path / "store"
    args = (f"FLIGHT={f}", *SMALL, f"STORE={store}")
    a, b, c = (Cb(home=tmp_path / n) for n in ("a", "b", "c"))
    for m in (a, b, c):
        m.home.mkdir()

    first = a.build(*args)
    assert first.code == 0, first.stderr
    assert sorted(first.report["action_cache"]["misses"]) == [
        "index",
        "preview",
        "selftest",
    ]
    assert first.report["action_cache"]["hits"] == []

    second = b.build(*args)
    assert second.code == 0, second.stderr
    rb = second.report
    assert sorted(rb["action_cache"]["hits"]) == ["index", "preview", "selftest"]
    assert rb["action_cache"]["misses"] == [] and rb["action_cache"]["from_bucket"] == []
    for n in ("index.faiss", "index.json", "selftest.json", "preview.png"):
        assert (a.current / n).read_bytes() == (b.current / n).read_bytes(), n
    assert b.run("verify-cache").code == 0
    assert rb["selftest"] == first.report["selftest"]

    # a flipped byte in the stored index: never served; computed again, the build succeeds
    obj = store / "actions" / "cas"
    digest = sha256_file(a.current / "index.faiss")[0]
    path = obj / digest[:2] / digest
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    third = c.build(*args)
    assert third.code == 0, third.stderr
    rc = third.report
    assert "index" in rc["action_cache"]["misses"] and "selftest" in rc["action_cache"]["hits"]
    assert any("corrupt" in w for w in rc["warnings"])
    assert sha256_file(c.current / "index.faiss")[0] == sha256_file(path)[0] == digest
    assert c.run("verify-cache").code == 0
