"""Tests for cachebuild.localize.index: the FAISS index over the descriptors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from cachebuild.errors import BuildError, UsageError
from cachebuild.localize import index
from cachebuild.localize.describe import DESCRIPTOR_IDS_FILE, DESCRIPTORS_FILE
from cachebuild.localize.index import FLAT_MAX, RECALL_TARGET, build_index, plan_index, search
from tests._harness.surface import assert_public_surface, heavy_imports


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_descriptors(directory: Path, vectors: np.ndarray, ids: np.ndarray) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / DESCRIPTORS_FILE, vectors)
    np.save(directory / DESCRIPTOR_IDS_FILE, ids)
    return directory


@pytest.fixture()
def built(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, dict]:
    vectors = unit_vectors(500, 64)
    # tile ids: large, sparse, not row numbers
    ids = np.sort(np.random.default_rng(1).choice(2**62, size=500, replace=False)).astype(np.int64)
    src = write_descriptors(tmp_path / "d", vectors, ids)
    info = build_index(descriptors_dir=src, out_path=tmp_path / "cache" / "index.faiss")
    return tmp_path / "cache" / "index.faiss", vectors, ids, info


def test_summary_and_file(built: tuple) -> None:
    path, vectors, ids, info = built
    assert info["type"] == "IDMap2,Flat" and info["kind"] == "flat"
    assert (info["ntotal"], info["dim"], info["metric"]) == (500, 64, "inner_product")
    assert info["reason"] == "auto: N < 10000" and info["params"] == {}
    # exact search against exact search: recall@10 is 1 (measured, not assumed)
    assert info["recall_at_10"] == 1.0 and info["recall_queries"] == 500
    loaded = faiss.read_index(str(path))
    assert loaded.ntotal == 500 and loaded.d == 64
    assert loaded.metric_type == faiss.METRIC_INNER_PRODUCT
    # IDMap2 keeps the vectors reachable by tile id
    np.testing.assert_array_equal(loaded.reconstruct(int(ids[17])), vectors[17])
    assert sorted(p.name for p in path.parent.iterdir()) == ["index.faiss", "positions.npy"]
    # every id the index answers has its ground position beside it
    pos = np.load(path.parent / "positions.npy", allow_pickle=False)
    assert info["positions"] == "positions.npy" and pos["id"].tolist() == sorted(ids.tolist())


def test_each_tile_finds_itself_first(built: tuple) -> None:
    path, vectors, ids, _ = built
    scores, found = search(path, vectors, 3)
    assert scores.shape == found.shape == (500, 3)
    assert found.dtype == np.int64
    np.testing.assert_array_equal(found[:, 0], ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert np.all(scores[:, 1] <= scores[:, 0])


def test_search_matches_brute_force(built: tuple) -> None:
    path, vectors, ids, _ = built
    queries = unit_vectors(20, 64, seed=9)
    scores, found = search(path, queries, 5)
    sims = queries @ vectors.T
    best = np.argsort(-sims, axis=1)[:, :5]
    np.testing.assert_array_equal(found, ids[best])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, best, axis=1), atol=1e-5)


def test_single_query_and_k_beyond_ntotal(tmp_path: Path) -> None:
    vectors = unit_vectors(3, 8)
    src = write_descriptors(tmp_path / "d", vectors, np.array([10, 20, 30], np.int64))
    build_index(descriptors_dir=src, out_path=tmp_path / "i.faiss")
    _, found = search(tmp_path / "i.faiss", vectors[1], 5)
    assert found.shape == (1, 5)
    assert found[0, 0] == 20 and found[0, 3:].tolist() == [-1, -1]


def test_empty_index(tmp_path: Path) -> None:
    src = write_descriptors(tmp_path / "d", np.zeros((0, 256), np.float32), np.zeros(0, np.int64))
    info = build_index(descriptors_dir=src, out_path=tmp_path / "i.faiss")
    assert info["ntotal"] == 0 and info["dim"] == 256
    _, found = search(tmp_path / "i.faiss", unit_vectors(1, 256), 1)
    assert found.tolist() == [[-1]]


def test_rebuild_replaces_the_index(built: tuple, tmp_path: Path) -> None:
    path = built[0]
    src = write_descriptors(tmp_path / "d2", unit_vectors(2, 64), np.array([1, 2], np.int64))
    build_index(descriptors_dir=src, out_path=path)
    assert faiss.read_index(str(path)).ntotal == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["index.faiss", "positions.npy"]


@pytest.mark.parametrize(
    "vectors, ids, message",
    [
        (unit_vectors(4, 8), np.arange(3, dtype=np.int64), "does not match"),
        (unit_vectors(4, 8), np.array([1, 2, 2, 3], np.int64), "duplicate tile ids"),
        (unit_vectors(4, 8).astype(np.float64), np.arange(4, dtype=np.int64), "must be float32"),
        (unit_vectors(4, 8), np.arange(4, dtype=np.int32), "does not match"),
        (np.full((2, 8), np.nan, np.float32), np.arange(2, dtype=np.int64), "non-finite"),
    ],
)
def test_inconsistent_inputs(
    tmp_path: Path, vectors: np.ndarray, ids: np.ndarray, message: str
) -> None:
    src = write_descriptors(tmp_path / "d", vectors, ids)
    with pytest.raises(BuildError, match=message) as err:
        build_index(descriptors_dir=src, out_path=tmp_path / "i.faiss")
    assert err.value.phase == "index"
    assert not (tmp_path / "i.faiss").exists()


def test_missing_descriptors(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="describe phase") as err:
        build_index(descriptors_dir=tmp_path, out_path=tmp_path / "i.faiss")
    assert err.value.phase == "index"


def test_missing_index_file(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="does not exist"):
        search(tmp_path / "nowhere.faiss", unit_vectors(1, 8), 1)


def test_wrong_query_dimension(built: tuple) -> None:
    with pytest.raises(ValueError, match=r"\[q, 64\]"):
        search(built[0], unit_vectors(1, 32), 1)


def test_without_faiss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    src = write_descriptors(tmp_path / "d", unit_vectors(2, 8), np.arange(2, dtype=np.int64))
    with pytest.raises(BuildError) as err:
        build_index(descriptors_dir=src, out_path=tmp_path / "i.faiss")
    assert err.value.phase == "index" and "faiss-cpu" in str(err.value)


def test_public_surface() -> None:
    """``__all__`` lists exactly the public names the module defines."""
    assert_public_surface(index)


def test_import_is_light() -> None:
    assert heavy_imports("cachebuild.localize.index") == []


# -- the index chosen by size ------------------------------------------------


@pytest.mark.parametrize(
    "n, kind, description",
    [
        (0, "flat", "IDMap2,Flat"),
        (FLAT_MAX - 1, "flat", "IDMap2,Flat"),
        (FLAT_MAX, "ivf", "IVF100,Flat"),
        (100_000, "ivf", "IVF316,Flat"),
        (1_000_000, "ivf", "IVF1000,Flat"),
    ],
)
def test_auto_picks_the_index_by_size(n: int, kind: str, description: str) -> None:
    plan = plan_index(n)
    assert (plan.kind, plan.description) == (kind, description)
    assert plan.reason.startswith("auto")
    if kind == "ivf":
        # K = sqrt(N) lists, fewer where N cannot give every list 39 training points
        assert plan.params["nlist"] == min(int(n**0.5), n // 39)
        assert plan.params["train_points"] >= 39 * plan.params["nlist"]


def test_hnsw_when_asked_for() -> None:
    plan = plan_index(50_000, "hnsw")
    assert plan.description == "IDMap2,HNSW32,Flat" and plan.params == {
        "M": 32,
        "efConstruction": 40,
    }
    assert plan_index(50_000, gpus=1).kind == "ivf" and "GPU" in plan_index(50_000, gpus=1).reason


def test_forced_kinds_and_small_ivf() -> None:
    assert plan_index(50_000, "flat").kind == "flat"
    assert plan_index(100, "hnsw").reason == "INDEX=hnsw"
    # few vectors: fewer lists, so each still gets 39 training points
    small = plan_index(1_000, "ivf")
    assert small.params["nlist"] == 1_000 // 39 and small.params["train_points"] == 1_000
    with pytest.raises(UsageError, match="INDEX"):
        plan_index(10, "lsh")


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Unit vectors in clusters, like descriptors of similar tiles (harder than uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), d)).astype(np.float32)
    v = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, d)).astype(
        np.float32
    )
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("kind, param", [("hnsw", "efSearch"), ("ivf", "nprobe")])
def test_approximate_index_reports_its_measured_recall(
    tmp_path: Path, kind: str, param: str
) -> None:
    n = 4_000
    vectors = clustered(n, 32)
    ids = np.arange(n, dtype=np.int64) * 7 + 3
    src = write_descriptors(tmp_path / "d", vectors, ids)
    out = tmp_path / "i.faiss"
    info = build_index(
        descriptors_dir=src, out_path=out, kind=kind, recall_queries=300, chunk_rows=999
    )
    assert info["kind"] == kind and info["ntotal"] == n and info["recall_queries"] == 300
    assert info["recall_at_10"] >= RECALL_TARGET
    assert param in info["params"]
    # the search parameter is saved in the file
    loaded = faiss.read_index(str(out))
    saved = faiss.downcast_index(loaded.index).hnsw.efSearch if kind == "hnsw" else loaded.nprobe
    assert saved == info["params"][param]
    # recall@10 recomputed here, by brute force, agrees with the reported figure
    q = vectors[:300]
    exact = np.sort(q @ vectors.T, axis=1)[:, -10]
    scores, found = search(out, q, 10)
    assert set(np.unique(found)) <= set(ids.tolist())
    mine = float(np.mean(np.sum(scores >= exact[:, None] - 1e-5, axis=1) / 10))
    assert mine >= RECALL_TARGET


def test_recall_of_a_starved_index_is_reported_honestly(tmp_path: Path) -> None:
    """IVF with one probe of many lists misses neighbours; the report says so."""
    vectors = unit_vectors(3_000, 64)  # uniform: the hardest case for IVF
    src = write_descriptors(tmp_path / "d", vectors, np.arange(3_000, dtype=np.int64))
    out = tmp_path / "i.faiss"
    info = build_index(descriptors_dir=src, out_path=out, kind="ivf", recall_queries=200)
    index = faiss.read_index(str(out))
    index.nprobe = 1
    q = vectors[:200]
    exact = np.sort(q @ vectors.T, axis=1)[:, -10]
    scores, _ = index.search(q, 10)
    starved = float(np.mean(np.sum(scores >= exact[:, None] - 1e-5, axis=1) / 10))
    assert starved < 0.9 <= info["recall_at_10"]
    assert info["params"]["nprobe"] > 1


def test_recall_measurement_can_be_skipped(tmp_path: Path) -> None:
    src = write_descriptors(tmp_path / "d", clustered(2_000, 16), np.arange(2_000, dtype=np.int64))
    info = build_index(
        descriptors_dir=src, out_path=tmp_path / "i.faiss", kind="hnsw", recall_queries=0
    )
    assert info["recall_at_10"] is None and info["params"]["efSearch"] == 64


# -- reusing the trained quantizer on a rebuild -------------------------------

KEY_A, KEY_B = "a" * 64, "b" * 64


def shifted_sets(
    tmp_path: Path, n: int = 4_000, new: float = 0.1, uniform: bool = False
) -> tuple[Path, Path, np.ndarray]:
    """Two descriptor sets of n vectors, the second with ``new`` of them not in the first."""
    shift = int(n * new)
    vectors = unit_vectors(n + shift, 32, seed=4) if uniform else clustered(n + shift, 32, seed=4)
    ids = np.arange(n + shift, dtype=np.int64) * 5 + 11
    first = write_descriptors(tmp_path / "first", vectors[:n], ids[:n])
    second = write_descriptors(tmp_path / "second", vectors[shift:], ids[shift:])
    return first, second, vectors


def reindex(src: Path, out: Path, **kw: object) -> dict:
    return build_index(
        descriptors_dir=src, out_path=out, kind="ivf", recall_queries=400, reuse=True, **kw
    )  # type: ignore[arg-type]


def exact_recall(path: Path, vectors: np.ndarray) -> float:
    """recall@10 of the index file against brute force, on 300 of its own vectors."""
    q = vectors[::13][:300]
    kth = np.sort(q @ vectors.T, axis=1)[:, -10]
    scores, _ = search(path, q, 10)
    return float(np.mean(np.sum(scores >= kth[:, None] - 1e-5, axis=1) / 10))


@pytest.fixture()
def merging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept recall lists merged even over these small areas, as over a large one."""
    from cachebuild.localize import index_reference

    monkeypatch.setattr(index_reference, "_MERGE_MIN_FLOPS", 0)


def test_a_shifted_rebuild_reuses_the_quantizer_and_keeps_its_recall(
    tmp_path: Path, merging: None
) -> None:
    first, second, vectors = shifted_sets(tmp_path)
    out = tmp_path / "build" / "index.faiss"
    a = reindex(first, out, engine_key=KEY_A)
    assert (
        a["quantizer"]["reused"] is False
        and a["quantizer"]["reason"] == "trained: no saved quantizer"
    )
    assert a["quantizer"]["trained_on_share"] == 1.0 and a["seconds"]["train"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "index-quantizer.npz",
        "index-recall.npz",
        "index.faiss",
        "positions.npy",
    ]
    assert a["recall_reference"] == {"kept": 0, "searched": 400, "new_vectors": -1}
    trained = faiss.read_index(str(out))  # kept: the quantizer belongs to it
    centroids = faiss.downcast_index(trained.quantizer).reconstruct_n(0, a["params"]["nlist"])

    b = reindex(second, out, engine_key=KEY_A)
    assert b["quantizer"]["reused"] is True and b["seconds"]["train"] == 0
    # most recall queries' exact top lists come from the last build's, merged with the new vectors
    ref = b["recall_reference"]
    assert ref["new_vectors"] == 400 and ref["kept"] > 200 and ref["kept"] + ref["searched"] == 400
    assert (
        b["quantizer"]["trained_on_share"] == 0.9
        and "10% of the vectors are new" in b["quantizer"]["reason"]
    )
    assert b["type"] == a["type"] and b["ntotal"] == 4_000
    index = faiss.read_index(str(out))
    np.testing.assert_array_equal(
        faiss.downcast_index(index.quantizer).reconstruct_n(0, index.nlist), centroids
    )
    # every vector is in, under its id, and the search quality holds
    assert b["recall_at_10"] >= RECALL_TARGET
    mine = exact_recall(out, vectors[400:])
    assert mine >= RECALL_TARGET - 0.02 and abs(mine - b["recall_at_10"]) < 0.03
    fresh = build_index(
        descriptors_dir=second, out_path=tmp_path / "fresh.faiss", kind="ivf", recall_queries=400
    )
    # a quantizer trained on these very vectors needs no fewer than half the probes
    assert (
        fresh["recall_at_10"] >= RECALL_TARGET
        and b["params"]["nprobe"] <= 2 * fresh["params"]["nprobe"]
    )
    _, found = search(out, vectors[400:][:50], 1)
    np.testing.assert_array_equal(found[:, 0], (np.arange(400, 450) * 5 + 11))
    # the vectors the last build had go to the lists it saved: the same index as adding them afresh
    with np.load(out.with_name("index-quantizer.npz")) as z:
        assert len(z["assigned"]) == len(z["lists"]) == 4_000
    coarse = faiss.IndexFlatIP(32)
    coarse.add(centroids)
    fresh_add = faiss.IndexIVFFlat(coarse, 32, index.nlist, faiss.METRIC_INNER_PRODUCT)
    fresh_add.add_with_ids(np.load(second / "descriptors.npy"), np.arange(400, 4_400) * 5 + 11)
    fresh_add.nprobe = index.nprobe
    assert bytes(faiss.serialize_index(fresh_add)) == bytes(faiss.serialize_index(index))


def test_the_files_of_the_last_build_are_never_changed_in_place(tmp_path: Path) -> None:
    """publish hard-links build files into the release: a rebuild writes new files."""
    first, second, _ = shifted_sets(tmp_path)
    out = tmp_path / "build" / "index.faiss"
    reindex(first, out, engine_key=KEY_A)
    release = tmp_path / "release"
    release.mkdir()
    kept = {}
    for name in ("index.faiss", "index-quantizer.npz"):
        (release / name).hardlink_to(out.parent / name)
        kept[name] = (release / name).read_bytes()
    assert reindex(second, out, engine_key=KEY_A)["quantizer"]["reused"]
    for name, data in kept.items():
        assert (release / name).read_bytes() == data
        assert (release / name).stat().st_ino != (out.parent / name).stat().st_ino
    assert (release / "index.faiss").read_bytes() != out.read_bytes()


def test_another_engine_key_or_kind_trains_again(tmp_path: Path) -> None:
    first, second, _ = shifted_sets(tmp_path)
    out = tmp_path / "build" / "index.faiss"
    reindex(first, out, engine_key=KEY_A)
    other = reindex(second, out, engine_key=KEY_B)
    assert (
        other["quantizer"]["reused"] is False
        and "another engine key" in other["quantizer"]["reason"]
    )
    assert other["seconds"]["train"] > 0
    # no engine key: never reused
    assert "no engine key" in reindex(second, out, engine_key=None)["quantizer"]["reason"]
    # a flat index has nothing to train and leaves no quantizer behind ...
    flat = build_index(
        descriptors_dir=second, out_path=out, kind="flat", reuse=True, engine_key=KEY_A
    )
    assert flat["quantizer"] == {
        "reused": False, "trained_on_share": None, "trained_points": None,
        "max_untrained_share": 0.3, "reason": "nothing to train",
    }  # fmt: skip
    assert not (out.parent / "index-quantizer.npz").exists()
    # ... so the next IVF trains; HNSW is rebuilt and says why
    assert (
        reindex(first, out, engine_key=KEY_A)["quantizer"]["reason"]
        == "trained: no saved quantizer"
    )
    hnsw = build_index(
        descriptors_dir=second,
        out_path=out,
        kind="hnsw",
        recall_queries=100,
        reuse=True,
        engine_key=KEY_A,
    )
    assert "faiss cannot remove" in hnsw["quantizer"]["reason"] and not hnsw["quantizer"]["reused"]


def test_too_many_new_vectors_or_another_size_trains_again(tmp_path: Path) -> None:
    first, second, _ = shifted_sets(tmp_path, new=0.4)
    out = tmp_path / "build" / "index.faiss"
    reindex(first, out, engine_key=KEY_A)
    r = reindex(second, out, engine_key=KEY_A)
    assert (
        r["quantizer"]["reused"] is False
        and "40% of the vectors are new" in r["quantizer"]["reason"]
    )
    assert r["quantizer"]["trained_on_share"] == 1.0
    # the plan family: four times the vectors ask for another number of lists
    big = write_descriptors(
        tmp_path / "big", clustered(16_000, 32, seed=5), np.arange(16_000, dtype=np.int64)
    )
    r = reindex(big, out, engine_key=KEY_A)
    assert not r["quantizer"]["reused"] and "lists" in r["quantizer"]["reason"]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:300]), "unreadable"),
        (lambda p: p.write_bytes(b"not a zip"), "unreadable"),
        (
            lambda p: np.savez(
                p, meta=np.array("{}"), centroids=np.zeros((2, 2)), population=np.zeros(1, "<u8")
            ),
            "unreadable",
        ),
    ],
)
def test_a_damaged_saved_quantizer_is_not_used(tmp_path: Path, damage: object, reason: str) -> None:
    first, second, _ = shifted_sets(tmp_path)
    out = tmp_path / "build" / "index.faiss"
    reindex(first, out, engine_key=KEY_A)
    qf = out.parent / "index-quantizer.npz"
    qf.unlink()  # a fresh inode: the damage must not reach a hard-linked copy
    reindex(first, tmp_path / "again" / "index.faiss", engine_key=KEY_A)
    (tmp_path / "again" / "index-quantizer.npz").rename(qf)
    damage(qf)  # type: ignore[operator]
    r = reindex(second, out, engine_key=KEY_A)
    assert (
        not r["quantizer"]["reused"]
        and reason in r["quantizer"]["reason"]
        and r["recall_at_10"] >= RECALL_TARGET
    )
    # and the file written now is whole again
    assert reindex(second, out, engine_key=KEY_A)["quantizer"]["reused"]


def test_a_quantizer_that_needs_far_more_probes_is_trained_again(tmp_path: Path) -> None:
    first, second, _ = shifted_sets(tmp_path, uniform=True)  # uniform: IVF needs many probes
    out = tmp_path / "build" / "index.faiss"
    assert reindex(first, out, engine_key=KEY_A)["params"]["nprobe"] > 2
    qf = out.parent / "index-quantizer.npz"
    with np.load(qf) as z:
        meta, centroids, population = (
            json.loads(str(z["meta"][()])),
            z["centroids"],
            z["population"],
        )
    meta["nprobe"] = 1  # as if it had been tuned to one probe when trained
    index._save_quantizer(qf, centroids, population, meta)
    r = reindex(second, out, engine_key=KEY_A)
    assert not r["quantizer"]["reused"] and "needed nprobe" in r["quantizer"]["reason"]
    assert (
        r["params"]["nprobe"] > 2
        and r["recall_at_10"] >= RECALL_TARGET
        and r["seconds"]["train"] > 0
    )


def test_predicted_nprobe_is_the_smallest_that_reaches_the_target(tmp_path: Path) -> None:
    """The nprobe predicted from list ranks is the one a search-by-search walk finds."""
    from cachebuild.localize.index_tune import _NPROBE_LADDER, predict_nprobe

    n = 6_000
    vectors = unit_vectors(n, 16)  # neighbours spread over lists: nprobe 1 is not enough
    src = write_descriptors(tmp_path / "d", vectors, np.arange(n, dtype=np.int64))
    out = tmp_path / "i.faiss"
    info = build_index(descriptors_dir=src, out_path=out, kind="ivf", recall_queries=400)
    ivf = faiss.read_index(str(out))
    q = vectors[:400]
    sims = q @ vectors.T
    top = np.argsort(-sims, axis=1)[:, :10]
    kth = np.take_along_axis(sims, top, axis=1)[:, -1]
    nlist = ivf.nlist
    ladder = tuple(v for v in _NPROBE_LADDER if v < nlist) + (nlist,)

    def measured(nprobe: int) -> float:
        ivf.nprobe = nprobe
        scores, _ = ivf.search(q, 10)
        return float(np.mean(np.sum(scores >= kth[:, None] - 1e-5, axis=1) / 10))

    walked = next(v for v in ladder if measured(v) >= RECALL_TARGET)
    assert predict_nprobe(faiss, ivf, q, vectors[top], ladder) == walked
    assert ladder[0] < walked < nlist  # the data make the prediction non-trivial
    assert info["recall_at_10"] >= RECALL_TARGET


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_mapped_index_answers_as_a_read_one(tmp_path: Path, kind: str) -> None:
    vectors = unit_vectors(3000, 32, seed=4)
    ids = np.arange(3000, dtype=np.int64) * 7 + 11
    src = write_descriptors(tmp_path / "d", vectors, ids)
    path = tmp_path / "i.faiss"
    build_index(descriptors_dir=src, out_path=path, kind=kind)
    queries = unit_vectors(40, 32, seed=5)
    got = index.load_index(path, mapped=True).search(queries, 5)
    want = index.load_index(path).search(queries, 5)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)


def test_fingerprints_tell_rows_apart_whatever_the_chunking() -> None:
    from cachebuild.localize.index_quantizer import _fingerprints

    v = unit_vectors(2000, 33, seed=6)  # 132 bytes a row: not a whole number of words
    prints = _fingerprints(v)
    assert prints.dtype == np.dtype("<u8") and len(np.unique(prints)) == 2000
    np.testing.assert_array_equal(
        np.concatenate([_fingerprints(v[:700]), _fingerprints(v[700:])]), prints
    )
    w = v.copy()
    w[3, 32] = np.nextafter(w[3, 32], np.float32(2))  # one bit of the last, padded word
    assert _fingerprints(w)[3] != prints[3] and _fingerprints(w)[4] == prints[4]
    assert _fingerprints(v[:0]).shape == (0,)


def test_the_index_hash_is_taken_as_it_is_written(tmp_path: Path) -> None:
    import hashlib

    from cachebuild._util.statcache import HashCache

    src = write_descriptors(tmp_path / "d", unit_vectors(300, 16), np.arange(300, dtype=np.int64))
    out, cache = tmp_path / "i.faiss", tmp_path / "hash-cache.json"
    build_index(descriptors_dir=src, out_path=out, hash_cache=cache)
    hit = HashCache(cache).lookup(out)
    assert hit == (hashlib.sha256(out.read_bytes()).hexdigest(), out.stat().st_size)


def _as_format_1(path: Path) -> None:
    """Rewrite a kept npz file as the format-1 file an earlier cachebuild left (blake2b prints)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: np.asarray(z[k]) for k in z.files}
    meta = json.loads(str(arrays["meta"][()]))
    arrays["meta"] = np.array(json.dumps(meta | {"format": 1}, sort_keys=True))
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def test_an_upgrade_over_format_1_files_trains_once_then_reuses_again(
    tmp_path: Path, merging: None
) -> None:
    first, second, _ = shifted_sets(tmp_path)
    out = tmp_path / "build" / "index.faiss"
    reindex(first, out, engine_key=KEY_A)
    for name in ("index-quantizer.npz", "index-recall.npz"):
        _as_format_1(out.with_name(name))
    b = reindex(second, out, engine_key=KEY_A)  # the first build after the upgrade
    assert b["quantizer"]["reused"] is False and "format 1" in b["quantizer"]["reason"]
    assert b["recall_reference"]["kept"] == 0 and b["recall_at_10"] >= RECALL_TARGET
    c = reindex(first, out, engine_key=KEY_A)  # and the next one reuses what b kept
    assert c["quantizer"]["reused"] is True and c["recall_reference"]["kept"] > 0
