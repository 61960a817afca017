"""The TensorRT engine backend (TensorRT 10.x and 11.x).

:class:`TensorRTBackend` compiles the ONNX network into a serialized
TensorRT engine (``engine.plan``) and runs it.  It sits behind the same
interface as the ONNX Runtime backend (:mod:`cachebuild.engine.compile`), so the
describe and self-test phases do not know which one runs.

What the compile does, in the TensorRT Python API's terms:

- ``Builder`` → ``create_network(flags)`` (explicit batch is the only mode
  since TensorRT 10; ``STRONGLY_TYPED`` where the model carries its own
  precision, and always on TensorRT 11) → ``OnnxParser.parse``: every
  parser error is reported, with its node, operator and code;
- one ``IOptimizationProfile`` over the batch dimension
  (:data:`PROFILE_BATCH`: min/opt/max), so any batch size runs;
- ``BuilderConfig.set_memory_pool_limit(WORKSPACE, …)``;
- a timing cache read before the build and written back after it
  (``create_timing_cache`` / ``set_timing_cache`` / ``serialize``), one
  file per TensorRT version, CUDA version and GPU, so the second build of
  any model on a machine skips most kernel timing;
- ``PRECISION`` mapped per TensorRT version by
  :func:`cachebuild.engine.tensorrt.policy.precision_plan`:
  TensorRT 10 sets the ``FP16``/``INT8`` builder flags for an fp32 model
  (int8 with a calibrator fed from ``CALIBRATION``); TensorRT 11 removed
  those flags and INT8 calibration, so there ``fp16``/``int8`` mean a model
  that carries that precision (converted with ModelOpt), or a clear error.

The engine key (:func:`cachebuild.engine.compile.engine_key`) covers the sha256 of
the ONNX bytes, the TensorRT and CUDA versions, the GPU name and compute
capability, the precision, the profile shapes, the workspace and the
flags, never a file name.  Loading checks that key against the machine:
an engine built for another GPU or TensorRT version is never loaded.

Inference goes through ``IExecutionContext.execute_async_v3`` on a CUDA
stream, with ``set_input_shape`` and ``set_tensor_address``, copying
through pinned host buffers.  The CUDA side (streams, pinned and device
memory) comes from whichever of cuda-python, CuPy or PyTorch imports
(:func:`cachebuild.engine.gpu.cuda_api`); TensorRT and that library are imported only here, and
only when a TensorRT engine is compiled or loaded.

This module has never run against a real TensorRT in this project's CI
(no TensorRT wheel and no GPU there): see docs/gpu.md for what was
exercised where.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachebuild._util.fs import atomic_write
from cachebuild.engine.gpu import CudaApi, cuda_api
from cachebuild.engine.interface import EngineInfo, read_engine_json
from cachebuild.engine.tensorrt.policy import (
    PROFILE_BATCH,
    check_environment,
    model_precision,
    parser_errors,
    precision_plan,
    profile_shapes,
    timing_cache_path,
)
from cachebuild.errors import EngineError

if TYPE_CHECKING:
    import numpy as np

    from cachebuild.engine.interface import EngineInfo

__all__ = [
    "DEFAULT_WORKSPACE",
    "ENGINE_FILE",
    "TensorRTBackend",
    "live_environment",
]

#: Builder workspace limit in bytes (``WORKSPACE``).
DEFAULT_WORKSPACE = 1 << 30
ENGINE_FILE = "engine.plan"


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError(
            f"BACKEND=tensorrt, but the `tensorrt` Python package cannot be imported here ({exc})",
            remedy="build on the Jetson (JetPack's python3-libnvinfer) or a machine with TensorRT "
            "10/11 and a CUDA GPU, or use BACKEND=onnxruntime (or BACKEND=auto)",
        ) from exc
    return tensorrt


# -- environment, key check, timing cache --------------------------------------


def live_environment(trt: Any, cuda: CudaApi) -> dict[str, str]:
    """What makes an engine non-portable, read live: TensorRT, CUDA, GPU, compute capability."""
    name, cc = cuda.gpu()
    return {
        "tensorrt": str(trt.__version__),
        "cuda": cuda.cuda_version(),
        "gpu": name,
        "compute_capability": cc,
    }


def _load_timing_cache(config: Any, path: Path | None) -> tuple[Any, bool]:
    """``(timing cache, reused)``: the saved one when it is readable and TensorRT takes it."""
    data = b""
    if path is not None:
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
    if data:
        try:
            cache = config.create_timing_cache(data)
            if cache is not None and config.set_timing_cache(cache, False) is not False:
                return cache, True
        except Exception:  # a cache from another build of TensorRT, or a torn file
            pass
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    return cache, False


def _save_timing_cache(config: Any, path: Path | None) -> None:
    if path is None:
        return
    cache = config.get_timing_cache()
    if cache is None:
        return
    data = bytes(memoryview(cache.serialize()))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, durable=False)


def _onnx_io(model: Any, model_path: Path, engine_file: str) -> EngineInfo:
    """The network's signature from the ONNX graph: one [n, 3, H, W] input, one [n, D] output."""
    from onnx import TensorProto

    init = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in init]
    outputs = list(model.graph.output)
    if len(inputs) != 1 or len(outputs) < 1:
        raise EngineError(
            f"model {model_path} must have one input and one output, "
            f"has {len(inputs)} inputs and {len(outputs)} outputs"
        )
    dtypes = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}

    def shape(v: Any) -> list[int | None]:
        return [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in v.type.tensor_type.shape.dim
        ]

    inp, out = inputs[0], outputs[0]
    in_shape, out_shape = shape(inp), shape(out)
    in_t, out_t = (
        dtypes.get(inp.type.tensor_type.elem_type),
        dtypes.get(out.type.tensor_type.elem_type),
    )
    if in_t is None or len(in_shape) != 4 or in_shape[1] != 3 or None in in_shape[2:]:
        raise EngineError(
            f"model {model_path} input {inp.name!r} must be float32/float16 [batch, 3, H, W] with "
            f"fixed H and W, is {in_shape}"
        )
    if out_t is None or len(out_shape) != 2 or out_shape[1] is None:
        raise EngineError(
            f"model {model_path} output {out.name!r} must be float32/float16 [batch, D] with a fixed D, "
            f"is {out_shape}"
        )
    return EngineInfo(
        engine_file=engine_file,
        input={"name": inp.name, "shape": in_shape, "dtype": in_t},
        output={"name": out.name, "shape": out_shape, "dtype": out_t},
        descriptor_dim=int(out_shape[1]),
    )


def _calibrator(trt: Any, cuda: CudaApi, calibration: Path, input_name: str, batch: int) -> Any:
    """An IInt8EntropyCalibrator2 over CALIBRATION: a TensorRT calibration cache, or .npy input tiles."""
    import numpy as np

    raw = calibration.read_bytes()
    cache = raw if raw.startswith(b"TRT-") else None
    tiles = None
    if cache is None:
        try:
            tiles = np.load(calibration, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise EngineError(
                f"calibration file {calibration} is neither a TensorRT calibration cache nor a .npy "
                f"array: {exc}",
                remedy="set CALIBRATION to a .npy of float32 [n, 3, H, W] input tiles",
            ) from exc
        if tiles.ndim != 4 or tiles.shape[1] != 3 or len(tiles) == 0:
            raise EngineError(
                f"calibration file {calibration} holds {tiles.dtype} {list(tiles.shape)}, "
                "not [n, 3, H, W] input tiles",
                remedy="set CALIBRATION to a .npy of float32 [n, 3, H, W] input tiles",
            )

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.pos = 0
            if tiles is not None:
                self.nbytes = min(batch, len(tiles)) * int(np.prod(tiles.shape[1:])) * 4
                self.host, self.dev = cuda.host(self.nbytes), cuda.device(self.nbytes)

        def get_batch_size(self) -> int:
            return min(batch, len(tiles)) if tiles is not None else batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if tiles is None or self.pos >= len(tiles):
                return None
            chunk = np.ascontiguousarray(
                tiles[self.pos : self.pos + self.get_batch_size()], np.float32
            )
            if len(chunk) < self.get_batch_size():
                return None
            self.pos += len(chunk)
            self.host.array[: chunk.nbytes] = chunk.view(np.uint8).ravel()
            cuda.to_device(self.dev, self.host, chunk.nbytes)
            cuda.synchronize()
            return [self.dev.ptr]

        def read_calibration_cache(self) -> bytes | None:
            return cache

        def write_calibration_cache(self, data: Any) -> None:
            return None

    return Calibrator()


class _TrtRunner:
    """A deserialized engine and one execution context on one stream."""

    def __init__(self, trt: Any, cuda: CudaApi, engine: Any, record: Mapping[str, Any]):
        import numpy as np

        self._trt, self._cuda, self._engine = trt, cuda, engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineError(
                "TensorRT could not create an execution context (out of GPU memory?)",
                remedy="free GPU memory (other processes) and retry",
            )
        self._in = str(record["input"]["name"])
        self._out = str(record["output"]["name"])
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        if not {self._in, self._out} <= names:
            raise EngineError(
                f"the TensorRT engine has tensors {sorted(names)}, not {self._in!r} and {self._out!r}",
                remedy="delete the engine directory and compile the engine again",
            )
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._in)))
        self._out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._out)))
        shape = record["input"]["shape"]
        self.input_hw: tuple[int, int] = (int(shape[2]), int(shape[3]))
        self.descriptor_dim: int = int(record["descriptor_dim"])
        prof = record.get("build", {}).get("profile") or profile_shapes(shape)
        self._min, self._max = int(prof["min"][0]), int(prof["max"][0])
        per_in = 3 * self.input_hw[0] * self.input_hw[1] * self._in_dtype.itemsize
        per_out = self.descriptor_dim * self._out_dtype.itemsize
        self._per_in, self._per_out = per_in, per_out
        self._h_in, self._d_in = cuda.host(per_in * self._max), cuda.device(per_in * self._max)
        self._h_out, self._d_out = cuda.host(per_out * self._max), cuda.device(per_out * self._max)
        self._context.set_tensor_address(self._in, self._d_in.ptr)
        self._context.set_tensor_address(self._out, self._d_out.ptr)

    def run(self, batch: np.ndarray) -> np.ndarray:
        import numpy as np

        x = np.asarray(batch)
        if x.ndim != 4 or x.shape[1:] != (3, *self.input_hw):
            raise EngineError(
                f"engine input must be float32 [n, 3, {self.input_hw[0]}, {self.input_hw[1]}], "
                f"got {list(x.shape)}",
                remedy="this is a bug in the caller; report it",
            )
        n = len(x)
        out = np.empty((n, self.descriptor_dim), dtype=np.float32)
        hw = (3, *self.input_hw)
        for start in range(0, n, self._max):
            k = min(self._max, n - start)
            rows = max(k, self._min)  # a fixed-batch engine: pad up to its batch
            staged = self._h_in.array[: rows * self._per_in].view(self._in_dtype).reshape(rows, *hw)
            staged[:k] = x[start : start + k]  # converts to the engine's input type
            if rows > k:
                staged[k:] = 0
            self._cuda.to_device(self._d_in, self._h_in, rows * self._per_in)
            if not self._context.set_input_shape(self._in, (rows, *hw)):
                raise EngineError(
                    f"TensorRT refused input shape {[rows, *hw]} (profile {self._min}..{self._max})",
                    remedy="this is a bug; report it",
                )
            if not self._context.execute_async_v3(self._cuda.stream_handle()):
                raise EngineError(
                    "TensorRT execute_async_v3 failed (see TensorRT's log above)",
                    remedy="recompile the engine (delete the engine directory) and retry",
                )
            self._cuda.to_host(self._h_out, self._d_out, rows * self._per_out)
            self._cuda.synchronize()
            res = self._h_out.array[: rows * self._per_out].view(self._out_dtype)
            out[start : start + k] = res.reshape(rows, self.descriptor_dim)[:k]
        return out


class TensorRTBackend:
    """TensorRT 10.x/11.x on an NVIDIA GPU: fp32, fp16, int8 (see :func:`precision_plan`).

    Parameters
    ----------
    workspace
        Builder workspace limit in bytes (``WORKSPACE``).
    timing_cache_dir
        Where timing caches persist between builds; None: none kept.
    trt, cuda
        The ``tensorrt`` module and a :class:`CudaApi`; imported/found on
        first use when not given (tests inject them).
    """

    name = "tensorrt"
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    engine_file = ENGINE_FILE
    #: An engine runs only where it was built: load checks the key.
    portable = False

    def __init__(
        self,
        *,
        workspace: int = DEFAULT_WORKSPACE,
        timing_cache_dir: str | os.PathLike[str] | None = None,
        profile_batch: tuple[int, int, int] = PROFILE_BATCH,
        trt: Any = None,
        cuda: CudaApi | None = None,
    ):
        if workspace < 1:
            raise EngineError(
                f"WORKSPACE must be positive, got {workspace}", remedy="set WORKSPACE=1G"
            )
        self.workspace = int(workspace)
        self.timing_cache_dir = Path(timing_cache_dir) if timing_cache_dir is not None else None
        self.profile_batch = profile_batch
        self._trt, self._cuda = trt, cuda
        self._logger: Any = None
        self.timing_cache_reused: bool | None = None

    @property
    def trt(self) -> Any:
        if self._trt is None:
            self._trt = _import_tensorrt()
        return self._trt

    @property
    def cuda(self) -> CudaApi:
        if self._cuda is None:
            self._cuda = cuda_api()
        return self._cuda

    def _log(self) -> Any:
        if self._logger is None:
            self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        return self._logger

    def environment(self) -> dict[str, str]:
        return live_environment(self.trt, self.cuda)

    def version(self) -> str:
        env = self.environment()
        return f"{env['tensorrt']} (CUDA {env['cuda']})"

    def device(self) -> str:
        env = self.environment()
        return f"gpu:{env['gpu']}:sm_{env['compute_capability'].replace('.', '')}"

    def compile(
        self, model_path: Path, calibration_path: Path | None, precision: str, out_dir: Path
    ) -> EngineInfo:
        """Parse, build with the profile, workspace and timing cache; write ``engine.plan``."""
        import onnx

        trt = self.trt
        model_path, out_dir = Path(model_path), Path(out_dir)
        data = model_path.read_bytes()
        model = onnx.load_from_string(data)
        info = _onnx_io(model, model_path, self.engine_file)
        carried = model_precision(model)
        plan = precision_plan(
            trt.__version__, precision, carried, has_calibration=calibration_path is not None,
            model=f"model {model_path.name}",
        )  # fmt: skip
        live = self.environment()
        profile = profile_shapes(info.input["shape"], self.profile_batch)

        builder = trt.Builder(self._log())
        # the parser keeps the network's weights: it lives until the engine is built
        network, parser = self._parse(builder, plan, data, model_path)
        config, calibrator = self._config(builder, plan, info, profile, calibration_path)
        cache_file = (
            timing_cache_path(self.timing_cache_dir, live) if self.timing_cache_dir else None
        )
        _, self.timing_cache_reused = _load_timing_cache(config, cache_file)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(
                f"TensorRT {trt.__version__} failed to build an engine from {model_path} "
                f"(PRECISION={precision}, WORKSPACE={self.workspace} bytes; see TensorRT's log above)",
                remedy="raise WORKSPACE, try PRECISION=fp32, or use BACKEND=onnxruntime",
            )
        del calibrator
        _save_timing_cache(config, cache_file)
        blob = bytes(memoryview(serialized))
        atomic_write(out_dir / self.engine_file, blob, durable=False)
        return EngineInfo(
            engine_file=info.engine_file,
            input=info.input,
            output=info.output,
            descriptor_dim=info.descriptor_dim,
            build={
                "profile": profile,
                "workspace": self.workspace,
                "flags": plan.flags(),
                "model_precision": carried,
            },
            environment=live,
            extra={
                "engine_sha256": hashlib.sha256(blob).hexdigest(),
                "timing_cache_reused": self.timing_cache_reused,
                "cuda_library": self.cuda.name,
            },
        )

    def _parse(self, builder: Any, plan: Any, data: bytes, model_path: Path) -> tuple[Any, Any]:
        """``(network, parser)``: the ONNX bytes parsed into a network with the plan's flags."""
        trt = self.trt
        flags = 0
        for name in plan.network_flags:
            flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
            if flag is not None:  # 11: strong typing is always on, the flag may be gone
                flags |= 1 << int(flag)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._log())
        # the bytes hashed for the key, not a second read of the file; the path only
        # locates external weights
        ok = parser.parse(data, str(model_path))
        if not ok:
            errors = parser_errors(parser) or ["(the parser gave no details)"]
            raise EngineError(
                f"TensorRT {trt.__version__} cannot parse model {model_path} ({len(errors)} "
                "error(s)):\n  " + "\n  ".join(errors),
                remedy="check that MODEL is an ONNX model TensorRT supports (opset, operators); "
                "BACKEND=onnxruntime runs more operators",
            )
        return network, parser

    def _config(
        self,
        builder: Any,
        plan: Any,
        info: EngineInfo,
        profile: dict[str, Any],
        calibration_path: Path | None,
    ) -> tuple[Any, Any]:
        """``(builder config, calibrator or None)``: workspace, the plan's flags, the shape profile.

        The calibrator must be held until the build is done: the bindings may
        not keep it alive.
        """
        trt = self.trt
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
        for name in plan.builder_flags:
            config.set_flag(getattr(trt.BuilderFlag, name))
        prof = builder.create_optimization_profile()
        prof.set_shape(info.input["name"], profile["min"], profile["opt"], profile["max"])
        config.add_optimization_profile(prof)
        calibrator = None
        if plan.calibrate:
            assert calibration_path is not None
            calibrator = _calibrator(
                trt, self.cuda, Path(calibration_path), info.input["name"], profile["opt"][0]
            )
            config.int8_calibrator = calibrator
            if hasattr(config, "set_calibration_profile"):
                config.set_calibration_profile(prof)
        return config, calibrator

    def load(self, engine_dir: Path, threads: int | None = None) -> Any:
        """Deserialize ``engine.plan`` after checking it was built for this machine."""

        engine_dir = Path(engine_dir)
        record = read_engine_json(engine_dir)
        check_environment(record, self.environment(), engine_dir)
        path = engine_dir / str(record["engine_file"])
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise EngineError(
                f"cannot read TensorRT engine {path}: {exc.strerror}",
                remedy="delete the engine directory and compile the engine again",
            ) from exc
        want = record.get("engine_sha256")
        if want and hashlib.sha256(blob).hexdigest() != want:
            raise EngineError(
                f"TensorRT engine {path} does not match the sha256 in engine.json",
                remedy="delete the engine directory and compile the engine again",
            )
        runtime = self.trt.Runtime(self._log())
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise EngineError(
                f"TensorRT {self.trt.__version__} cannot deserialize engine {path}",
                remedy="delete the engine directory and compile the engine again",
            )
        runner = _TrtRunner(self.trt, self.cuda, engine, record)
        runner._runtime = runtime  # type: ignore[attr-defined]  # outlives the engine
        return runner
