"""The second stage's cells: each place's pooled grid, kept small, and the model that makes a frame's.

The built-in network pools its feature maps onto an ``8 x 8`` grid of
cells, centres and signed-roots it (``grid.s``), then projects the whole
grid to one 256-d descriptor.  The projection keeps what a place looks like
but blurs *where*: at 10k tiles many places look alike to it.  The cells
keep where: ``grid.s`` with its 48 channels projected to :data:`CHANNELS`
by fixed +-1 weights (a Johnson-Lindenstrauss projection, exact
integers, so the same on every machine).  A frame's cells against a
place's, compared at a few one-cell offsets, tell the true place from the
look-alikes (:mod:`cachebuild.localize.rerank`).

Two ONNX models, cut from the network's own graph, so a place's cells and
a frame's are rounded the same way:

- :func:`write_cells_head`: ``grid`` ``[N, C, g, g]`` -> cells ``[N, k, g, g]``,
  run by the build on the grids it pools for the windows;
- :func:`write_cells_model`: tiles ``[N, 3, H, W]`` -> cells ``[N, k, g, g]``,
  the whole path for a frame: what the self-test and an onboard client run
  (published as ``engine/cells.onnx``).

onnx and numpy are imported inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cachebuild.engine.subgraph import write_subgraph

__all__ = [
    "CHANNELS",
    "CELLS_MODEL",
    "CELLS_HEAD",
    "CELLS_OUTPUT",
    "projection",
    "write_cells_head",
    "write_cells_model",
]

#: Channels a cell keeps (of the network's 48): 8 cells x 8 x 8 = 512 bytes a place.
CHANNELS = 8
#: The frame-to-cells model, in the engine directory (published).
CELLS_MODEL = "cells.onnx"
#: The grid-to-cells model, beside the feature engine (build-side only).
CELLS_HEAD = "cells-head.onnx"
CELLS_OUTPUT = "cells"
_SEED = 20261207
_GRID_OUT = "grid"
_ROOTED = "grid.s"


def projection(channels: int, k: int = CHANNELS) -> Any:
    """``[channels, k]`` float32 of +-1: column j sums a fixed random half of the channels minus the rest.

    Drawn from the legacy ``RandomState`` stream (frozen by NEP 19) and
    compared with 0.5 only: exact, the same bits everywhere.
    """
    import numpy as np

    rng = np.random.RandomState(_SEED)
    return np.where(rng.random_sample((channels, k)) < 0.5, -1.0, 1.0).astype(np.float32)


def _cells_nodes(channels: int) -> tuple[list[Any], list[Any]]:
    """Nodes and weights from ``grid.s`` ``[N, C, g, g]`` to ``cells`` ``[N, k, g, g]``."""
    from onnx import helper, numpy_helper

    nodes = [
        helper.make_node("Transpose", [_ROOTED], ["cells.t"], name="cells.t", perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["cells.t", "cells.proj"], ["cells.p"], name="cells.proj"),
        helper.make_node(
            "Transpose", ["cells.p"], [CELLS_OUTPUT], name="cells.out", perm=[0, 3, 1, 2]
        ),
    ]
    return nodes, [numpy_helper.from_array(projection(channels), name="cells.proj")]


def _cut(
    model_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, head: bool
) -> Path:
    """The network's nodes up to ``grid.s`` (after ``grid`` only, with ``head``), then the cells."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=True)
    g = model.graph
    names = [n.output[0] for n in g.node]
    start = names.index(_GRID_OUT) + 1 if head else 0
    keep = list(g.node[start : names.index(_ROOTED) + 1])
    channels = next(t.dims[0] for t in g.initializer if t.name == "conv2.w")
    cells = next(t.dims[0] for t in g.initializer if t.name == "pool.rows")
    extra, weights = _cells_nodes(channels)
    grid = helper.make_tensor_value_info(
        _GRID_OUT, onnx.TensorProto.FLOAT, ["N", channels, cells, cells]
    )
    out = helper.make_tensor_value_info(
        CELLS_OUTPUT, onnx.TensorProto.FLOAT, ["N", CHANNELS, cells, cells]
    )
    return write_subgraph(
        model, keep + extra, out_path, weights=weights, inputs=[grid] if head else None,
        outputs=[out],
    )  # fmt: skip


def write_cells_head(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the grid-to-cells model (``grid`` ``[N, C, g, g]`` in) of a poolable network."""
    return _cut(model_path, out_path, head=True)


def write_cells_model(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the frame-to-cells model (the network's input in) of a poolable network."""
    return _cut(model_path, out_path, head=False)
