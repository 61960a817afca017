"""What every engine backend is and says: the interface, the engine key, engine.json, the CPU as a device.

The backends (:mod:`cachebuild.engine.ort`, :mod:`cachebuild.engine.tensorrt.backend`)
and the compiler (:mod:`cachebuild.engine.compile`) all build on this module,
which imports none of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cachebuild.errors import EngineError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_BACKEND",
    "ENGINE_JSON",
    "PRECISIONS",
    "EngineBackend",
    "EngineInfo",
    "EngineRunner",
    "INPUT_PREPARATION",
    "check_precision",
    "cpu_device",
    "documented_input",
    "engine_key",
    "read_engine_json",
]


ENGINE_JSON = "engine.json"

#: How every frame and tile is prepared for the engine (cachebuild.localize.decode does
#: exactly this); ``engine.json``'s ``input`` carries it so an onboard client needs no source.
INPUT_PREPARATION: dict[str, Any] = {
    "channel_order": "RGB",
    "layout": "NCHW",
    "dtype": "float32",
    "scaling": "x / 255 - 0.5",
    "scale": 1 / 255,
    "offset": -0.5,
    "resize": "bilinear, to size",
}


PRECISIONS = ("fp32", "fp16", "int8")


DEFAULT_BACKEND = "auto"


# CPU features that change which kernels a backend picks (x86 and ARM names
# as /proc/cpuinfo spells them).
_RELEVANT_CPU_FLAGS = frozenset(
    {
        "avx", "avx2", "fma", "f16c",
        "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
        "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
        "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "i8mm", "bf16",
    }
)  # fmt: skip


@dataclass(frozen=True)
class EngineInfo:
    """What a backend's ``compile`` produced.

    Attributes
    ----------
    engine_file
        File name of the compiled engine inside the engine directory.
    input
        ``{"name", "shape", "dtype"}`` of the network input; ``shape`` is
        ``[batch, 3, H, W]`` with ``None`` for a dynamic batch.
    output
        ``{"name", "shape", "dtype"}`` of the descriptor output ``[batch, D]``.
    descriptor_dim
        ``D``.
    build
        Build settings that are part of the engine key beyond precision,
        version and device (TensorRT: ``profile``, ``workspace``,
        ``flags``); None for none (ONNX Runtime).
    environment
        What the engine is tied to, checked at load (TensorRT: ``tensorrt``,
        ``cuda``, ``gpu``, ``compute_capability``); None for a portable engine.
    extra
        Further facts for ``engine.json`` (not in the key).
    """

    engine_file: str
    input: dict[str, Any]
    output: dict[str, Any]
    descriptor_dim: int
    build: dict[str, Any] | None = None
    environment: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class EngineRunner(Protocol):
    """A loaded engine: float32 NCHW tiles in, ``[n, descriptor_dim]`` out."""

    descriptor_dim: int
    input_hw: tuple[int, int]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Descriptors of ``batch`` (float32 ``[n, 3, H, W]``), float32 ``[n, D]``."""
        ...


class EngineBackend(Protocol):
    """A way to compile and run the network (ONNX Runtime today, TensorRT later).

    ``version()`` and ``device()`` feed :func:`engine_key`, so between them
    they must name everything that makes a compiled engine non-portable.  A
    TensorRT backend would put the GPU name and compute capability in
    ``device()`` and the TensorRT and CUDA versions (and its fixed builder
    settings: profile shapes, workspace) in ``version()``.
    """

    name: str
    precisions: tuple[str, ...]

    def version(self) -> str:
        """The backend's version, part of the engine key."""
        ...

    def device(self) -> str:
        """The device the engine is compiled for, stable per machine."""
        ...

    def compile(
        self, model_path: Path, calibration_path: Path | None, precision: str, out_dir: Path
    ) -> EngineInfo:
        """Compile ``model_path`` into ``out_dir``; never writes ``engine.json``."""
        ...

    def load(self, engine_dir: Path, threads: int | None = None) -> EngineRunner:
        """Load the engine compiled into ``engine_dir``."""
        ...


def engine_key(
    model_sha256: str,
    calibration_sha256: str | None,
    precision: str,
    backend: str,
    backend_version: str,
    device: str,
    build: Mapping[str, Any] | None = None,
) -> str:
    """The identity of an engine: sha256 of the canonical JSON of its inputs.

    Two engines share a key exactly when they were compiled from the same
    model and calibration bytes, at the same precision, by the same backend
    version, for the same device, with the same build settings (``build``:
    TensorRT's profile shapes, workspace and flags; omitted when None, so
    ONNX Runtime keys are what they were).  File names play no part.

    >>> k = engine_key("ab" * 32, None, "fp32", "onnxruntime", "1.18.0", "cpu:x:avx2")
    >>> len(k), k == engine_key("ab" * 32, None, "fp32", "onnxruntime", "1.18.0", "cpu:x:avx2")
    (64, True)
    """
    fields: dict[str, Any] = {
        "model_sha256": model_sha256,
        "calibration_sha256": calibration_sha256,
        "precision": precision,
        "backend": backend,
        "backend_version": backend_version,
        "device": device,
    }
    if build is not None:
        fields["build"] = dict(build)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def cpu_device(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """``cpu:<model name>:<relevant flags, sorted, comma-separated>``.

    Parameters
    ----------
    cpuinfo
        Text of ``/proc/cpuinfo``; read from the system when omitted (and
        empty where there is none).
    machine
        Architecture, e.g. ``aarch64``; ``platform.machine()`` when omitted.
        Used where cpuinfo names no model (ARM boards).

    >>> cpu_device("model name\\t: AMD EPYC\\nflags\\t\\t: fpu avx avx2 sse2\\n", "x86_64")
    'cpu:AMD EPYC:avx,avx2'
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    machine = machine or platform.machine() or "unknown"
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key and key not in fields:  # the first processor is enough
            fields[key] = value.strip()
    model = fields.get("model name") or fields.get("hardware") or ""
    if not model and "cpu part" in fields:
        model = (
            f"{machine} implementer {fields.get('cpu implementer', '?')} part {fields['cpu part']}"
        )
    model = " ".join((model or platform.processor() or machine).replace(":", " ").split())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return f"cpu:{model}:{','.join(sorted(flags & _RELEVANT_CPU_FLAGS))}"


def read_engine_json(engine_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``engine.json`` of a compiled engine.

    Raises
    ------
    EngineError
        When the engine directory holds no (readable) ``engine.json``.
    """
    path = Path(engine_dir) / ENGINE_JSON
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise EngineError(
            f"no compiled engine at {Path(engine_dir)} ({ENGINE_JSON} is missing)",
            remedy="compile the engine first (the engine phase of build-cache)",
        ) from exc
    except (OSError, ValueError) as exc:
        raise EngineError(
            f"{path} is unreadable: {exc}",
            remedy="delete the engine directory and compile the engine again",
        ) from exc
    required = ("backend", "engine_file", "input", "output", "descriptor_dim")
    missing = (
        [k for k in required if k not in record] if isinstance(record, dict) else list(required)
    )
    if missing:
        raise EngineError(
            f"{path} is incomplete (missing {', '.join(missing)})",
            remedy="delete the engine directory and compile the engine again",
        )
    return record


def check_precision(backend: EngineBackend, precision: str) -> None:
    """Refuse a precision no backend knows, or one ``backend`` cannot build."""
    if precision not in PRECISIONS:
        raise EngineError(
            f"unknown PRECISION={precision!r}; known precisions: {', '.join(PRECISIONS)}",
            remedy="set PRECISION to fp32, fp16 or int8",
        )
    if precision not in backend.precisions:
        raise EngineError(
            f"PRECISION={precision} is not supported by the {backend.name} backend "
            f"(it supports {', '.join(backend.precisions)}); fp16 and int8 need "
            f"BACKEND=tensorrt on a machine with TensorRT",
            remedy=f"set PRECISION={backend.precisions[0]}, or build on a machine with TensorRT",
        )


def documented_input(inp: dict[str, Any]) -> dict[str, Any]:
    """A backend's ``input`` record with ``size`` ([H, W], None when dynamic) and the preparation.

    >>> documented_input({"name": "tiles", "shape": [None, 3, 256, 256], "dtype": "float32"})["size"]
    [256, 256]
    """
    shape = list(inp.get("shape") or [])
    hw = shape[2:4] if len(shape) == 4 else []
    size = [int(v) for v in hw] if len(hw) == 2 and all(isinstance(v, int) for v in hw) else None
    return {**inp, "size": size, **INPUT_PREPARATION}
