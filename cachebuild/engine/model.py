"""The default descriptor network, built from code (no downloaded weights).

``cbnet-v2`` turns one 256x256 RGB tile into a 256-d L2-normalised
descriptor.  It is small (about 0.1 GFLOP a tile) and fully deterministic:
:func:`build_default_model` returns the same ONNX bytes on every machine,
so its SHA-256 can key engines and caches.

Architecture (input ``tiles`` float32 [N, 3, 256, 256], ``uint8 / 255 - 0.5``
in RGB order; output ``descriptor`` float32 [N, 256])::

    Conv 3->16 5x5 s2 + ReLU      fixed filters: oriented edges, blobs, colour
    Conv 16->48 3x3 s2 + ReLU     He-uniform, seeded             -> [N, 48, 64, 64]
    P @ x @ P.T                   smooth pooling onto an 8x8 grid -> [N, 48, 8, 8]
    grid - mean, signed sqrt      the layout, centred per channel
    Concat(grid, mean / 4)        -> [N, 3120]
    MatMul                        -> [N, 256]
    x / max(||x||, 1e-12)         L2-normalised in the graph

What it is for: a camera frame never lines up with the tile grid.  The
localisation self-test (:mod:`cachebuild.localize.selftest`) describes frames cut
across tile borders, rotated, rescaled and re-lit, and searches them
against the tiles.  ``cbnet-v1`` (four convolutions, a hard 4x4 grid of
64-pixel cells) missed many frames shifted off the grid, because a shift of
half a cell moves every feature into the neighbouring cell.  v2 keeps only the two
shallow layers (9-pixel receptive field: colour and edge detail, which is
what tells synthetic and real terrain apart) and pools them through
overlapping windows: each of the 8x8 cells averages the feature map under
a biweight window of radius 0.3 tile (77 px), so a shift moves weight
smoothly between neighbouring cells instead of across a hard border.  The
signed square root damps the few strong responses (roads, patch borders)
that would otherwise dominate the cosine.  Frames shifted by up to half a
tile are beyond any one-descriptor-per-tile index.  The recall of v2
against v1, measured: docs/design/builtin-model.md.

Why the grid is centred: ReLU features are all positive, so every tile's
raw grid shares a large common component.  Subtracting the per-channel
mean keeps what tells tiles apart (where things are); the scaled-down mean
keeps the texture and colour summary, so a featureless tile (water, a blank
provider tile) still gets a unit descriptor rather than a zero one.

Determinism: weights come only from integer filter taps, the legacy
``numpy.random.RandomState`` stream (frozen by NEP 19) and IEEE-754 basic
operations (``+ - * /`` and ``sqrt``, which are correctly rounded), never
from ``exp``/``cos``, whose last bit may differ between libm builds (hence
a biweight pooling window, not a Gaussian).  The opset, IR version and
producer fields are pinned.  Change any of this and bump
:data:`DEFAULT_MODEL_VERSION`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_write

__all__ = [
    "DEFAULT_MODEL_VERSION",
    "DEFAULT_MODEL_SEED",
    "DEFAULT_OPSET",
    "DEFAULT_IR_VERSION",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "TILE_SIZE",
    "DESCRIPTOR_DIM",
    "build_default_model",
    "write_default_model",
]

DEFAULT_MODEL_VERSION = "cbnet-v2"
DEFAULT_MODEL_SEED = 20240917
DEFAULT_OPSET = 17
# IR 8 is what opset 17 shipped with: readable by every ONNX Runtime since 1.11
# and by TensorRT 8.5+, which is what older Jetson images carry.
DEFAULT_IR_VERSION = 8
INPUT_NAME = "tiles"
OUTPUT_NAME = "descriptor"
TILE_SIZE = 256
DESCRIPTOR_DIM = 256

_EPSILON = 1e-12
_MEAN_WEIGHT = 0.25
#: Channels of the second convolution.
_CHANNELS = 48
#: The second convolution's output is ``_MAP`` x ``_MAP``; it is pooled onto
#: a ``_GRID`` x ``_GRID`` grid through biweight windows of radius
#: ``_RADIUS`` (a fraction of the tile).
_MAP = TILE_SIZE // 4
_GRID = 8
_RADIUS = 0.3
#: Added under the signed square root: sqrt(|x| + eps) is smooth at 0.
_SQRT_EPSILON = 1e-4


def _unit(filters: Any) -> Any:
    """Scale each integer-valued filter to unit L2 norm, exactly reproducibly."""
    import numpy as np

    out = np.empty(filters.shape, dtype=np.float64)
    for i, f in enumerate(filters):
        # sum of squares of integers is exact in Python ints; sqrt is correctly rounded
        norm = math.sqrt(sum(int(v) * int(v) for v in f.ravel()))
        out[i] = f.astype(np.float64) / norm
    return out


def _first_layer() -> Any:
    """16 fixed 3x5x5 filters: 8 oriented edges, 2 blobs, 2 brightness, 4 colour.

    All are built from the binomial kernel [1 4 6 4 1] and its derivative
    [-1 -2 0 2 1] (integer taps).  Each comes in a +/- pair because the
    ReLU after the layer would otherwise drop half of every response.
    """
    import numpy as np

    b = np.array([1, 4, 6, 4, 1], dtype=np.int64)
    d = np.array([-1, -2, 0, 2, 1], dtype=np.int64)
    gx = np.outer(b, d)  # vertical edges (x gradient)
    gy = np.outer(d, b)  # horizontal edges
    low = np.outer(b, b)  # sum 256
    centre_surround = low * 25 - 256  # zero-mean difference of blob and box
    grey = np.array([1, 1, 1], dtype=np.int64)
    red_green = np.array([1, -1, 0], dtype=np.int64)
    blue_yellow = np.array([-1, -1, 2], dtype=np.int64)

    def rgb(spatial: Any, colour: Any) -> Any:
        return colour[:, None, None] * spatial[None, :, :]

    filters = []
    for spatial in (gx, gy, gx + gy, gx - gy, centre_surround):
        filters += [rgb(spatial, grey), rgb(-spatial, grey)]
    filters += [rgb(low, grey), rgb(-low, grey)]
    filters += [rgb(low, red_green), rgb(-low, red_green)]
    filters += [rgb(low, blue_yellow), rgb(-low, blue_yellow)]
    return _unit(np.stack(filters))


def _he_uniform(rng: Any, shape: tuple[int, ...], fan_in: int) -> Any:
    """Uniform on [-sqrt(6/fan_in), sqrt(6/fan_in)] (He init for ReLU layers)."""
    limit = math.sqrt(6.0 / fan_in)
    u = rng.random_sample(shape)  # exact multiples of 2**-53
    return (u * 2.0 - 1.0) * limit


def _pool_matrix(n: int = _MAP, grid: int = _GRID, radius: float = _RADIUS) -> Any:
    """``[grid, n]``: row g is a normalised biweight window over the n map cells.

    Cell centres are at ``(i + 1/2) / n`` of the tile, grid centres at
    ``(g + 1/2) / grid``; the weight is ``(1 - (d / radius)**2)**2`` inside
    the radius, 0 outside: basic operations only, so exactly reproducible.
    """
    import numpy as np

    w = np.zeros((grid, n), dtype=np.float64)
    for g in range(grid):
        centre = (2 * g + 1) / (2 * grid)
        for i in range(n):
            d = ((2 * i + 1) / (2 * n) - centre) / radius
            if abs(d) < 1.0:
                w[g, i] = (1.0 - d * d) ** 2
        w[g] /= float(np.sum(w[g]))
    return w


def _weights(seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.RandomState(seed)
    features = _CHANNELS * _GRID * _GRID + _CHANNELS
    w: dict[str, Any] = {"conv1.w": _first_layer()}
    w["conv2.w"] = _he_uniform(rng, (_CHANNELS, 16, 3, 3), 16 * 9)
    # variance 1/fan_in: a Johnson-Lindenstrauss projection, scale is irrelevant
    # because the output is normalised
    w["proj.w"] = _he_uniform(rng, (features, DESCRIPTOR_DIM), 2 * features)
    pool = _pool_matrix()
    w["pool.rows"] = pool
    w["pool.cols"] = np.ascontiguousarray(pool.T)
    return {k: v.astype(np.float32) for k, v in w.items()}


def build_default_model(seed: int = DEFAULT_MODEL_SEED) -> bytes:
    """Build the default descriptor network and return its ONNX bytes.

    The result is byte-for-byte the same on every call and every machine.

    Parameters
    ----------
    seed
        Seed of the random layers.  Only the default seed is
        ``cbnet-v2``; other seeds are for experiments.

    Returns
    -------
    bytes
        A serialised ONNX ``ModelProto`` (opset 17) that passes
        ``onnx.checker.check_model``.

    Examples
    --------
    >>> build_default_model() == build_default_model()
    True
    """
    import onnx
    from onnx import TensorProto, helper

    inits = _initializers(seed)
    nodes = _graph_nodes()
    graph = helper.make_graph(
        nodes,
        DEFAULT_MODEL_VERSION,
        [
            helper.make_tensor_value_info(
                INPUT_NAME, TensorProto.FLOAT, ["N", 3, TILE_SIZE, TILE_SIZE]
            )
        ],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", DESCRIPTOR_DIM])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)],
        producer_name="cachebuild",
        producer_version=DEFAULT_MODEL_VERSION,
        ir_version=DEFAULT_IR_VERSION,
        doc_string=f"{DEFAULT_MODEL_VERSION} tile descriptor, seed {seed}",
    )
    model.model_version = 1
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString(deterministic=True)
    return data


def _initializers(seed: int) -> list[Any]:
    """The network's constant tensors: the seeded weights, then the fixed scalars."""
    from onnx import numpy_helper

    w = _weights(seed)
    inits = [numpy_helper.from_array(v, name=k) for k, v in sorted(w.items())]
    inits.append(numpy_helper.from_array(_np_f32(_MEAN_WEIGHT), name="mean.weight"))
    inits.append(numpy_helper.from_array(_np_f32(_EPSILON), name="l2.eps"))
    inits.append(numpy_helper.from_array(_np_f32(_SQRT_EPSILON), name="ssqrt.eps"))
    return inits


def _graph_nodes() -> list[Any]:
    """The network's nodes in order: two strided convolutions, the grid pool, the head."""
    from onnx import helper

    def conv(name: str, x: str, k: int, pad: int) -> list[Any]:
        return [
            helper.make_node(
                "Conv",
                [x, f"{name}.w"],
                [f"{name}.y"],
                name=name,
                kernel_shape=[k, k],
                strides=[2, 2],
                pads=[pad, pad, pad, pad],
            ),
            helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"], name=f"{name}.relu"),
        ]

    nodes = []
    nodes += conv("conv1", INPUT_NAME, 5, 2)  # 128x128
    nodes += conv("conv2", "conv1.r", 3, 1)  # 64x64
    nodes += [
        # pool onto the grid: [N, C, 64, 64] @ [64, 8] -> [N, C, 64, 8]; [8, 64] @ that
        helper.make_node("MatMul", ["conv2.r", "pool.cols"], ["pool.x"], name="pool.x"),
        helper.make_node("MatMul", ["pool.rows", "pool.x"], ["grid"], name="pool.y"),
        helper.make_node("ReduceMean", ["grid"], ["mean"], name="mean", axes=[2, 3], keepdims=1),
        helper.make_node("Sub", ["grid", "mean"], ["grid.c"], name="centre"),
        # signed square root: x / sqrt(|x| + eps)
        helper.make_node("Abs", ["grid.c"], ["grid.abs"], name="ssqrt.abs"),
        helper.make_node("Add", ["grid.abs", "ssqrt.eps"], ["grid.abs.e"], name="ssqrt.eps"),
        helper.make_node("Sqrt", ["grid.abs.e"], ["grid.root"], name="ssqrt.sqrt"),
        helper.make_node("Div", ["grid.c", "grid.root"], ["grid.s"], name="ssqrt.div"),
        helper.make_node("Flatten", ["grid.s"], ["grid.f"], name="grid.flat", axis=1),
        helper.make_node("Flatten", ["mean"], ["mean.f"], name="mean.flat", axis=1),
        helper.make_node("Mul", ["mean.f", "mean.weight"], ["mean.s"], name="mean.scale"),
        helper.make_node("Concat", ["grid.f", "mean.s"], ["feat"], name="concat", axis=1),
        helper.make_node("MatMul", ["feat", "proj.w"], ["raw"], name="proj"),
        helper.make_node("ReduceL2", ["raw"], ["norm"], name="l2.norm", axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "l2.eps"], ["norm.c"], name="l2.clamp"),
        helper.make_node("Div", ["raw", "norm.c"], [OUTPUT_NAME], name="l2.div"),
    ]
    return nodes


def _np_f32(value: float) -> Any:
    import numpy as np

    return np.array(value, dtype=np.float32)


def write_default_model(path: str | os.PathLike[str]) -> Path:
    """Write :func:`build_default_model` to ``path`` atomically.

    Parameters
    ----------
    path
        Destination file; its directory is created if missing.

    Returns
    -------
    Path
        ``path``.  A temporary file in the same directory is synced and
        renamed onto it (:func:`cachebuild._util.fs.atomic_write`), so a
        reader never sees a partial model.
    """

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, build_default_model(), durable=True)
    return path
