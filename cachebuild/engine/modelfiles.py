"""The files that make up an ONNX model: ``model.onnx`` and its external data.

A model saved with external data (``onnx.save_model(...,
save_as_external_data=True)``) keeps its tensors in files beside it
(``weights.bin``), named relative to the model.  Those files are part of
the model's identity (the engine key hashes them) and travel with it
(doit's file dependencies, the companion push).  They are listed with
``onnx.external_data_helper`` from the graph alone, tensors not loaded, and
the list is remembered by the model file's stat (:mod:`cachebuild._util.statcache`)
so that the warm no-op does not parse the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_write
from cachebuild._util.hashing import canonical_json, sha256_file
from cachebuild._util.statcache import stat_key, still_valid
from cachebuild.errors import EngineError

__all__ = [
    "external_data_files",
    "external_data_files_cached",
    "model_sha256",
    "remembered",
    "self_contained",
]

#: How an external data entry's key is encoded (StringStringEntryProto field 1, "location"):
#: a model without these bytes has no external data.
_LOCATION_KEY = b"\x0a\x08location"
_REMEDY = "keep the model's external data files beside it, as onnx.save_model wrote them, or save the model in one file"


def external_data_files(model_path: str | os.PathLike[str]) -> list[str]:
    """The external data locations of ``model_path``, relative to its directory, sorted.

    Raises
    ------
    EngineError
        The model cannot be parsed, or a location is absolute, leaves the
        model's directory, or does not exist.
    """
    model_path = Path(model_path)
    try:
        if _LOCATION_KEY not in model_path.read_bytes():
            return []  # no tensor names a location: nothing to parse (and numpy not imported)
        import onnx

        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise EngineError(
            f"model file {model_path} is not a valid ONNX model: {type(exc).__name__}",
            remedy="check that MODEL is an ONNX file",
        ) from None
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    locations = sorted(
        {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}
    )
    root = os.path.realpath(model_path.parent)
    for loc in locations:
        full = os.path.realpath(model_path.parent / loc)
        if os.path.isabs(loc) or os.path.commonpath([root, full]) != root:
            raise EngineError(
                f"model {model_path} names external data {loc!r} outside its directory",
                remedy=_REMEDY,
            )
        if not os.path.isfile(full):
            raise EngineError(
                f"model {model_path} names external data {loc!r}, which is missing", remedy=_REMEDY
            )
    return locations


def external_data_files_cached(
    model_path: str | os.PathLike[str], cache_file: str | os.PathLike[str]
) -> list[str]:
    """:func:`external_data_files`, remembered in ``cache_file`` while the model's stat holds.

    A model that cannot be listed gives an empty list here: the engine
    task then fails with the error, where it belongs.
    """

    def listed(path: Path) -> list[str]:
        try:
            return external_data_files(path)
        except EngineError:
            return []

    return [str(x) for x in remembered(model_path, cache_file, listed, [])]


def remembered(
    model_path: str | os.PathLike[str],
    cache_file: str | os.PathLike[str],
    probe: Callable[[Path], Any],
    missing: Any,
) -> Any:
    """``probe(model_path)`` (JSON-able), kept in ``cache_file`` while the model's stat holds.

    ``missing`` when the model does not exist.  So the warm no-op reads no model.
    """
    model_path = Path(model_path)
    try:
        st = os.stat(model_path)
    except OSError:
        return missing
    key = str(model_path.absolute())
    try:
        cached = json.loads(Path(cache_file).read_text()).get(key)
        if isinstance(cached, dict) and still_valid(
            st, cached.get("stat"), cached.get("recorded_ns")
        ):
            return cached["value"]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    value = probe(model_path)
    entry = {"stat": stat_key(st), "recorded_ns": time.time_ns(), "value": value}
    try:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, json.dumps({key: entry}).encode(), durable=False)
    except OSError:  # only a cache
        pass
    return value


def model_sha256(model_path: str | os.PathLike[str]) -> str:
    """The model's identity: the file's SHA-256, or, with external data, a hash over it and every data file.

    A self-contained model keeps the plain SHA-256 of its file (engine keys
    made before are still valid).
    """
    model_path = Path(model_path)
    digest = sha256_file(model_path)[0]
    files = external_data_files(model_path)
    if not files:
        return digest
    doc = {
        "model": digest,
        "external_data": {loc: sha256_file(model_path.parent / loc)[0] for loc in files},
    }
    return hashlib.sha256(b"cachebuild-model-v1\0" + canonical_json(doc)).hexdigest()


def self_contained(model_path: str | os.PathLike[str]) -> str | bytes:
    """The model as ONNX Runtime should read it: its path, or, with external data, its bytes with the data in.

    ONNX Runtime's saved optimisation keeps external initializers pointing
    at files beside the model; from bytes with the data loaded, the engine
    it saves is one self-contained file.
    """
    if not external_data_files(model_path):
        return str(model_path)
    import onnx

    return onnx.load(str(model_path), load_external_data=True).SerializeToString()
