"""The ONNX Runtime backend: the CPU (or onnxruntime-gpu's CUDA provider), no compile step.

onnxruntime and numpy are imported inside the functions that use them.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachebuild._util.cpus import usable_cpus
from cachebuild.engine.gpu import gpu_name_here
from cachebuild.engine.interface import (
    EngineInfo,
    EngineRunner,
    check_precision,
    cpu_device,
    read_engine_json,
)
from cachebuild.engine.modelfiles import self_contained
from cachebuild.errors import EngineError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["OnnxRuntimeBackend"]


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
        check_precision(self, precision)
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
