"""Tests for cachebuild.engine.compile: compiling and loading the descriptor network."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from cachebuild._util.hashing import sha256_file
from cachebuild.engine import compile as engine
from cachebuild.engine.compile import compile_engine, get_backend, load_engine
from cachebuild.engine.interface import ENGINE_JSON, cpu_device, engine_key, read_engine_json
from cachebuild.engine.model import DESCRIPTOR_DIM, write_default_model
from cachebuild.engine.ort import OnnxRuntimeBackend
from cachebuild.errors import BuildError, EngineError
from tests._harness.surface import assert_public_surface, heavy_imports

KEY_FIELDS = {
    "model_sha256": "a" * 64,
    "calibration_sha256": None,
    "precision": "fp32",
    "backend": "onnxruntime",
    "backend_version": "1.18.0",
    "device": "cpu:AMD EPYC:avx,avx2",
}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_default_model(tmp_path_factory.mktemp("model") / "cbnet.onnx")


@pytest.fixture(scope="module")
def compiled(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("engine")
    record = compile_engine(
        model_path=model_path, calibration_path=None, precision="fp32", out_dir=out
    )
    return out, record


def tiny_model(path: Path, *, batch: int | str = "N", rank2_input: bool = False) -> Path:
    """A valid ONNX model: mean colour of an 8x8 tile, [batch, 3]."""
    if rank2_input:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])
        nodes = [helper.make_node("Identity", ["x"], ["y"])]
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])
        nodes = [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["y"], axis=1),
        ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    proto = helper.make_model(
        helper.make_graph(nodes, "tiny", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())
    return path


# -- engine_key ------------------------------------------------------------


def test_key_is_sha256_of_canonical_json() -> None:
    import hashlib

    canonical = json.dumps(KEY_FIELDS, sort_keys=True, separators=(",", ":"))
    assert engine_key(**KEY_FIELDS) == hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_sha256", "b" * 64),
        ("calibration_sha256", "c" * 64),
        ("precision", "fp16"),
        ("backend", "tensorrt"),
        ("backend_version", "1.18.1"),
        ("device", "cpu:AMD EPYC:avx,avx2,avx512f"),
    ],
)
def test_key_changes_with_each_field(field: str, value: str) -> None:
    assert engine_key(**{**KEY_FIELDS, field: value}) != engine_key(**KEY_FIELDS)


def test_key_does_not_depend_on_the_file_name(
    model_path: Path, tmp_path: Path, compiled: tuple
) -> None:
    renamed = tmp_path / "some-other-name.onnx"
    shutil.copyfile(model_path, renamed)
    record = compile_engine(
        model_path=renamed, calibration_path=None, precision="fp32", out_dir=tmp_path / "e2"
    )
    assert record["key"] == compiled[1]["key"]
    assert record == compiled[1]


def test_key_depends_on_calibration_bytes(
    model_path: Path, tmp_path: Path, compiled: tuple
) -> None:
    calib = tmp_path / "calib.bin"
    calib.write_bytes(b"\x01\x02")
    record = compile_engine(
        model_path=model_path, calibration_path=calib, precision="fp32", out_dir=tmp_path / "e"
    )
    assert record["calibration_sha256"] == sha256_file(calib)[0]
    assert record["key"] != compiled[1]["key"]


def test_sha256_file_streams(tmp_path: Path) -> None:
    import hashlib

    data = np.random.default_rng(0).bytes(3 * 1000 + 7)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", bufsize=1000)[0] == hashlib.sha256(data).hexdigest()


# -- device ----------------------------------------------------------------


def test_cpu_device_x86() -> None:
    info = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n"
        "flags\t\t: fpu sse2 avx2 avx512f fma avx avx512_vnni ht\n\n"
        "processor\t: 1\nmodel name\t: Something Else\nflags\t\t: fpu\n"
    )
    assert cpu_device(info, "x86_64") == (
        "cpu:Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz:avx,avx2,avx512_vnni,avx512f,fma"
    )


def test_cpu_device_arm_without_model_name() -> None:
    info = (
        "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp\n"
        "CPU implementer\t: 0x41\nCPU part\t: 0xd42\n"
    )
    assert cpu_device(info, "aarch64") == "cpu:aarch64 implementer 0x41 part 0xd42:asimd,asimddp"


def test_device_is_stable_here() -> None:
    backend = get_backend("onnxruntime")
    assert backend.device() == backend.device() == cpu_device()
    assert backend.device().startswith("cpu:")


# -- errors ----------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_is_refused_by_onnxruntime(
    model_path: Path, tmp_path: Path, precision: str
) -> None:
    with pytest.raises(EngineError) as err:
        compile_engine(
            model_path=model_path, calibration_path=None, precision=precision, out_dir=tmp_path
        )
    message = str(err.value)
    assert f"PRECISION={precision}" in message and "tensorrt" in message.lower()
    assert isinstance(err.value, BuildError) and err.value.phase == "engine"
    assert not (tmp_path / ENGINE_JSON).exists()


def test_unknown_precision_lists_the_known_ones(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="fp32, fp16, int8"):
        compile_engine(
            model_path=model_path, calibration_path=None, precision="fp64", out_dir=tmp_path
        )


def test_garbage_model_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model.onnx"
    bad.write_bytes(b"\x00garbage, not protobuf\xff" * 10)
    with pytest.raises(EngineError) as err:
        compile_engine(
            model_path=bad, calibration_path=None, precision="fp32", out_dir=tmp_path / "e"
        )
    assert str(bad) in str(err.value) and "not a valid ONNX model" in str(err.value)


def test_missing_model_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.onnx"
    with pytest.raises(EngineError, match=re.escape("nowhere.onnx")):
        compile_engine(
            model_path=missing, calibration_path=None, precision="fp32", out_dir=tmp_path / "e"
        )


def test_missing_calibration_is_named(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=re.escape("calib.bin")):
        compile_engine(
            model_path=model_path,
            calibration_path=tmp_path / "calib.bin",
            precision="fp32",
            out_dir=tmp_path / "e",
        )


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(EngineError, match="known backends: onnxruntime, tensorrt"):
        get_backend("openvino")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed"
)
def test_tensorrt_is_not_installed_here() -> None:
    with pytest.raises(EngineError, match="the `tensorrt` Python package is not installed") as info:
        get_backend("tensorrt")
    assert info.value.exit_code == 21 and "BACKEND=auto" in (info.value.remedy or "")


def test_wrong_signature_fails_and_leaves_no_engine_json(tmp_path: Path, compiled: tuple) -> None:
    out = tmp_path / "engine"
    shutil.copytree(compiled[0], out)
    bad = tiny_model(tmp_path / "rank2.onnx", rank2_input=True)
    with pytest.raises(EngineError, match=r"must be float32 \[batch, 3, H, W\]"):
        compile_engine(model_path=bad, calibration_path=None, precision="fp32", out_dir=out)
    # the old engine.json no longer vouches for the directory
    assert not (out / ENGINE_JSON).exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_load_without_engine_json(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="compile the engine first"):
        load_engine(tmp_path)


def test_incomplete_engine_json(tmp_path: Path) -> None:
    (tmp_path / ENGINE_JSON).write_text('{"backend": "onnxruntime"}')
    with pytest.raises(EngineError, match="incomplete"):
        read_engine_json(tmp_path)


# -- compile and load ------------------------------------------------------


def test_engine_json_is_written(compiled: tuple, model_path: Path) -> None:
    out, record = compiled
    on_disk = json.loads((out / ENGINE_JSON).read_text())
    assert on_disk == record
    assert set(record) == {
        "key", "backend", "backend_version", "device", "precision", "model_sha256",
        "calibration_sha256", "engine_file", "input", "output", "descriptor_dim",
    }  # fmt: skip
    assert record["backend"] == "onnxruntime" and record["backend_version"] == ort.__version__
    assert record["model_sha256"] == sha256_file(model_path)[0]
    assert record["engine_file"] == "engine.onnx" and (out / "engine.onnx").is_file()
    inp = record["input"]
    assert {k: inp[k] for k in ("name", "shape", "dtype")} == {
        "name": "tiles",
        "shape": [None, 3, 256, 256],
        "dtype": "float32",
    }
    # how a frame is prepared, so an onboard client needs no source (issue 21)
    assert inp["size"] == [256, 256] and inp["channel_order"] == "RGB" and inp["layout"] == "NCHW"
    assert (inp["scale"], inp["offset"]) == (1 / 255, -0.5)
    assert record["output"] == {"name": "descriptor", "shape": [None, 256], "dtype": "float32"}
    assert record["descriptor_dim"] == DESCRIPTOR_DIM
    fields = {k: record[k] for k in KEY_FIELDS}
    assert record["key"] == engine_key(**fields)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_loaded_engine_matches_the_raw_model(compiled: tuple, model_path: Path) -> None:
    runner = load_engine(compiled[0], threads=1)
    assert runner.descriptor_dim == DESCRIPTOR_DIM and runner.input_hw == (256, 256)
    x = np.random.default_rng(3).random((4, 3, 256, 256), dtype=np.float32) - 0.5
    ours = runner.run(x)
    raw = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    ref = raw.run(None, {"tiles": x})[0]
    assert ours.shape == (4, DESCRIPTOR_DIM) and ours.dtype == np.float32
    cos = np.sum(ours * ref, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert np.all(cos > 0.9999)


def test_runner_refuses_wrong_shapes(compiled: tuple) -> None:
    runner = load_engine(compiled[0], threads=1)
    with pytest.raises(EngineError, match=r"\[n, 3, 256, 256\]"):
        runner.run(np.zeros((1, 3, 128, 128), np.float32))


def test_fixed_batch_model_runs_any_batch(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "fixed.onnx", batch=2)
    record = compile_engine(
        model_path=model, calibration_path=None, precision="fp32", out_dir=tmp_path / "e"
    )
    assert record["input"]["shape"] == [2, 3, 8, 8] and record["descriptor_dim"] == 3
    runner = load_engine(tmp_path / "e")
    x = np.random.default_rng(1).random((5, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(runner.run(x), x.mean(axis=(2, 3)), atol=1e-6)


def test_backend_satisfies_the_protocol() -> None:
    backend = get_backend("onnxruntime")
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.name == "onnxruntime" and backend.precisions == ("fp32",)
    assert backend.version() == ort.__version__


def test_public_surface() -> None:
    """``__all__`` lists exactly the public names the module defines."""
    assert_public_surface(engine)


def test_import_is_light() -> None:
    assert heavy_imports("cachebuild.engine.compile") == []
