"""Which engine backend runs here: ``BACKEND=auto|tensorrt|onnxruntime``.

:func:`probe_machine` looks at this machine without loading CUDA (package
metadata, device nodes, the NVIDIA driver's /proc entries), cheaply enough
for every no-op build; :func:`select_backend` turns a BACKEND value and
those probes into a backend, as a pure function; :func:`engine_environment`
is what a build's engine task depends on.  ``auto`` takes TensorRT where
its package is installed and a GPU is present, else ONNX Runtime (its CUDA
provider where onnxruntime-gpu offers it, else the CPU).  Nothing heavy is
imported at module level.
"""

from __future__ import annotations

from dataclasses import dataclass

from cachebuild._util.dists import installed_version
from cachebuild.engine import gpu as gpu_probes
from cachebuild.engine.interface import cpu_device
from cachebuild.errors import EngineError

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "MachineProbes",
    "BackendChoice",
    "probe_machine",
    "select_backend",
    "engine_environment",
]

BACKENDS = ("onnxruntime", "tensorrt")
#: What BACKEND may say: a backend, or ``auto`` (:func:`select_backend`).
BACKEND_CHOICES = ("auto", *BACKENDS)


@dataclass(frozen=True)
class MachineProbes:
    """What this machine offers an engine, found without loading CUDA.

    Attributes
    ----------
    tensorrt
        TensorRT's version, or None where the ``tensorrt`` package is absent.
    gpu
        Whether an NVIDIA GPU shows (device nodes, driver /proc entries).
    onnxruntime
        ONNX Runtime's version (onnxruntime or onnxruntime-gpu), or None.
    ort_cuda
        Whether ONNX Runtime offers the CUDAExecutionProvider here.
    """

    tensorrt: str | None
    gpu: bool
    onnxruntime: str | None
    ort_cuda: bool


@dataclass(frozen=True)
class BackendChoice:
    """The backend a BACKEND value resolves to here, and why."""

    backend: str
    provider: str  # "tensorrt", "cuda" or "cpu": what runs the network
    reason: str


def probe_machine() -> MachineProbes:
    """:class:`MachineProbes` for this machine.

    Cheap (a plan resolves it on every no-op): package metadata and device
    nodes.  ONNX Runtime is imported only where onnxruntime-gpu is installed
    and a GPU shows, to ask whether its CUDA provider is usable.
    """

    gpu = gpu_probes.gpu_present()
    ort = installed_version("onnxruntime", "onnxruntime-gpu")
    ort_version = ort[1] if ort else None
    ort_cuda = False
    if gpu and installed_version("onnxruntime-gpu"):
        try:
            import onnxruntime

            ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        except Exception:  # a broken install: the CPU then
            ort_cuda = False
    return MachineProbes(
        tensorrt=gpu_probes.tensorrt_version_here(),
        gpu=gpu,
        onnxruntime=ort_version,
        ort_cuda=ort_cuda,
    )


def _missing_tensorrt(probes: MachineProbes) -> EngineError | None:
    missing = []
    if probes.tensorrt is None:
        missing.append("the `tensorrt` Python package is not installed")
    if not probes.gpu:
        missing.append(
            "no CUDA GPU is visible (no /dev/nvidia0, /dev/nvhost-ctrl-gpu or driver entry)"
        )
    if not missing:
        return None
    return EngineError(
        "BACKEND=tensorrt, but " + " and ".join(missing) + " on this machine",
        remedy="build on the Jetson (JetPack's python3-libnvinfer) or a machine with TensorRT 10/11 "
        "and an NVIDIA GPU, or set BACKEND=auto (ONNX Runtime where TensorRT is missing)",
    )


def select_backend(requested: str, probes: MachineProbes | None = None) -> BackendChoice:
    """The backend ``BACKEND=requested`` means on this machine.

    ``auto``: TensorRT when its package is installed and a GPU is present;
    else ONNX Runtime, on its CUDA provider when onnxruntime-gpu offers it,
    else on the CPU.  ``onnxruntime`` likewise picks CUDA or CPU.

    Raises
    ------
    EngineError
        Exit 21: ``tensorrt`` where the package or a GPU is missing (naming
        which), or an unknown name.

    >>> p = MachineProbes(tensorrt=None, gpu=False, onnxruntime="1.20.0", ort_cuda=False)
    >>> select_backend("auto", p).backend, select_backend("auto", p).provider
    ('onnxruntime', 'cpu')
    """
    probes = probes or probe_machine()
    if requested not in BACKEND_CHOICES:
        raise EngineError(
            f"unknown BACKEND={requested!r}; known backends: {', '.join(BACKEND_CHOICES)}",
            remedy="set BACKEND=auto",
        )
    if requested == "tensorrt":
        err = _missing_tensorrt(probes)
        if err is not None:
            raise err
        return BackendChoice("tensorrt", "tensorrt", "BACKEND=tensorrt")
    if requested == "auto" and probes.tensorrt is not None and probes.gpu:
        return BackendChoice("tensorrt", "tensorrt", f"auto: TensorRT {probes.tensorrt} and a GPU")
    why = (
        "auto: " + ("no GPU" if not probes.gpu else "no TensorRT")
        if requested == "auto"
        else "BACKEND=onnxruntime"
    )
    if probes.ort_cuda:
        return BackendChoice("onnxruntime", "cuda", f"{why}; onnxruntime-gpu's CUDA provider")
    return BackendChoice("onnxruntime", "cpu", f"{why}; ONNX Runtime on the CPU")


def engine_environment(requested: str, probes: MachineProbes | None = None) -> dict[str, str]:
    """``{backend, version, device}`` of what BACKEND resolves to here, without loading it.

    What a build's engine task depends on (a change rebuilds the engine):
    the device is the CPU (model and vector features) or the GPU's model
    (from the driver, without loading CUDA); TensorRT's version includes
    the CUDA runtime's, read from its wheel or the toolkit's version file.  Never raises: a missing
    TensorRT shows as version ``missing``; the engine phase then fails with
    the reason (exit 21).
    """

    probes = probes or probe_machine()
    try:
        choice = select_backend(requested, probes)
    except EngineError:
        return {"backend": requested, "version": probes.tensorrt or "missing", "device": "none"}
    if choice.backend == "tensorrt":
        version = f"{probes.tensorrt} (CUDA {gpu_probes.cuda_version_here() or 'unknown'})"
        return {
            "backend": "tensorrt",
            "version": version,
            "device": f"gpu:{gpu_probes.gpu_name_here() or 'unknown'}",
        }
    version = probes.onnxruntime or "missing"
    if choice.provider == "cuda":
        return {
            "backend": "onnxruntime",
            "version": version,
            "device": f"cuda:{gpu_probes.gpu_name_here() or 'unknown'}",
        }
    return {"backend": "onnxruntime", "version": version, "device": cpu_device()}
