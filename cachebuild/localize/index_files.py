"""The index's files: its inputs checked (descriptors.npy, descriptor_ids.npy), its outputs
written, and the index read back and searched (:func:`load_index`, :func:`search`).

``index.json`` says what the index is; :data:`INDEX_RUN_FILE` says how this
build made it (timings, quantizer reuse): history, which the build report
carries and the signed cache does not.

numpy and faiss are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachebuild._util.cpus import usable_cpus
from cachebuild._util.fs import atomic_write
from cachebuild._util.npyio import npy_shape
from cachebuild._util.statcache import remember_written
from cachebuild.errors import BuildError
from cachebuild.localize.describe import DESCRIPTOR_IDS_FILE, DESCRIPTORS_FILE
from cachebuild.localize.index_quantizer import INDEX_METRIC
from cachebuild.localize.places import POSITIONS_FILE

if TYPE_CHECKING:
    import numpy as np

__all__ = ["INDEX_RUN_FILE", "write_index_json", "read_index_run", "load_index", "search"]

_PHASE = "index"


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


def _write_faiss(faiss: Any, index: Any, out: Path, hash_cache: Path | None = None) -> None:
    """Write the index through a temp file and a rename.

    With ``hash_cache``, the bytes are hashed as faiss hands them over and the
    SHA-256 remembered there, so that the action cache and the manifest do not
    read the file again (332 MB at 20k tiles).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    digest = None
    try:
        if hash_cache is None:
            faiss.write_index(index, str(tmp))
        else:
            with open(tmp, "wb") as fh, _Hasher() as hasher:

                def put(data: bytes) -> None:
                    hasher.put(data)
                    fh.write(data)

                faiss.write_index(index, faiss.PyCallbackIOWriter(put))
            digest = hasher.hexdigest()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if hash_cache is not None and digest is not None:
        remember_written(hash_cache, [(out, digest)])


class _Hasher:
    """SHA-256 of the chunks put, computed on a thread of its own while the writer writes
    (hashlib releases the GIL): the index's write and its hash overlap."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._run, name="index-hash", daemon=True)

    def __enter__(self) -> _Hasher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._chunks.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (data := self._chunks.get()) is not None:
            self._sha.update(data)

    def put(self, data: bytes) -> None:
        self._chunks.put(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


#: Beside ``index.json``: what this build did (timings, quantizer reuse): history, for the report.
INDEX_RUN_FILE = "index-run.json"
#: Keys of :func:`build_index`'s result that are this run's history, not the index's content.
_HISTORY = ("seconds", "quantizer", "recall_reference")


def write_index_json(build_dir: str | os.PathLike[str], info: dict[str, Any]) -> None:
    """``index.json`` (what the index is) and :data:`INDEX_RUN_FILE` (how this build made it)."""
    b = Path(build_dir)
    content = {k: v for k, v in info.items() if k not in _HISTORY}
    history = {k: info[k] for k in _HISTORY if k in info}
    for name, doc in (("index.json", content), (INDEX_RUN_FILE, history)):
        atomic_write(
            b / name, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), durable=False
        )


def read_index_run(build_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last build's :data:`INDEX_RUN_FILE` (None when absent or unreadable)."""
    try:
        doc = json.loads((Path(build_dir) / INDEX_RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _summary(
    run: Any,
    index: Any,
    device: str,
    gpu_error: str | None,
    params: dict[str, int],
    recall: float | None,
    q: int,
    recall_target: float,
) -> dict[str, Any]:
    """What ``build_index`` returns, but the quantizer's and the recall reference's story."""
    return {
        "type": run.plan.description,
        "kind": run.plan.kind,
        "reason": run.plan.reason,
        "ntotal": int(index.ntotal),
        "dim": run.dim,
        "metric": INDEX_METRIC,
        "params": params,
        "recall_at_10": None if recall is None else round(recall, 4),
        "recall_queries": int(q),
        "recall_target": recall_target,
        "device": device,
        "positions": POSITIONS_FILE,
        **({"gpu_error": gpu_error} if gpu_error else {}),
        "seconds": {k: round(v, 3) for k, v in run.seconds.items()},
    }


def _faiss() -> Any:
    # faiss's OpenMP threads sleep when idle instead of spinning (read once, when libgomp
    # loads): spinning threads take the cores the describer, the fetch and other work share
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


def load_index(index_path: str | os.PathLike[str], *, mapped: bool = False) -> Any:
    """Read an index written by :func:`build_index` (search parameters included).

    ``mapped``: map the file's vectors instead of copying them (faiss's
    ``IO_FLAG_MMAP_IFC``), for a reader that only searches: the self-test
    then reads the lists it probes from the page cache, not the whole file
    into fresh memory.  Safe because index files are replaced by rename,
    never rewritten in place.
    """
    faiss = _faiss()
    path = Path(index_path)
    if not path.is_file():
        raise BuildError(
            f"index {path} does not exist", remedy="build the index first", phase=_PHASE
        )
    flags = int(getattr(faiss, "IO_FLAG_MMAP_IFC", 0)) if mapped else 0
    return faiss.read_index(str(path), flags)


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
    index: Any = index_path if hasattr(index_path, "search") else load_index(index_path)
    q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
    if q.ndim != 2 or q.shape[1] != index.d:
        raise ValueError(f"queries must be [q, {index.d}], got {list(np.shape(queries))}")
    scores, ids = index.search(q, int(k))
    return scores, ids
