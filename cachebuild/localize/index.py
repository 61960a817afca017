"""The FAISS index over the tile descriptors, chosen by size.

Descriptors are unit vectors, so the inner product is the cosine
similarity; every index answers tile ids, not row numbers.  Which index,
after the faiss wiki's "Guidelines to choose an index" and autofaiss:

==========  ==========================  ===================================
N           index                       parameters
==========  ==========================  ===================================
< 10k       ``IDMap2,Flat`` (exact)     none: exact, and as fast as anything
>= 10k      ``IVF{K},Flat``             K = sqrt(N) lists, trained on
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
:data:`QUANTIZER_FILE`, with the 64-bit fingerprints (a hash of the
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
faiss's flat search, chunk by chunk; IVF's nprobe is predicted from
each query's list ranks and confirmed by one search (bisected when short).
With ``reuse``, an IVF index's recall queries are the vectors of smallest
fingerprint (chosen by content), and their exact top lists are kept in
:data:`~cachebuild.localize.index_reference.REFERENCE_FILE`: the next build
searches only the vectors new to it for the queries it shares, exactly
(:mod:`cachebuild.localize.index_reference`); ``recall_reference`` in
``index-run.json`` says how many.

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

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachebuild._util.npyio import gather_npy_rows, iter_npy_rows
from cachebuild.errors import BuildError, UsageError
from cachebuild.localize import index_files as _files
from cachebuild.localize import index_quantizer as _quantizer
from cachebuild.localize import index_tune as _tuning
from cachebuild.localize.describe import DESCRIPTORS_FILE
from cachebuild.localize.index_files import _check_inputs, _faiss, _summary, _write_faiss
from cachebuild.localize.index_quantizer import (
    _QUANTIZER_FORMAT,
    _add_assigned,
    _assignments,
    _fingerprints,
    _load_assignments,
    _load_quantizer,
    _save_quantizer,
    rows_lists,
)
from cachebuild.localize.index_reference import REFERENCE_FILE, exact_recall_top, keep_reference
from cachebuild.localize.index_tune import _set_search_param, _tune, lists_tell, one_thread_below
from cachebuild.localize.places import POSITIONS_FILE, write_positions

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
INDEX_METRIC = _quantizer.INDEX_METRIC
#: ``auto``: exact search below this many vectors.
FLAT_MAX = 10_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
#: The recall@10 the search parameter is tuned to reach.
RECALL_TARGET = _tuning.RECALL_TARGET
#: Descriptors of the cache used as queries to measure recall@10.
RECALL_QUERIES = 1000
#: Beside the index: the trained IVF centroids and the population they came from.
QUANTIZER_FILE = _quantizer.QUANTIZER_FILE
#: Read an index file (search parameters included); search it: in index_files, named here too.
load_index = _files.load_index
search = _files.search
#: Retrain when more than this share of the vectors is new to the quantizer.
MAX_UNTRAINED_SHARE = _quantizer.MAX_UNTRAINED_SHARE
#: Retrain when the reused quantizer needs more than this times the nprobe it was trained with.
_NPROBE_GROWTH = 2
#: IVF lists per sqrt(N): 1, not faiss's 4-16 (k-means cost grows as K squared; design/index-choice.md).
_LISTS_PER_ROOT = 1
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
    ('flat', 'hnsw', 'IVF1000,Flat')
    >>> plan_index(1_000_000).params
    {'nlist': 1000, 'train_points': 64000}
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
    nlist = max(1, min(int(_LISTS_PER_ROOT * math.sqrt(max(n, 1))), n // _MIN_TRAIN_PER_LIST))
    train = min(n, _TRAIN_PER_LIST * nlist)
    return IndexPlan("ivf", f"IVF{nlist},Flat", {"nlist": nlist, "train_points": train}, reason)


def _new_index(faiss: Any, plan: IndexPlan, dim: int) -> Any:
    ip = faiss.METRIC_INNER_PRODUCT
    if plan.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if plan.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, plan.params["M"], ip)
        hnsw.hnsw.efConstruction = plan.params["efConstruction"]
        return faiss.IndexIDMap2(hnsw)
    return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, plan.params["nlist"], ip)


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
    hash_cache: str | os.PathLike[str] | None = None,
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
    hash_cache
        A HashCache file (:mod:`cachebuild._util.statcache`) given the index's SHA-256 as written.

    Returns
    -------
    dict
        ``type`` (faiss name), ``kind``, ``ntotal``, ``dim``, ``metric``,
        ``params``, ``reason``, ``recall_at_10`` (None when not measured),
        ``recall_queries``, ``recall_target``, ``device`` (``gpu_error``
        when the GPU failed), ``positions``; and this run's history:
        ``seconds`` and (``reuse``) ``quantizer`` {``reused``,
        ``trained_on_share``, ``trained_points``, ``max_untrained_share``,
        ``reason``}.  Writes :data:`POSITIONS_FILE` beside ``out_path``.
        Raises BuildError (``phase="index"``) for missing or inconsistent
        inputs, non-finite descriptors or no faiss; UsageError for an
        unknown ``kind``.
    """

    faiss, out = faiss if faiss is not None else _faiss(), Path(out_path)
    run = _Run.start(faiss, Path(descriptors_dir), kind, chunk_rows, seed)
    with one_thread_below(faiss, run.flops(recall_queries)):  # a tiny index: one thread
        run.scan(reuse)
        quantizer_path = out.with_name(QUANTIZER_FILE)
        if reuse and run.n:
            run.pick_quantizer(quantizer_path, engine_key)
            run.ref_path = out.with_name(REFERENCE_FILE) if len(run.prints) else None
        if run.plan.kind == "ivf" and run.n and run.centroids is None:
            run.draw_sample()
        index, device, gpu_error = run.build()
        index, device, gpu_error, params, recall, q = _tune_or_default(
            run, index, (device, gpu_error), recall_queries, kind
        )
    _write_faiss(faiss, index, out, None if hash_cache is None else Path(hash_cache))
    write_positions(out.with_name(POSITIONS_FILE), run.ids)  # where each id lies on the ground
    info = _summary(run, index, device, gpu_error, params, recall, q, RECALL_TARGET)
    if reuse:
        info["quantizer"] = run.keep_quantizer(index, params, quantizer_path, engine_key)
        ref = keep_reference(out.with_name(REFERENCE_FILE), run.prints, run.kept, run.dim)
        info["recall_reference"] = ref
    return info


@dataclass
class _Run:
    """One index build's state: the vectors, the plan, the quantizer it starts from, timings."""

    faiss: Any
    vec_path: Path
    n: int
    dim: int
    ids: Any
    plan: IndexPlan
    gpus: int
    chunk_rows: int
    rng: Any
    seconds: dict[str, float] = field(
        default_factory=lambda: {"read": 0.0, "train": 0.0, "add": 0.0, "tune": 0.0}
    )
    prints: Any = None
    centroids: Any = None
    population: Any = None
    saved: dict[str, Any] = field(default_factory=dict)
    why: str = "not asked to (reuse=False)"
    trained_share: float | None = None
    sample: Any = None
    ref_path: Path | None = None  # the recall reference kept for the next build (reuse)
    lists: Any = None  # the saved quantizer's lists of the last build's vectors
    row_lists: Any = None  # the IVF list of each row in the index built (rows_lists)
    kept: dict[str, Any] | None = None

    @classmethod
    def start(cls, faiss: Any, src: Path, kind: str, chunk_rows: int, seed: int) -> _Run:
        """The vectors in ``src`` checked, and the plan for them."""
        import numpy as np

        n, dim, ids = _check_inputs(src)
        gpus = _gpus(faiss)
        plan = plan_index(n, kind, gpus=gpus)
        rng = np.random.default_rng(seed)
        return cls(faiss, src / DESCRIPTORS_FILE, n, dim, ids, plan, gpus, chunk_rows, rng)

    def flops(self, queries: int) -> int:
        """Multiply-adds of the build's largest pass: the training (10 k-means iterations), the
        adding (a centroid search each) or the exact recall pass, whichever is most."""
        nlist = self.plan.params.get("nlist", 0)
        train = 10 * self.plan.params.get("train_points", 0) * nlist
        return self.dim * max(train, self.n * max(nlist, min(queries, self.n)))

    def scan(self, reuse: bool) -> None:
        """One pass: every vector finite, and (for the quantizer) its fingerprint."""
        import numpy as np

        t = time.perf_counter()
        keep = reuse and self.plan.kind == "ivf"
        self.prints = np.empty(self.n if keep else 0, dtype="<u8")
        for start, chunk in iter_npy_rows(self.vec_path, chunk_rows=self.chunk_rows):
            if not bool(np.all(np.isfinite(chunk))):
                row = start + int(np.flatnonzero(~np.isfinite(chunk).all(1))[0])
                raise BuildError(
                    f"{self.vec_path} holds non-finite values (row {row})",
                    remedy="check the model, recompile the engine and describe again",
                    phase=_PHASE,
                )
            if keep:
                self.prints[start : start + len(chunk)] = _fingerprints(chunk)
        self.seconds["read"] = time.perf_counter() - t

    def pick_quantizer(self, path: Path, engine_key: str | None) -> None:
        """Start from the saved quantizer when it fits and knows most of the vectors."""
        import numpy as np

        self.centroids, self.population, self.saved, self.why = _load_quantizer(
            path, engine_key=engine_key, plan=self.plan, dim=self.dim
        )
        if self.centroids is None:
            return
        pos = np.clip(np.searchsorted(self.population, self.prints), 0, len(self.population) - 1)
        share = float(np.mean(self.population[pos] == self.prints))
        if 1 - share > MAX_UNTRAINED_SHARE:
            self.why = (
                f"{1 - share:.0%} of the vectors are new to the saved quantizer "
                f"(> {MAX_UNTRAINED_SHARE:.0%})"
            )
            self.centroids = self.population = None
            return
        self.trained_share = share
        nlist = len(self.centroids)
        self.lists = _load_assignments(path, nlist)
        train = int(self.saved["trained_points"])
        params = {"nlist": nlist, "train_points": train}
        self.plan = IndexPlan("ivf", f"IVF{nlist},Flat", params, self.plan.reason)

    def draw_sample(self) -> None:
        """The training sample, the same whichever device trains."""
        import numpy as np

        size = self.plan.params["train_points"]
        self.sample = np.sort(self.rng.choice(self.n, size=size, replace=False))

    def new_index(self) -> Any:
        faiss = self.faiss
        if self.centroids is None:
            return _new_index(faiss, self.plan, self.dim)
        quantizer = faiss.IndexFlatIP(self.dim)
        quantizer.add(self.centroids)
        return faiss.IndexIVFFlat(
            quantizer, self.dim, len(self.centroids), faiss.METRIC_INNER_PRODUCT
        )

    def fill(self, index: Any, cpu: bool = False) -> Any:
        """Train (IVF, unless the quantizer is reused) and add every descriptor (on the CPU
        with a reused quantizer: in the lists it saved for the vectors it knows)."""
        import numpy as np

        if self.sample is not None:
            t = time.perf_counter()
            index.train(np.ascontiguousarray(gather_npy_rows(self.vec_path, self.sample)))
            self.seconds["train"] = time.perf_counter() - t
        t = time.perf_counter()
        saved = self.lists if cpu and self.centroids is not None else None
        for start, chunk in iter_npy_rows(self.vec_path, chunk_rows=self.chunk_rows):
            ids = np.ascontiguousarray(self.ids[start : start + len(chunk)])
            if saved is None:
                index.add_with_ids(chunk, ids)
            else:
                prints = self.prints[start : start + len(chunk)]
                _add_assigned(self.faiss, index, chunk, ids, prints, saved)
        self.seconds["add"] = time.perf_counter() - t
        return index

    def build(self) -> tuple[Any, str, str | None]:
        """``(index, device, gpu error)``: IVF on GPU 0 where faiss has one, else the CPU."""
        faiss = self.faiss
        if self.gpus and self.n and self.plan.kind in _GPU_KINDS:
            try:
                res = faiss.StandardGpuResources()
                on_gpu = self.fill(faiss.index_cpu_to_gpu(res, 0, self.new_index()))
                cpu = faiss.index_gpu_to_cpu(on_gpu)  # a CPU index: the file loads anywhere
                del on_gpu, res
                return cpu, "gpu", None
            except BuildError:
                raise
            except Exception as exc:  # out of GPU memory, a driver error: the CPU can still do it
                error = f"{type(exc).__name__}: {exc}"[:300]
                return self.fill(self.new_index(), cpu=True), "cpu", error
        return self.fill(self.new_index(), cpu=True), "cpu", None

    def keep_quantizer(
        self, index: Any, params: dict[str, int], path: Path, engine_key: str | None
    ) -> dict[str, Any]:
        """Save the quantizer for the next build (IVF) and say whether this one was reused."""
        import numpy as np

        reused = self.centroids is not None
        if self.plan.kind == "ivf" and self.n:
            if not reused:  # trained here: this population, these centroids
                quantizer = self.faiss.downcast_index(index.quantizer)
                self.centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
                self.population = np.unique(self.prints)
                self.trained_share = 1.0
                self.saved = {
                    "format": _QUANTIZER_FORMAT,
                    "engine_key": engine_key,
                    "kind": self.plan.kind,
                    "metric": INDEX_METRIC,
                    "dim": self.dim,
                    "nlist": len(self.centroids),
                    "trained_points": int(self.plan.params["train_points"]),
                    "population": int(self.n),
                    "nprobe": int(params["nprobe"]),
                }
            if self.row_lists is None:
                self.row_lists = rows_lists(
                    self.faiss, self.faiss.extract_index_ivf(index), self.ids
                )
            lists = _assignments(self.prints, self.row_lists)
            _save_quantizer(path, self.centroids, self.population, self.saved, lists)
        else:
            path.unlink(missing_ok=True)  # nothing to reuse: no stale one either
        share = self.trained_share
        return {
            "reused": reused,
            "trained_on_share": None if share is None else round(share, 4),
            "trained_points": params.get("train_points"),
            "max_untrained_share": MAX_UNTRAINED_SHARE,
            "reason": (
                f"reused: {1 - share:.0%} of the vectors are new to it"
                if reused and share is not None
                else (f"trained: {self.why}" if self.plan.kind == "ivf" else self.why)
            ),
        }


def _neighbours(run: _Run, index: Any, top: Any, kth: Any, k: int) -> tuple[Any, Any]:
    """``(neighbours, listed)`` for :func:`_tune` on an IVF index: the kept exact lists and each
    row's list when this build has them (recall read without searching), else the exact top
    ``k``'s vectors (nprobe predicted, then one search)."""
    run.row_lists = None  # of this index; keep_quantizer maps them itself when not done here
    if run.plan.kind != "ivf":
        return None, None
    kept = run.kept
    if kept is not None and lists_tell(kept["sims"], kept["top"], kth, k):
        run.row_lists = rows_lists(run.faiss, run.faiss.extract_index_ivf(index), run.ids)
        return None, (kept["sims"], kept["top"], run.row_lists)
    return gather_npy_rows(run.vec_path, top.ravel()).reshape(len(top), k, -1), None


def _tune_or_default(
    run: _Run, index: Any, where: tuple[str, str | None], recall_queries: int, kind: str
) -> tuple[Any, str, str | None, dict[str, int], float | None, int]:
    """Measure recall@10 and tune the search parameter (retraining a quantizer that went stale)."""
    faiss, plan = run.faiss, run.plan
    device, gpu_error = where
    params: dict[str, int] = dict(plan.params)
    recall = None
    q = min(recall_queries, run.n)
    if q > 0:
        t = time.perf_counter()
        k = min(10, run.n)
        queries, kth, top, run.kept = exact_recall_top(
            faiss, run.vec_path, run.prints, run.rng, run.n, q, k, run.ref_path
        )
        near, listed = _neighbours(run, index, top, kth, k)
        value, recall = _tune(
            faiss, index, plan, queries, kth, k, hint=run.saved.get("nprobe"), neighbours=near,
            listed=listed,
        )  # fmt: skip
        if run.centroids is not None and value > _NPROBE_GROWTH * int(run.saved["nprobe"]):
            # the new vectors crowd lists the quantizer was not trained for: train afresh
            run.why = (
                f"the saved quantizer needed nprobe {value} > "
                f"{_NPROBE_GROWTH} x {run.saved['nprobe']}"
            )
            run.centroids = run.population = None
            run.trained_share = None
            run.plan = plan = plan_index(run.n, kind, gpus=run.gpus)
            params = dict(plan.params)
            run.draw_sample()
            index, device, gpu_error = run.build()
            near, listed = _neighbours(run, index, top, kth, k)
            value, recall = _tune(
                faiss, index, plan, queries, kth, k, hint=None, neighbours=near, listed=listed
            )
        if plan.kind in ("hnsw", "ivf"):
            params["efSearch" if plan.kind == "hnsw" else "nprobe"] = int(value)
        run.seconds["tune"] = time.perf_counter() - t
    elif plan.kind == "hnsw":
        params["efSearch"] = 64
        _set_search_param(faiss, index, "hnsw", 64)
    elif plan.kind == "ivf":
        params["nprobe"] = min(16, plan.params["nlist"])
        _set_search_param(faiss, index, "ivf", params["nprobe"])
    return index, device, gpu_error, params, recall, q
