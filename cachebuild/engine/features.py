"""The feature half of a poolable network: what lets windows be pooled instead of run.

A network is *poolable* when it has the built-in model's shape
(:mod:`cachebuild.engine.model`): convolutions up to ``conv2.r``, then a
fixed head (grid pooling, centring, signed root, projection, L2) whose
weights are initialisers of the graph.  For such a network the descriptor
of any square window of the area is the head applied to the window's crop
of the feature maps, so the convolutions run once per tile and every
window is pooled from them (:mod:`cachebuild.localize.windows`) -- a few
times cheaper than one engine run per window.

:func:`write_features_model` cuts the network after ``conv2.r`` and flattens
the maps to ``[N, C*H*W]``, so the cut network is an ordinary engine input
(one ``[N, 3, H, W]`` input, one ``[N, D]`` output) that every backend
compiles as it compiles the whole network; :func:`write_head` keeps the
head's weights beside it.  Any other network is a black box: each window
is one engine run.

onnx and numpy are imported inside the functions.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from cachebuild._util.cpus import usable_cpus
from cachebuild._util.fs import atomic_write
from cachebuild.engine.cells import CELLS_HEAD, CELLS_MODEL, write_cells_head, write_cells_model
from cachebuild.engine.compile import compile_engine
from cachebuild.engine.model import DEFAULT_MODEL_VERSION
from cachebuild.engine.subgraph import write_subgraph

__all__ = [
    "FEATURES_DIR",
    "HEAD_FILES",
    "HEAD_FILE",
    "HEAD_MODEL",
    "FEATURES_OUTPUT",
    "poolable",
    "write_features_model",
    "write_head",
    "read_head",
    "write_head_model",
    "load_head_model",
    "matmul_runner",
    "compile_features",
]

#: The feature engine's directory inside the engine directory (build-side only, never published).
FEATURES_DIR = "features"
#: The head's pooling weights beside the feature engine.
HEAD_FILE = "head.npz"
#: The head after the pooling (centre, signed root, projection, L2) as an ONNX
#: model of its own: ``grid`` ``[N, C, g, g]`` -> ``[N, D]``, run by ONNX Runtime.
HEAD_MODEL = "head.onnx"
#: The files beside a feature engine that describing windows reads (a worker needs them too).
HEAD_FILES = (HEAD_FILE, HEAD_MODEL, CELLS_HEAD)
_GRID = "grid"
FEATURES_OUTPUT = "features"
_CUT = "conv2.r"
#: Initialisers the head is made of, and the scalars; all must be present.
_HEAD = ("pool.rows", "pool.cols", "proj.w", "mean.weight", "ssqrt.eps", "l2.eps")
#: The head's nodes after the cut, in order (op types): the built-in model's exactly.
_HEAD_OPS = (
    "MatMul", "MatMul", "ReduceMean", "Sub", "Abs", "Add", "Sqrt", "Div", "Flatten", "Flatten",
    "Mul", "Concat", "MatMul", "ReduceL2", "Max", "Div",
)  # fmt: skip


def _load(model_path: str | os.PathLike[str], *, data: bool = False) -> Any:
    """The model's graph; with ``data`` its external weights read in (the compiler checked where they are)."""
    import onnx

    return onnx.load(str(model_path), load_external_data=data)


def poolable(model_path: str | os.PathLike[str]) -> bool:
    """Whether ``model_path`` is a network whose windows can be pooled (the built-in head).

    Judged from the graph, not the name: the producer is cachebuild's
    cbnet, the head after ``conv2.r`` has the built-in model's nodes, and
    its weights are initialisers.  Anything else (an operator's own model)
    is described one engine run per window.
    """
    try:
        model = _load(model_path)
    except Exception:
        return False
    g = model.graph
    if model.producer_name != "cachebuild" or model.producer_version != DEFAULT_MODEL_VERSION:
        return False
    names = [n.output[0] for n in g.node]
    if _CUT not in names:
        return False
    head = g.node[names.index(_CUT) + 1 :]
    inits = {t.name for t in g.initializer}
    return tuple(n.op_type for n in head) == _HEAD_OPS and all(k in inits for k in _HEAD)


def write_features_model(
    model_path: str | os.PathLike[str], out_path: str | os.PathLike[str]
) -> Path:
    """Write the network cut after ``conv2.r``, maps flattened: ``[N, 3, H, W] -> [N, C*h*w]``."""
    import onnx
    from onnx import helper

    model = _load(model_path, data=True)  # the cut model keeps its weights inline
    g = model.graph
    keep = []
    for node in g.node:
        keep.append(node)
        if node.output[0] == _CUT:
            break
    keep.append(helper.make_node("Flatten", [_CUT], [FEATURES_OUTPUT], name="features", axis=1))
    out = helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT, None)
    return write_subgraph(model, keep, out_path, outputs=[out], infer_shapes=True)


def write_head(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the head's weights (float32 arrays named as in the graph) to ``out_path`` (.npz)."""
    import numpy as np
    from onnx import numpy_helper

    g = _load(model_path, data=True).graph
    arrays = {
        t.name: np.asarray(numpy_helper.to_array(t), dtype=np.float32)
        for t in g.initializer
        if t.name in _HEAD
    }
    buf = io.BytesIO()
    named: dict[str, Any] = {k.replace(".", "_"): v for k, v in sorted(arrays.items())}
    np.savez(buf, **named)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, buf.getvalue(), durable=False)
    return out


def write_head_model(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the network's nodes after the grid pooling as a model of its own (``grid`` in).

    The same nodes and weights as the engine's, so a window's descriptor is
    rounded as the engine rounds a tile's, and ONNX Runtime's products give
    a row the same bits whatever the rows beside it.
    """
    import onnx
    from onnx import helper

    model = _load(model_path, data=True)
    g = model.graph
    names = [n.output[0] for n in g.node]
    head = list(g.node[names.index(_GRID) + 1 :])
    channels = next(t.dims[0] for t in g.initializer if t.name == "conv2.w")
    cells = next(t.dims[0] for t in g.initializer if t.name == "pool.rows")
    grid = helper.make_tensor_value_info(
        _GRID, onnx.TensorProto.FLOAT, ["N", channels, cells, cells]
    )
    return write_subgraph(model, head, out_path, inputs=[grid])


def read_head(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The head's weights written by :func:`write_head`, by their graph names."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return {k.replace("_", "."): np.asarray(z[k], dtype=np.float32) for k in z.files}


def compile_features(
    *,
    model_path: str | os.PathLike[str],
    calibration_path: str | os.PathLike[str] | None,
    precision: str,
    backend: str,
    engine_dir: str | os.PathLike[str],
    workspace: int | None = None,
    timing_cache_dir: str | os.PathLike[str] | None = None,
) -> bool:
    """Compile a poolable network's feature half into ``engine_dir/features`` with the same backend.

    Returns False (and removes a stale one) for a network that is not
    :func:`poolable`: its windows are each run through the whole engine.
    Also writes the cells models (:mod:`cachebuild.engine.cells`): the
    grid-to-cells head beside the feature engine, the frame-to-cells model
    as ``engine_dir/cells.onnx`` (published: an onboard client's stage 2).
    """
    import shutil

    out = Path(engine_dir) / FEATURES_DIR
    if not poolable(model_path):
        shutil.rmtree(out, ignore_errors=True)
        (Path(engine_dir) / CELLS_MODEL).unlink(missing_ok=True)
        return False
    out.mkdir(parents=True, exist_ok=True)
    (out / HEAD_FILE).unlink(missing_ok=True)  # its absence marks the directory incomplete
    cut = write_features_model(model_path, out / "features-model.onnx")
    compile_engine(
        model_path=cut, calibration_path=calibration_path, precision=precision, backend=backend,
        out_dir=out, workspace=workspace, timing_cache_dir=timing_cache_dir,
    )  # fmt: skip
    write_head_model(model_path, out / HEAD_MODEL)
    write_cells_head(model_path, out / CELLS_HEAD)
    write_cells_model(model_path, Path(engine_dir) / CELLS_MODEL)
    write_head(model_path, out / HEAD_FILE)  # last: its presence marks the directory complete
    return True


def load_head_model(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """``run(grids [n, C, g, g]) -> [n, D]``: :data:`HEAD_MODEL` in ONNX Runtime, on the CPU."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or usable_cpus())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # idle intra-op threads sleep, as the engine's do (cachebuild.engine.ort): the re-ranking's
    # cells model spinning between runs cost the self-test ~0.2 s of two shared cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(grids: Any) -> Any:
        x = np.ascontiguousarray(grids, dtype=np.float32)
        return session.run(None, {name: x})[0]

    return run


#: A one-node ``MatMul`` graph (inputs ``a``, ``b``, output ``y``; opset 17, IR version 8),
#: serialised: what ``onnx.helper`` makes of it (tests/unit/engine/test_features.py
#: checks), kept as bytes so that describing windows does not import onnx (about 0.8 s
#: of ml_dtypes on a rebuild whose engine is up to date).
_MATMUL_ONNX = (
    b'\x08\x08:8\n\x11\n\x01a\n\x01b\x12\x01y"\x06MatMul\x12\x02mmZ\t\n\x01a\x12\x04\n\x02\x08\x01'
    b"Z\t\n\x01b\x12\x04\n\x02\x08\x01b\t\n\x01y\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11"
)


def matmul_runner(threads: int = 1) -> Any:
    """``mm(a [..., K], b [K, N]) -> a @ b`` by ONNX Runtime's MatMul on ``threads`` threads.

    The windows' pooling products are small and many: numpy's BLAS spends
    more starting its threads than computing them (3x slower on two busy
    cores, measured), and one ONNX Runtime thread does not.  The graph is
    :data:`_MATMUL_ONNX`.
    """
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(
        _MATMUL_ONNX, sess_options=so, providers=["CPUExecutionProvider"]
    )

    def mm(a: Any, b: Any) -> Any:
        a = np.ascontiguousarray(a, dtype=np.float32)
        return session.run(None, {"a": a, "b": np.ascontiguousarray(b, dtype=np.float32)})[0]

    return mm
