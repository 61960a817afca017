"""The trained IVF quantizer a build keeps for the next (cachebuild.localize.index's notes).

:data:`QUANTIZER_FILE` holds the centroids, the 64-bit fingerprints of the
vectors they were trained from, and what they are valid for (engine key,
kind, metric, dimension, plan family); anything unreadable or foreign is
not used.

numpy is imported inside the functions.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

__all__ = ["INDEX_METRIC", "QUANTIZER_FILE", "MAX_UNTRAINED_SHARE"]

INDEX_METRIC = "inner_product"
#: Beside the index: the trained IVF centroids and the population they came from.
QUANTIZER_FILE = "index-quantizer.npz"
#: Retrain when more than this share of the vectors is new to the quantizer.
MAX_UNTRAINED_SHARE = 0.3
_QUANTIZER_FORMAT = 2  # 2: fingerprints by _fingerprints' multilinear hash
#: The plan family: a saved quantizer of K lists serves N vectors whose plan asks for K' lists,
#: 1/_FAMILY <= K' / K <= _FAMILY.
_FAMILY = 1.25


def _fingerprints(chunk: Any) -> Any:
    """A 64-bit fingerprint of each row's bytes: which vectors a quantizer has seen.

    A multilinear hash (each 8-byte word times its own fixed odd 64-bit key,
    summed modulo 2**64) finished by splitmix64's mixer, in whole-array
    numpy: a per-row ``hashlib`` call was 0.4-0.7 s at 320k rows.  Not a
    cryptographic hash: it tells vectors apart, an adversary is not in play.
    """
    import numpy as np

    rows = np.ascontiguousarray(chunk)
    if not len(rows):
        return np.zeros(0, dtype="<u8")
    raw = rows.reshape(len(rows), -1).view(np.uint8)
    pad = -raw.shape[1] % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((len(raw), pad), dtype=np.uint8)], axis=1)
    words = np.ascontiguousarray(raw).view("<u8")
    keys = _keys(words.shape[1])
    with np.errstate(over="ignore"):
        h = (
            (words * keys).sum(axis=1, dtype=np.uint64)
            if words.size
            else np.zeros(len(rows), "<u8")
        )
        h = h ^ (h >> np.uint64(30))
        h = h * np.uint64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> np.uint64(27))
        h = h * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return h.astype("<u8")


def _keys(width: int) -> Any:
    """The fixed odd 64-bit keys of :func:`_fingerprints`, one per word (the same in every run)."""
    import numpy as np

    rng = np.random.default_rng(0x51F7_6E0A)
    return rng.integers(0, 2**63, size=width, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _load_quantizer(
    path: Path, *, engine_key: str | None, plan: Any, dim: int
) -> tuple[Any, Any, dict[str, Any], str]:
    """``(centroids, population, meta, "")`` of a saved quantizer that fits, else ``(None, None, {}, why not)``."""
    import numpy as np

    if plan.kind != "ivf":
        why = (
            "HNSW is rebuilt (faiss cannot remove vectors from it)"
            if plan.kind == "hnsw"
            else "nothing to train"
        )
        return None, None, {}, why
    if engine_key is None:
        return None, None, {}, "no engine key given"
    if not path.is_file():
        return None, None, {}, "no saved quantizer"
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"][()]))
            centroids = np.ascontiguousarray(z["centroids"], dtype=np.float32)
            population = np.ascontiguousarray(z["population"], dtype="<u8")
        if not isinstance(meta, dict) or meta.get("format") != _QUANTIZER_FORMAT:
            raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else meta!r}")
        nlist = int(meta["nlist"])
        if centroids.shape != (nlist, int(meta["dim"])) or not np.all(np.isfinite(centroids)):
            raise ValueError(f"centroids {list(centroids.shape)} do not match nlist {nlist}")
        if population.ndim != 1 or not len(population) or np.any(population[1:] < population[:-1]):
            raise ValueError("population fingerprints are not a sorted list")
    except Exception as exc:  # truncated, garbage, a zip that is not ours: train again
        return (
            None,
            None,
            {},
            f"saved quantizer unreadable ({type(exc).__name__}: {str(exc)[:120]})",
        )
    for field_, want in (
        ("engine_key", engine_key),
        ("kind", plan.kind),
        ("metric", INDEX_METRIC),
        ("dim", dim),
    ):
        if meta.get(field_) != want:
            return None, None, {}, f"saved quantizer is of another {field_.replace('_', ' ')}"
    ratio = plan.params["nlist"] / nlist
    if not 1 / _FAMILY <= ratio <= _FAMILY:
        return (
            None,
            None,
            {},
            f"saved quantizer has {nlist} lists, these vectors ask for {plan.params['nlist']}",
        )
    return centroids, population, meta, ""


def _save_quantizer(
    path: Path, centroids: Any, population: Any, meta: dict[str, Any], lists: Any = None
) -> None:
    """Write the quantizer file through a temp file and a rename (never in place).

    ``lists``: :func:`_assignments`' ``(fingerprints, list numbers)`` of this build's vectors.
    """
    import numpy as np

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    extra = {} if lists is None else {"assigned": lists[0], "lists": lists[1]}
    try:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                meta=np.array(json.dumps(meta, sort_keys=True)),
                centroids=np.ascontiguousarray(centroids, dtype=np.float32),
                population=np.ascontiguousarray(population, dtype="<u8"),
                **extra,
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rows_lists(faiss: Any, index: Any, ids: Any) -> Any:
    """int32 ``[n]``: the IVF list each row's vector is in, read from the inverted lists
    (ids mapped to rows), one pass over them."""
    import numpy as np

    inv = index.invlists
    sizes = np.array([inv.list_size(lst) for lst in range(index.nlist)], dtype=np.int64)
    got = [faiss.rev_swig_ptr(inv.get_ids(lst), int(s)) for lst, s in enumerate(sizes) if s]
    listed = np.concatenate(got) if got else np.empty(0, dtype=np.int64)
    owner = np.repeat(np.arange(index.nlist, dtype=np.int32), sizes)
    order = np.argsort(ids, kind="stable")
    lists = np.full(len(ids), -1, dtype=np.int32)
    lists[order[np.searchsorted(ids[order], listed)]] = owner
    return lists


def _assignments(prints: Any, lists: Any) -> tuple[Any, Any]:
    """``(fingerprints, lists)`` sorted by fingerprint, from :func:`rows_lists`' ``lists``:
    what the next build adds with :func:`_add_assigned` instead of searching the centroids again."""
    import numpy as np

    assigned, first = np.unique(prints, return_index=True)
    return assigned.astype("<u8"), lists[first]


def _load_assignments(path: Path, nlist: int) -> tuple[Any, Any] | None:
    """The saved ``(fingerprints, lists)`` when present and sound, else None."""
    import numpy as np

    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            assigned = np.asarray(z["assigned"])
            lists = np.asarray(z["lists"])
    except Exception:  # absent (an older file) or unreadable: search the centroids
        return None
    if (
        assigned.dtype != np.dtype("<u8")
        or lists.dtype != np.int32
        or assigned.shape != lists.shape
        or assigned.ndim != 1
        or not bool(np.all(assigned[1:] > assigned[:-1]))
        or not bool(np.all((lists >= 0) & (lists < nlist)))
    ):
        return None
    return assigned, lists


def _add_assigned(
    faiss: Any, index: Any, chunk: Any, ids: Any, prints: Any, saved: tuple[Any, Any]
) -> int:
    """Add ``chunk`` to the CPU IVF ``index`` in the lists saved for its vectors (the same
    index as ``add_with_ids``: same lists, same order), searching the centroids only for
    vectors the saved ones lack; returns how many lists were reused."""
    import numpy as np

    assigned, lists = saved
    pos = np.clip(np.searchsorted(assigned, prints), 0, max(len(assigned) - 1, 0))
    known = (assigned[pos] == prints) if len(assigned) else np.zeros(len(prints), dtype=bool)
    where = np.where(known, lists[pos] if len(assigned) else 0, -1).astype(np.int64)
    if not known.all():
        _, found = index.quantizer.search(np.ascontiguousarray(chunk[~known]), 1)
        where[~known] = found[:, 0]
    x = np.ascontiguousarray(chunk, dtype=np.float32)
    xids = np.ascontiguousarray(ids, dtype=np.int64)
    where = np.ascontiguousarray(where)
    index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(xids), faiss.swig_ptr(where))
    return int(known.sum())
