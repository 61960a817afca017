"""Reading and verifying a published cache's signed manifest.

Split from :mod:`cachebuild.release.manifest` (which writes it): the manifest's
constants, the rules for target paths, and :func:`verify_cache`, which
checks, beyond the signature, that the release holds exactly what the
manifest lists and that the stored manifest is the very value that was
signed (no number changed type).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

from cachebuild._util.hashing import canonical_json, is_sha256_hex, sha256_file
from cachebuild.errors import UsageError, VerifyError
from cachebuild.release.signing import verify_envelope

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "MANIFEST_NAME",
    "SIGNER_PUB_NAME",
    "MANIFEST_TYPE",
    "SPEC_VERSION",
    "TIME_FORMAT",
    "read_manifest",
    "verify_cache",
    "VERIFY_REASONS",
    "canonical_value",
]

MANIFEST_NAME = "manifest.json"
SIGNER_PUB_NAME = "signer.pub"
MANIFEST_TYPE = "cachebuild/manifest"
SPEC_VERSION = 1
#: UTC timestamps in the manifest, e.g. ``2030-01-01T00:00:00Z``.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

_RESERVED = frozenset({MANIFEST_NAME, SIGNER_PUB_NAME})


# -- paths -------------------------------------------------------------------


def _relpath_problem(rel: object) -> str | None:
    """Why ``rel`` is not an acceptable target path, or None if it is."""
    if not isinstance(rel, str) or not rel:
        return "is not a non-empty string"
    if "\\" in rel or "\x00" in rel:
        return "contains a backslash or NUL (use '/'-separated relative paths)"
    if rel.startswith("/") or PureWindowsPath(rel).drive:
        return "is absolute (targets are relative to the cache directory)"
    parts = rel.split("/")
    if ".." in parts:
        return "contains '..' (targets must stay inside the cache directory)"
    if any(part in ("", ".") for part in parts):
        return "is not normalized (empty or '.' component)"
    return None


def _escapes(root_real: str, path: Path) -> bool:
    """True if ``path``, symlinks resolved, lies outside ``root_real``."""
    real = os.path.realpath(path)
    return os.path.commonpath([root_real, real]) != root_real


def _format_time(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime(TIME_FORMAT)


# -- what was signed ----------------------------------------------------------


def canonical_value(value: Any) -> Any:
    """``value`` as its canonical JSON reads back: the value a signature over that JSON means.

    Canonical JSON writes ``17.0`` as ``17``; the writer stores this form,
    so the stored manifest parses to exactly the value whose bytes were
    signed, and :func:`_changed_type` can refuse any other.
    """
    return json.loads(canonical_json(value))


def _changed_type(stored: Any, signed: Any, where: str = "signed") -> str | None:
    """Where ``stored`` differs from ``signed`` in type or value (e.g. a float for an int), or None."""
    if type(stored) is not type(signed):
        return f"{where} is {json.dumps(stored)[:40]} ({type(stored).__name__}), signed as {json.dumps(signed)[:40]}"
    if isinstance(stored, dict):
        for k in stored:
            problem = _changed_type(stored[k], signed[k], f"{where}.{k}")
            if problem:
                return problem
    elif isinstance(stored, list):
        for i, (a, b) in enumerate(zip(stored, signed)):
            problem = _changed_type(a, b, f"{where}[{i}]")
            if problem:
                return problem
    elif stored != signed:
        return f"{where} is {stored!r}, signed as {signed!r}"
    return None


def _unlisted(cache_dir: Path, targets: dict[str, Any], name: str) -> str | None:
    """The first entry of ``cache_dir`` that is not a target, a directory above one, ``name`` or ``signer.pub``."""
    files = set(targets) | {name, SIGNER_PUB_NAME}
    dirs = {rel.rsplit("/", i)[0] for rel in targets for i in range(1, rel.count("/") + 1)}
    pending = [""]
    while pending:
        prefix = pending.pop()
        with os.scandir(cache_dir / prefix if prefix else cache_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{prefix}/{entry.name}" if prefix else entry.name
            if rel in files:
                continue  # a target, whatever it is now: its own check names what is wrong
            if rel in dirs and entry.is_dir(follow_symlinks=False):
                pending.append(rel)
            else:
                return rel + "/" if entry.is_dir(follow_symlinks=False) else rel
    return None


# -- reading and verifying ---------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            # Two parsers may keep different copies: refuse, never guess.
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def read_manifest(cache_dir: Path, *, name: str = MANIFEST_NAME) -> dict[str, Any]:
    """The manifest envelope in ``cache_dir``, parsed but NOT verified.

    Raises
    ------
    VerifyError
        No manifest (``no published cache at <dir>``), or it is not a JSON
        object (bad JSON, NaN/Infinity, duplicate keys).
    """
    path = Path(cache_dir) / name
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise VerifyError(f"no published cache at {cache_dir} (no {name})") from exc
    except OSError as exc:
        raise VerifyError(f"cannot read {path} ({exc.strerror or type(exc).__name__})") from exc
    try:
        envelope = json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_duplicates
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise VerifyError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(envelope, dict):
        raise VerifyError(f"{path} is not a JSON object")
    return envelope


def _parse_time(value: object, field: str) -> datetime:
    try:
        if not isinstance(value, str):
            raise ValueError
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        raise VerifyError(
            f"manifest field {field!r} is not a UTC time like 2030-01-01T00:00:00Z"
        ) from None


def _check_target(cache_dir: Path, root_real: str, rel: str, meta: object) -> None:
    if _relpath_problem(rel) is not None or rel in _RESERVED:
        raise VerifyError(f"manifest target {rel!r} {_relpath_problem(rel) or 'is reserved'}")
    if (
        not isinstance(meta, dict)
        or isinstance(meta.get("length"), bool)
        or not isinstance(meta.get("length"), int)
        or meta["length"] < 0
        or not isinstance(meta.get("hashes"), dict)
        or not is_sha256_hex(meta["hashes"].get("sha256"))
    ):
        raise VerifyError(f"{rel}: malformed target entry in the manifest")
    want_len, want_hash = meta["length"], meta["hashes"]["sha256"]
    path = cache_dir / rel
    if _escapes(root_real, path):
        raise VerifyError(f"{rel}: resolves outside the cache directory (symlink)")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VerifyError(f"{rel}: missing (manifest lists {want_len} bytes)") from None
    except OSError as exc:
        raise VerifyError(f"{rel}: cannot be read ({exc.strerror})") from exc
    if not path.is_file():
        raise VerifyError(f"{rel}: not a regular file")
    if st.st_size != want_len:
        raise VerifyError(
            f"{rel}: length mismatch (manifest {want_len} bytes, file {st.st_size} bytes)"
        )
    got_hash, got_len = sha256_file(path)
    if got_len != want_len:
        raise VerifyError(
            f"{rel}: length mismatch (manifest {want_len} bytes, file {got_len} bytes)"
        )
    if got_hash != want_hash:
        raise VerifyError(
            f"{rel}: sha256 mismatch (manifest {want_hash[:12]}…, file {got_hash[:12]}…)"
        )


def verify_cache(
    cache_dir: Path,
    trusted: Sequence[Ed25519PublicKey],
    *,
    now: datetime | None = None,
    min_version: int | None = None,
    name: str = MANIFEST_NAME,
) -> dict[str, Any]:
    """Verify the published cache in ``cache_dir``; return the signed manifest.

    Checks, in order: the manifest parses; a trusted key signed it; it is
    stored as the very value signed (``17.0`` where ``17`` was signed is
    refused); its ``_type`` and ``spec_version``; it has not expired; its
    version is not below ``min_version``; the directory holds nothing but
    the targets, the manifest and ``signer.pub`` (reason ``unlisted``);
    then every target, in sorted order, is inside the directory, present,
    of the listed length and SHA-256.

    Parameters
    ----------
    cache_dir
        The cache directory.
    trusted
        The operator's public keys.
    now
        The time to check expiry against (timezone-aware); default now.
    min_version
        Refuse a manifest older than this (replay protection).
    name
        File name of the manifest.

    Returns
    -------
    dict
        The verified ``signed`` part.

    Raises
    ------
    VerifyError
        The first problem found, precisely: e.g. ``tiles.mbtiles: sha256
        mismatch (manifest 3f2a…, file 9b1c…)``.
    UsageError
        ``trusted`` is empty or ``now`` is naive.
    """
    cache_dir = Path(cache_dir)
    if now is None:
        now = datetime.now(timezone.utc)
    elif now.tzinfo is None:
        raise UsageError("verify_cache: `now` must be timezone-aware")
    signed = _signed_as_stored(cache_dir, trusted, name)
    targets = _checked_header(signed, name, now, min_version)
    _check_release_holds_only(cache_dir, targets, name)

    root_real = os.path.realpath(cache_dir)
    for rel in sorted(targets):
        try:
            _check_target(cache_dir, root_real, rel, targets[rel])
        except VerifyError as exc:
            raise _tag(exc, "malformed" if "malformed" in exc.message else "artifact")  # noqa: B904
    return signed


def _signed_as_stored(
    cache_dir: Path, trusted: Sequence[Ed25519PublicKey], name: str
) -> dict[str, Any]:
    """The manifest's ``signed`` part: it parses, a trusted key signed it, it is stored as the value signed."""
    try:
        envelope = read_manifest(cache_dir, name=name)
    except VerifyError as exc:
        raise _tag(exc, "malformed" if "JSON" in exc.message else "no-manifest")  # noqa: B904 (exc itself, tagged)
    try:
        signed = verify_envelope(envelope, trusted)
    except VerifyError as exc:
        raise _tag(exc, "signature")  # noqa: B904 (exc itself, tagged)
    changed = _changed_type(signed, canonical_value(signed))
    if changed is not None:
        raise _refuse(
            "malformed",
            f"{name} is not the value that was signed: {changed} (a number changed type after signing?)",
            remedy="never use this cache; rebuild and re-sign it with `doit build-cache`",
        )
    return signed


def _checked_header(
    signed: dict[str, Any], name: str, now: datetime, min_version: int | None
) -> dict[str, Any]:
    """``signed``'s targets, once its type, spec version, expiry and version are acceptable."""
    if signed.get("_type") != MANIFEST_TYPE:
        raise _refuse(
            "malformed", f"{name} is not a cachebuild manifest (_type {signed.get('_type')!r})"
        )
    spec = signed.get("spec_version")
    if spec != SPEC_VERSION or isinstance(spec, bool):
        raise _refuse(
            "malformed",
            f"{name} has spec_version {spec!r}; this cachebuild reads {SPEC_VERSION}",
            remedy="rebuild the cache with this cachebuild, or verify with a matching one",
        )
    try:
        expires = _parse_time(signed.get("expires"), "expires")
    except VerifyError as exc:
        raise _tag(exc, "malformed")  # noqa: B904 (exc itself, tagged)
    if now >= expires:
        raise _refuse(
            "expired",
            f"manifest expired at {signed['expires']} (now {_format_time(now)})",
            remedy="rebuild and re-sign the cache with `doit build-cache`",
        )
    version = signed.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _refuse("malformed", f"{name} has an invalid version {version!r}")
    if min_version is not None and version < min_version:
        raise _refuse(
            "rollback",
            f"rollback refused: manifest version {version} is older than the minimum {min_version} "
            "(a replayed cache?)",
        )
    targets = signed.get("targets")
    if not isinstance(targets, dict):
        raise _refuse("malformed", f"{name} has no 'targets' object")
    return targets


#: Why ``verify_cache`` refused, as its VerifyError's ``reason`` (and the
#: verify-cache report's ``reason``): ``no-manifest``, ``malformed``,
#: ``signature`` (modified after signing), ``untrusted-key`` (signed by
#: another key), ``expired``, ``rollback`` (older than accepted, see
#: :mod:`cachebuild.release.rollback`), ``artifact`` (a file missing or changed),
#: ``unlisted`` (a file the manifest does not list, e.g. a planted journal).
VERIFY_REASONS = (
    "no-manifest",
    "malformed",
    "signature",
    "untrusted-key",
    "expired",
    "rollback",
    "artifact",
    "unlisted",
)


def _check_release_holds_only(cache_dir: Path, targets: dict[str, Any], name: str) -> None:
    """Refuse a release holding anything but its targets, the manifest and ``signer.pub``."""
    try:
        extra = _unlisted(cache_dir, targets, name)
    except OSError as exc:
        raise _refuse(
            "artifact", f"cannot list {cache_dir} ({exc.strerror or type(exc).__name__})"
        ) from None
    if extra is not None:
        raise _refuse(
            "unlisted",
            f"unlisted file {extra} in {cache_dir}: a release holds only the targets its manifest lists, "
            f"{name} and {SIGNER_PUB_NAME} (a planted SQLite journal would change what readers see)",
            remedy="never use this cache; publish it again with `doit build-cache` (or remove the file "
            "if you know who put it there), then verify again",
        )


def _tag(exc: VerifyError, reason: str) -> VerifyError:
    """``exc`` with its ``reason`` set, unless the raiser set a more precise one."""
    if getattr(exc, "reason", None) is None:
        exc.reason = reason
    return exc


def _refuse(reason: str, message: str, remedy: str | None = None) -> VerifyError:
    return _tag(VerifyError(message, remedy=remedy), reason)
