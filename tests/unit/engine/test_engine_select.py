"""BACKEND=auto|tensorrt|onnxruntime: probes, selection, exit 21, and what the report says.

The probes read real files (device nodes, the driver's /proc entries,
package metadata, a package's ``__init__.py``); tests point them at
directories laid out like a Jetson or a workstation.  Selection is a pure
function of the probes, tested over every combination.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cachebuild.engine import backends
from cachebuild.engine.backends import (
    BACKEND_CHOICES,
    MachineProbes,
    engine_environment,
    probe_machine,
    select_backend,
)
from cachebuild.engine.compile import get_backend
from cachebuild.engine.gpu import (
    cuda_version_here,
    gpu_name_here,
    gpu_present,
    tensorrt_version_here,
)
from cachebuild.engine.interface import DEFAULT_BACKEND, cpu_device
from cachebuild.engine.ort import OnnxRuntimeBackend
from cachebuild.errors import EngineError
from tests.conftest import Cb, write_flight

CPU = MachineProbes(tensorrt=None, gpu=False, onnxruntime="1.20.0", ort_cuda=False)
JETSON = MachineProbes(tensorrt="10.3.0", gpu=True, onnxruntime="1.20.0", ort_cuda=False)
TRT_NO_GPU = MachineProbes(tensorrt="10.3.0", gpu=False, onnxruntime="1.20.0", ort_cuda=False)
GPU_NO_TRT = MachineProbes(tensorrt=None, gpu=True, onnxruntime="1.20.0", ort_cuda=False)
ORT_GPU = MachineProbes(tensorrt=None, gpu=True, onnxruntime="1.20.0", ort_cuda=True)


def test_default_is_auto() -> None:
    assert DEFAULT_BACKEND == "auto" and BACKEND_CHOICES == ("auto", "onnxruntime", "tensorrt")


@pytest.mark.parametrize(
    "requested, probes, backend, provider",
    [
        ("auto", CPU, "onnxruntime", "cpu"),
        ("auto", JETSON, "tensorrt", "tensorrt"),
        ("auto", TRT_NO_GPU, "onnxruntime", "cpu"),
        ("auto", GPU_NO_TRT, "onnxruntime", "cpu"),
        ("auto", ORT_GPU, "onnxruntime", "cuda"),
        ("onnxruntime", JETSON, "onnxruntime", "cpu"),
        ("onnxruntime", ORT_GPU, "onnxruntime", "cuda"),
        ("tensorrt", JETSON, "tensorrt", "tensorrt"),
    ],
)
def test_selection(requested: str, probes: MachineProbes, backend: str, provider: str) -> None:
    choice = select_backend(requested, probes)
    assert (choice.backend, choice.provider) == (backend, provider)
    assert choice.reason


@pytest.mark.parametrize(
    "probes, names",
    [
        (CPU, ["`tensorrt` Python package is not installed", "no CUDA GPU"]),
        (TRT_NO_GPU, ["no CUDA GPU"]),
        (GPU_NO_TRT, ["`tensorrt` Python package is not installed"]),
    ],
)
def test_tensorrt_where_it_is_missing_exits_21_naming_what(
    probes: MachineProbes, names: list[str]
) -> None:
    with pytest.raises(EngineError) as info:
        select_backend("tensorrt", probes)
    assert info.value.exit_code == 21 and info.value.phase == "engine"
    for name in names:
        assert name in info.value.message
    if "no CUDA GPU" not in names:
        assert "GPU" not in info.value.message
    assert "BACKEND=auto" in (info.value.remedy or "")


def test_unknown_backend() -> None:
    with pytest.raises(EngineError, match="known backends: auto, onnxruntime, tensorrt"):
        select_backend("openvino", CPU)


def test_engine_environment_resolves_auto_without_importing() -> None:
    env = engine_environment("auto", CPU)
    assert env == {"backend": "onnxruntime", "version": "1.20.0", "device": cpu_device()}
    assert env == engine_environment("onnxruntime", CPU)  # same engine, same dependencies
    assert engine_environment("tensorrt", CPU) == {
        "backend": "tensorrt",
        "version": "missing",
        "device": "none",
    }
    assert engine_environment("auto", JETSON)["backend"] == "tensorrt"
    assert engine_environment("auto", ORT_GPU)["device"].startswith("cuda:")


def test_onnxruntime_backend_on_cuda_says_so_in_its_device() -> None:
    be = get_backend("auto", ORT_GPU)
    assert isinstance(be, OnnxRuntimeBackend) and be.provider == "cuda"
    assert be.device().startswith("cuda:") and be.device() != cpu_device()
    with pytest.raises(ValueError):
        OnnxRuntimeBackend(provider="rocm")


def test_a_cuda_engine_where_onnxruntime_has_no_cuda_is_refused(tmp_path: Path) -> None:
    import onnxruntime as ort

    from cachebuild.engine.compile import compile_engine, load_engine
    from cachebuild.engine.model import write_default_model

    assert "CUDAExecutionProvider" not in ort.get_available_providers()  # the CPU build here
    model = write_default_model(tmp_path / "m.onnx")
    record = compile_engine(
        model_path=model,
        calibration_path=None,
        precision="fp32",
        out_dir=tmp_path / "e",
        probes=ORT_GPU,
    )
    assert record["device"].startswith("cuda:")
    with pytest.raises(EngineError, match="CUDA provider, which this ONNX Runtime lacks"):
        load_engine(tmp_path / "e")


def test_probes_here_find_onnxruntime_on_the_cpu() -> None:
    p = probe_machine()
    assert p.onnxruntime is not None and not p.ort_cuda
    if p.tensorrt is None and not p.gpu:  # this project's CI machines
        assert select_backend("auto", p) == select_backend("auto", CPU)


# -- the import-free probes, against directory trees laid out like real machines ---------------


def test_gpu_probes_on_a_workstation_tree(tmp_path: Path) -> None:
    info = tmp_path / "proc/driver/nvidia/gpus/0000:65:00.0/information"
    info.parent.mkdir(parents=True)
    info.write_text("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t 140\nGPU UUID: \t GPU-1234\n")
    assert gpu_present(str(tmp_path)) and gpu_name_here(str(tmp_path)) == "NVIDIA H100 80GB HBM3"


def test_gpu_probes_on_a_jetson_tree(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/nvhost-ctrl-gpu").write_text("")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    assert gpu_present(str(tmp_path))
    assert gpu_name_here(str(tmp_path)) == "NVIDIA Jetson AGX Orin Developer Kit"


def test_cuda_version_from_the_toolkit_files(tmp_path: Path) -> None:
    from importlib import metadata

    if any(d.metadata["Name"].startswith("nvidia-cuda-runtime") for d in metadata.distributions()):
        pytest.skip("a CUDA runtime wheel is installed: it answers first")
    cuda = tmp_path / "usr/local/cuda"
    cuda.mkdir(parents=True)
    assert cuda_version_here(str(tmp_path)) is None
    (cuda / "version.txt").write_text("CUDA Version 11.4.315\n")
    assert cuda_version_here(str(tmp_path)) == "11.4.315"
    (cuda / "version.json").write_text('{"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}')
    assert cuda_version_here(str(tmp_path)) == "12.6.68"


def test_a_new_cuda_changes_what_the_engine_depends_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import cachebuild.engine.gpu as gpu

    monkeypatch.setattr(gpu, "cuda_version_here", lambda root="/": "12.6.68")
    before = engine_environment("auto", JETSON)
    monkeypatch.setattr(gpu, "cuda_version_here", lambda root="/": "12.8.90")
    after = engine_environment("auto", JETSON)
    assert before["version"] == "10.3.0 (CUDA 12.6.68)" and before != after


def test_gpu_probes_without_a_gpu(tmp_path: Path) -> None:
    assert not gpu_present(str(tmp_path)) and gpu_name_here(str(tmp_path)) is None


def test_tensorrt_version_from_a_package_without_pip_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JetPack installs the bindings from a Debian package: the version is read from __init__.py, not imported."""
    pkg = tmp_path / "tensorrt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        'raise ImportError("must not be imported")\n__version__ = "10.3.0.30"\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    assert tensorrt_version_here() == "10.3.0.30"
    assert "tensorrt" not in sys.modules
    probes = probe_machine()
    assert probes.tensorrt == "10.3.0.30"


def test_no_tensorrt_here() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        assert tensorrt_version_here() is None


# -- through doit: BACKEND=tensorrt fails early; auto is onnxruntime here, the same cache ----


def test_build_with_tensorrt_missing_exits_21_before_fetching(cb: Cb, tmp_path: Path) -> None:
    if backends.probe_machine().tensorrt and backends.probe_machine().gpu:
        pytest.skip("TensorRT and a GPU are present here")
    flight = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={flight}", "BUFFER_M=100", "BACKEND=tensorrt")
    rep = r.report
    assert r.code == 21 and rep["exit_code"] == 21 and rep["failure_phase"] == "engine"
    assert "BACKEND=tensorrt" in rep["error"] and "`tensorrt` Python package" in rep["error"]
    assert rep["remedy"] and "BACKEND=auto" in rep["remedy"]
    assert rep["tasks"]["run"] == [] and not cb.current.exists()
    assert not (cb.home / "store").exists() or not any((cb.home / "store").rglob("*.png"))


def test_auto_is_onnxruntime_on_the_cpu_here_and_the_same_engine(cb: Cb, tmp_path: Path) -> None:
    here = backends.probe_machine()
    if here.tensorrt or here.ort_cuda:
        pytest.skip("this machine has a GPU backend: auto would not pick the CPU")
    flight = write_flight(tmp_path / "f.json")
    small = ("BUFFER_M=100", "ZOOM=17", "SELFTEST_QUERIES=0")
    r = cb.build(f"FLIGHT={flight}", *small)  # BACKEND unset: auto
    assert r.code == 0, r.stderr
    eng = r.report["engine"]
    assert (
        eng["backend"] == "onnxruntime" and eng["device"] == cpu_device() and len(eng["key"]) == 64
    )
    signed = json.loads((cb.current / "manifest.json").read_text())["signed"]
    assert (
        signed["info"]["engine"]["key"] == eng["key"]
        and signed["info"]["engine"]["backend"] == "onnxruntime"
    )
    # naming the backend changes nothing: the same engine, nothing to do
    again = cb.build(f"FLIGHT={flight}", *small, "BACKEND=onnxruntime")
    assert again.code == 0, again.stderr
    assert again.report["outcome"] == "up_to_date" and again.report["tasks"]["run"] == []
    assert again.report["engine"] == eng
