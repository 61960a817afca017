"""Write part of an ONNX network as a model of its own: the cuts the pooled path and the cells use.

One place for what every cut does the same way: keep the chosen nodes and
only the weights they read (ONNX Runtime warns about unused ones), set the
new inputs and outputs, drop stale shape annotations, check, and write
deterministic bytes atomically (the files are hashed and signed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_write

__all__ = ["write_subgraph"]


def write_subgraph(
    model: Any,
    nodes: Sequence[Any],
    out_path: str | os.PathLike[str],
    *,
    weights: Sequence[Any] = (),
    inputs: Sequence[Any] | None = None,
    outputs: Sequence[Any] | None = None,
    infer_shapes: bool = False,
) -> Path:
    """Replace ``model``'s graph by ``nodes`` (and new ``weights``, inputs, outputs) and write it.

    ``infer_shapes``: write the strictly inferred model instead of only checking it.
    """
    import onnx

    g = model.graph
    used = {i for node in nodes for i in node.input}
    inits = [t for t in g.initializer if t.name in used] + list(weights)
    kept = list(nodes)
    del g.node[:]
    g.node.extend(kept)
    del g.initializer[:]
    g.initializer.extend(inits)
    if inputs is not None:
        del g.input[:]
        g.input.extend(inputs)
    if outputs is not None:
        del g.output[:]
        g.output.extend(outputs)
    del g.value_info[:]
    if infer_shapes:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    else:
        onnx.checker.check_model(model)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, model.SerializeToString(deterministic=True), durable=False)
    return out
