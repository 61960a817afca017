"""The resolved inputs of one build: settings, flight, area and the values
each artifact depends on.

Resolving happens before the lock is taken, so a mistyped flight never
blocks anyone.  Everything here is cheap: the warm no-op resolves a plan,
so no numpy, onnxruntime or cryptography on this path (the signing key's id
is cached against the key file's stat).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_write
from cachebuild._util.statcache import stat_key, still_valid
from cachebuild.engine.backends import engine_environment as resolve
from cachebuild.engine.backends import select_backend
from cachebuild.engine.model import DEFAULT_MODEL_VERSION
from cachebuild.errors import UsageError
from cachebuild.inputs.area import check_area
from cachebuild.inputs.config import Settings
from cachebuild.inputs.flight import flight_area, flight_record, load_flight_file, looks_like_uuid
from cachebuild.inputs.flights_api import TOKEN_ENV, fetch_flight, load_saved_answer, save_answer
from cachebuild.providers.pushed import pushed_dir
from cachebuild.release.devkey import dev_key_home, refuse_resign
from cachebuild.release.signing import (
    LEGACY_PASSPHRASE_ENV,
    PASSPHRASE_ENV,
    ensure_dev_key,
    keyid,
    load_private_key,
)

#: The compiled engine's file name per backend.
ENGINE_FILES = {"onnxruntime": "engine.onnx", "tensorrt": "engine.plan"}

__all__ = [
    "ENGINE_FILES",
    "BuildPlan",
    "resolve_plan",
    "provider_key",
    "engine_environment",
    "cached_keyid",
    "resolve_flight",
]


@dataclass(frozen=True)
class BuildPlan:
    """A build's inputs, resolved.  ``flight`` is None only for listing tasks."""

    settings: Settings
    flight: Any  # cachebuild.inputs.flight.Flight | None
    record: dict[str, Any] | None
    bbox: tuple[float, float, float, float] | None
    provider_key: str
    model_path: Path
    builtin_model: bool
    key_path: Path
    keyid: str | None
    engine_env: dict[str, str]
    flight_source: str | None = None

    @property
    def engine_file(self) -> str:
        """The engine's file name in ``engine/`` for the backend BACKEND resolved to."""
        return ENGINE_FILES.get(self.engine_env.get("backend", self.settings.backend), "engine.bin")

    @property
    def paths(self):
        return self.settings.paths


def resolve_flight(settings: Settings) -> tuple[Any, str]:
    """The flight named by ``FLIGHT``: a file, or a flight id for the Flights API.

    Returns ``(Flight, source)`` with source ``file``, ``api`` or ``offline``.
    """

    raw = settings.flight
    if not raw:
        raise UsageError(
            "FLIGHT is not set",
            remedy="name a flight plan file or a flight id: doit build-cache FLIGHT=examples/flights/demo.json",
        )
    if os.path.exists(raw) or raw.lower().endswith(".json") or os.sep in raw:
        return load_flight_file(raw), "file"
    if not looks_like_uuid(raw):
        raise UsageError(
            f"FLIGHT={raw!r} is neither an existing flight file nor a flight id (a UUID)",
            remedy="give the path of a flight plan file, or the flight's UUID",
        )

    flight_id = raw.lower()
    if len(flight_id) == 32:
        flight_id = "-".join(
            (flight_id[:8], flight_id[8:12], flight_id[12:16], flight_id[16:20], flight_id[20:])
        )
    if settings.offline:
        flight, _ = load_saved_answer(settings.paths.state, flight_id)
        return flight, "offline"
    if not settings.flights_api_url:
        raise UsageError(
            f"FLIGHT={raw} is a flight id, but FLIGHTS_API_URL is not set",
            remedy="set FLIGHTS_API_URL (and FLIGHTS_API_TOKEN in the environment), "
            "or OFFLINE=1 to use the answer saved by the last online build",
        )
    flight, record = fetch_flight(
        flight_id,
        url=settings.flights_api_url,
        token=settings.env.get(TOKEN_ENV) or None,
        timeout_s=settings.flights_api_timeout,
    )
    save_answer(settings.paths.state, flight_id, record)
    return flight, "api"


def provider_key(spec: str) -> str:
    """A cheap, secret-free identity of the provider, used as a dependency.

    An MBTiles file is identified by its absolute path, size and mtime, so
    replacing the file re-runs the tiles phase without hashing it on every
    no-op.  URL templates are keys as written (the API key is a ``{key}``
    placeholder, never its value).
    """
    if spec.startswith("pushed:"):  # companion mode: what the workstation pushed
        d = pushed_dir(spec)
        try:
            st = (d / "tileset.json").stat()
        except OSError:
            raise UsageError(f"PROVIDER={spec}: no pushed tile set (tileset.json) there") from None
        return f"pushed:{d}:{st.st_size}:{st.st_mtime_ns}"
    if spec.endswith(".mbtiles") and "://" not in spec:
        p = Path(spec).expanduser().absolute()
        try:
            st = p.stat()
        except (OSError, ValueError):  # ValueError: a NUL byte
            raise UsageError(f"PROVIDER={spec}: no such MBTiles file") from None
        return f"mbtiles:{p}:{st.st_size}:{st.st_mtime_ns}"
    return spec


def engine_environment(backend: str) -> dict[str, str]:
    """Backend (``auto`` resolved), version and device, read without importing the backend."""

    return resolve(backend)


def cached_keyid(key_path: Path, cache_file: Path) -> str:
    """The signing key's id (sha256 of its public key), cached by the key file's stat.

    Only the public id is cached, never key material.
    """

    st = key_path.stat()
    stamp = {
        "path": str(key_path),
        "stat": stat_key(st),
    }  # ctime too: a key rotated in place is seen
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("stamp") == stamp and still_valid(
            st, stamp["stat"], cached.get("recorded_ns")
        ):
            return str(cached["keyid"])
    except (OSError, ValueError, KeyError):
        pass

    kid = keyid(load_private_key(key_path).public_key())
    record = {"stamp": stamp, "keyid": kid, "recorded_ns": time.time_ns()}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, json.dumps(record).encode(), durable=False)
    except OSError:  # only a cache (a full disk, say): the key was read; the build says the rest
        pass
    return kid


def _keyid(settings: Settings, key_path: Path) -> str:
    try:
        return cached_keyid(key_path, settings.paths.state / "keyid.json")
    except OSError as exc:
        raise UsageError(f"KEY={key_path}: cannot read the key ({exc.strerror})") from None


def _signing_key(settings: Settings, warn: Any) -> tuple[Path, str]:
    """The key that signs and its id: ``KEY``, else the development key (cachebuild.release.devkey).

    Without ``KEY``, a published cache another key signed is refused here,
    before the lock and before a development key is made.
    """
    if settings.key is not None:
        if settings.env.get(LEGACY_PASSPHRASE_ENV) and not settings.env.get(PASSPHRASE_ENV):
            warn(
                f"{LEGACY_PASSPHRASE_ENV} is deprecated: set {PASSPHRASE_ENV} in the environment instead"
            )
        return settings.key, _keyid(settings, settings.key)
    path = dev_key_home(settings)
    if not path.exists():
        refuse_resign(settings, path, None)

        _, created = ensure_dev_key(path)
        if created:
            warn(
                f"no KEY given: made a development signing key at {path} (mode 0600); "
                "set KEY=<your Ed25519 key> for caches that fly"
            )
        return path, _keyid(settings, path)
    keyid = _keyid(settings, path)
    refuse_resign(settings, path, keyid)
    warn(f"no KEY given: signing with the development key at {path}")
    return path, keyid


def resolve_plan(settings: Settings, *, with_flight: bool = True, warn: Any = None) -> BuildPlan:
    """Resolve the flight and every value the build depends on.

    With ``with_flight=False`` (``doit list``) nothing is read or created.
    """
    warn = warn or (lambda msg: None)
    flight = record = bbox = None
    source = None
    if with_flight:
        flight, source = resolve_flight(settings)
        record = flight_record(flight)
        bbox = tuple(flight_area(flight, settings.buffer_m))

        check_area(settings, bbox)  # MAX_TILES and free disk, before the lock and any download
    if settings.model is not None:
        model_path, builtin = settings.model, False
    else:
        model_path = settings.paths.build / "model" / f"{DEFAULT_MODEL_VERSION}.onnx"
        builtin = True
    keyid = None
    key_path = settings.key or settings.dev_key
    if with_flight and settings.companion is None:  # with COMPANION, the companion signs
        key_path, keyid = _signing_key(settings, warn)
    if with_flight and settings.companion is None and settings.backend == "tensorrt":
        select_backend("tensorrt")  # exit 21 naming what is missing, before any tile is fetched
    return BuildPlan(
        settings=settings,
        flight=flight,
        record=record,
        bbox=bbox,  # type: ignore[arg-type]
        provider_key=provider_key(settings.provider) if with_flight else settings.provider,
        model_path=model_path,
        builtin_model=builtin,
        key_path=key_path,
        keyid=keyid,
        engine_env=engine_environment(settings.backend),
        flight_source=source,
    )


def digest(obj: Any) -> str:
    """Short hex digest of a JSON-able value (for logs, not security)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
