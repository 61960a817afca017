"""Stand-ins for what cannot run here: the ``tensorrt`` module and a CUDA device.

TensorRT has no wheel these machines can install and there is no GPU, so
the TensorRT backend's own logic (flags per version, profile, workspace,
timing cache, parser errors, the key check, the runner's staging through
host buffers) is exercised against these.  They implement only the calls
cachebuild.engine.tensorrt.backend makes, with the signatures of TensorRT's Python API
(docs.nvidia.com/deeplearning/tensorrt/latest/api/python_api); the
"engine" they build is the ONNX model itself, run by ONNX Runtime on the
CPU, so descriptors are real.  Nothing here says how real TensorRT
behaves: tests/unit/engine/test_trt.py's ``real_tensorrt`` tests do, where it imports.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import types
from typing import Any

import numpy as np
import onnx

MAGIC = b"FAKEPLAN\n"
TC_MAGIC = b"FAKETC"


class ParserError:
    def __init__(self, code: str, desc: str, node: int, name: str, op: str):
        self._c, self._d, self._n, self._nm, self._op = code, desc, node, name, op

    def code(self) -> Any:
        return types.SimpleNamespace(name=self._c)

    def desc(self) -> str:
        return self._d

    def node(self) -> int:
        return self._n

    def node_name(self) -> str:
        return self._nm

    def node_operator(self) -> str:
        return self._op


def make(version: str = "10.3.0") -> types.ModuleType:
    """A fresh stand-in ``tensorrt`` module of ``version`` (10.x has the FP16/INT8 flags, 11.x not)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    major = int(version.split(".")[0])
    trt.log: list[tuple[Any, ...]] = []  # type: ignore[misc]
    trt.unsupported_ops: set[str] = set()  # type: ignore[misc]
    trt.fail_build = False  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, severity: int):
            self.severity = severity

    class NetworkDefinitionCreationFlag:
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 1

    flags = {"TF32": 2, "SPARSE_WEIGHTS": 3}
    if major < 11:
        flags.update(FP16=0, INT8=1)
    BuilderFlag = type("BuilderFlag", (), flags)

    class MemoryPoolType:
        WORKSPACE = 0

    class DataType:
        FLOAT = "float32"
        HALF = "float16"

    class TensorIOMode:
        INPUT = 1
        OUTPUT = 2

    def nptype(dt: str) -> Any:
        return np.dtype(dt).type

    class Network:
        def __init__(self, flags: int):
            self.flags = flags
            self.model: bytes | None = None

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger):
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> ParserError:
            return self.errors[i]

        def parse(self, model: bytes, path: str | None = None) -> bool:
            trt.log.append(("parse", len(model), path))
            try:
                proto = onnx.load_from_string(bytes(model))
            except Exception as exc:
                self.errors.append(ParserError("MODEL_DESERIALIZE_FAILED", str(exc), -1, "", ""))
                return False
            for i, node in enumerate(proto.graph.node):
                if node.op_type in trt.unsupported_ops:
                    self.errors.append(
                        ParserError(
                            "UNSUPPORTED_NODE",
                            f"No importer registered for op: {node.op_type}",
                            i,
                            node.name,
                            node.op_type,
                        )
                    )
            if self.errors:
                return False
            self.network.model = bytes(model)
            return True

    class TimingCache:
        def __init__(self, entries: list[str]):
            self.entries = entries

        def serialize(self) -> bytes:
            return TC_MAGIC + json.dumps(self.entries).encode()

    class Config:
        def __init__(self) -> None:
            self.flags: list[str] = []
            self.pools: dict[Any, int] = {}
            self.profiles: list[Any] = []
            self.cache: TimingCache | None = None
            self.int8_calibrator: Any = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pools[pool] = size

        def set_flag(self, flag: int) -> None:
            self.flags.append(next(k for k, v in vars(BuilderFlag).items() if v == flag))

        def add_optimization_profile(self, profile: Any) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            if not data:
                return TimingCache([])
            if not data.startswith(TC_MAGIC):
                raise RuntimeError("timing cache: bad magic")
            return TimingCache(json.loads(data[len(TC_MAGIC) :]))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = (list(lo), list(opt), list(hi))

    class Builder:
        def __init__(self, logger: Logger):
            self.logger = logger

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            trt.log.append(
                (
                    "build",
                    network.flags,
                    list(config.flags),
                    dict(config.pools),
                    [p.shapes for p in config.profiles],
                    config.int8_calibrator is not None,
                )
            )
            if trt.fail_build or network.model is None:
                return None
            if config.int8_calibrator is not None:  # TensorRT drains the calibrator while building
                cal = config.int8_calibrator
                while cal.get_batch(["x"]) is not None:
                    pass
            tactic = hashlib.sha256(network.model).hexdigest()[:12]
            if config.cache is not None and tactic not in config.cache.entries:
                config.cache.entries.append(tactic)
            header = {
                "flags": network.flags,
                "builder_flags": config.flags,
                "profile": [p.shapes for p in config.profiles][0],
            }
            return MAGIC + json.dumps(header).encode() + b"\n" + network.model

    class Context:
        def __init__(self, engine: Engine):
            self.engine, self.addr, self.shapes = engine, {}, {}

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addr[name] = int(ptr)
            return True

        def set_input_shape(self, name: str, shape: Any) -> bool:
            lo, _, hi = self.engine.profile[name]
            shape = list(shape)
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = shape
            return True

        def execute_async_v3(self, stream: int) -> bool:
            e = self.engine
            shape = self.shapes[e.input]
            nbytes = int(np.prod(shape)) * 4
            x = np.frombuffer(
                (ctypes.c_uint8 * nbytes).from_address(self.addr[e.input]), np.float32
            ).reshape(shape)
            y = np.ascontiguousarray(e.session.run([e.output], {e.input: x.copy()})[0], np.float32)
            ctypes.memmove(self.addr[e.output], y.ctypes.data, y.nbytes)
            trt.log.append(("execute", stream, shape[0]))
            return True

    class Engine:
        def __init__(self, header: dict[str, Any], model: bytes):
            import onnxruntime as ort

            self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
            self.output = self.session.get_outputs()[0].name
            self.profile = header["profile"]
            self.num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return [self.input, self.output][i]

        def get_tensor_dtype(self, name: str) -> str:
            return DataType.FLOAT

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger: Logger):
            self.logger = logger

        def deserialize_cuda_engine(self, blob: bytes) -> Engine | None:
            if not blob.startswith(MAGIC):
                return None
            header, _, model = blob[len(MAGIC) :].partition(b"\n")
            return Engine(json.loads(header), model)

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            pass

    for name, value in list(locals().items()):
        if isinstance(value, type) or callable(value):
            setattr(trt, name, value)
    if major >= 11:  # TensorRT 11 removed INT8 calibration
        del trt.IInt8EntropyCalibrator2
    return trt


class HostBuf:
    def __init__(self, nbytes: int):
        self.array = np.zeros(nbytes, np.uint8)
        self.ptr = int(self.array.ctypes.data)


class HostCuda:
    """A CudaApi whose "device" is host memory: copies are memmoves, the stream is synchronous."""

    name = "host-stand-in"

    def __init__(self, gpu: str = "Fake Orin", cc: str = "8.7", cuda: str = "12.6"):
        self._gpu, self._cc, self._cuda = gpu, cc, cuda
        self.copies: list[tuple[str, int]] = []
        self.syncs = 0
        self.pinned: list[int] = []

    def gpu(self) -> tuple[str, str]:
        return self._gpu, self._cc

    def cuda_version(self) -> str:
        return self._cuda

    def stream_handle(self) -> int:
        return 7

    def host(self, nbytes: int) -> HostBuf:
        self.pinned.append(nbytes)
        return HostBuf(nbytes)

    def device(self, nbytes: int) -> HostBuf:
        return HostBuf(nbytes)

    def to_device(self, dst: HostBuf, src: HostBuf, nbytes: int) -> None:
        self.copies.append(("h2d", nbytes))
        ctypes.memmove(dst.ptr, src.ptr, nbytes)

    def to_host(self, dst: HostBuf, src: HostBuf, nbytes: int) -> None:
        self.copies.append(("d2h", nbytes))
        ctypes.memmove(dst.ptr, src.ptr, nbytes)

    def synchronize(self) -> None:
        self.syncs += 1
