"""issue 19: an ONNX model with external data (``weights.bin`` beside ``model.onnx``).

The data file is part of the model's identity (the engine key hashes it,
doit depends on it) and travels with it (the engine is one self-contained
file; the companion push sends the data beside the model).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachebuild.companion import push
from cachebuild.engine.compile import compile_engine
from cachebuild.engine.model import build_default_model
from cachebuild.engine.modelfiles import external_data_files, model_sha256
from cachebuild.errors import EngineError
from tests.conftest import Cb, write_flight
from tests.unit.companion.test_companion_units import _staged

SMALL = ("BUFFER_M=150", "ZOOM=17", "SELFTEST_QUERIES=0")


def external_model(d: Path, location: str = "weights.bin") -> Path:
    """The built-in network saved as ``d/model.onnx`` with its tensors in ``d/<location>``."""
    import onnx

    d.mkdir(parents=True, exist_ok=True)
    model = onnx.load_model_from_string(build_default_model())
    onnx.save_model(
        model,
        str(d / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,
    )
    assert (d / location).stat().st_size > 1_000_000
    return d / "model.onnx"


def flip_weights(data: Path) -> None:
    """Another weight in the data file: the same size, the mtime put back."""
    st = data.stat()
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    with open(data, "r+b") as fh:
        fh.write(raw)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_model_with_external_data_builds_and_its_data_keys_the_engine(
    cb: Cb, tmp_path: Path
) -> None:
    model = external_model(tmp_path / "net")
    flight = write_flight(tmp_path / "f.json")
    args = (f"FLIGHT={flight}", f"MODEL={model}", *SMALL)
    r = cb.build(*args)
    assert r.code == 0, r.stderr
    key = r.report["engine"]["key"]
    assert cb.run("verify-cache").code == 0
    flip_weights(model.parent / "weights.bin")
    r2 = cb.build(*args)
    assert r2.code == 0, r2.stderr
    assert r2.report["engine"]["key"] != key, r2.report
    assert cb.run("verify-cache").code == 0


def test_the_identity_hashes_the_data_and_a_model_in_one_file_keeps_its_plain_hash(
    tmp_path: Path,
) -> None:
    import hashlib

    model = external_model(tmp_path / "net")
    assert external_data_files(model) == ["weights.bin"]
    before = model_sha256(model)
    assert before != hashlib.sha256(model.read_bytes()).hexdigest()
    flip_weights(model.parent / "weights.bin")
    assert model_sha256(model) != before
    single = tmp_path / "single.onnx"
    single.write_bytes(build_default_model())
    assert external_data_files(single) == []
    assert model_sha256(single) == hashlib.sha256(single.read_bytes()).hexdigest()


@pytest.mark.parametrize("how", ["missing", "outside"])
def test_external_data_that_is_missing_or_outside_is_refused(tmp_path: Path, how: str) -> None:
    if how == "missing":
        model = external_model(tmp_path / "net")
        (model.parent / "weights.bin").unlink()
        words = "which is missing"
    else:
        import onnx

        model = external_model(tmp_path / "net")
        (tmp_path / "other").mkdir()
        os.replace(model.parent / "weights.bin", tmp_path / "other" / "w.bin")
        m = onnx.load(str(model), load_external_data=False)
        for t in m.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = "../other/w.bin"  # a crafted model: onnx itself never writes this
        model.write_bytes(m.SerializeToString())
        words = "outside its directory"
    with pytest.raises(EngineError, match=words):
        compile_engine(
            model_path=model,
            calibration_path=None,
            precision="fp32",
            out_dir=tmp_path / "e",
            backend="onnxruntime",
        )


def test_the_push_sends_the_data_beside_the_model(tmp_path: Path) -> None:
    build, store_root, _ = _staged(tmp_path)
    model = external_model(tmp_path / "net")
    p = push.plan_push(
        build_dir=build, store_root=store_root, root="/c", model=model, state_dir=tmp_path
    )
    rels = sorted(r for r in p.inputs if r.startswith("inputs/"))
    assert len(rels) == 2, rels
    folder = rels[0].rsplit("/", 1)[0]
    assert rels == [f"{folder}/model.onnx", f"{folder}/weights.bin"]
    assert p.inputs[f"{folder}/weights.bin"][0] == model.parent / "weights.bin"
    assert p.remote["model"] == f"/c/{folder}/model.onnx"
    flip_weights(model.parent / "weights.bin")
    again = push.plan_push(
        build_dir=build, store_root=store_root, root="/c", model=model, state_dir=tmp_path
    )
    assert not set(again.inputs) & set(rels)  # changed data: a new folder, sent again


def test_a_model_with_external_data_builds_on_the_companion(
    cb: Cb, sshd: object, tmp_path: Path
) -> None:
    """Through a real sshd: the data file is pushed beside the model, and the companion's build uses it."""
    from tests.scenarios.test_companion import SSHD, Companion

    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} (openssh-server) is not installed")
    if getattr(sshd, "proc", None) is None:
        sshd.start()  # type: ignore[attr-defined]
    c = Companion.under(tmp_path, cb, sshd)  # type: ignore[arg-type]
    model = external_model(tmp_path / "net")
    r = c.build(write_flight(tmp_path / "f.json"), MODEL=str(model))
    assert r.code == 0, r.stderr
    push_report = r.report["push"]
    assert push_report["objects"] == push_report["tile_objects"] + 2  # model.onnx and weights.bin
    pushed = list((c.dir / "inputs").glob("*/weights.bin"))
    assert (
        len(pushed) == 1 and pushed[0].read_bytes() == (model.parent / "weights.bin").read_bytes()
    )
    assert (pushed[0].parent / "model.onnx").read_bytes() == model.read_bytes()
    assert c.verify().code == 0
