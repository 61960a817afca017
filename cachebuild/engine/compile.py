"""Compile the descriptor network for the device that runs it.

An *engine* is the network prepared for one backend on one device, in a
directory of its own::

    <engine_dir>/engine.onnx   the compiled network (the name is the backend's
                               choice: a TensorRT backend writes a .plan)
    <engine_dir>/engine.json   what was compiled, from what, for what; written
                               last, so its presence means the engine is whole

Callers only see :class:`EngineBackend` and :class:`EngineRunner`; the
backends are ONNX Runtime (CPU, or its CUDA provider where onnxruntime-gpu
sees a GPU) and TensorRT (:mod:`cachebuild.engine.tensorrt.backend`).  ``BACKEND=auto`` takes
TensorRT where it is installed and a GPU is present, else ONNX Runtime
(:mod:`cachebuild.engine.backends`).  An engine is identified by :func:`engine_key`: the hashes of the model and calibration *bytes*, the precision, the
backend and its version, the device and, for TensorRT, the build settings
(profile shapes, workspace, flags), never a file name (ONNX Runtime's
TensorRT provider keys its cache on the model's file name, a known trap).
An engine that runs only where it was built (TensorRT's) has its key
checked against the machine when it is loaded.

onnx, onnxruntime, tensorrt and CUDA libraries are imported inside the
functions that use them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cachebuild.engine.backends import BACKEND_CHOICES, BACKENDS, MachineProbes, select_backend
from cachebuild._util.hashing import sha256_file as _sha256_and_size
from cachebuild.errors import EngineError
from cachebuild.engine.modelfiles import external_data_files, model_sha256, self_contained
from cachebuild.tiles.tileset import atomic_write_bytes

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ENGINE_JSON",
    "PRECISIONS",
    "DEFAULT_BACKEND",
    "EngineInfo",
    "EngineRunner",
    "EngineBackend",
    "OnnxRuntimeBackend",
    "engine_key",
    "sha256_file",
    "cpu_device",
    "get_backend",
    "compile_engine",
    "read_engine_json",
    "load_engine",
]

ENGINE_JSON = "engine.json"
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


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (models can be large)."""
    return _sha256_and_size(path, chunk_size)[0]


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


def _onnx_shape(shape: Any) -> list[int | None]:
    """An ONNX Runtime shape with symbolic dimensions as ``None``."""
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


class _OrtRunner:
    """An ONNX Runtime session over a compiled engine."""

    def __init__(self, session: Any, record: dict[str, Any]):
        self._session = session
        self._input = str(record["input"]["name"])
        self._output = str(record["output"]["name"])
        shape = record["input"]["shape"]
        self._fixed_batch: int | None = shape[0]
        self.input_hw: tuple[int, int] = (int(shape[2]), int(shape[3]))
        self.descriptor_dim: int = int(record["descriptor_dim"])

    def run(self, batch: np.ndarray) -> np.ndarray:
        import numpy as np

        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (3, *self.input_hw):
            raise EngineError(
                f"engine input must be float32 [n, 3, {self.input_hw[0]}, {self.input_hw[1]}], "
                f"got {list(x.shape)}",
                remedy="this is a bug in the caller; report it",
            )
        fixed = self._fixed_batch
        if fixed is None or len(x) == fixed:
            result: np.ndarray = self._session.run([self._output], {self._input: x})[0]
            return result
        # a model exported with a fixed batch: run it chunk by chunk, padding the last
        out = np.empty((len(x), self.descriptor_dim), dtype=np.float32)
        for start in range(0, len(x), fixed):
            chunk = x[start : start + fixed]
            n = len(chunk)
            if n < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *x.shape[1:]), np.float32)])
            out[start : start + n] = self._session.run([self._output], {self._input: chunk})[0][:n]
        return out


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU, or on a GPU through its CUDA provider: fp32 only.

    The engine is the model as ONNX Runtime optimised it, saved as
    ``engine.onnx``.  It may use ONNX Runtime's own operators (``FusedConv``
    in the ``com.microsoft`` domain), so only ONNX Runtime can run it.
    Loading it optimises further for the device at hand.

    Parameters
    ----------
    spin
        Let idle intra-op threads spin (CPU).
    provider
        ``cpu``, or ``cuda`` for the CUDAExecutionProvider (onnxruntime-gpu);
        the engine is compiled the same way, the device (part of the key)
        says which runs it.
    """

    name = "onnxruntime"
    precisions: tuple[str, ...] = ("fp32",)
    engine_file = "engine.onnx"

    def __init__(self, *, spin: bool = False, provider: str = "cpu"):
        # Spinning intra-op threads burn a core while they wait for work; in the
        # describe pipeline that core is needed by the tile decoders.
        self.spin = spin
        if provider not in ("cpu", "cuda"):
            raise ValueError(f"provider must be cpu or cuda, got {provider!r}")
        self.provider = provider

    def version(self) -> str:
        import onnxruntime

        return str(onnxruntime.__version__)

    def device(self) -> str:
        if self.provider == "cuda":
            from cachebuild.engine.gpu import gpu_name_here

            return f"cuda:{gpu_name_here() or 'unknown GPU'}"
        return cpu_device()

    def _providers(self) -> list[str]:
        if self.provider != "cuda":
            return ["CPUExecutionProvider"]
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError(
                "the engine is for ONNX Runtime's CUDA provider, which this ONNX Runtime lacks "
                f"(it has {', '.join(ort.get_available_providers())})",
                remedy="install onnxruntime-gpu with a matching CUDA, or build again here "
                "(BACKEND=auto picks what this machine has)",
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def compile(
        self, model_path: Path, calibration_path: Path | None, precision: str, out_dir: Path
    ) -> EngineInfo:
        """Optimise ``model_path`` and save the result as ``out_dir/engine.onnx``.

        ``calibration_path`` is unused (fp32 needs none); it still keys the
        engine through :func:`engine_key`.
        """
        _check_precision(self, precision)
        import onnxruntime as ort

        model_path, out_dir = Path(model_path), Path(out_dir)
        tmp = out_dir / f".{self.engine_file}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        so = ort.SessionOptions()
        # EXTENDED, not ALL: ALL adds layout transforms (NCHWc blocked for the
        # CPU's vector width) that ONNX Runtime documents as tied to the machine
        # that saved them; EXTENDED fusions are portable, and load() applies ALL
        # on the machine that runs the engine.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp)
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        try:
            try:
                session = ort.InferenceSession(
                    self_contained(model_path), sess_options=so, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:
                raise EngineError(
                    f"ONNX Runtime cannot compile model {model_path}: {exc}",
                    remedy="check that MODEL is a valid ONNX model ONNX Runtime supports",
                ) from exc
            info = _describe_io(model_path, session, self.engine_file)
            os.replace(tmp, out_dir / self.engine_file)
        finally:
            tmp.unlink(missing_ok=True)
        return info

    def load(self, engine_dir: Path, threads: int | None = None) -> EngineRunner:
        """Open the engine with ``threads`` intra-op threads (default: one per core)."""
        import onnxruntime as ort

        engine_dir = Path(engine_dir)
        record = read_engine_json(engine_dir)
        path = engine_dir / str(record["engine_file"])
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not threads:
            from cachebuild._util.cpus import usable_cpus

            # ONNX Runtime's own default counts the machine's cores, not a
            # container's CPU quota (see cachebuild/_util/cpus.py).
            threads = usable_cpus()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=self._providers())
        except Exception as exc:
            raise EngineError(
                f"ONNX Runtime cannot load engine {path}: {exc}",
                remedy="delete the engine directory and compile the engine again",
            ) from exc
        return _OrtRunner(session, record)


def _describe_io(model_path: Path, session: Any, engine_file: str) -> EngineInfo:
    """Check the network's signature: one [n, 3, H, W] float input, one [n, D] output."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise EngineError(
            f"model {model_path} must have one input and one output, "
            f"has {len(inputs)} inputs and {len(outputs)} outputs"
        )
    inp, out = inputs[0], outputs[0]
    in_shape, out_shape = _onnx_shape(inp.shape), _onnx_shape(out.shape)
    if (
        inp.type != "tensor(float)"
        or len(in_shape) != 4
        or in_shape[1] != 3
        or in_shape[2] is None
        or in_shape[3] is None
    ):
        raise EngineError(
            f"model {model_path} input {inp.name!r} must be float32 [batch, 3, H, W] with fixed "
            f"H and W, is {inp.type} {list(inp.shape)}"
        )
    if out.type != "tensor(float)" or len(out_shape) != 2 or out_shape[1] is None:
        raise EngineError(
            f"model {model_path} output {out.name!r} must be float32 [batch, D] with a fixed D, "
            f"is {out.type} {list(out.shape)}"
        )
    return EngineInfo(
        engine_file=engine_file,
        input={"name": inp.name, "shape": in_shape, "dtype": "float32"},
        output={"name": out.name, "shape": out_shape, "dtype": "float32"},
        descriptor_dim=int(out_shape[1]),
    )


def _check_precision(backend: EngineBackend, precision: str) -> None:
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


def get_backend(name: str, probes: MachineProbes | None = None, **options: Any) -> EngineBackend:
    """The backend called ``name`` (or chosen by ``auto``), ready to compile or load.

    Parameters
    ----------
    name
        A name from :data:`BACKEND_CHOICES`.
    probes
        :class:`MachineProbes`; probed here when omitted.
    options
        TensorRT's ``workspace`` and ``timing_cache_dir``; ignored by ONNX Runtime.

    Raises
    ------
    EngineError
        Exit 21: for an unknown name (listing the known ones), for
        ``tensorrt`` where its package or a GPU is missing (naming which),
        or when the chosen backend's package is missing.
    """
    if name not in BACKEND_CHOICES:
        raise EngineError(
            f"unknown BACKEND={name!r}; known backends: {', '.join(BACKENDS)} (or auto)",
            remedy="set BACKEND=auto",
        )
    if name == "onnxruntime" and probes is None and importlib.util.find_spec("onnxruntime") is None:
        raise EngineError(
            "BACKEND=onnxruntime, but onnxruntime is not installed here",
            remedy="pip install onnxruntime",
        )
    choice = select_backend(name, probes)
    if choice.backend == "tensorrt":
        from cachebuild.engine.tensorrt.backend import TensorRTBackend

        kw = {k: options[k] for k in ("workspace", "timing_cache_dir") if options.get(k) is not None}
        return TensorRTBackend(**kw)
    if importlib.util.find_spec("onnxruntime") is None:
        raise EngineError(
            f"BACKEND={name} needs onnxruntime, which is not installed here",
            remedy="pip install onnxruntime",
        )
    return OnnxRuntimeBackend(provider=choice.provider)


def _check_onnx(model_path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(model_path))
    except Exception as exc:
        raise EngineError(
            f"model file {model_path} is not a valid ONNX model: {exc}",
            remedy="set MODEL to an ONNX file (or leave it unset for the default network)",
        ) from exc


def compile_engine(
    *,
    model_path: str | os.PathLike[str],
    calibration_path: str | os.PathLike[str] | None,
    precision: str,
    backend: str = DEFAULT_BACKEND,
    out_dir: str | os.PathLike[str],
    workspace: int | None = None,
    timing_cache_dir: str | os.PathLike[str] | None = None,
    probes: MachineProbes | None = None,
) -> dict[str, Any]:
    """Compile ``model_path`` for this machine into ``out_dir``.

    Parameters
    ----------
    model_path
        The ONNX network.
    calibration_path
        Calibration data for int8 (hashed into the key whatever the
        precision), or ``None``.
    precision
        ``fp32``, ``fp16`` or ``int8``; the backend must support it.
    backend
        A name from :data:`cachebuild.engine.backends.BACKEND_CHOICES` (``auto``: see
        :func:`cachebuild.engine.backends.select_backend`).
    out_dir
        The engine directory (created).  ``engine.json`` is removed first
        and written last, atomically.
    workspace, timing_cache_dir
        TensorRT's builder workspace limit (bytes) and where its timing
        cache persists between builds.
    probes
        :class:`MachineProbes`; probed here when omitted.

    Returns
    -------
    dict
        The contents of ``engine.json``: ``key``, ``backend``,
        ``backend_version``, ``device``, ``precision``, ``model_sha256``,
        ``calibration_sha256``, ``engine_file``, ``input``, ``output``,
        ``descriptor_dim``; TensorRT adds ``build`` (in the key),
        ``environment`` (checked at load) and ``engine_sha256``.

    Raises
    ------
    EngineError
        Naming the file, precision or backend at fault.
    """
    be = get_backend(backend, probes, workspace=workspace, timing_cache_dir=timing_cache_dir)
    _check_precision(be, precision)
    model_path = Path(model_path)
    if not model_path.is_file():
        raise EngineError(
            f"model file {model_path} does not exist",
            remedy="set MODEL to an ONNX file (or leave it unset for the default network)",
        )
    calibration = Path(calibration_path) if calibration_path is not None else None
    if calibration is not None and not calibration.is_file():
        raise EngineError(
            f"calibration file {calibration} does not exist",
            remedy="set CALIBRATION to an existing file, or leave it unset",
        )
    external_data_files(model_path)  # missing or escaping external data: named before the checker's words
    _check_onnx(model_path)
    model_digest = model_sha256(model_path)  # external data files included
    calibration_sha256 = sha256_file(calibration) if calibration is not None else None
    version, device = be.version(), be.device()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # its absence marks the directory as incomplete until the new engine is in
    (out / ENGINE_JSON).unlink(missing_ok=True)
    info = be.compile(model_path, calibration, precision, out)
    key = engine_key(model_digest, calibration_sha256, precision, be.name, version, device, info.build)
    record: dict[str, Any] = {
        "key": key,
        "backend": be.name,
        "backend_version": version,
        "device": device,
        "precision": precision,
        "model_sha256": model_digest,
        "calibration_sha256": calibration_sha256,
        "engine_file": info.engine_file,
        "input": info.input,
        "output": info.output,
        "descriptor_dim": info.descriptor_dim,
    }
    if info.build is not None:
        record["build"] = info.build
    if info.environment is not None:
        record["environment"] = info.environment
    record.update(info.extra)
    atomic_write_bytes(out / ENGINE_JSON, json.dumps(record, indent=1, sort_keys=True).encode())
    return record


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


def load_engine(engine_dir: str | os.PathLike[str], threads: int | None = None) -> EngineRunner:
    """Load the engine in ``engine_dir`` with the backend that compiled it.

    Parameters
    ----------
    engine_dir
        A directory written by :func:`compile_engine`.
    threads
        Threads the backend may use (ONNX Runtime intra-op threads);
        ``None`` for the backend's default.
    """
    record = read_engine_json(engine_dir)
    name = str(record["backend"])
    if name == "onnxruntime":  # the device in engine.json says which provider it was built for
        if importlib.util.find_spec("onnxruntime") is None:
            raise EngineError(
                f"the engine in {engine_dir} needs onnxruntime, which is not installed here",
                remedy="pip install onnxruntime",
            )
        provider = "cuda" if str(record.get("device", "")).startswith("cuda:") else "cpu"
        be: EngineBackend = OnnxRuntimeBackend(provider=provider)
    else:
        be = get_backend(name)
    if not getattr(be, "portable", True):
        _check_key(be, record, Path(engine_dir))
    return be.load(Path(engine_dir), threads=threads)


def _check_key(be: EngineBackend, record: dict[str, Any], engine_dir: Path) -> None:
    """The key check at load: the engine's key, derived again for this machine, must match.

    A TensorRT engine runs only on the GPU, TensorRT and CUDA it was built
    with; one built elsewhere is never loaded.
    """
    check = getattr(be, "environment", None)
    if callable(check) and record.get("environment") is not None:
        from cachebuild.engine.tensorrt.backend import check_environment

        check_environment(record, check(), engine_dir)  # the readable message first
    here = engine_key(
        str(record.get("model_sha256")), record.get("calibration_sha256"), str(record.get("precision")),
        be.name, be.version(), be.device(), record.get("build"),
    )  # fmt: skip
    if here != record.get("key"):
        raise EngineError(
            f"the engine in {engine_dir} was built for {record.get('device')} with {record.get('backend')} "
            f"{record.get('backend_version')}; here it would be {be.device()} with {be.version()}: "
            "its key does not match this machine, so it is not loaded",
            remedy=f"delete {engine_dir} and run build-cache again: the engine is then built for this "
            "machine (a new TensorRT, CUDA or GPU model rebuilds it by itself)",
        )
