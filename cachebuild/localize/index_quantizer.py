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
_QUANTIZER_FORMAT = 1
#: The plan family: a saved quantizer of K lists serves N vectors whose plan asks for K' lists,
#: 1/_FAMILY <= K' / K <= _FAMILY.
_FAMILY = 1.25


def _fingerprints(chunk: Any) -> Any:
    """A 64-bit fingerprint of each row's bytes (blake2b): which vectors a quantizer has seen."""
    import hashlib

    import numpy as np

    raw = b"".join(hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in chunk)
    return np.frombuffer(raw, dtype="<u8")


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


def _save_quantizer(path: Path, centroids: Any, population: Any, meta: dict[str, Any]) -> None:
    """Write the quantizer file through a temp file and a rename (never in place)."""
    import numpy as np

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                meta=np.array(json.dumps(meta, sort_keys=True)),
                centroids=np.ascontiguousarray(centroids, dtype=np.float32),
                population=np.ascontiguousarray(population, dtype="<u8"),
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
