"""Tests for cachebuild.engine.model: the default network built from code."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from cachebuild.engine import model
from cachebuild.engine.model import (
    DEFAULT_MODEL_VERSION,
    DESCRIPTOR_DIM,
    INPUT_NAME,
    OUTPUT_NAME,
    TILE_SIZE,
    build_default_model,
    write_default_model,
)
from tests._harness.surface import assert_public_surface, heavy_imports

# Pinned: these bytes key every engine and cache built with the default model.
# If this changes, the model changed: bump DEFAULT_MODEL_VERSION and update it.
CBNET_V2_SHA256 = "c9074285eb44dfe89d9483e17e39c774f6b671f0c16a9ecc3f1cfb868acc5c98"


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return build_default_model()


@pytest.fixture(scope="module")
def session(model_bytes: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W], x / 255 - 0.5."""
    return np.ascontiguousarray((rgb.astype(np.float32) / 255 - 0.5).transpose(0, 3, 1, 2))


def terrain(seed: int, size: int = 768) -> np.ndarray:
    """Smooth multi-octave colour noise: fields, forests and roads it is not, but
    it has structure at every scale, as aerial imagery does."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3))
    for cells, amp in [(3, 1.0), (12, 0.5), (48, 0.25), (192, 0.12)]:
        for c in range(3):
            small = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
            img[:, :, c] += amp * np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


def describe(session: ort.InferenceSession, rgb: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAME], {INPUT_NAME: preprocess(rgb)})[0]


def test_bytes_are_deterministic(model_bytes: bytes) -> None:
    assert build_default_model() == model_bytes
    assert hashlib.sha256(model_bytes).hexdigest() == CBNET_V2_SHA256, (
        "the default model's bytes changed: bump DEFAULT_MODEL_VERSION and the pinned hash"
    )


def test_another_seed_is_another_model(model_bytes: bytes) -> None:
    assert build_default_model(seed=1) != model_bytes


def test_checker_and_signature(model_bytes: bytes) -> None:
    proto = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    assert proto.producer_name == "cachebuild"
    assert proto.producer_version == DEFAULT_MODEL_VERSION == "cbnet-v2"
    (inp,) = proto.graph.input
    (out,) = proto.graph.output

    def dims(v: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert inp.name == "tiles" and dims(inp) == ["N", 3, TILE_SIZE, TILE_SIZE]
    assert out.name == "descriptor" and dims(out) == ["N", DESCRIPTOR_DIM]


def test_compute_is_small(model_bytes: bytes) -> None:
    """Multiply-adds of the convolutions and matrix products: 0.05 to 0.3 GFLOP a tile."""
    proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(model_bytes))
    shapes = {
        v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
        for v in list(proto.graph.value_info) + list(proto.graph.output)
    }
    weights = {i.name: list(i.dims) for i in proto.graph.initializer}
    shapes.update(weights)
    flops = 0
    for node in proto.graph.node:
        if node.op_type == "Conv":
            _, _, h, w = shapes[node.output[0]]
            cout, cin, kh, kw = weights[node.input[1]]
            flops += 2 * h * w * cout * cin * kh * kw
        elif node.op_type == "MatMul":
            # every output element is an inner product over the shared dimension
            inner = shapes[node.input[1]][-2]
            flops += 2 * int(np.prod(shapes[node.output[0]])) * inner
    assert 0.05e9 <= flops <= 0.3e9


def test_output_is_unit_norm_for_any_batch(session: ort.InferenceSession) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((7, 3, TILE_SIZE, TILE_SIZE), dtype=np.float32) - 0.5
    full = session.run(None, {INPUT_NAME: x})[0]
    assert full.shape == (7, DESCRIPTOR_DIM) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    # dynamic batch: each row is the same whatever batch it is run in
    for n in (1, 3):
        part = session.run(None, {INPUT_NAME: x[:n]})[0]
        np.testing.assert_allclose(part, full[:n], atol=1e-5)


def test_featureless_tiles_still_get_unit_descriptors(session: ort.InferenceSession) -> None:
    flat = np.stack([np.full((TILE_SIZE, TILE_SIZE, 3), v, np.uint8) for v in (0, 128, 255)])
    d = describe(session, flat)
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_neighbouring_tiles_differ_and_each_matches_itself(
    session: ort.InferenceSession, seed: int
) -> None:
    img = terrain(seed)
    n = img.shape[0] // TILE_SIZE
    tiles = np.stack(
        [
            img[i * TILE_SIZE : (i + 1) * TILE_SIZE, j * TILE_SIZE : (j + 1) * TILE_SIZE]
            for i in range(n)
            for j in range(n)
        ]
    )
    d = describe(session, tiles)
    cos = d @ d.T
    for i in range(n):
        for j in range(n):
            k = i * n + j
            if j + 1 < n:
                assert cos[k, k + 1] < 0.95
            if i + 1 < n:
                assert cos[k, k + n] < 0.95
    assert np.array_equal(np.argmax(cos, axis=1), np.arange(len(tiles)))
    # and a re-encoded copy of a tile (JPEG noise) still matches itself best
    noisy = np.clip(
        tiles.astype(np.int16) + np.random.default_rng(seed).integers(-6, 7, tiles.shape), 0, 255
    )
    q = describe(session, noisy.astype(np.uint8))
    assert np.array_equal(np.argmax(q @ d.T, axis=1), np.arange(len(tiles)))


def test_write_default_model_is_atomic(tmp_path: Path, model_bytes: bytes) -> None:
    target = tmp_path / "sub" / "model.onnx"
    assert write_default_model(target) == target
    assert target.read_bytes() == model_bytes
    target.write_bytes(b"old")
    write_default_model(target)
    assert target.read_bytes() == model_bytes
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx"]


def test_public_surface() -> None:
    """``__all__`` lists exactly the public names the module defines."""
    assert_public_surface(model)


def test_import_is_light() -> None:
    assert heavy_imports("cachebuild.engine.model") == []
