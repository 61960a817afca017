"""Tests for cachebuild.localize.index_reference: the recall queries' exact top lists kept for the next build."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from cachebuild.localize import index_reference
from cachebuild.localize.index_quantizer import _fingerprints
from cachebuild.localize.index_reference import (
    REFERENCE_FILE,
    exact_recall_top,
    keep_reference,
    pick_queries,
)
from cachebuild.localize.index_tune import exact_top_k

DIM, N, Q, K = 32, 3_000, 200, 10


@pytest.fixture(autouse=True)
def merge_small(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """These areas are small: merge the kept lists anyway (what larger ones do), unless a
    test is about the size rule."""
    if "full_pass" not in request.node.name:
        monkeypatch.setattr(index_reference, "_MERGE_MIN_FLOPS", 0)


def clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 40 centres: near neighbours that a shift takes away."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM))
    v = centres[rng.integers(0, 40, n)] + 0.4 * rng.standard_normal((n, DIM))
    v = v.astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def area(tmp_path: Path, vectors: np.ndarray, start: int, name: str) -> tuple[Path, np.ndarray]:
    """``N`` vectors from ``start`` written as descriptors.npy, with their fingerprints."""
    path = tmp_path / name / "descriptors.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    v = np.ascontiguousarray(vectors[start : start + N])
    np.save(path, v)
    return path, _fingerprints(v)


def check_exact(path: Path, queries: np.ndarray, kth: np.ndarray, top: np.ndarray) -> None:
    """The k-th similarity and the top rows are a full exact pass's (to float rounding)."""
    sims, _ = exact_top_k(faiss, path, queries, K)
    np.testing.assert_allclose(kth, sims[:, K - 1], atol=1e-5)
    v = np.load(path)
    np.testing.assert_allclose(np.einsum("qd,qkd->qk", queries, v[top]), sims, atol=1e-5)


def test_successive_shifts_keep_the_exact_top_lists_and_search_less(tmp_path: Path) -> None:
    vectors = clustered(N + 5 * N // 10, seed=3)
    ref = tmp_path / REFERENCE_FILE
    rng = np.random.default_rng(0)
    for step in range(5):  # the area moves by a tenth each time
        path, prints = area(tmp_path, vectors, step * N // 10, f"s{step}")
        queries, kth, top, kept = exact_recall_top(faiss, path, prints, rng, N, Q, K, ref)
        check_exact(path, queries, kth, top)
        # the queries are the smallest fingerprints: chosen by content, not by row
        rows = pick_queries(prints, Q)
        np.testing.assert_array_equal(queries, np.load(path)[rows])
        assert np.all(np.sort(prints)[Q - 1] >= prints[rows])
        stats = keep_reference(ref, prints, kept, DIM)
        if step == 0:
            assert stats == {"kept": 0, "searched": Q, "new_vectors": -1}
        else:
            assert stats["new_vectors"] == N // 10
            assert stats["kept"] + stats["searched"] == Q and stats["kept"] > Q // 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"not a zip"),
        lambda p: p.write_bytes(p.read_bytes()[:200]),
        lambda p: None,  # a reference of other vectors: their queries are not these
    ],
)
def test_an_unusable_reference_means_a_full_pass(tmp_path: Path, damage: object) -> None:
    rng = np.random.default_rng(0)
    ref = tmp_path / REFERENCE_FILE
    other, other_prints = area(tmp_path, clustered(N, seed=9), 0, "other")
    _, _, _, kept = exact_recall_top(faiss, other, other_prints, rng, N, Q, K, ref)
    keep_reference(ref, other_prints, kept, DIM)
    damage(ref)  # type: ignore[operator]
    path, prints = area(tmp_path, clustered(N, seed=3), 0, "mine")
    queries, kth, top, kept = exact_recall_top(faiss, path, prints, rng, N, Q, K, ref)
    check_exact(path, queries, kth, top)
    assert kept is not None and kept["stats"]["kept"] == 0 and kept["stats"]["searched"] == Q


def test_without_fingerprints_the_queries_are_drawn_and_nothing_is_kept(tmp_path: Path) -> None:
    path, _ = area(tmp_path, clustered(N, seed=3), 0, "flat")
    ref = tmp_path / REFERENCE_FILE
    ref.write_bytes(b"stale")
    queries, kth, top, kept = exact_recall_top(
        faiss, path, np.empty(0, "<u8"), np.random.default_rng(0), N, Q, K, None
    )
    check_exact(path, queries, kth, top)
    assert kept is None and keep_reference(ref, np.empty(0, "<u8"), kept, DIM) is None
    assert not ref.exists()


def test_a_small_area_takes_a_full_pass_and_still_keeps_its_lists(tmp_path: Path) -> None:
    """Under _MERGE_MIN_FLOPS loading and merging costs more than the pass: none is merged,
    the answer is the same, and the lists are kept for a later, larger build."""
    assert Q * N * DIM < index_reference._MERGE_MIN_FLOPS
    vectors = clustered(N + N // 10, seed=3)
    ref = tmp_path / REFERENCE_FILE
    rng = np.random.default_rng(0)
    path, prints = area(tmp_path, vectors, 0, "a")
    _, _, _, kept = exact_recall_top(faiss, path, prints, rng, N, Q, K, ref)
    keep_reference(ref, prints, kept, DIM)
    path, prints = area(tmp_path, vectors, N // 10, "b")
    queries, kth, top, kept = exact_recall_top(faiss, path, prints, rng, N, Q, K, ref)
    check_exact(path, queries, kth, top)
    assert kept is not None and kept["stats"] == {"kept": 0, "searched": Q, "new_vectors": -1}
    assert keep_reference(ref, prints, kept, DIM) == kept["stats"] and ref.exists()
