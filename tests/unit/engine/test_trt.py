"""Tests for cachebuild.engine.tensorrt.backend, the TensorRT backend.

Three kinds, by what can run here:

- pure logic (version parsing, PRECISION per TensorRT version, the model's
  own precision from real ONNX files, profile shapes, parser-error lines,
  the environment check, the engine key): no stand-ins;
- the backend's compile/load/run flow against tests/_harness/fake_tensorrt.py (a
  stand-in ``tensorrt`` module and a CUDA whose device is host memory),
  because TensorRT and a GPU cannot be had here;
- ``real_tensorrt``: the same flow on a real TensorRT and GPU, skipped
  where ``tensorrt`` does not import (every machine of this project's CI).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cachebuild.engine import backends
from cachebuild.engine import compile as engine
from cachebuild.engine.backends import MachineProbes
from cachebuild.engine.compile import compile_engine, load_engine
from cachebuild.engine.interface import ENGINE_JSON, engine_key, read_engine_json
from cachebuild.engine.model import write_default_model
from cachebuild.engine.tensorrt import backend as trt
from cachebuild.engine.tensorrt import policy as trtplan
from cachebuild.engine.tensorrt.backend import TensorRTBackend
from cachebuild.engine.tensorrt.policy import (
    PROFILE_BATCH,
    TrtBuildPlan,
    check_environment,
    model_precision,
    parser_errors,
    precision_plan,
    profile_shapes,
    timing_cache_path,
    trt_major,
)
from cachebuild.errors import EngineError
from tests._harness import fake_tensorrt
from tests._harness.surface import assert_public_surface, heavy_imports

NO_TRT = "tensorrt not installed: no TensorRT wheel / GPU on this machine"
real_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason=NO_TRT)
PROBES = MachineProbes(tensorrt="10.3.0", gpu=True, onnxruntime="1.20.0", ort_cuda=False)


def conv_model(path: Path, *, kind: str = "fp32", batch: int | str = "N") -> Path:
    """A small valid network [batch, 3, 16, 16] -> [batch, 4]; ``fp16`` casts inside, ``int8`` has Q/DQ."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.linspace(-1, 1, 108).tolist())
    inits, nodes, src = [w], [], "x"
    if kind == "fp16":
        nodes.append(helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16))
        nodes.append(helper.make_node("Cast", ["x16"], ["x32"], to=TensorProto.FLOAT))
        src = "x32"
    if kind == "int8":
        inits += [
            helper.make_tensor("s", TensorProto.FLOAT, [], [0.02]),
            helper.make_tensor("z", TensorProto.INT8, [], [0]),
        ]
        nodes.append(helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]))
        nodes.append(helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]))
        src = "xd"
    nodes += [
        helper.make_node("Conv", [src, "w"], ["c"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("Relu", ["c"], ["r"], name="relu0"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"], axis=1),
    ]
    proto = helper.make_model(
        helper.make_graph(nodes, "conv", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    """TensorRT 10.3 and a host-memory CUDA, as the backend finds them (by import and probe)."""
    return install(monkeypatch, "10.3.0", fake_tensorrt.HostCuda())


def install(monkeypatch: pytest.MonkeyPatch, version: str, cuda: Any) -> Any:
    mod = fake_tensorrt.make(version)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    monkeypatch.setattr(trt, "cuda_api", lambda prefer=None: cuda)
    probes = MachineProbes(tensorrt=version, gpu=True, onnxruntime="1.20.0", ort_cuda=False)
    monkeypatch.setattr(backends, "probe_machine", lambda: probes)
    mod.cuda = cuda
    return mod


def compile_trt(model: Path, out: Path, precision: str = "fp32", **kw: Any) -> dict[str, Any]:
    return compile_engine(
        model_path=model, calibration_path=kw.pop("calibration", None), precision=precision,
        backend="tensorrt", out_dir=out, **kw,
    )  # fmt: skip


# -- pure logic -----------------------------------------------------------------


def test_trt_major() -> None:
    assert [trt_major(v) for v in ("10.3.0.30", "11.4.1", " 10")] == [10, 11, 10]
    with pytest.raises(EngineError, match="cannot read a TensorRT version"):
        trt_major("unknown")


@pytest.mark.parametrize(
    "version, precision, carried, calibration, network, builder",
    [
        ("10.3.0", "fp32", "fp32", False, (), ()),
        ("10.3.0", "fp16", "fp32", False, (), ("FP16",)),
        ("10.3.0", "int8", "fp32", True, (), ("INT8", "FP16")),
        ("10.3.0", "fp16", "fp16", False, ("STRONGLY_TYPED",), ()),
        ("10.3.0", "int8", "int8", False, ("STRONGLY_TYPED",), ()),
        ("11.4.1", "fp32", "fp32", False, ("STRONGLY_TYPED",), ()),
        ("11.4.1", "fp16", "fp16", False, ("STRONGLY_TYPED",), ()),
        ("11.4.1", "int8", "int8", True, ("STRONGLY_TYPED",), ()),
    ],
)
def test_precision_plan_per_version(
    version: str, precision: str, carried: str, calibration: bool, network: tuple, builder: tuple
) -> None:
    plan = precision_plan(version, precision, carried, has_calibration=calibration)
    assert (plan.network_flags, plan.builder_flags) == (network, builder)
    assert plan.calibrate == (builder == ("INT8", "FP16"))
    # TensorRT 11 never gets a precision builder flag: they were removed
    if trt_major(version) >= 11:
        assert plan.builder_flags == () and not plan.calibrate


@pytest.mark.parametrize(
    "version, precision, carried, calibration, needles",
    [
        (
            "11.4.1",
            "fp16",
            "fp32",
            False,
            ["TensorRT 11 removed", "modelopt.onnx.autocast", "PRECISION=fp32"],
        ),
        ("11.0.0", "int8", "fp32", True, ["TensorRT 11 removed", "Q/DQ"]),
        ("11.4.1", "fp32", "fp16", False, ["carries fp16", "PRECISION=fp16"]),
        ("10.3.0", "fp32", "int8", False, ["carries int8", "PRECISION=int8"]),
        ("10.3.0", "fp16", "int8", False, ["carries int8"]),
        ("10.3.0", "int8", "fp32", False, ["needs calibration data", "CALIBRATION"]),
        ("8.6.1", "fp32", "fp32", False, ["too old", "10.x and 11.x"]),
    ],
)
def test_precision_plan_errors_say_what_to_do(
    version: str, precision: str, carried: str, calibration: bool, needles: list[str]
) -> None:
    with pytest.raises(EngineError) as info:
        precision_plan(
            version, precision, carried, has_calibration=calibration, model="model m.onnx"
        )
    text = f"{info.value.message} {info.value.remedy}"
    for needle in needles:
        assert needle in text, text
    assert info.value.exit_code == 21


def test_model_precision_of_real_models(tmp_path: Path) -> None:
    assert model_precision(onnx.load(write_default_model(tmp_path / "cb.onnx"))) == "fp32"
    for kind in ("fp32", "fp16", "int8"):
        assert model_precision(onnx.load(conv_model(tmp_path / f"{kind}.onnx", kind=kind))) == kind


def test_model_precision_sees_fp16_initializers_and_io(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 3])
    io = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    )
    assert model_precision(io) == "fp16"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    b = helper.make_tensor("b", TensorProto.FLOAT16, [3], [0.0, 1.0, 2.0])
    nodes = [
        helper.make_node("Cast", ["b"], ["b32"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "b32"], ["y"]),
    ]
    assert (
        model_precision(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [b]))) == "fp16"
    )


def test_profile_shapes() -> None:
    p = profile_shapes([None, 3, 224, 224])
    assert p == {"min": [1, 3, 224, 224], "opt": [64, 3, 224, 224], "max": [256, 3, 224, 224]}
    assert PROFILE_BATCH == (1, 64, 256)
    assert profile_shapes([8, 3, 32, 32]) == {k: [8, 3, 32, 32] for k in ("min", "opt", "max")}
    assert profile_shapes([None, 3, 8, 8], (2, 4, 16))["opt"] == [4, 3, 8, 8]
    with pytest.raises(ValueError, match="min <= opt <= max"):
        profile_shapes([None, 3, 8, 8], (4, 2, 16))


def test_parser_errors_are_one_line_each_with_node_and_code() -> None:
    class Bare:  # an error object with only code() and desc(), as older bindings have
        def code(self) -> int:
            return 8

        def desc(self) -> str:
            return "Assertion failed: weights are not initializers"

    class Parser:
        num_errors = 3
        errs = [
            fake_tensorrt.ParserError(
                "UNSUPPORTED_NODE",
                "No importer registered for op: GridSample",
                12,
                "gs_1",
                "GridSample",
            ),
            fake_tensorrt.ParserError("INVALID_NODE", "Invalid attribute", 3, "", "Conv"),
            Bare(),
        ]

        def get_error(self, i: int) -> Any:
            return self.errs[i]

    lines = parser_errors(Parser())
    assert lines == [
        "[node 12, name gs_1, op GridSample] UNSUPPORTED_NODE: No importer registered for op: GridSample",
        "[node 3, op Conv] INVALID_NODE: Invalid attribute",
        "[model] 8: Assertion failed: weights are not initializers",
    ]


LIVE = {"tensorrt": "10.3.0", "cuda": "12.6", "gpu": "Orin", "compute_capability": "8.7"}


@pytest.mark.parametrize(
    "field, other",
    [("tensorrt", "10.4.0"), ("cuda", "12.8"), ("gpu", "Thor"), ("compute_capability", "11.0")],
)
def test_check_environment_refuses_another_machine(tmp_path: Path, field: str, other: str) -> None:
    check_environment({"environment": LIVE}, LIVE, tmp_path)  # the same: loads
    with pytest.raises(EngineError) as info:
        check_environment({"environment": {**LIVE, field: other}}, LIVE, tmp_path)
    assert f"({field} differ)" in info.value.message and "not loaded" in info.value.message
    assert f"delete {tmp_path}" in (info.value.remedy or "") and info.value.exit_code == 21


def test_timing_cache_file_is_per_environment(tmp_path: Path) -> None:
    a = timing_cache_path(tmp_path, LIVE)
    assert a == timing_cache_path(tmp_path, dict(reversed(list(LIVE.items()))))
    for field in LIVE:
        assert timing_cache_path(tmp_path, {**LIVE, field: "other"}) != a


BUILD = {
    "profile": profile_shapes([None, 3, 64, 64]),
    "workspace": 1 << 30,
    "flags": ["builder:FP16"],
}
TRT_KEY = ("a" * 64, None, "fp16", "tensorrt", "10.3.0 (CUDA 12.6)", "gpu:Orin:sm_87")


@pytest.mark.parametrize(
    "position, value",
    [
        (4, "11.4.1 (CUDA 12.6)"),
        (4, "10.3.0 (CUDA 12.8)"),
        (5, "gpu:Thor:sm_87"),
        (5, "gpu:Orin:sm_86"),
        (2, "fp32"),
        (0, "b" * 64),
    ],
)
def test_tensorrt_key_changes_with_version_cuda_gpu_capability_precision_model(
    position: int, value: str
) -> None:
    args = list(TRT_KEY)
    args[position] = value
    assert engine_key(*args, build=BUILD) != engine_key(*TRT_KEY, build=BUILD)


@pytest.mark.parametrize(
    "change",
    [
        {"profile": profile_shapes([None, 3, 64, 64], (1, 32, 256))},
        {"profile": profile_shapes([None, 3, 64, 64], (1, 64, 512))},
        {"workspace": 1 << 29},
        {"flags": []},
        {"flags": ["network:STRONGLY_TYPED"]},
    ],
)
def test_tensorrt_key_changes_with_profile_workspace_flags(change: dict) -> None:
    assert engine_key(*TRT_KEY, build={**BUILD, **change}) != engine_key(*TRT_KEY, build=BUILD)


def test_build_settings_leave_onnxruntime_keys_as_they_were() -> None:
    args = ("a" * 64, None, "fp32", "onnxruntime", "1.18.0", "cpu:x:avx2")
    assert engine_key(*args) == engine_key(*args, build=None)
    assert engine_key(*args, build={}) != engine_key(*args)


def test_public_surface() -> None:
    for module in (trt, trtplan, backends, sys.modules["cachebuild.engine.gpu"]):
        assert_public_surface(module)


# -- the backend against the stand-ins ----------------------------------------------


def test_compile_records_key_fields_and_builds_with_profile_workspace_and_no_flags(
    fake: Any, tmp_path: Path
) -> None:
    model = conv_model(tmp_path / "m.onnx")
    record = compile_trt(
        model, tmp_path / "e", workspace=256 << 20, timing_cache_dir=tmp_path / "tc"
    )
    assert record["backend"] == "tensorrt" and record["engine_file"] == "engine.plan"
    assert (
        record["backend_version"] == "10.3.0 (CUDA 12.6)"
        and record["device"] == "gpu:Fake Orin:sm_87"
    )
    assert record["environment"] == {
        "tensorrt": "10.3.0",
        "cuda": "12.6",
        "gpu": "Fake Orin",
        "compute_capability": "8.7",
    }
    assert record["build"] == {
        "profile": {"min": [1, 3, 16, 16], "opt": [64, 3, 16, 16], "max": [256, 3, 16, 16]},
        "workspace": 256 << 20,
        "flags": [],
        "model_precision": "fp32",
    }
    assert record["key"] == engine_key(
        record["model_sha256"],
        None,
        "fp32",
        "tensorrt",
        record["backend_version"],
        record["device"],
        record["build"],
    )
    assert read_engine_json(tmp_path / "e") == record
    builds = [e for e in fake.log if e[0] == "build"]
    assert builds == [
        (
            "build",
            0,
            [],
            {0: 256 << 20},
            [{"x": ([1, 3, 16, 16], [64, 3, 16, 16], [256, 3, 16, 16])}],
            False,
        )
    ]
    # the bytes hashed for the key are what the parser got, with the path for external weights
    assert [e for e in fake.log if e[0] == "parse"] == [("parse", model.stat().st_size, str(model))]


def test_the_file_name_is_not_in_the_key(fake: Any, tmp_path: Path) -> None:
    a = conv_model(tmp_path / "a.onnx")
    b = tmp_path / "renamed.onnx"
    b.write_bytes(a.read_bytes())
    assert compile_trt(a, tmp_path / "ea")["key"] == compile_trt(b, tmp_path / "eb")["key"]


def test_fp16_on_10_sets_the_builder_flag(fake: Any, tmp_path: Path) -> None:
    record = compile_trt(conv_model(tmp_path / "m.onnx"), tmp_path / "e", "fp16")
    assert record["build"]["flags"] == ["builder:FP16"]
    assert [e[2] for e in fake.log if e[0] == "build"] == [["FP16"]]


def test_a_model_carrying_fp16_is_built_strongly_typed_on_11(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mod = install(monkeypatch, "11.4.1", fake_tensorrt.HostCuda())
    record = compile_trt(conv_model(tmp_path / "m.onnx", kind="fp16"), tmp_path / "e", "fp16")
    assert record["build"]["flags"] == ["network:STRONGLY_TYPED"]
    assert [(e[1], e[2]) for e in mod.log if e[0] == "build"] == [(1 << 1, [])]


def test_fp16_of_an_fp32_model_on_11_is_a_clear_error_and_leaves_no_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mod = install(monkeypatch, "11.4.1", fake_tensorrt.HostCuda())
    with pytest.raises(
        EngineError, match="TensorRT 11 removed the FP16/INT8 builder flags"
    ) as info:
        compile_trt(conv_model(tmp_path / "m.onnx"), tmp_path / "e", "fp16")
    assert info.value.exit_code == 21 and info.value.phase == "engine"
    assert not (tmp_path / "e" / ENGINE_JSON).exists()
    assert not any(e[0] == "build" for e in mod.log)


def test_int8_on_10_calibrates_from_npy_tiles(fake: Any, tmp_path: Path) -> None:
    tiles = np.random.default_rng(0).random((130, 3, 16, 16), dtype=np.float32)
    np.save(tmp_path / "cal.npy", tiles)
    record = compile_trt(
        conv_model(tmp_path / "m.onnx"), tmp_path / "e", "int8", calibration=tmp_path / "cal.npy"
    )
    assert record["build"]["flags"] == ["builder:INT8", "builder:FP16"]
    assert record["calibration_sha256"] is not None
    assert [e[5] for e in fake.log if e[0] == "build"] == [True]
    # two full batches of 64 went to the device through a pinned buffer; the 2 left over did not
    assert fake.cuda.copies == [("h2d", 64 * 3 * 16 * 16 * 4)] * 2


def test_int8_calibration_file_of_the_wrong_shape_is_named(fake: Any, tmp_path: Path) -> None:
    np.save(tmp_path / "cal.npy", np.zeros((10, 16, 16), np.float32))
    with pytest.raises(EngineError, match=r"cal\.npy holds float32 \[10, 16, 16\]"):
        compile_trt(
            conv_model(tmp_path / "m.onnx"),
            tmp_path / "e",
            "int8",
            calibration=tmp_path / "cal.npy",
        )


def test_every_parser_error_is_reported(fake: Any, tmp_path: Path) -> None:
    fake.unsupported_ops.update({"Conv", "Relu"})
    with pytest.raises(EngineError) as info:
        compile_trt(conv_model(tmp_path / "m.onnx"), tmp_path / "e")
    msg = info.value.message
    assert "cannot parse model" in msg and "(2 error(s))" in msg
    assert (
        "[node 0, name conv0, op Conv] UNSUPPORTED_NODE: No importer registered for op: Conv" in msg
    )
    assert "[node 1, name relu0, op Relu] UNSUPPORTED_NODE" in msg
    assert "BACKEND=onnxruntime" in (info.value.remedy or "") and info.value.exit_code == 21


def test_a_failed_build_names_precision_and_workspace(fake: Any, tmp_path: Path) -> None:
    fake.fail_build = True
    with pytest.raises(EngineError, match=r"PRECISION=fp32, WORKSPACE=1073741824 bytes") as info:
        compile_trt(conv_model(tmp_path / "m.onnx"), tmp_path / "e")
    assert "raise WORKSPACE" in (info.value.remedy or "")
    assert (
        not (tmp_path / "e" / ENGINE_JSON).exists()
        and not (tmp_path / "e" / "engine.plan").exists()
    )


def test_timing_cache_persists_and_is_reused_across_builds(fake: Any, tmp_path: Path) -> None:
    tc = tmp_path / "tc"
    first = compile_trt(conv_model(tmp_path / "m.onnx"), tmp_path / "e1", timing_cache_dir=tc)
    assert first["timing_cache_reused"] is False
    (cache_file,) = tc.iterdir()
    assert cache_file == timing_cache_path(tc, first["environment"])
    one = json.loads(cache_file.read_bytes()[len(fake_tensorrt.TC_MAGIC) :])
    # another model, another cache directory: the first model's timings come along
    second = compile_trt(
        conv_model(tmp_path / "m2.onnx", kind="fp16"), tmp_path / "e2", "fp16", timing_cache_dir=tc
    )
    assert second["timing_cache_reused"] is True
    both = json.loads(cache_file.read_bytes()[len(fake_tensorrt.TC_MAGIC) :])
    assert len(one) == 1 and len(both) == 2 and both[0] == one[0]
    # a torn cache file is not fatal: the build starts from an empty cache and rewrites it
    cache_file.write_bytes(b"garbage")
    third = compile_trt(conv_model(tmp_path / "m.onnx"), tmp_path / "e3", timing_cache_dir=tc)
    assert third["timing_cache_reused"] is False
    assert cache_file.read_bytes().startswith(fake_tensorrt.TC_MAGIC)


def test_runs_through_pinned_buffers_and_matches_onnxruntime(fake: Any, tmp_path: Path) -> None:
    import onnxruntime as ort

    model = conv_model(tmp_path / "m.onnx")
    compile_trt(model, tmp_path / "e")
    runner = load_engine(tmp_path / "e")
    assert runner.input_hw == (16, 16) and runner.descriptor_dim == 4
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for n in (1, 5, 300):  # 300 > the profile's max of 256: two executions
        x = np.random.default_rng(n).random((n, 3, 16, 16), dtype=np.float32)
        fake.cuda.copies.clear()
        got = runner.run(x)
        np.testing.assert_allclose(got, ref.run(["y"], {"x": x})[0], rtol=1e-5, atol=1e-6)
        chunks = [min(256, n)] + ([n - 256] if n > 256 else [])
        assert fake.cuda.copies == [
            c for k in chunks for c in (("h2d", k * 3 * 16 * 16 * 4), ("d2h", k * 4 * 4))
        ]
    assert [e[2] for e in fake.log if e[0] == "execute"][-2:] == [256, 44]
    # input and output staging buffers are pinned, sized for the profile's max batch
    assert fake.cuda.pinned == [256 * 3 * 16 * 16 * 4, 256 * 4 * 4]
    with pytest.raises(EngineError, match=r"must be float32 \[n, 3, 16, 16\]"):
        runner.run(np.zeros((2, 3, 8, 8), np.float32))


def test_a_fixed_batch_engine_pads_the_last_batch(fake: Any, tmp_path: Path) -> None:
    import onnxruntime as ort

    model = conv_model(tmp_path / "m.onnx", batch=4)
    record = compile_trt(model, tmp_path / "e")
    assert record["build"]["profile"]["min"][0] == record["build"]["profile"]["max"][0] == 4
    x = np.random.default_rng(2).random((6, 3, 16, 16), dtype=np.float32)
    got = load_engine(tmp_path / "e").run(x)
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = np.concatenate(
        [
            ref.run(["y"], {"x": x[:4]})[0],
            ref.run(["y"], {"x": np.concatenate([x[4:], np.zeros_like(x[:2])])})[0][:2],
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "version, cuda",
    [
        ("10.3.0", fake_tensorrt.HostCuda(gpu="Fake Thor", cc="11.0")),  # another GPU
        ("10.3.0", fake_tensorrt.HostCuda(cc="8.6")),  # another compute capability
        ("10.4.0", fake_tensorrt.HostCuda()),  # another TensorRT
        ("10.3.0", fake_tensorrt.HostCuda(cuda="12.8")),  # another CUDA
    ],
)
def test_an_engine_for_another_machine_is_never_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, version: str, cuda: Any
) -> None:
    install(monkeypatch, "10.3.0", fake_tensorrt.HostCuda())
    compile_trt(conv_model(tmp_path / "m.onnx"), tmp_path / "e")
    mod = install(monkeypatch, version, cuda)
    with pytest.raises(EngineError, match="it is not loaded") as info:
        load_engine(tmp_path / "e")
    assert "Fake Orin (sm 8.7), TensorRT 10.3.0, CUDA 12.6" in info.value.message
    assert info.value.exit_code == 21 and f"delete {tmp_path / 'e'}" in (info.value.remedy or "")
    assert not any(e[0] == "execute" for e in mod.log)


def test_the_key_check_catches_an_edited_engine_json(fake: Any, tmp_path: Path) -> None:
    compile_trt(conv_model(tmp_path / "m.onnx"), tmp_path / "e", workspace=1 << 30)
    path = tmp_path / "e" / ENGINE_JSON
    record = json.loads(path.read_text())
    record["build"]["workspace"] = 1 << 31  # the key no longer derives from what is recorded
    path.write_text(json.dumps(record))
    with pytest.raises(EngineError, match="its key does not match this machine"):
        load_engine(tmp_path / "e")


def test_a_swapped_plan_file_is_refused(fake: Any, tmp_path: Path) -> None:
    compile_trt(conv_model(tmp_path / "m.onnx"), tmp_path / "e")
    plan = tmp_path / "e" / "engine.plan"
    plan.write_bytes(plan.read_bytes() + b" ")
    with pytest.raises(EngineError, match="does not match the sha256 in engine.json"):
        load_engine(tmp_path / "e")


def test_backend_is_found_by_name_with_options(fake: Any, tmp_path: Path) -> None:
    be = engine.get_backend("tensorrt", PROBES, workspace=123 << 20, timing_cache_dir=tmp_path)
    assert (
        isinstance(be, TensorRTBackend)
        and be.workspace == 123 << 20
        and be.timing_cache_dir == tmp_path
    )
    assert be.precisions == ("fp32", "fp16", "int8") and be.portable is False
    auto = engine.get_backend("auto", PROBES)
    assert isinstance(auto, TensorRTBackend)
    assert isinstance(TrtBuildPlan((), ()), TrtBuildPlan)


def test_importing_the_backend_loads_no_gpu_library() -> None:
    modules = (
        "cachebuild.engine.tensorrt.backend",
        "cachebuild.engine.tensorrt.policy",
        "cachebuild.engine.backends",
        "cachebuild.engine.gpu",
    )
    gpu = ("numpy", "onnx", "onnxruntime", "tensorrt", "cupy", "torch", "cuda")
    assert heavy_imports(*modules, heavy=gpu) == []


def test_a_whole_build_with_backend_tensorrt_against_the_stand_ins(
    fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build-cache BACKEND=auto on a "Jetson": engine.plan signed in the manifest, the report names it."""
    import io

    from cachebuild._util.report import Report
    from cachebuild.cli.runner import build_cache
    from tests.conftest import write_flight

    printed = io.StringIO()  # Report.emit's default stream is bound at import: hand it ours
    emit = Report.emit
    monkeypatch.setattr(
        Report,
        "emit",
        lambda self, fmt, out=None, err=None: emit(self, fmt, printed, io.StringIO()),
    )

    def last_report() -> dict[str, Any]:
        return json.loads(printed.getvalue().strip().splitlines()[-1])

    flight = write_flight(tmp_path / "f.json")
    env = {"CACHEBUILD_HOME": str(tmp_path / "home")}
    code = build_cache(
        {"FLIGHT": str(flight), "BUFFER_M": "200", "REPORT": "json", "SELFTEST_QUERIES": "20"}, env
    )
    report = last_report()
    assert code == 0, report
    assert (
        report["engine"]["backend"] == "tensorrt"
        and report["engine"]["device"] == "gpu:Fake Orin:sm_87"
    )
    current = tmp_path / "home" / "cache" / "current"
    signed = json.loads((current / "manifest.json").read_text())["signed"]
    assert (
        "engine/engine.plan" in signed["targets"] and "engine/engine.onnx" not in signed["targets"]
    )
    assert signed["info"]["engine"]["key"] == report["engine"]["key"]
    record = json.loads((current / "engine" / ENGINE_JSON).read_text())
    assert record["build"]["workspace"] == 1 << 30 and record["timing_cache_reused"] is False
    assert any((tmp_path / "home" / "tensorrt").glob("timing-*.cache"))
    # windows were pooled from the feature half, compiled by TensorRT as the engine was
    build = tmp_path / "home" / "cache" / "state" / "build"
    assert json.loads((current / "windows.json").read_text())["mode"] == "pooled"
    features = json.loads((build / "engine" / "features" / ENGINE_JSON).read_text())
    assert features["backend"] == "tensorrt" and features["engine_file"] == "engine.plan"
    # describe ran the engine through execute_async_v3, and so did the self-test when it had frames
    runs = [e[2] for e in fake.log if e[0] == "execute"]
    assert sum(runs) >= report["descriptors"]["computed"] > 0, (
        runs,
        report["descriptors"],
        report["selftest"],
    )
    assert report["selftest"]["queries"] > 0 and len(runs) >= 2  # the self-test's frames too
    # the same again: nothing to do
    assert (
        build_cache(
            {"FLIGHT": str(flight), "BUFFER_M": "200", "REPORT": "json", "SELFTEST_QUERIES": "20"},
            env,
        )
        == 0
    )
    again = last_report()
    assert again["outcome"] == "up_to_date" and again["engine"] == report["engine"]


# -- a real TensorRT (skipped here) ----------------------------------------------------


@real_tensorrt
def test_real_tensorrt_matches_onnxruntime_and_reuses_its_timing_cache(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = write_default_model(tmp_path / "cbnet.onnx")
    first = compile_trt(model, tmp_path / "e1", timing_cache_dir=tmp_path / "tc")
    second = compile_trt(model, tmp_path / "e2", timing_cache_dir=tmp_path / "tc")
    assert first["key"] == second["key"] and second["timing_cache_reused"] is True
    runner = load_engine(tmp_path / "e1")
    h, w = runner.input_hw
    x = np.random.default_rng(0).random((37, 3, h, w), dtype=np.float32) - 0.5
    got = runner.run(x)
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = ref.run(None, {ref.get_inputs()[0].name: x})[0]
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert float(cos.min()) > 0.999  # backends differ by ~1e-4..5e-3, never bit for bit


@real_tensorrt
def test_real_tensorrt_refuses_an_engine_for_another_gpu(tmp_path: Path) -> None:
    compile_trt(write_default_model(tmp_path / "cbnet.onnx"), tmp_path / "e")
    path = tmp_path / "e" / ENGINE_JSON
    record = json.loads(path.read_text())
    record["environment"]["gpu"] = "Some Other GPU"
    path.write_text(json.dumps(record))
    with pytest.raises(EngineError, match="it is not loaded"):
        load_engine(tmp_path / "e")
