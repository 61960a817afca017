"""The signed manifest that makes a cache directory a published cache.

``<cache>/manifest.json`` is a TUF-style envelope (see
:mod:`cachebuild.release.signing`) whose ``signed`` part lists every artifact's
length and SHA-256, like a Debian Release file::

    {"signed": {"_type": "cachebuild/manifest", "spec_version": 1,
                "version": 3, "expires": "2030-01-01T00:00:00Z",
                "built_at": "2029-12-01T12:00:00Z",
                "build_id": "<sha256 of the identity>",
                "identity": {...}, "info": {...},
                "targets": {"tiles.mbtiles": {"length": 1234,
                                              "hashes": {"sha256": "..."}}}},
     "signatures": [{"keyid": "...", "sig": "..."}]}

``version`` and ``expires`` let the drone refuse a stale or replayed cache.
``signer.pub`` (the signer's OpenSSH public key) is written next to it for
the operator's convenience only: a verifier must trust its own copy of the
operator's key, never the one shipped inside the cache.

Target paths are relative, ``/``-separated and must stay inside the cache
directory: absolute paths, ``..``, and symlinks that lead outside are
refused both when writing and when verifying.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachebuild._util.cpus import usable_cpus
from cachebuild._util.fs import atomic_write
from cachebuild._util.hashing import canonical_json, is_sha256_hex, sha256_file
from cachebuild._util.statcache import HASH_CACHE_NAME, HashCache, doit_file_checker
from cachebuild.errors import BuildError, UsageError
from cachebuild.release.produced import check_signable
from cachebuild.release.signing import keyid, sign_envelope, write_public_key
from cachebuild.release.verify import (
    _RESERVED,
    MANIFEST_NAME,
    MANIFEST_TYPE,
    SIGNER_PUB_NAME,
    SPEC_VERSION,
    TIME_FORMAT,
    VERIFY_REASONS,
    _escapes,
    _format_time,
    _relpath_problem,
    canonical_value,
    read_manifest,
    verify_cache,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "MANIFEST_NAME",
    "SIGNER_PUB_NAME",
    "MANIFEST_TYPE",
    "SPEC_VERSION",
    "TIME_FORMAT",
    "build_identity",
    "write_manifest",
    "read_manifest",
    "verify_cache",
    "VERIFY_REASONS",
    "HASH_CACHE_NAME",
    "HashCache",
    "doit_file_checker",
]

log = logging.getLogger(__name__)


# -- identity ----------------------------------------------------------------


def _check_sha256(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not is_sha256_hex(value):
        raise UsageError(f"{name} must be a 64-character lower-case hex SHA-256, got {value!r}")


def _check_identity(
    bbox: Sequence[float],
    zooms: Sequence[int],
    takeoff_origin: dict[str, Any] | None,
    flight_id: str | None,
    calibration_sha256: str | None,
    tiles_sha256: str,
    engine_key: str,
) -> None:
    """Raise :class:`UsageError` naming the first malformed field of :func:`build_identity`."""
    if isinstance(bbox, (str, bytes)) or len(bbox) != 4:
        raise UsageError(f"bbox must be 4 numbers (west, south, east, north), got {bbox!r}")
    for v in bbox:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UsageError(f"bbox must hold finite numbers, got {bbox!r}")
    if not zooms or any(isinstance(z, bool) or not isinstance(z, int) or z < 0 for z in zooms):
        raise UsageError(f"zooms must be a non-empty list of non-negative integers, got {zooms!r}")
    if takeoff_origin is not None and not isinstance(takeoff_origin, dict):
        raise UsageError(
            f"takeoff_origin must be a dict or None, got {type(takeoff_origin).__name__}"
        )
    if flight_id is not None and not isinstance(flight_id, str):
        raise UsageError(f"flight_id must be a string or None, got {type(flight_id).__name__}")
    _check_sha256("calibration_sha256", calibration_sha256, optional=True)
    _check_sha256("tiles_sha256", tiles_sha256)
    if not isinstance(engine_key, str) or not engine_key:
        raise UsageError(f"engine_key must be a non-empty string, got {engine_key!r}")


def build_identity(
    *,
    bbox: Sequence[float],
    zooms: Sequence[int],
    takeoff_origin: dict[str, Any] | None,
    flight_id: str | None,
    calibration_sha256: str | None,
    tiles_sha256: str,
    engine_key: str,
) -> tuple[str, dict[str, Any]]:
    """The identity of a build and its id.

    Everything that determines the cache's content goes in: the same
    identity means the same cache, so the id names a build exactly.

    Parameters
    ----------
    bbox
        ``(west, south, east, north)`` in degrees (stored as floats).
    zooms
        Zoom levels (stored sorted, without duplicates).
    takeoff_origin
        The takeoff origin as a JSON-able dict, or None.
    flight_id
        The flight, or None for a bbox-only build.
    calibration_sha256
        SHA-256 of the calibration set, or None.
    tiles_sha256
        SHA-256 of the tile set (e.g. of ``tiles.mbtiles``).
    engine_key
        The inference engine's cache key.

    Returns
    -------
    tuple[str, dict]
        ``(build_id, identity)``: build_id is the hex SHA-256 of the
        identity's canonical JSON.

    Raises
    ------
    UsageError
        A field is malformed; the message names it.

    Examples
    --------
    >>> bid, ident = build_identity(bbox=(8, 47, 8.1, 47.1), zooms=[17, 16],
    ...     takeoff_origin=None, flight_id="F1", calibration_sha256=None,
    ...     tiles_sha256="0" * 64, engine_key="cpu-fp32")
    >>> ident["zooms"], len(bid)
    ([16, 17], 64)
    """
    _check_identity(
        bbox, zooms, takeoff_origin, flight_id, calibration_sha256, tiles_sha256, engine_key
    )
    identity: dict[str, Any] = {
        "bbox": [float(v) for v in bbox],
        "zooms": sorted(set(zooms)),
        "takeoff_origin": takeoff_origin,
        "flight_id": flight_id,
        "calibration_sha256": calibration_sha256,
        "tiles_sha256": tiles_sha256,
        "engine_key": engine_key,
    }
    try:
        payload = canonical_json(identity)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"takeoff_origin is not JSON-representable: {exc}") from exc
    return hashlib.sha256(payload).hexdigest(), identity


# -- writing -----------------------------------------------------------------


def write_manifest(
    *,
    cache_dir: Path,
    artifacts: Sequence[str],
    identity: dict[str, Any],
    build_id: str,
    info: dict[str, Any],
    key: Ed25519PrivateKey,
    version: int,
    expires_at: datetime,
    out_name: str = MANIFEST_NAME,
    hash_cache: str | os.PathLike[str] | None = None,
    check_produced: bool = False,
) -> dict[str, Any]:
    """Hash the artifacts, sign the manifest and publish it in ``cache_dir``; returns the envelope.

    ``signer.pub`` is written first, ``out_name`` last; both atomically
    (temporary file, then ``os.replace``), so a reader sees either the old
    manifest or the complete new one.  The signed part is stored as its
    canonical value (``17.0`` becomes ``17``), so the stored manifest parses
    to exactly the value whose canonical JSON was signed (see
    :func:`cachebuild.release.verify.verify_cache`).

    Parameters
    ----------
    artifacts
        Paths relative to ``cache_dir`` (``"engine/engine.onnx"``), ``/``-separated.
    identity, build_id
        From :func:`build_identity`; ``info``: free-form JSON-able facts for the operator.
    key, version, expires_at
        The Ed25519 signing key; the manifest version, >= 1 (the drone can
        refuse one lower than it saw); a timezone-aware expiry in the future,
        written in whole UTC seconds.
    hash_cache
        A :class:`HashCache` file (the build's ``<build>/.sha256-cache.json``):
        an artifact whose stat is unchanged since it was hashed is not read
        again, and the others' hashes are remembered there.  None hashes every
        artifact.  Artifacts that must be read are hashed in parallel threads.
    check_produced
        Refuse (and forget, so the next build makes it again) an artifact
        whose hash is not the one its task recorded when it wrote it
        (:func:`cachebuild.release.produced.check_signable`).

    Raises
    ------
    BuildError
        ``phase="manifest"``: a path is absolute, contains ``..``, escapes
        through a symlink, is missing or is not a file; or an argument is malformed.
    UsageError
        ``key`` is not an Ed25519 private key.
    """
    cache_dir = Path(cache_dir)
    now = datetime.now(timezone.utc)
    _check_manifest_args(cache_dir, version, expires_at, build_id, now)
    checked = _checked_artifacts(cache_dir, artifacts)
    targets: dict[str, dict[str, Any]] = {
        rel: {"length": size, "hashes": {"sha256": digest}}
        for rel, (digest, size) in zip(
            checked, _hash_all([cache_dir / rel for rel in checked], hash_cache)
        )
    }

    if check_produced:
        check_signable(cache_dir, {rel: meta["hashes"]["sha256"] for rel, meta in targets.items()})

    signed: dict[str, Any] = {
        "_type": MANIFEST_TYPE,
        "spec_version": SPEC_VERSION,
        "version": version,
        "expires": _format_time(expires_at),
        "built_at": _format_time(now),
        "build_id": build_id,
        "identity": identity,
        "targets": targets,
        "info": info,
    }
    return _sign_and_publish(cache_dir, out_name, signed, key)


def _fail(message: str) -> BuildError:
    return BuildError(message, phase="manifest")


def _check_manifest_args(
    cache_dir: Path, version: int, expires_at: datetime, build_id: str, now: datetime
) -> None:
    """Raise a manifest-phase :class:`BuildError` for the first malformed argument of :func:`write_manifest`."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _fail(f"manifest version must be an integer >= 1, got {version!r}")
    if not isinstance(expires_at, datetime) or expires_at.tzinfo is None:
        raise _fail(f"manifest expiry must be a timezone-aware datetime, got {expires_at!r}")
    if expires_at <= now:
        raise _fail(f"manifest expiry {_format_time(expires_at)} is not in the future")
    _check_sha256("build_id", build_id)
    if not cache_dir.is_dir():
        raise _fail(f"cache directory {cache_dir} does not exist")


def _checked_artifacts(cache_dir: Path, artifacts: Sequence[str]) -> list[str]:
    """``artifacts``, each a safe relative path to a regular file inside ``cache_dir``, listed once."""
    root_real = os.path.realpath(cache_dir)
    checked: list[str] = []
    for rel in artifacts:
        problem = _relpath_problem(rel)
        if problem is not None:
            raise _fail(f"artifact path {rel!r} {problem}")
        if rel in _RESERVED:
            raise _fail(f"artifact path {rel!r} is reserved for the manifest itself")
        if rel in checked:
            raise _fail(f"artifact path {rel!r} is listed twice")
        path = cache_dir / rel
        if _escapes(root_real, path):
            raise _fail(f"artifact {rel} resolves outside {cache_dir} (symlink)")
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "is missing"
            err = _fail(f"artifact {rel} {what} in {cache_dir}")
            err.remedy = (
                "doit clean, then build-cache again (the store is kept: nothing is fetched again)"
            )
            raise err
        checked.append(rel)
    return checked


def _sign_and_publish(
    cache_dir: Path, out_name: str, signed: dict[str, Any], key: Ed25519PrivateKey
) -> dict[str, Any]:
    """Sign ``signed``; write ``signer.pub``, then the manifest ``out_name``; the envelope."""
    try:
        envelope = sign_envelope(canonical_value(signed), key)
        text = json.dumps(envelope, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError) as exc:
        raise _fail(f"manifest identity or info is not JSON-representable: {exc}") from exc

    write_public_key(cache_dir / SIGNER_PUB_NAME, key.public_key())
    atomic_write(cache_dir / out_name, (text + "\n").encode("utf-8"), durable=True)
    log.info(
        "wrote %s: version %d, %d targets, build %s, keyid %s",
        cache_dir / out_name,
        signed["version"],
        len(signed["targets"]),
        signed["build_id"][:12],
        keyid(key.public_key()),
    )
    return envelope


def _hash_all(
    paths: list[Path], cache_file: str | os.PathLike[str] | None
) -> list[tuple[str, int]]:
    """``(sha256, size)`` of each file, in order; remembered ones from ``cache_file``, others in threads."""
    from concurrent.futures import ThreadPoolExecutor

    cache = HashCache(cache_file) if cache_file is not None else None
    hash_one = cache.sha256 if cache is not None else sha256_file
    # the big files first, so the pool's threads finish together
    order = sorted(range(len(paths)), key=lambda i: -paths[i].stat().st_size)
    workers = max(1, min(len(paths), usable_cpus(), 8))
    if workers == 1:
        done = {i: hash_one(paths[i]) for i in order}
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="manifest-hash") as pool:
            done = dict(zip(order, pool.map(hash_one, [paths[i] for i in order])))
    if cache is not None:
        cache.settle()  # files written moments ago: hashed once more now, not by the next run
        cache.save()
        log.info(
            "hashed %d artifacts, %d remembered from %s", cache.misses, cache.hits, cache.path.name
        )
    return [done[i] for i in range(len(paths))]
