"""Measuring and tuning an index's search parameter (cachebuild.localize.index's notes).

The search parameter (HNSW ``efSearch``, IVF ``nprobe``) is the smallest
value on a ladder whose recall@10 against exact search reaches
:data:`RECALL_TARGET`; the exact top 10 comes from faiss's flat search,
chunk by chunk.

numpy is imported inside the functions; faiss is passed in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cachebuild._util.npyio import iter_npy_rows, npy_shape

__all__ = [
    "RECALL_TARGET",
    "exact_top_k",
    "one_thread_below",
    "lists_tell",
    "predict_nprobe",
    "recall_by_lists",
]

#: The recall@10 the search parameter is tuned to reach.
RECALL_TARGET = 0.95
#: Passes (multiply-adds) below this run on one thread: threads cost more than they share.
_ONE_THREAD_FLOPS = 2 * 10**9
_EF_LADDER = (16, 32, 64, 128, 256, 512, 1024)
_NPROBE_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _set_search_param(faiss: Any, index: Any, kind: str, value: int) -> None:
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = int(value)
    elif kind == "ivf":
        index.nprobe = int(value)


def _exact_top(faiss: Any, path: Path, queries: Any, k: int) -> tuple[Any, Any]:
    """``(kth, rows)``: each query's k-th best exact similarity and the rows of its exact top k."""
    best, rows = exact_top_k(faiss, path, queries, k)
    return best[:, k - 1], rows


def exact_top_k(faiss: Any, path: Path, queries: Any, k: int) -> tuple[Any, Any]:
    """``(sims, rows)``, each ``[queries, k]``: every query's exact top k over ``path``, best first.

    One pass over the descriptors: each chunk is searched exactly (faiss's
    flat search: BLAS and a heap) and the k best kept across chunks.  A
    pass of under :data:`_ONE_THREAD_FLOPS` runs on one thread (thread start
    and barriers would cost more than the arithmetic; docs/design/quantizer-reuse.md).
    """
    import numpy as np

    shape, _ = npy_shape(path)
    with one_thread_below(faiss, len(queries) * shape[0] * shape[1]):
        best = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for start, chunk in iter_npy_rows(path, chunk_rows=16_384):
            flat = faiss.IndexFlatIP(chunk.shape[1])
            flat.add(np.ascontiguousarray(chunk))
            sims, ids = flat.search(queries, min(k, len(chunk)))
            both = np.concatenate([best, sims], axis=1)
            both_rows = np.concatenate([rows, np.where(ids >= 0, ids + start, -1)], axis=1)
            order = np.argsort(-both, axis=1, kind="stable")[:, :k]
            best = np.take_along_axis(both, order, axis=1)
            rows = np.take_along_axis(both_rows, order, axis=1)
    return best, rows


@contextmanager
def one_thread_below(faiss: Any, flops: int) -> Iterator[None]:
    """faiss on one thread meanwhile when ``flops`` (queries x vectors x dim) is under
    :data:`_ONE_THREAD_FLOPS` (see :func:`exact_top_k`), else as it was."""
    threads = faiss.omp_get_max_threads()
    if flops < _ONE_THREAD_FLOPS:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def predict_nprobe(
    faiss: Any, index: Any, queries: Any, neighbours: Any, ladder: tuple[int, ...]
) -> int:
    """The smallest ``nprobe`` on the ladder whose recall@k should reach the target, without searching.

    A true neighbour is found once its list is probed, and a query probes
    its lists in the order of the quantizer's scores: so the ``nprobe`` a
    query needs for each neighbour is that list's rank for the query.  One
    quantizer search and one assignment give the whole recall curve; the
    caller still measures recall at the value chosen (ties at the k-th
    score can differ).  ``neighbours`` are the vectors of each query's
    exact top k, shape ``(queries, k, dim)``.
    """
    import numpy as np

    q, k, dim = neighbours.shape
    nlist = int(index.nlist)
    _, order = index.quantizer.search(queries, nlist)
    rank = np.empty_like(order)  # each list's place in each query's probe order
    rank[np.arange(q)[:, None], order] = np.arange(nlist)
    _, lists = index.quantizer.search(np.ascontiguousarray(neighbours.reshape(q * k, dim)), 1)
    need = np.take_along_axis(rank, lists.reshape(q, k), axis=1) + 1
    for value in ladder:
        if float(np.mean(np.sum(need <= value, axis=1) / k)) >= RECALL_TARGET:
            return value
    return ladder[-1]


def lists_tell(sims: Any, rows: Any, kth: Any, k: int) -> bool:
    """Whether exact lists of more than ``k`` entries hold every vector within 1e-5 of each
    query's k-th best: some known entry of each falls below that (the rest are no closer)."""
    import numpy as np

    lowest = np.min(np.where(rows >= 0, sims, np.inf), axis=1)
    return sims.shape[1] > k and bool(np.all(lowest < kth - 1e-5))


def recall_by_lists(
    index: Any,
    queries: Any,
    kth: Any,
    k: int,
    listed: tuple[Any, Any, Any],
    ladder: tuple[int, ...],
) -> dict[int, float] | None:
    """recall@k at every ``nprobe`` on the ladder, from the exact top lists, without searching.

    ``listed``: ``(sims, rows, row lists)``: each query's exact best rows
    (more than ``k``, -1 where unknown) with their similarities, and the IVF
    list of every row (:func:`cachebuild.localize.index_quantizer.rows_lists`).
    A search with ``nprobe`` p probes a query's p best-scoring lists and
    returns the k best of what they hold, with exact scores; it scores a hit
    (:func:`_recall`) for each returned vector within 1e-5 of the k-th best.
    So it scores min(k, the vectors within 1e-5 of the k-th best whose list
    is among the p), which the lists give for every p at once. None when a
    query's lists may miss such a vector (every known entry ties the k-th):
    then only a search tells.
    """
    import numpy as np

    sims, rows, lists = listed
    if not lists_tell(sims, rows, kth, k):
        return None
    tie = kth[:, None] - 1e-5
    q, nlist = len(queries), int(index.nlist)
    _, order = index.quantizer.search(queries, nlist)
    rank = np.empty_like(order)  # each list's place in each query's probe order
    rank[np.arange(q)[:, None], order] = np.arange(nlist)
    counts = (rows >= 0) & (sims >= tie)
    need = np.take_along_axis(rank, lists[np.maximum(rows, 0)].astype(np.int64), axis=1) + 1
    need = np.where(counts, need, nlist + 1)
    return {v: float(np.mean(np.minimum(k, np.sum(need <= v, axis=1)) / k)) for v in ladder}


def _recall(index: Any, queries: Any, kth: Any, k: int) -> float:
    """recall@k: the share of results at least as similar as the exact k-th best.

    The returned scores of Flat, HNSW-Flat and IVF-Flat are exact inner
    products (the vectors are stored uncompressed), so ties at the k-th
    place count as hits whichever tied tile the index returned.
    """
    import numpy as np

    scores, ids = index.search(queries, k)
    hits = (ids >= 0) & (scores >= kth[:, None] - 1e-5)
    return float(np.mean(np.sum(hits, axis=1) / k))


def _tune(
    faiss: Any,
    index: Any,
    plan: Any,
    queries: Any,
    kth: Any,
    k: int,
    hint: int | None,
    neighbours: Any = None,
    listed: tuple[Any, Any, Any] | None = None,
) -> tuple[int, float]:
    """The smallest search parameter on the ladder whose recall@k reaches the target, and that recall.

    IVF-Flat's recall grows with nprobe (more lists probed, exact scores: a
    result is never lost).  Given the exact neighbours' vectors, the value
    is predicted (:func:`predict_nprobe`) and measured; else, or when the
    measurement falls short, the ladder is bisected, starting at ``hint``
    (the last build's nprobe); ``nprobe = nlist`` is exhaustive and always
    reaches it.  Given ``listed`` (:func:`recall_by_lists`), recall is read
    from the lists for every value and no search runs.  HNSW's efSearch is walked up from the bottom.
    """
    measured: dict[int, float] = {}

    def recall_at(value: int) -> float:
        if value not in measured:
            _set_search_param(faiss, index, plan.kind, value)
            measured[value] = _recall(index, queries, kth, k)
        return measured[value]

    if plan.kind == "ivf":
        nlist = plan.params["nlist"]
        ladder = tuple(v for v in _NPROBE_LADDER if v < nlist) + (nlist,)
        curve = None if listed is None else recall_by_lists(index, queries, kth, k, listed, ladder)
        if curve is not None:
            measured.update(curve)
        lo, hi = (
            0,
            len(ladder) - 1,
        )  # the answer is in ladder[lo..hi]; ladder[hi] reaches the target
        guess = (
            predict_nprobe(faiss, index, queries, neighbours, ladder)
            if neighbours is not None and curve is None
            else None
        )
        if curve is not None:
            lo = hi = next(i for i, v in enumerate(ladder) if curve[v] >= RECALL_TARGET)
        elif guess is not None:  # exact but for ties: one search confirms it
            g = ladder.index(guess)
            lo, hi = (g, g) if recall_at(guess) >= RECALL_TARGET else (g + 1, hi)
        elif hint is not None and int(hint) in ladder:
            # most rebuilds need the hint's value again: two searches tell
            h = ladder.index(int(hint))
            if recall_at(ladder[h]) >= RECALL_TARGET:
                hi = h
                if h > 0 and recall_at(ladder[h - 1]) >= RECALL_TARGET:
                    hi = h - 1
                else:
                    lo = h
            else:
                lo = h + 1
                if lo < hi and recall_at(ladder[lo]) >= RECALL_TARGET:
                    hi = lo
        while lo < hi:
            mid = (lo + hi) // 2
            if recall_at(ladder[mid]) >= RECALL_TARGET:
                hi = mid
            else:
                lo = mid + 1
        value = ladder[lo]
    else:
        for value in {"hnsw": _EF_LADDER}.get(plan.kind, (0,)):
            if recall_at(value) >= RECALL_TARGET:
                break
    recall = recall_at(value)  # also leaves the index set to it
    _set_search_param(faiss, index, plan.kind, value)
    return int(value), recall
