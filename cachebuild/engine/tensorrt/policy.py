"""The TensorRT backend's decisions, as pure functions (no TensorRT needed).

How ``PRECISION`` maps onto TensorRT 10.x and 11.x flags
(:func:`precision_plan`), what precision a model carries
(:func:`model_precision`), the optimisation profile (:func:`profile_shapes`),
parser errors as lines (:func:`parser_errors`), the check that an engine
was built for this machine (:func:`check_environment`) and where timing
caches live (:func:`timing_cache_path`).  :mod:`cachebuild.engine.tensorrt.backend` applies
them to the real TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachebuild.errors import EngineError

__all__ = [
    "PROFILE_BATCH",
    "TrtBuildPlan",
    "trt_major",
    "model_precision",
    "precision_plan",
    "profile_shapes",
    "parser_errors",
    "check_environment",
    "timing_cache_path",
]

#: Batch sizes of the optimisation profile: (min, opt, max).  Fixed rather
#: than taken from BATCH, since the profile is part of the engine key and a
#: new key means every tile described again; larger batches run in chunks.
PROFILE_BATCH = (1, 64, 256)
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass(frozen=True)
class TrtBuildPlan:
    """How one PRECISION is built on one TensorRT version.

    Attributes
    ----------
    network_flags
        ``NetworkDefinitionCreationFlag`` names set on ``create_network``.
    builder_flags
        ``BuilderFlag`` names set on the builder config.
    calibrate
        True when an INT8 calibrator must be attached (TensorRT 10 only).
    """

    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    calibrate: bool = False

    def flags(self) -> list[str]:
        """Every flag, as the engine key records them."""
        return [f"network:{f}" for f in self.network_flags] + [
            f"builder:{f}" for f in self.builder_flags
        ]


def trt_major(version: str) -> int:
    """The major version of a TensorRT version string.

    >>> trt_major("10.3.0.30"), trt_major("11.4.1")
    (10, 11)
    """
    m = re.match(r"\s*(\d+)", str(version))
    if not m:
        raise EngineError(
            f"cannot read a TensorRT version from {version!r}",
            remedy="reinstall TensorRT's Python bindings (python3-libnvinfer on JetPack)",
        )
    return int(m.group(1))


def model_precision(model: Any) -> str:
    """The precision an ONNX model carries: ``int8``, ``fp16`` or ``fp32``.

    ``int8``: it has QuantizeLinear/DequantizeLinear nodes (explicit
    quantization, as ModelOpt writes).  ``fp16``: some tensor, initializer
    or Cast is float16 (ModelOpt AutoCast's output).  Otherwise ``fp32``.
    """
    from onnx import TensorProto

    f16 = TensorProto.FLOAT16
    graphs = [model.graph]
    nodes = []
    while graphs:  # subgraphs (If/Loop bodies) too
        g = graphs.pop()
        nodes.extend(g.node)
        for node in g.node:
            for attr in node.attribute:
                if attr.g and attr.g.node:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    if any(n.op_type in _QDQ_OPS for n in nodes):
        return "int8"
    g = model.graph
    values = list(g.input) + list(g.output) + list(g.value_info)
    if any(v.type.tensor_type.elem_type == f16 for v in values):
        return "fp16"
    if any(t.data_type == f16 for t in g.initializer):
        return "fp16"
    for n in nodes:
        if n.op_type == "Cast" and any(a.name == "to" and a.i == f16 for a in n.attribute):
            return "fp16"
    return "fp32"


def _typed_mismatch(
    trt_version: str, major: int, precision: str, carried: str, model: str
) -> EngineError:
    """Why a strongly typed build cannot give ``precision``: the model carries ``carried``."""
    if major >= 11 and carried == "fp32":
        tool = (
            "python -m modelopt.onnx.autocast --onnx_path MODEL (fp16)"
            if precision == "fp16"
            else "ModelOpt's ONNX quantization (Q/DQ nodes) for int8"
        )
        return EngineError(
            f"PRECISION={precision} on TensorRT {trt_version} needs a model that carries "
            f"{precision}: TensorRT 11 removed the FP16/INT8 builder flags and INT8 "
            f"calibration, and {model} is fp32 throughout",
            remedy=f"convert the model with {tool} and set MODEL to the result, "
            "or set PRECISION=fp32",
        )
    return EngineError(
        f"{model} carries {carried} (strongly typed: its own types decide), "
        f"but PRECISION={precision}",
        remedy=f"set PRECISION={carried}, or give a model exported in {precision}",
    )


def precision_plan(
    trt_version: str,
    precision: str,
    carried: str,
    *,
    has_calibration: bool,
    model: str = "the model",
) -> TrtBuildPlan:
    """Map ``PRECISION`` onto TensorRT's network and builder flags.

    Parameters
    ----------
    trt_version
        ``tensorrt.__version__``.
    precision
        ``fp32``, ``fp16`` or ``int8`` (``PRECISION``).
    carried
        What the model carries (:func:`model_precision`).
    has_calibration
        Whether ``CALIBRATION`` names a file.
    model
        The model's name, for messages.

    Returns
    -------
    TrtBuildPlan

    Raises
    ------
    EngineError
        When the model and PRECISION disagree, for int8 on TensorRT 10
        without calibration data or a quantized model, and for a TensorRT
        older than 10.

    Notes
    -----
    A model that carries reduced precision is built strongly typed (its
    types rule) on both versions, and PRECISION must name that precision.
    An fp32 model on TensorRT 10 gets the weak-typing builder flags
    (``FP16``; ``INT8`` with ``FP16`` as fallback and a calibrator).
    TensorRT 11 has neither flags nor calibration: every network is
    strongly typed, so PRECISION must match the model.

    >>> precision_plan("10.3.0", "fp16", "fp32", has_calibration=False).builder_flags
    ('FP16',)
    >>> precision_plan("11.4.1", "fp16", "fp16", has_calibration=False).flags()
    ['network:STRONGLY_TYPED']
    """
    major = trt_major(trt_version)
    if major < 10:
        raise EngineError(
            f"TensorRT {trt_version} is too old: cachebuild supports TensorRT 10.x and 11.x",
            remedy="upgrade TensorRT (JetPack 6 ships 10.x), or use BACKEND=onnxruntime",
        )
    if carried != "fp32" or major >= 11:
        if carried != precision:
            raise _typed_mismatch(trt_version, major, precision, carried, model)
        return TrtBuildPlan(("STRONGLY_TYPED",), ())
    # TensorRT 10, fp32 model: weak typing with builder flags
    if precision == "fp32":
        return TrtBuildPlan((), ())
    if precision == "fp16":
        return TrtBuildPlan((), ("FP16",))
    if not has_calibration:
        raise EngineError(
            f"PRECISION=int8 on TensorRT {trt_version} with the fp32 {model} needs calibration data",
            remedy="set CALIBRATION to a .npy of float32 [n, 3, H, W] input tiles (or a TensorRT "
            "calibration cache), or give a model quantized with Q/DQ nodes",
        )
    return TrtBuildPlan((), ("INT8", "FP16"), calibrate=True)


def profile_shapes(
    input_shape: list[int | None], batch: tuple[int, int, int] = PROFILE_BATCH
) -> dict[str, list[int]]:
    """The optimisation profile for input ``[batch, 3, H, W]``.

    A dynamic batch (``None``) gets ``batch`` as (min, opt, max); a fixed
    batch is its own min, opt and max.

    >>> profile_shapes([None, 3, 64, 64])["max"]
    [256, 3, 64, 64]
    >>> profile_shapes([8, 3, 64, 64])["min"]
    [8, 3, 64, 64]
    """
    rest = [int(d) for d in input_shape[1:]]  # type: ignore[arg-type]
    lo, opt, hi = batch if input_shape[0] is None else (int(input_shape[0]),) * 3
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"profile batch sizes must satisfy 1 <= min <= opt <= max, got {batch}")
    return {"min": [lo, *rest], "opt": [opt, *rest], "max": [hi, *rest]}


def parser_errors(parser: Any) -> list[str]:
    """Every error of a TensorRT ``OnnxParser``, one line each.

    Each names the node (index, name, operator) where TensorRT gives it,
    the error code and the description.
    """
    lines = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        where = []
        for label, attr in (("node", "node"), ("name", "node_name"), ("op", "node_operator")):
            fn = getattr(err, attr, None)
            try:
                value = fn() if callable(fn) else None
            except Exception:  # an accessor this TensorRT version lacks or cannot answer
                value = None
            if value not in (None, "", -1):
                where.append(f"{label} {value}")
        code = err.code() if callable(getattr(err, "code", None)) else "?"
        desc = err.desc() if callable(getattr(err, "desc", None)) else str(err)
        lines.append(f"[{', '.join(where) or 'model'}] {getattr(code, 'name', code)}: {desc}")
    return lines


def check_environment(record: Mapping[str, Any], live: Mapping[str, str], engine_dir: Path) -> None:
    """Refuse an engine built for another GPU, TensorRT or CUDA than this machine's.

    Raises
    ------
    EngineError
        Naming both environments and the engine directory to delete.
    """
    built = record.get("environment") or {}
    diff = [
        k
        for k in ("tensorrt", "cuda", "gpu", "compute_capability")
        if str(built.get(k)) != str(live.get(k))
    ]
    if diff:

        def show(env: Mapping[str, Any]) -> str:
            return (
                f"{env.get('gpu')} (sm {env.get('compute_capability')}), TensorRT {env.get('tensorrt')}, "
                f"CUDA {env.get('cuda')}"
            )

        raise EngineError(
            f"the TensorRT engine in {engine_dir} was built for {show(built)}; this machine has "
            f"{show(live)} ({', '.join(diff)} differ): it is not loaded",
            remedy=f"delete {engine_dir} and run build-cache again: the engine is then built for this "
            "machine (a new TensorRT, CUDA or GPU model rebuilds it by itself)",
        )


def timing_cache_path(cache_dir: str | os.PathLike[str], live: Mapping[str, str]) -> Path:
    """The timing cache file for one TensorRT + CUDA + GPU, under ``cache_dir``."""
    tag = json.dumps(dict(sorted(live.items())), sort_keys=True).encode()
    return Path(cache_dir) / f"timing-{hashlib.sha256(tag).hexdigest()[:16]}.cache"
