"""The GPU, seen from Python: cheap probes and the few CUDA calls TensorRT needs.

Two layers:

- import-free probes (:func:`gpu_present`, :func:`gpu_name_here`,
  :func:`tensorrt_version_here`), cheap enough for every no-op build: they
  read device nodes, the NVIDIA driver's /proc entries and package
  metadata, never load CUDA;
- :class:`CudaApi`: one stream, pinned host buffers, device buffers and
  async copies, from whichever of cuda-python, CuPy or PyTorch imports
  (:func:`cuda_api`).  They are imported only when a TensorRT engine is
  compiled or loaded.

None of the CUDA classes has run in this project's CI (no GPU there); see
docs/gpu.md.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Any, Protocol

from cachebuild._util.dists import installed_version
from cachebuild.errors import EngineError

__all__ = [
    "CudaApi",
    "gpu_present",
    "gpu_name_here",
    "tensorrt_version_here",
    "cuda_version_here",
    "cuda_api",
]


def tensorrt_version_here() -> str | None:
    """TensorRT's version without importing it, or None where it is absent.

    From pip metadata, else (JetPack installs the bindings from a Debian
    package) from the ``__version__`` line of the package's ``__init__.py``.
    """
    import importlib.util

    found = installed_version("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu12")
    if found:
        return found[1]
    try:
        spec = importlib.util.find_spec("tensorrt")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and os.path.isfile(spec.origin):
        try:
            text = Path(spec.origin).read_text(errors="replace")
        except OSError:
            text = ""
        m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
        if m:
            return m.group(1)
    return "unknown"


def cuda_version_here(root: str = "/") -> str | None:
    """The CUDA runtime's version without loading it, or None where none is found.

    From the pip wheels TensorRT's wheels depend on (nvidia-cuda-runtime-*),
    else the CUDA toolkit's ``version.json`` (JetPack, and toolkit installs)
    or ``version.txt``.
    """
    import json

    found = installed_version(
        "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime"
    )
    if found:
        return found[1]
    base = Path(root) / "usr/local/cuda"
    try:
        return str(json.loads((base / "version.json").read_text())["cuda"]["version"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        m = re.search(r"CUDA Version\s+([\d.]+)", (base / "version.txt").read_text())
    except OSError:
        return None
    return m.group(1) if m else None


_GPU_NODES = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0", "/dev/dri/card0-nvidia")


def gpu_present(root: str = "/") -> bool:
    """Whether an NVIDIA GPU shows here, from device nodes and the driver's /proc entries.

    A cheap, import-free hint (dGPU: /dev/nvidia0 or
    /proc/driver/nvidia/gpus; Jetson: /dev/nvhost-ctrl-gpu or
    /dev/nvgpu); loading CUDA is the real test, done when an engine is
    compiled or loaded.
    """
    base = Path(root)
    if any((base / p.lstrip("/")).exists() for p in _GPU_NODES):
        return True
    gpus = base / "proc/driver/nvidia/gpus"
    try:
        return gpus.is_dir() and any(gpus.iterdir())
    except OSError:
        return False


def gpu_name_here(root: str = "/") -> str | None:
    """The GPU's model without loading CUDA: the NVIDIA driver's /proc entry, or the Jetson's model."""
    base = Path(root)
    names = []
    try:
        for info in sorted((base / "proc/driver/nvidia/gpus").glob("*/information")):
            for line in info.read_text(errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Model":
                    names.append(value.strip())
    except OSError:
        pass
    if names:
        return ", ".join(names)
    try:
        model = (
            (base / "proc/device-tree/model").read_bytes().rstrip(b"\0").decode("utf-8", "replace")
        )
    except OSError:
        return None
    return model.strip() or None


# -- CUDA: whichever of cuda-python, CuPy, PyTorch imports ------------------


class CudaApi(Protocol):
    """The few CUDA calls the TensorRT runner needs, on device 0 and one stream."""

    name: str

    def gpu(self) -> tuple[str, str]:
        """``(name, compute capability "major.minor")``."""
        ...

    def cuda_version(self) -> str:
        """The CUDA runtime version, ``"12.6"``."""
        ...

    def stream_handle(self) -> int:
        """The ``cudaStream_t`` for ``execute_async_v3``."""
        ...

    def host(self, nbytes: int) -> Any:
        """A pinned host buffer: an object with ``array`` (numpy uint8, ``nbytes`` long)."""
        ...

    def device(self, nbytes: int) -> Any:
        """A device buffer: an object with ``ptr`` (int)."""
        ...

    def to_device(self, dst: Any, src: Any, nbytes: int) -> None:
        """Enqueue a host-to-device copy on the stream."""
        ...

    def to_host(self, dst: Any, src: Any, nbytes: int) -> None:
        """Enqueue a device-to-host copy on the stream."""
        ...

    def synchronize(self) -> None:
        """Wait for the stream."""
        ...


class _Buf:
    def __init__(self, owner: Any, array: Any = None, ptr: int = 0):
        self.owner, self.array, self.ptr = owner, array, ptr


def _np_at(ptr: int, nbytes: int) -> Any:
    import numpy as np

    return np.frombuffer(memoryview((ctypes.c_uint8 * nbytes).from_address(ptr)), dtype=np.uint8)


class _CudaPython:
    """cuda-python's runtime bindings (what TensorRT's own samples use)."""

    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart
        self._rt = cudart
        self._stream = self._call(cudart.cudaStreamCreate())
        self._frees: list[Any] = []

    def _call(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def gpu(self) -> tuple[str, str]:
        props = self._call(self._rt.cudaGetDeviceProperties(0))
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\0"), f"{props.major}.{props.minor}"

    def cuda_version(self) -> str:
        v = int(self._call(self._rt.cudaRuntimeGetVersion()))
        return f"{v // 1000}.{(v % 1000) // 10}"

    def stream_handle(self) -> int:
        return int(self._stream)

    def host(self, nbytes: int) -> _Buf:
        ptr = int(self._call(self._rt.cudaMallocHost(nbytes)))
        self._frees.append((self._rt.cudaFreeHost, ptr))
        return _Buf(None, _np_at(ptr, nbytes), ptr)

    def device(self, nbytes: int) -> _Buf:
        ptr = int(self._call(self._rt.cudaMalloc(nbytes)))
        self._frees.append((self._rt.cudaFree, ptr))
        return _Buf(None, None, ptr)

    def to_device(self, dst: _Buf, src: _Buf, nbytes: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self._rt.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, kind, self._stream))

    def to_host(self, dst: _Buf, src: _Buf, nbytes: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self._rt.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, kind, self._stream))

    def synchronize(self) -> None:
        self._call(self._rt.cudaStreamSynchronize(self._stream))

    def __del__(self) -> None:
        for free, ptr in getattr(self, "_frees", []):
            try:
                free(ptr)
            except Exception:
                pass


class _CuPy:
    name = "cupy"

    def __init__(self) -> None:
        import cupy

        self._cp = cupy
        cupy.cuda.Device(0).use()
        self._stream = cupy.cuda.Stream(non_blocking=True)

    def gpu(self) -> tuple[str, str]:
        props = self._cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return name.rstrip("\0"), f"{props['major']}.{props['minor']}"

    def cuda_version(self) -> str:
        v = int(self._cp.cuda.runtime.runtimeGetVersion())
        return f"{v // 1000}.{(v % 1000) // 10}"

    def stream_handle(self) -> int:
        return int(self._stream.ptr)

    def host(self, nbytes: int) -> _Buf:
        import numpy as np

        mem = self._cp.cuda.alloc_pinned_memory(nbytes)
        return _Buf(mem, np.frombuffer(mem, np.uint8, nbytes), int(mem.ptr))

    def device(self, nbytes: int) -> _Buf:
        mem = self._cp.cuda.alloc(nbytes)
        return _Buf(mem, None, int(mem.ptr))

    def to_device(self, dst: _Buf, src: _Buf, nbytes: int) -> None:
        dst.owner.copy_from_host_async(src.ptr, nbytes, self._stream)

    def to_host(self, dst: _Buf, src: _Buf, nbytes: int) -> None:
        src.owner.copy_to_host_async(dst.ptr, nbytes, self._stream)

    def synchronize(self) -> None:
        self._stream.synchronize()


class _Torch:
    name = "torch"

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("PyTorch sees no CUDA device")
        self._t = torch
        self._dev = torch.device("cuda", 0)
        self._stream = torch.cuda.Stream(self._dev)

    def gpu(self) -> tuple[str, str]:
        p = self._t.cuda.get_device_properties(0)
        return str(p.name), f"{p.major}.{p.minor}"

    def cuda_version(self) -> str:
        return str(self._t.version.cuda or "unknown")

    def stream_handle(self) -> int:
        return int(self._stream.cuda_stream)

    def host(self, nbytes: int) -> _Buf:
        t = self._t.empty(nbytes, dtype=self._t.uint8, pin_memory=True)
        return _Buf(t, t.numpy(), int(t.data_ptr()))

    def device(self, nbytes: int) -> _Buf:
        t = self._t.empty(nbytes, dtype=self._t.uint8, device=self._dev)
        return _Buf(t, None, int(t.data_ptr()))

    def to_device(self, dst: _Buf, src: _Buf, nbytes: int) -> None:
        with self._t.cuda.stream(self._stream):
            dst.owner[:nbytes].copy_(src.owner[:nbytes], non_blocking=True)

    def to_host(self, dst: _Buf, src: _Buf, nbytes: int) -> None:
        with self._t.cuda.stream(self._stream):
            dst.owner[:nbytes].copy_(src.owner[:nbytes], non_blocking=True)

    def synchronize(self) -> None:
        self._stream.synchronize()


_CUDA_LIBS = (
    ("cuda-python", "cuda", _CudaPython),
    ("cupy", "cupy", _CuPy),
    ("torch", "torch", _Torch),
)


def cuda_api(prefer: str | None = None) -> CudaApi:
    """A :class:`CudaApi` from the first of cuda-python, CuPy, PyTorch that imports and finds a GPU.

    Raises
    ------
    EngineError
        Naming what was tried and why each failed.
    """
    import importlib.util

    tried = []
    for label, module, cls in _CUDA_LIBS:
        if prefer and label != prefer:
            continue
        if importlib.util.find_spec(module) is None:
            tried.append(f"{label}: not installed")
            continue
        try:
            return cls()
        except Exception as exc:  # no driver, no device, a broken install
            tried.append(f"{label}: {type(exc).__name__}: {exc}")
    raise EngineError(
        "BACKEND=tensorrt needs a CUDA GPU reachable from Python, and none was found ("
        + "; ".join(tried)
        + ")",
        remedy="install cuda-python (pip install cuda-python) or CuPy on the machine with the GPU, "
        "check the NVIDIA driver (nvidia-smi, or tegrastats on a Jetson), or use BACKEND=onnxruntime",
    )
