"""The faiss-gpu path of cachebuild.localize.index.

No GPU here, and faiss-cpu has no GPU symbols: the control flow (train and
add on what ``index_cpu_to_gpu`` returns, write what ``index_gpu_to_cpu``
returns, fall back to the CPU when the GPU fails) is exercised with a
stand-in for the three GPU calls around the real faiss.  The stand-in's
"GPU index" is a real faiss index (a clone), so the file written is real
and is checked against a CPU build byte for byte.  What a real GpuIndexIVFFlat
does has not run in this project's CI (docs/gpu.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from cachebuild.localize.describe import DESCRIPTOR_IDS_FILE, DESCRIPTORS_FILE
from cachebuild.localize.index import build_index


class _OnGpu:
    """What the stand-in's index_cpu_to_gpu returns: records train/add, runs them on a clone."""

    def __init__(self, inner: Any, calls: list[tuple[Any, ...]]):
        self.inner, self.calls = inner, calls

    def train(self, x: np.ndarray) -> None:
        self.calls.append(("train", len(x)))
        self.inner.train(x)

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        self.calls.append(("add", len(x)))
        self.inner.add_with_ids(x, ids)

    @property
    def ntotal(self) -> int:
        return int(self.inner.ntotal)


class GpuFaiss:
    """The real faiss module, reporting one GPU (see the module notes)."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail

    def __getattr__(self, name: str) -> Any:
        return getattr(faiss, name)

    class StandardGpuResources:
        pass

    def get_num_gpus(self) -> int:
        return 1

    def index_cpu_to_gpu(self, res: Any, device: int, index: Any) -> _OnGpu:
        assert isinstance(res, GpuFaiss.StandardGpuResources)
        self.calls.append(
            ("to_gpu", device, type(index).__name__, int(index.ntotal), bool(index.is_trained))
        )
        if self.fail:
            raise RuntimeError(
                "Error in virtual void* faiss::gpu::StandardGpuResourcesImpl: out of memory"
            )
        return _OnGpu(faiss.clone_index(index), self.calls)

    def index_gpu_to_cpu(self, index: _OnGpu) -> Any:
        self.calls.append(("to_cpu",))
        return faiss.clone_index(index.inner)


@pytest.fixture()
def descriptors(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    v = rng.standard_normal((1200, 32)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.sort(rng.choice(2**40, size=len(v), replace=False)).astype(np.int64)
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / DESCRIPTORS_FILE, v)
    np.save(d / DESCRIPTOR_IDS_FILE, ids)
    return d


def _build(src: Path, out: Path, kind: str, fake: Any = None) -> dict[str, Any]:
    return build_index(
        descriptors_dir=src, out_path=out, kind=kind, recall_queries=200, chunk_rows=400, faiss=fake
    )


def test_ivf_is_trained_and_filled_on_the_gpu_and_written_as_a_cpu_index(
    descriptors: Path, tmp_path: Path
) -> None:
    fake = GpuFaiss()
    info = _build(descriptors, tmp_path / "gpu.faiss", "ivf", fake)
    cpu_info = _build(descriptors, tmp_path / "cpu.faiss", "ivf")
    assert info["device"] == "gpu" and cpu_info["device"] == "cpu" and "gpu_error" not in info
    assert info["reason"] == "INDEX=ivf"
    # an empty, untrained IVF goes to the GPU; training and every add happen there; one copy back
    assert fake.calls[0] == ("to_gpu", 0, "IndexIVFFlat", 0, False)
    assert fake.calls[1] == ("train", info["params"]["train_points"])
    adds = [c for c in fake.calls if c[0] == "add"]
    assert [c[1] for c in adds] == [400, 400, 400]
    assert fake.calls[-1] == ("to_cpu",)
    # the file is a plain CPU index, the same bytes as a CPU build with the same seed
    loaded = faiss.read_index(str(tmp_path / "gpu.faiss"))
    assert type(faiss.downcast_index(loaded)).__name__ == "IndexIVFFlat" and loaded.ntotal == 1200
    assert (tmp_path / "gpu.faiss").read_bytes() == (tmp_path / "cpu.faiss").read_bytes()
    assert info["params"] == cpu_info["params"] and info["recall_at_10"] == cpu_info["recall_at_10"]


def test_a_failing_gpu_falls_back_to_the_cpu_and_says_why(
    descriptors: Path, tmp_path: Path
) -> None:
    fake = GpuFaiss(fail=True)
    info = _build(descriptors, tmp_path / "gpu.faiss", "ivf", fake)
    _build(descriptors, tmp_path / "cpu.faiss", "ivf")
    assert info["device"] == "cpu" and "out of memory" in info["gpu_error"]
    assert [c[0] for c in fake.calls] == ["to_gpu"]
    assert (tmp_path / "gpu.faiss").read_bytes() == (tmp_path / "cpu.faiss").read_bytes()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_flat_and_hnsw_stay_on_the_cpu(descriptors: Path, tmp_path: Path, kind: str) -> None:
    fake = GpuFaiss()
    info = _build(descriptors, tmp_path / "i.faiss", kind, fake)
    assert info["device"] == "cpu" and fake.calls == []
    assert faiss.read_index(str(tmp_path / "i.faiss")).ntotal == 1200


def test_faiss_cpu_reports_no_gpu(descriptors: Path, tmp_path: Path) -> None:
    assert not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0
    info = _build(descriptors, tmp_path / "i.faiss", "auto")
    assert info["device"] == "cpu"
