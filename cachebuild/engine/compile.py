"""Compile the descriptor network for the device that runs it.

An *engine* is the network prepared for one backend on one device, in a
directory of its own::

    <engine_dir>/engine.onnx   the compiled network (the name is the backend's
                               choice: a TensorRT backend writes a .plan)
    <engine_dir>/engine.json   what was compiled, from what, for what; written
                               last, so its presence means the engine is whole

Callers only see :class:`EngineBackend` and :class:`EngineRunner`; the
backends are ONNX Runtime (CPU, or its CUDA provider where onnxruntime-gpu
sees a GPU) and TensorRT (:mod:`cachebuild.engine.tensorrt.backend`).  ``BACKEND=auto`` takes
TensorRT where it is installed and a GPU is present, else ONNX Runtime
(:mod:`cachebuild.engine.backends`).  An engine is identified by :func:`engine_key`: the hashes of the model and calibration *bytes*, the precision, the
backend and its version, the device and, for TensorRT, the build settings
(profile shapes, workspace, flags), never a file name (ONNX Runtime's
TensorRT provider keys its cache on the model's file name, a known trap).
An engine that runs only where it was built (TensorRT's) has its key
checked against the machine when it is loaded.

onnx, onnxruntime, tensorrt and CUDA libraries are imported inside the
functions that use them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachebuild._util.fs import atomic_write
from cachebuild._util.hashing import sha256_file
from cachebuild.engine.backends import BACKEND_CHOICES, BACKENDS, MachineProbes, select_backend
from cachebuild.engine.interface import (
    DEFAULT_BACKEND,
    ENGINE_JSON,
    EngineBackend,
    EngineRunner,
    check_precision,
    documented_input,
    engine_key,
    read_engine_json,
)
from cachebuild.engine.modelfiles import external_data_files, model_sha256
from cachebuild.engine.ort import OnnxRuntimeBackend
from cachebuild.engine.tensorrt.backend import TensorRTBackend
from cachebuild.engine.tensorrt.policy import check_environment
from cachebuild.errors import EngineError

if TYPE_CHECKING:
    pass

__all__ = ["compile_engine", "get_backend", "load_engine"]


def get_backend(name: str, probes: MachineProbes | None = None, **options: Any) -> EngineBackend:
    """The backend called ``name`` (or chosen by ``auto``), ready to compile or load.

    Parameters
    ----------
    name
        A name from :data:`BACKEND_CHOICES`.
    probes
        :class:`MachineProbes`; probed here when omitted.
    options
        TensorRT's ``workspace`` and ``timing_cache_dir``; ignored by ONNX Runtime.

    Raises
    ------
    EngineError
        Exit 21: for an unknown name (listing the known ones), for
        ``tensorrt`` where its package or a GPU is missing (naming which),
        or when the chosen backend's package is missing.
    """
    if name not in BACKEND_CHOICES:
        raise EngineError(
            f"unknown BACKEND={name!r}; known backends: {', '.join(BACKENDS)} (or auto)",
            remedy="set BACKEND=auto",
        )
    if name == "onnxruntime" and probes is None and importlib.util.find_spec("onnxruntime") is None:
        raise EngineError(
            "BACKEND=onnxruntime, but onnxruntime is not installed here",
            remedy="pip install onnxruntime",
        )
    choice = select_backend(name, probes)
    if choice.backend == "tensorrt":
        kw = {
            k: options[k] for k in ("workspace", "timing_cache_dir") if options.get(k) is not None
        }
        return TensorRTBackend(**kw)
    if importlib.util.find_spec("onnxruntime") is None:
        raise EngineError(
            f"BACKEND={name} needs onnxruntime, which is not installed here",
            remedy="pip install onnxruntime",
        )
    return OnnxRuntimeBackend(provider=choice.provider)


def _check_onnx(model_path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(model_path))
    except Exception as exc:
        raise EngineError(
            f"model file {model_path} is not a valid ONNX model: {exc}",
            remedy="set MODEL to an ONNX file (or leave it unset for the default network)",
        ) from exc


def compile_engine(
    *,
    model_path: str | os.PathLike[str],
    calibration_path: str | os.PathLike[str] | None,
    precision: str,
    backend: str = DEFAULT_BACKEND,
    out_dir: str | os.PathLike[str],
    workspace: int | None = None,
    timing_cache_dir: str | os.PathLike[str] | None = None,
    probes: MachineProbes | None = None,
) -> dict[str, Any]:
    """Compile ``model_path`` for this machine into ``out_dir``.

    Parameters
    ----------
    model_path, calibration_path
        The ONNX network; calibration data for int8 (hashed into the key
        whatever the precision), or ``None``.
    precision, backend
        ``fp32``, ``fp16`` or ``int8``, which the backend must support; a
        name from :data:`cachebuild.engine.backends.BACKEND_CHOICES`
        (``auto``: see :func:`cachebuild.engine.backends.select_backend`).
    out_dir
        The engine directory (created).  ``engine.json`` is removed first
        and written last, atomically.
    workspace, timing_cache_dir
        TensorRT's builder workspace limit (bytes) and where its timing
        cache persists between builds.
    probes
        :class:`MachineProbes`; probed here when omitted.

    Returns the contents of ``engine.json``: ``key``, ``backend``,
    ``backend_version``, ``device``, ``precision``, ``model_sha256``,
    ``calibration_sha256``, ``engine_file``, ``input``, ``output``,
    ``descriptor_dim``; TensorRT adds ``build`` (in the key),
    ``environment`` (checked at load) and ``engine_sha256``.  Raises
    :class:`EngineError` naming the file, precision or backend at fault.
    """
    be = get_backend(backend, probes, workspace=workspace, timing_cache_dir=timing_cache_dir)
    check_precision(be, precision)
    model_path, calibration = _checked_inputs(model_path, calibration_path)
    model_digest = model_sha256(model_path)  # external data files included
    calibration_sha256 = sha256_file(calibration)[0] if calibration is not None else None
    version, device = be.version(), be.device()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # its absence marks the directory as incomplete until the new engine is in
    (out / ENGINE_JSON).unlink(missing_ok=True)
    info = be.compile(model_path, calibration, precision, out)
    key = engine_key(
        model_digest, calibration_sha256, precision, be.name, version, device, info.build
    )
    record: dict[str, Any] = {
        "key": key,
        "backend": be.name,
        "backend_version": version,
        "device": device,
        "precision": precision,
        "model_sha256": model_digest,
        "calibration_sha256": calibration_sha256,
        "engine_file": info.engine_file,
        "input": documented_input(info.input),  # size, channel order, scaling, layout
        "output": info.output,
        "descriptor_dim": info.descriptor_dim,
    }
    if info.build is not None:
        record["build"] = info.build
    if info.environment is not None:
        record["environment"] = info.environment
    record.update(info.extra)
    atomic_write(
        out / ENGINE_JSON, json.dumps(record, indent=1, sort_keys=True).encode(), durable=False
    )
    return record


def _checked_inputs(
    model_path: str | os.PathLike[str], calibration_path: str | os.PathLike[str] | None
) -> tuple[Path, Path | None]:
    """The model and calibration files as paths, once they exist and the model checks out.

    Missing or escaping external data is named before the ONNX checker's words.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise EngineError(
            f"model file {model_path} does not exist",
            remedy="set MODEL to an ONNX file (or leave it unset for the default network)",
        )
    calibration = Path(calibration_path) if calibration_path is not None else None
    if calibration is not None and not calibration.is_file():
        raise EngineError(
            f"calibration file {calibration} does not exist",
            remedy="set CALIBRATION to an existing file, or leave it unset",
        )
    external_data_files(model_path)
    _check_onnx(model_path)
    return model_path, calibration


def load_engine(engine_dir: str | os.PathLike[str], threads: int | None = None) -> EngineRunner:
    """Load the engine in ``engine_dir`` with the backend that compiled it.

    Parameters
    ----------
    engine_dir
        A directory written by :func:`compile_engine`.
    threads
        Threads the backend may use (ONNX Runtime intra-op threads);
        ``None`` for the backend's default.
    """
    record = read_engine_json(engine_dir)
    name = str(record["backend"])
    if name == "onnxruntime":  # the device in engine.json says which provider it was built for
        if importlib.util.find_spec("onnxruntime") is None:
            raise EngineError(
                f"the engine in {engine_dir} needs onnxruntime, which is not installed here",
                remedy="pip install onnxruntime",
            )
        provider = "cuda" if str(record.get("device", "")).startswith("cuda:") else "cpu"
        be: EngineBackend = OnnxRuntimeBackend(provider=provider)
    else:
        be = get_backend(name)
    if not getattr(be, "portable", True):
        _check_key(be, record, Path(engine_dir))
    return be.load(Path(engine_dir), threads=threads)


def _check_key(be: EngineBackend, record: dict[str, Any], engine_dir: Path) -> None:
    """The key check at load: the engine's key, derived again for this machine, must match.

    A TensorRT engine runs only on the GPU, TensorRT and CUDA it was built
    with; one built elsewhere is never loaded.
    """
    check = getattr(be, "environment", None)
    if callable(check) and record.get("environment") is not None:
        check_environment(record, check(), engine_dir)  # the readable message first
    here = engine_key(
        str(record.get("model_sha256")), record.get("calibration_sha256"), str(record.get("precision")),
        be.name, be.version(), be.device(), record.get("build"),
    )  # fmt: skip
    if here != record.get("key"):
        raise EngineError(
            f"the engine in {engine_dir} was built for {record.get('device')} with {record.get('backend')} "
            f"{record.get('backend_version')}; here it would be {be.device()} with {be.version()}: "
            "its key does not match this machine, so it is not loaded",
            remedy=f"delete {engine_dir} and run build-cache again: the engine is then built for this "
            "machine (a new TensorRT, CUDA or GPU model rebuilds it by itself)",
        )
