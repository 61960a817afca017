"""The FAISS index over the tile descriptors, chosen by size.

Descriptors are unit vectors, so the inner product is the cosine
similarity; every index answers tile ids, not row numbers.  Which index,
after the faiss wiki's "Guidelines to choose an index" and autofaiss:

==========  ==========================  ===================================
N           index                       parameters
==========  ==========================  ===================================
< 10k       ``IDMap2,Flat`` (exact)     none: exact, and as fast as anything
>= 10k      ``IVF{K},Flat``             K = 4 sqrt(N) lists, trained on
                                        min(N, 64 K) >= 39 K sampled
                                        vectors; nprobe tuned (below)
``hnsw``    ``IDMap2,HNSW32,Flat``      M = 32, efConstruction = 40;
                                        efSearch tuned (below)
==========  ==========================  ===================================

The faiss wiki would take HNSW while it fits in memory: it answers a query
fastest.  Here a query is one camera frame at a time, which either index
answers in well under a millisecond at these sizes, while the *build*
matters: a shifted bbox rebuilds the index.  HNSW adds a vector by a graph
search that slows as the graph grows, IVF trains k-means on a sample and
then adds cheaply, at a recall@10 tuned to the same target; and IVF also
runs on GPUs.  So ``auto``
takes IVF above the exact range; ``INDEX=hnsw`` builds HNSW, and
``INDEX=flat|ivf`` force the others.

The search parameter (HNSW ``efSearch``, IVF ``nprobe``) is chosen from N
by measurement: the smallest value on a ladder whose recall@10 against
exact search reaches :data:`RECALL_TARGET`, on :data:`RECALL_QUERIES`
descriptors of the cache itself.  It is saved in the index file, and the
recall@10 of the index as saved is reported in ``index.json`` (and the
manifest's ``info``).

Everything is streamed from ``descriptors.npy`` in chunks
(:mod:`cachebuild._util.npyio`): memory is the index itself plus constants (and
8 bytes a vector for its fingerprint, below).

Rebuilds reuse the trained quantizer.  Training the IVF k-means is the
index's one whole-area cost (adding a vector is one search among K
centroids).  A build
(``reuse=True``) keeps the IVF centroids beside the index in
:data:`QUANTIZER_FILE`, with the 64-bit fingerprints (blake2b of the
vector's bytes) of the vectors the k-means was trained from.  The next
build of the same engine key, kind and plan family (an ``IVF{K}`` whose
``K`` is within x0.8..1.25 of what N asks for) starts a fresh IVF from
those centroids and only adds the vectors: a bbox shifted by 10% finds
90% of its vectors in the trained population.  It trains from scratch
when more than :data:`MAX_UNTRAINED_SHARE` of the vectors are new to the
quantizer (so successive shifts retrain every third or fourth time), when
the reused quantizer needs more than twice the ``nprobe`` it was tuned to
when trained (the new vectors crowd a few lists), or when the saved
quantizer is missing, unreadable or of another engine, kind, dimension or
family.  ``index.json`` (and so the manifest) says which under
``quantizer``: ``reused``, ``trained_on_share`` (of the vectors indexed,
the share that was in the population the k-means was trained from),
``trained_points`` and ``reason``.  Recall@10 is measured on the index as
built either way, so reuse cannot hide a worse index.  Flat indexes have
nothing to train; HNSW is rebuilt, as faiss cannot remove vectors from an
HNSW graph.  The exact top 10 that recall is measured against comes from
faiss's flat search, chunk by chunk, and IVF's nprobe is bisected.

Why IVF and not HNSW, with figures: docs/design/index-choice.md; why the
quantizer is reused up to 30% new vectors: docs/design/quantizer-reuse.md.

Where faiss sees a GPU (faiss-gpu, ``faiss.get_num_gpus() > 0``), an IVF
index is trained and filled on GPU 0 (``index_cpu_to_gpu``) and copied
back (``index_gpu_to_cpu``) before tuning and writing, so the file is a
CPU index that loads anywhere; ``index.json`` says ``device: gpu``.  A
failure on the GPU (out of memory) builds on the CPU instead and says why.
Flat indexes (a memory copy to fill) and HNSW (no GPU implementation in
faiss) are built on the CPU.

faiss is imported inside the functions that use it.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachebuild._util.cpus import usable_cpus
from cachebuild._util.npyio import gather_npy_rows, iter_npy_rows, npy_shape
from cachebuild.errors import BuildError, UsageError
from cachebuild.localize.describe import DESCRIPTOR_IDS_FILE, DESCRIPTORS_FILE
from cachebuild.localize.places import POSITIONS_FILE, write_positions

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "INDEX_KINDS",
    "INDEX_METRIC",
    "FLAT_MAX",
    "HNSW_M",
    "HNSW_EF_CONSTRUCTION",
    "RECALL_TARGET",
    "RECALL_QUERIES",
    "QUANTIZER_FILE",
    "MAX_UNTRAINED_SHARE",
    "IndexPlan",
    "plan_index",
    "build_index",
    "load_index",
    "search",
]

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
INDEX_METRIC = "inner_product"
#: ``auto``: exact search below this many vectors.
FLAT_MAX = 10_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
#: The recall@10 the search parameter is tuned to reach.
RECALL_TARGET = 0.95
#: Descriptors of the cache used as queries to measure recall@10.
RECALL_QUERIES = 1000
#: Beside the index: the trained IVF centroids and the population they came from.
QUANTIZER_FILE = "index-quantizer.npz"
#: Retrain when more than this share of the vectors is new to the quantizer.
MAX_UNTRAINED_SHARE = 0.3
_QUANTIZER_FORMAT = 1
#: The plan family: a saved quantizer of K lists serves N vectors whose plan asks for K' lists,
#: 1/_FAMILY <= K' / K <= _FAMILY.
_FAMILY = 1.25
#: Retrain when the reused quantizer needs more than this times the nprobe it was trained with.
_NPROBE_GROWTH = 2
#: Exact recall passes (queries x N x D multiply-adds) below this run on one thread.
_ONE_THREAD_FLOPS = 2 * 10**10
_EF_LADDER = (16, 32, 64, 128, 256, 512, 1024)
_NPROBE_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TRAIN_PER_LIST = 64
_MIN_TRAIN_PER_LIST = 39
_PHASE = "index"


@dataclass(frozen=True)
class IndexPlan:
    """Which index to build for N vectors, and its build parameters.

    Attributes
    ----------
    kind
        ``flat``, ``hnsw`` or ``ivf``.
    description
        The faiss factory-style name, e.g. ``IVF1264,Flat``.
    params
        ``{"M", "efConstruction"}`` (hnsw), ``{"nlist", "train_points"}``
        (ivf), ``{}`` (flat).
    reason
        Why this kind: ``auto: N < 10000`` or ``INDEX=hnsw``.
    """

    kind: str
    description: str
    params: dict[str, int] = field(default_factory=dict)
    reason: str = ""


#: Index kinds trained and filled on a GPU where faiss has one.
_GPU_KINDS = ("ivf",)


def _gpus(faiss: Any) -> int:
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
    except Exception:  # faiss-cpu builds without the symbol, or a broken driver
        return 0


def plan_index(n: int, kind: str = "auto", *, gpus: int = 0) -> IndexPlan:
    """The index to build for ``n`` vectors.

    >>> plan_index(5_000).kind, plan_index(50_000, "hnsw").kind, plan_index(1_000_000).description
    ('flat', 'hnsw', 'IVF4000,Flat')
    >>> plan_index(1_000_000).params
    {'nlist': 4000, 'train_points': 256000}
    """
    if kind not in INDEX_KINDS:
        raise UsageError(f"INDEX={kind!r} must be one of {', '.join(INDEX_KINDS)}")
    reason = f"INDEX={kind}"
    if kind == "auto":
        if n < FLAT_MAX:
            kind, reason = "flat", f"auto: N < {FLAT_MAX}"
        else:
            kind, reason = "ivf", f"auto: N >= {FLAT_MAX}" + (f", on {gpus} GPU(s)" if gpus else "")
    if kind == "flat":
        return IndexPlan("flat", "IDMap2,Flat", {}, reason)
    if kind == "hnsw":
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
        return IndexPlan("hnsw", f"IDMap2,HNSW{HNSW_M},Flat", params, reason)
    # k-means needs >= 39 points a list to be trained without a warning
    nlist = max(1, min(int(4 * math.sqrt(max(n, 1))), n // _MIN_TRAIN_PER_LIST))
    train = min(n, _TRAIN_PER_LIST * nlist)
    return IndexPlan("ivf", f"IVF{nlist},Flat", {"nlist": nlist, "train_points": train}, reason)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise BuildError(
            f"faiss cannot be imported: {exc}",
            remedy="pip install faiss-cpu",
            phase=_PHASE,
        ) from exc

    # OpenMP sizes its pool from the machine's CPU count, not the container's
    # quota; spinning threads over the quota slow faiss down many times.
    faiss.omp_set_num_threads(usable_cpus())
    return faiss


def _check_inputs(src: Path) -> tuple[int, int, Any]:
    """``(N, D, ids)`` after checking descriptors.npy and descriptor_ids.npy agree."""
    import numpy as np

    vec_path, ids_path = src / DESCRIPTORS_FILE, src / DESCRIPTOR_IDS_FILE
    for path in (vec_path, ids_path):
        if not path.is_file():
            raise BuildError(
                f"{path} does not exist",
                remedy="run the describe phase first (doit build-cache does)",
                phase=_PHASE,
            )
    try:
        shape, dtype = npy_shape(vec_path)
        ids = np.load(ids_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BuildError(
            f"{src} holds an unreadable .npy file: {exc}",
            remedy="delete descriptors.npy and descriptor_ids.npy and run build-cache again",
            phase=_PHASE,
        ) from exc
    if len(shape) != 2 or shape[1] < 1 or dtype != np.float32:
        raise BuildError(
            f"{vec_path} must be float32 [N, D], is {dtype} {list(shape)}",
            remedy="delete it and run the describe phase again",
            phase=_PHASE,
        )
    if ids.ndim != 1 or ids.dtype != np.int64 or len(ids) != shape[0]:
        raise BuildError(
            f"{ids_path} ({ids.dtype} {list(ids.shape)}) does not match {vec_path} ({shape[0]} rows)",
            remedy="delete both and run the describe phase again",
            phase=_PHASE,
        )
    if len(np.unique(ids)) != len(ids):
        raise BuildError(
            f"{ids_path} holds duplicate tile ids",
            remedy="delete it and run the describe phase again",
            phase=_PHASE,
        )
    return int(shape[0]), int(shape[1]), ids


def _new_index(faiss: Any, plan: IndexPlan, dim: int) -> Any:
    ip = faiss.METRIC_INNER_PRODUCT
    if plan.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if plan.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, plan.params["M"], ip)
        hnsw.hnsw.efConstruction = plan.params["efConstruction"]
        return faiss.IndexIDMap2(hnsw)
    return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, plan.params["nlist"], ip)


def _set_search_param(faiss: Any, index: Any, kind: str, value: int) -> None:
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = int(value)
    elif kind == "ivf":
        index.nprobe = int(value)


def _exact_top(faiss: Any, path: Path, queries: Any, k: int) -> Any:
    """The k-th best exact similarity of each query, by one pass over the descriptors.

    Each chunk is searched exactly (faiss's flat search: BLAS and a heap)
    and the k best kept across chunks.  A pass of under
    :data:`_ONE_THREAD_FLOPS` runs on one thread: on two shared, busy cores
    the threaded pass over 20k descriptors took 0.42-0.73 s and the
    single-threaded one 0.13-0.16 s (thread start and barriers cost more
    than the arithmetic).
    """
    import numpy as np

    from cachebuild._util.npyio import iter_npy_rows, npy_shape

    shape, _ = npy_shape(path)
    threads = faiss.omp_get_max_threads()
    if len(queries) * shape[0] * shape[1] < _ONE_THREAD_FLOPS:
        faiss.omp_set_num_threads(1)
    try:
        best = np.full((len(queries), k), -np.inf, dtype=np.float32)
        for _, chunk in iter_npy_rows(path, chunk_rows=16_384):
            flat = faiss.IndexFlatIP(chunk.shape[1])
            flat.add(np.ascontiguousarray(chunk))
            sims, _ = flat.search(queries, min(k, len(chunk)))
            both = np.concatenate([best, sims], axis=1)
            best = -np.sort(-both, axis=1)[:, :k]
    finally:
        faiss.omp_set_num_threads(threads)
    return best[:, k - 1]


def _fingerprints(chunk: Any) -> Any:
    """A 64-bit fingerprint of each row's bytes (blake2b): which vectors a quantizer has seen."""
    import hashlib

    import numpy as np

    raw = b"".join(hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in chunk)
    return np.frombuffer(raw, dtype="<u8")


def _load_quantizer(
    path: Path, *, engine_key: str | None, plan: IndexPlan, dim: int
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


def build_index(
    *,
    descriptors_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    kind: str = "auto",
    recall_queries: int = RECALL_QUERIES,
    chunk_rows: int = 16_384,
    seed: int = 0,
    faiss: Any = None,
    reuse: bool = False,
    engine_key: str | None = None,
) -> dict[str, Any]:
    """Index ``descriptors.npy`` under the ids in ``descriptor_ids.npy``.

    Parameters
    ----------
    descriptors_dir
        Directory written by :func:`cachebuild.localize.describe.describe_tiles`.
    out_path
        The index file; written to a temp file beside it, then renamed.
    kind
        ``auto`` (by N, see the module notes), ``flat``, ``hnsw`` or ``ivf``.
    recall_queries
        Descriptors used as queries to measure recall@10 (and tune the
        search parameter); 0 skips the measurement.
    chunk_rows
        Descriptors read and added at a time.
    seed
        Seed of the training and query samples.
    faiss
        The faiss module; imported when None (tests pass a stand-in that
        reports a GPU).
    reuse
        Keep the trained IVF quantizer in :data:`QUANTIZER_FILE` beside
        ``out_path`` and start from the one saved there when it fits (see
        the module notes).  What a build does.
    engine_key
        The key of the engine that made the descriptors: a saved quantizer
        of another engine is never reused (None: none is).

    Returns
    -------
    dict
        ``type`` (faiss name), ``kind``, ``ntotal``, ``dim``, ``metric``,
        ``params`` (build and search parameters), ``reason``,
        ``recall_at_10`` (None when not measured), ``recall_queries``,
        ``recall_target``, ``device`` (``gpu`` or ``cpu``: where it was
        trained and filled; ``gpu_error`` when the GPU failed), with
        ``reuse``: ``quantizer`` {``reused``, ``trained_on_share``,
        ``trained_points``, ``max_untrained_share``, ``reason``}; and
        ``seconds`` (``read``, ``train``, ``add``, ``tune``).

    Raises
    ------
    BuildError
        ``phase="index"``: missing or inconsistent inputs, non-finite
        descriptors, or no faiss.
    UsageError
        For an unknown ``kind``.
    """
    import numpy as np

    from cachebuild.localize.describe import DESCRIPTORS_FILE

    faiss = faiss if faiss is not None else _faiss()
    src = Path(descriptors_dir)
    out = Path(out_path)
    n, dim, ids = _check_inputs(src)
    vec_path = src / DESCRIPTORS_FILE
    gpus = _gpus(faiss)
    plan = plan_index(n, kind, gpus=gpus)
    rng = np.random.default_rng(seed)
    seconds = {"read": 0.0, "train": 0.0, "add": 0.0, "tune": 0.0}

    # one pass: every vector finite, and (for the quantizer) its fingerprint
    t = time.perf_counter()
    keep_prints = reuse and plan.kind == "ivf"
    prints = np.empty(n if keep_prints else 0, dtype="<u8")
    for start, chunk in iter_npy_rows(vec_path, chunk_rows=chunk_rows):
        if not bool(np.all(np.isfinite(chunk))):
            raise BuildError(
                f"{vec_path} holds non-finite values (row {start + int(np.flatnonzero(~np.isfinite(chunk).all(1))[0])})",
                remedy="check the model, recompile the engine and describe again",
                phase=_PHASE,
            )
        if keep_prints:
            prints[start : start + len(chunk)] = _fingerprints(chunk)
    seconds["read"] = time.perf_counter() - t

    quantizer_path = out.with_name(QUANTIZER_FILE)
    centroids = population = None
    saved: dict[str, Any] = {}
    why = "not asked to (reuse=False)"
    trained_share = None
    if reuse and n:
        centroids, population, saved, why = _load_quantizer(
            quantizer_path, engine_key=engine_key, plan=plan, dim=dim
        )
        if centroids is not None:
            pos = np.clip(np.searchsorted(population, prints), 0, len(population) - 1)
            trained_share = float(np.mean(population[pos] == prints))
            if 1 - trained_share > MAX_UNTRAINED_SHARE:
                why = f"{1 - trained_share:.0%} of the vectors are new to the saved quantizer (> {MAX_UNTRAINED_SHARE:.0%})"
                centroids = population = None
                trained_share = None
    if centroids is not None:
        plan = IndexPlan(
            "ivf",
            f"IVF{len(centroids)},Flat",
            {"nlist": len(centroids), "train_points": int(saved["trained_points"])},
            plan.reason,
        )

    sample = None  # the training sample, the same whichever device trains
    if plan.kind == "ivf" and n and centroids is None:
        sample = np.sort(rng.choice(n, size=plan.params["train_points"], replace=False))

    def new_index() -> Any:
        if centroids is None:
            return _new_index(faiss, plan, dim)
        quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(centroids)
        return faiss.IndexIVFFlat(quantizer, dim, len(centroids), faiss.METRIC_INNER_PRODUCT)

    def fill(index: Any) -> Any:
        """Train (IVF, unless the quantizer is reused) and add every descriptor."""
        if sample is not None:
            t = time.perf_counter()
            index.train(np.ascontiguousarray(gather_npy_rows(vec_path, sample)))
            seconds["train"] = time.perf_counter() - t
        t = time.perf_counter()
        for start, chunk in iter_npy_rows(vec_path, chunk_rows=chunk_rows):
            index.add_with_ids(chunk, np.ascontiguousarray(ids[start : start + len(chunk)]))
        seconds["add"] = time.perf_counter() - t
        return index

    def build() -> tuple[Any, str, str | None]:
        if gpus and n and plan.kind in _GPU_KINDS:
            try:
                res = faiss.StandardGpuResources()
                on_gpu = fill(faiss.index_cpu_to_gpu(res, 0, new_index()))
                cpu = faiss.index_gpu_to_cpu(on_gpu)  # a CPU index: the file loads anywhere
                del on_gpu, res
                return cpu, "gpu", None
            except BuildError:
                raise
            except Exception as exc:  # out of GPU memory, a driver error: the CPU can still do it
                return fill(new_index()), "cpu", f"{type(exc).__name__}: {exc}"[:300]
        return fill(new_index()), "cpu", None

    index, device, gpu_error = build()

    params: dict[str, int] = dict(plan.params)
    recall = None
    q = min(recall_queries, n)
    if q > 0:
        t = time.perf_counter()
        rows = np.sort(rng.choice(n, size=q, replace=False))
        queries = np.ascontiguousarray(gather_npy_rows(vec_path, rows))
        k = min(10, n)
        kth = _exact_top(faiss, vec_path, queries, k)
        value, recall = _tune(faiss, index, plan, queries, kth, k, hint=saved.get("nprobe"))
        if centroids is not None and value > _NPROBE_GROWTH * int(saved["nprobe"]):
            # the new vectors crowd lists the quantizer was not trained for: train afresh
            why = (
                f"the saved quantizer needed nprobe {value} > {_NPROBE_GROWTH} x {saved['nprobe']}"
            )
            centroids = population = None
            trained_share = None
            plan = plan_index(n, kind, gpus=gpus)
            params = dict(plan.params)
            sample = np.sort(rng.choice(n, size=plan.params["train_points"], replace=False))
            index, device, gpu_error = build()
            value, recall = _tune(faiss, index, plan, queries, kth, k, hint=None)
        if plan.kind == "hnsw":
            params["efSearch"] = int(value)
        elif plan.kind == "ivf":
            params["nprobe"] = int(value)
        seconds["tune"] = time.perf_counter() - t
    elif plan.kind == "hnsw":
        params["efSearch"] = 64
        _set_search_param(faiss, index, "hnsw", 64)
    elif plan.kind == "ivf":
        params["nprobe"] = min(16, plan.params["nlist"])
        _set_search_param(faiss, index, "ivf", params["nprobe"])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    write_positions(out.with_name(POSITIONS_FILE), ids)  # where each id lies on the ground
    info: dict[str, Any] = {
        "type": plan.description,
        "kind": plan.kind,
        "reason": plan.reason,
        "ntotal": int(index.ntotal),
        "dim": dim,
        "metric": INDEX_METRIC,
        "params": params,
        "recall_at_10": None if recall is None else round(recall, 4),
        "recall_queries": int(q),
        "recall_target": RECALL_TARGET,
        "device": device,
        "positions": POSITIONS_FILE,
        **({"gpu_error": gpu_error} if gpu_error else {}),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    if reuse:
        reused = centroids is not None
        if plan.kind == "ivf" and n:
            if not reused:  # trained here: this population, these centroids
                quantizer = faiss.downcast_index(index.quantizer)
                centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
                population = np.unique(prints)
                trained_share = 1.0
                saved = {
                    "format": _QUANTIZER_FORMAT,
                    "engine_key": engine_key,
                    "kind": plan.kind,
                    "metric": INDEX_METRIC,
                    "dim": dim,
                    "nlist": len(centroids),
                    "trained_points": int(plan.params["train_points"]),
                    "population": int(n),
                    "nprobe": int(params["nprobe"]),
                }
            _save_quantizer(quantizer_path, centroids, population, saved)
        else:
            quantizer_path.unlink(missing_ok=True)  # nothing to reuse: no stale one either
        info["quantizer"] = {
            "reused": reused,
            "trained_on_share": None if trained_share is None else round(trained_share, 4),
            "trained_points": params.get("train_points"),
            "max_untrained_share": MAX_UNTRAINED_SHARE,
            "reason": (
                f"reused: {1 - trained_share:.0%} of the vectors are new to it"
                if reused
                else (f"trained: {why}" if plan.kind == "ivf" else why)
            ),
        }
    return info


def _tune(
    faiss: Any, index: Any, plan: IndexPlan, queries: Any, kth: Any, k: int, hint: int | None
) -> tuple[int, float]:
    """The smallest search parameter on the ladder whose recall@k reaches the target, and that recall.

    IVF-Flat's recall grows with nprobe (more lists probed, exact scores: a
    result is never lost), so its ladder is bisected, starting at ``hint``
    (the last build's nprobe); ``nprobe = nlist`` is exhaustive and always
    reaches it.  HNSW's efSearch is walked up from the bottom.
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
        lo, hi = (
            0,
            len(ladder) - 1,
        )  # the answer is in ladder[lo..hi]; ladder[hi] reaches the target
        if hint is not None and int(hint) in ladder:
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


def load_index(index_path: str | os.PathLike[str]) -> Any:
    """Read an index written by :func:`build_index` (search parameters included)."""
    faiss = _faiss()
    path = Path(index_path)
    if not path.is_file():
        raise BuildError(
            f"index {path} does not exist", remedy="build the index first", phase=_PHASE
        )
    return faiss.read_index(str(path))


def search(
    index_path: str | os.PathLike[str] | Any, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best tiles for each query descriptor.

    Parameters
    ----------
    index_path
        A file written by :func:`build_index`, or an index already loaded
        with :func:`load_index`.
    queries
        float32 ``[q, D]`` (or one ``[D]`` vector), L2-normalised.
    k
        Results per query.  Where the index holds fewer than ``k`` tiles
        the extra ids are -1.

    Returns
    -------
    tuple of numpy.ndarray
        ``(scores, ids)``, each ``[q, k]``: cosine similarities, best first,
        and tile ids (int64).
    """
    import numpy as np

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    index = index_path if hasattr(index_path, "search") else load_index(index_path)
    q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
    if q.ndim != 2 or q.shape[1] != index.d:
        raise ValueError(f"queries must be [q, {index.d}], got {list(np.shape(queries))}")
    scores, ids = index.search(q, int(k))
    return scores, ids
