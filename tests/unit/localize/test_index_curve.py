"""Tests for reading an IVF index's recall curve from exact top lists instead of searching."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from cachebuild.localize import index as index_mod
from cachebuild.localize import index_reference, index_tune
from cachebuild.localize.describe import DESCRIPTOR_IDS_FILE, DESCRIPTORS_FILE
from cachebuild.localize.index import build_index
from cachebuild.localize.index_quantizer import rows_lists
from cachebuild.localize.index_tune import _NPROBE_LADDER, _recall, lists_tell, recall_by_lists

K = 10


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def ivf_over(vectors: np.ndarray, ids: np.ndarray, nlist: int) -> faiss.IndexIVFFlat:
    ivf = faiss.IndexIVFFlat(
        faiss.IndexFlatIP(vectors.shape[1]), vectors.shape[1], nlist, faiss.METRIC_INNER_PRODUCT
    )
    ivf.train(vectors)
    ivf.add_with_ids(vectors, ids)
    return ivf


def exact_lists(vectors: np.ndarray, queries: np.ndarray, keep: int) -> tuple[np.ndarray, ...]:
    sims = queries @ vectors.T
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :keep]
    top = np.take_along_axis(sims, rows, axis=1)
    return top, rows, top[:, K - 1]


def test_the_curve_read_from_the_lists_is_the_searched_recall() -> None:
    vectors = unit_vectors(6_000, 16)
    ids = np.random.default_rng(1).choice(2**40, size=len(vectors), replace=False).astype(np.int64)
    ivf = ivf_over(vectors, ids, 64)
    lists = rows_lists(faiss, ivf, ids)
    assert lists.min() >= 0  # every row found in some list
    queries = vectors[:300]
    sims, rows, kth = exact_lists(vectors, queries, 2 * K)
    ladder = tuple(v for v in _NPROBE_LADDER if v < 64) + (64,)
    assert lists_tell(sims, rows, kth, K)
    curve = recall_by_lists(ivf, queries, kth, K, (sims, rows, lists), ladder)
    assert curve is not None
    for value in ladder:
        ivf.nprobe = value
        assert curve[value] == pytest.approx(_recall(ivf, queries, kth, K), abs=1e-9), value
    assert curve[1] < 0.95 <= curve[64] == 1.0  # the data make the curve non-trivial


def test_lists_all_tied_do_not_tell() -> None:
    base = unit_vectors(2_000, 16, seed=2)
    vectors = np.concatenate([base, np.repeat(base[:1], 3 * K, axis=0)])  # 31 copies of row 0
    ids = np.arange(len(vectors), dtype=np.int64) * 3
    ivf = ivf_over(vectors, ids, 16)
    sims, rows, kth = exact_lists(vectors, vectors[:50], 2 * K)
    lists = rows_lists(faiss, ivf, ids)
    # query 0's top 20 all tie its 10th: a vector outside them may tie too
    assert not lists_tell(sims, rows, kth, K)
    assert recall_by_lists(ivf, vectors[:50], kth, K, (sims, rows, lists), (1, 16)) is None
    # only k entries never tell: the k-th ties itself
    assert not lists_tell(sims[1:, :K], rows[1:, :K], kth[1:], K)
    assert lists_tell(sims[1:], rows[1:], kth[1:], K)


def test_a_rebuild_tunes_by_the_lists_to_the_same_nprobe_and_recall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that keeps exact lists (reuse) searches no recall, first or second; searching
    instead gives the same nprobe and recall."""
    vectors = unit_vectors(12_000, 32, seed=5)
    ids = np.arange(len(vectors), dtype=np.int64) * 5 + 3
    src = tmp_path / "d"
    src.mkdir()
    np.save(src / DESCRIPTORS_FILE, vectors)
    np.save(src / DESCRIPTOR_IDS_FILE, ids)
    searches: list[int] = []
    real = index_tune._recall

    def counted(*a: object, **k: object) -> float:
        searches.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(index_tune, "_recall", counted)
    monkeypatch.setattr(index_reference, "_MERGE_MIN_FLOPS", 0)  # merge, as a large area does

    def build(where: str) -> dict:
        out = tmp_path / where / "index.faiss"
        return build_index(descriptors_dir=src, out_path=out, reuse=True, engine_key="e")

    first = build("a")
    by_lists = build("a")  # the second from the kept reference
    assert first["kind"] == "ivf" and by_lists["recall_reference"]["kept"] > 0
    assert not searches
    # the same build told to search: the same nprobe and recall
    monkeypatch.setattr(index_mod, "lists_tell", lambda *a: False)
    build("b")
    searched = build("b")
    assert searches
    assert by_lists["params"] == searched["params"]
    assert by_lists["recall_at_10"] == pytest.approx(searched["recall_at_10"], abs=1e-9)
