"""The recall queries' exact top list, kept for the next build (cachebuild.localize.index's notes).

An index's recall@10 is measured against the exact top 10 of
``RECALL_QUERIES`` of the cache's own descriptors: one exact pass of
queries x N x D multiply-adds, the index phase's largest cost once a
quantizer is reused.  Where the vectors' fingerprints are known (an IVF
index built with ``reuse``), the queries are the vectors with the smallest
fingerprints (a hash of their bytes: a uniform sample, chosen by content,
not by row), so most of a shifted area's queries are the last build's.
:data:`REFERENCE_FILE` keeps each query's exact top list (fingerprints and
similarities, up to :func:`keep_for` ``k`` entries) and the fingerprints
of every vector; the next build then searches exactly only

- the vectors new since that build, for the queries it shares with it,
  and merges them into the kept list less the vectors gone.  A vector
  that was not on the kept list is no closer than its last entry, so the
  merged list is exact down to that similarity: kept (for this build and
  the next) as far as it reaches, used where it holds ``k`` entries;
- every vector, for the other queries (new ones, or ones whose exact list
  fell short of ``k``).

The result is the top list a full pass finds (ties aside: any of equally
close vectors).  Anything unreadable or foreign in the file is not used.

numpy is imported inside the functions; faiss is passed in.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from cachebuild._util.npyio import gather_npy_rows, iter_npy_rows
from cachebuild.localize.index_tune import exact_top_k, one_thread_below

__all__ = [
    "REFERENCE_FILE",
    "keep_for",
    "pick_queries",
    "exact_top_kept",
    "exact_recall_top",
    "keep_reference",
]

#: Beside the index: the recall queries' exact top lists and the vectors they were taken over.
REFERENCE_FILE = "index-recall.npz"
_FORMAT = 2  # 2: fingerprints by index_quantizer._fingerprints' multilinear hash
_CHUNK = 16_384


def keep_for(k: int, n: int) -> int:
    """Entries kept a query: twice ``k``, so that a few vectors gone leave ``k`` exact ones."""
    return min(2 * k, n)


def pick_queries(prints: Any, q: int) -> Any:
    """The rows of the ``q`` smallest fingerprints, in row order (ties: the first rows)."""
    import numpy as np

    return np.sort(np.argsort(prints, kind="stable")[:q])


def _load(path: Path, dim: int, keep: int) -> dict[str, Any] | None:
    """The kept reference when it is ours and consistent, else None."""
    import numpy as np

    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"][()]))
            ref = {k: np.asarray(z[k]) for k in ("prints", "queries", "top", "sims")}
    except Exception:  # missing, truncated, not ours: search in full
        return None
    p, q, top, sims = (ref[k] for k in ("prints", "queries", "top", "sims"))
    if (
        not isinstance(meta, dict)
        or meta.get("format") != _FORMAT
        or meta.get("dim") != dim
        or meta.get("keep") != keep
        or p.dtype != np.dtype("<u8")
        or q.dtype != np.dtype("<u8")
        or top.dtype != np.dtype("<u8")
        or sims.dtype != np.float32
        or p.ndim != 1
        or q.ndim != 1
        or top.shape != (len(q), keep)
        or sims.shape != top.shape
        or not bool(np.all(p[1:] > p[:-1]))
        or not bool(np.all(q[1:] > q[:-1]))
        or bool(np.any(np.isnan(sims) | (sims == np.inf)))
        or not bool(np.all(sims[:, 1:] <= sims[:, :-1]))
    ):
        return None
    return ref


def _in(sorted_set: Any, values: Any) -> Any:
    """Whether each of ``values`` is in the sorted, unique ``sorted_set``."""
    import numpy as np

    if not len(sorted_set):
        return np.zeros(np.shape(values), dtype=bool)
    pos = np.clip(np.searchsorted(sorted_set, values), 0, len(sorted_set) - 1)
    return sorted_set[pos] == values


def _new_vectors_top(faiss: Any, path: Path, queries: Any, new: Any, keep: int) -> tuple[Any, Any]:
    """Each query's exact top ``keep`` among the rows where ``new`` is set (one pass, by chunks)."""
    import numpy as np

    best = np.full((len(queries), keep), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), keep), -1, dtype=np.int64)
    for start, chunk in iter_npy_rows(path, chunk_rows=_CHUNK):
        picked = np.flatnonzero(new[start : start + len(chunk)])
        if not len(picked) or not len(queries):
            continue
        flat = faiss.IndexFlatIP(chunk.shape[1])
        flat.add(np.ascontiguousarray(chunk[picked]))
        with one_thread_below(faiss, len(queries) * len(picked) * chunk.shape[1]):
            sims, ids = flat.search(queries, min(keep, len(picked)))
        both = np.concatenate([best, sims], axis=1)
        both_rows = np.concatenate([rows, np.where(ids >= 0, picked[ids] + start, -1)], axis=1)
        order = np.argsort(-both, axis=1, kind="stable")[:, :keep]
        best = np.take_along_axis(both, order, axis=1)
        rows = np.take_along_axis(both_rows, order, axis=1)
    return best, rows


def _merge(
    ref: dict[str, Any], prints: Any, qp: Any, new_top: tuple[Any, Any], keep: int
) -> tuple[Any, Any, Any]:
    """``(exact entries, sims, rows)``: the kept lists less the vectors gone, merged with the new
    vectors' lists; entries past each list's exact part are -inf."""
    import numpy as np

    order = np.argsort(prints, kind="stable")
    by_print = prints[order]
    at = np.searchsorted(ref["queries"], qp)
    old, old_sims = ref["top"][at], ref["sims"][at]
    listed = np.isfinite(old_sims)
    alive = listed & _in(np.unique(prints), old)
    # a row that holds each kept vector now (equal fingerprints: equal bytes)
    old_rows = order[np.clip(np.searchsorted(by_print, old), 0, len(order) - 1)]
    new_sims, new_rows = new_top
    sims = np.concatenate([np.where(alive, old_sims, -np.inf), new_sims], axis=1)
    rows = np.concatenate([np.where(alive, old_rows, -1), new_rows], axis=1)
    pick = np.argsort(-sims, axis=1, kind="stable")[:, :keep]
    sims = np.take_along_axis(sims, pick, axis=1).astype(np.float32)
    rows = np.take_along_axis(rows, pick, axis=1)
    # a vector off a kept list is no closer than the list's last entry: above it, the list is exact
    last = np.min(np.where(listed, old_sims, np.inf), axis=1, keepdims=True)
    exact = np.isfinite(sims) & (sims >= last)
    sims[~exact] = -np.inf
    rows[~exact] = -1
    return exact.sum(axis=1), sims, rows


def exact_top_kept(
    faiss: Any,
    path: Path,
    prints: Any,
    rows: Any,
    queries: Any,
    k: int,
    keep: int,
    ref_path: Path | None,
    max_new_share: float = 1.0,
) -> tuple[Any, Any, dict[str, int]]:
    """``(sims, top rows, stats)``, each ``[queries, keep]``: the exact top lists, from the kept
    reference where it serves (module notes), by a full pass for the rest.

    ``prints`` are every vector's fingerprints, ``rows`` the queries' rows.
    ``stats``: ``kept`` (queries served from the reference), ``searched``
    (queries searched over every vector), ``new_vectors`` (vectors new since
    the reference, searched for the kept queries; -1: no reference, none
    asked for (``ref_path`` None), or more than ``max_new_share`` of the
    vectors are new).
    """
    import numpy as np

    q, dim = queries.shape
    sims = np.full((q, keep), -np.inf, dtype=np.float32)
    top = np.full((q, keep), -1, dtype=np.int64)
    served = np.zeros(q, dtype=bool)
    stats = {"kept": 0, "searched": q, "new_vectors": -1}
    ref = None if ref_path is None else _load(ref_path, dim, keep)
    if ref is not None:
        qp = prints[rows]
        known = np.flatnonzero(_in(ref["queries"], qp))
        new = ~_in(ref["prints"], prints)
        if new.sum() > max_new_share * len(prints):
            known = known[:0]
        else:
            stats["new_vectors"] = int(new.sum())
        if len(known):
            found = _new_vectors_top(faiss, path, queries[known], new, keep)
            exact, s, r = _merge(ref, prints, qp[known], found, keep)
            exact = exact >= k
            served[known[exact]] = True
            sims[known[exact]], top[known[exact]] = s[exact], r[exact]
    rest = np.flatnonzero(~served)
    if len(rest):
        sims[rest], top[rest] = exact_top_k(faiss, path, queries[rest], keep)
    stats["kept"], stats["searched"] = int(served.sum()), int(len(rest))
    return sims, top, stats


def save_reference(path: Path, prints: Any, rows: Any, sims: Any, top: Any, dim: int) -> None:
    """Keep the queries' exact top lists (as fingerprints) for the next build; temp file, rename."""
    import numpy as np

    qp = prints[rows]
    _, first = np.unique(qp, return_index=True)  # a vector drawn twice is kept once
    meta = {"format": _FORMAT, "dim": int(dim), "keep": int(top.shape[1])}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                meta=np.array(json.dumps(meta, sort_keys=True)),
                prints=np.unique(prints).astype("<u8"),
                queries=qp[first].astype("<u8"),
                top=np.where(top[first] >= 0, prints[np.maximum(top[first], 0)], 0).astype("<u8"),
                sims=np.ascontiguousarray(sims[first], dtype=np.float32),
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: Past this share of new vectors the kept lists are not worth merging: one full pass.
_MAX_NEW_SHARE = 0.5
#: A full pass of fewer multiply-adds (queries x vectors x dim) is cheaper than loading and
#: merging the kept lists (under about 5k tiles): the lists are still kept for the next build.
_MERGE_MIN_FLOPS = 2 * 10**10


def exact_recall_top(
    faiss: Any, path: Path, prints: Any, rng: Any, n: int, q: int, k: int, ref_path: Path | None
) -> tuple[Any, Any, Any, dict[str, Any] | None]:
    """``(queries, kth, top rows, kept)``: the recall queries, their exact k-th similarity and top ``k``.

    Without fingerprints (``prints`` empty) or ``ref_path``: ``q`` rows drawn
    by ``rng`` and one full pass, as for a flat or HNSW index.  Else the
    content-chosen queries of the module notes, and ``kept`` what
    :func:`keep_reference` saves (with ``stats``); the kept lists are
    merged only when a full pass would be large (:data:`_MERGE_MIN_FLOPS`).
    """
    import numpy as np

    if not len(prints) or ref_path is None:
        rows = np.sort(rng.choice(n, size=q, replace=False))
        queries = np.ascontiguousarray(gather_npy_rows(path, rows))
        sims, top = exact_top_k(faiss, path, queries, k)
        return queries, sims[:, k - 1], top, None
    rows = pick_queries(prints, q)
    queries = np.ascontiguousarray(gather_npy_rows(path, rows))
    merge = q * n * queries.shape[1] >= _MERGE_MIN_FLOPS
    sims, top, stats = exact_top_kept(
        faiss, path, prints, rows, queries, k, keep_for(k, n), ref_path if merge else None,
        _MAX_NEW_SHARE,
    )  # fmt: skip
    kept = {"rows": rows, "sims": sims, "top": top, "stats": stats}
    return queries, sims[:, k - 1], top[:, :k], kept


def keep_reference(path: Path, prints: Any, kept: dict[str, Any] | None, dim: int) -> Any:
    """Save the reference for the next build (or remove a stale one); this build's ``stats``."""
    if kept is None:
        path.unlink(missing_ok=True)  # nothing to serve from: no stale one either
        return None
    save_reference(path, prints, kept["rows"], kept["sims"], kept["top"], dim)
    return kept["stats"]
