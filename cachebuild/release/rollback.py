"""Rollback protection: the highest manifest version accepted, per cache and signer key.

A TUF client keeps the version of the last metadata it trusted and refuses
anything older; this is that record for one cache directory.  It lives at
``CACHE_DIR/state/accepted.json``::

    {"format": 1,
     "keys": {"<keyid>": {"version": 7,
                          "signed_sha256": "<sha256 of the signed part's canonical JSON>",
                          "build_id": "<build id>",
                          "accepted_at": "2030-01-01T00:00:00Z"}}}

- ``doit verify-cache`` reads it before verifying: a manifest signed by that
  key with a lower version is refused (exit 23, reason ``rollback``), and
  one with the recorded version must be the very manifest recorded (its
  ``signed`` part hashes to ``signed_sha256``), else it is refused too.
  After a pass, the version is recorded.
- ``doit build-cache`` records the manifest it publishes (the builder
  accepted its own cache), and numbers the next manifest above every version
  in the record, so a lost ``current`` never makes a new build look like a
  rollback.

Updates hold an flock on ``state/accepted.lock``, write a temporary file,
fsync it, rename it over the record and fsync the directory: a crash leaves
the old record or the new one.  A version is never lowered.

The record protects against a cache put back by whoever can replace
``current`` or a release but not ``state/``: someone who can write the whole
cache directory can remove the record too.  ``doit clean`` keeps it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_write, fsync_dir
from cachebuild._util.hashing import canonical_json
from cachebuild.errors import VerifyError

__all__ = [
    "ACCEPTED_NAME",
    "accepted_path",
    "read_record",
    "highest_accepted",
    "signed_digest",
    "check_not_rolled_back",
    "record_accepted",
]

ACCEPTED_NAME = "accepted.json"
FORMAT = 1
_LOCK_TIMEOUT_S = 30.0


def accepted_path(cache_dir: Path) -> Path:
    """Where the record of ``cache_dir`` lives: ``<cache_dir>/state/accepted.json``."""
    return Path(cache_dir) / "state" / ACCEPTED_NAME


def _refused(message: str, remedy: str | None = None) -> VerifyError:
    err = VerifyError(message, remedy=remedy)
    err.reason = "rollback"
    return err


def read_record(cache_dir: Path) -> dict[str, Any]:
    """The record's ``keys`` (keyid -> entry); empty when there is none yet.

    Raises
    ------
    VerifyError
        The record exists but is not one (damaged): refuse rather than
        forget what was accepted.
    """
    path = accepted_path(cache_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise _refused(f"cannot read the rollback record {path} ({exc.strerror})") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
        keys = doc["keys"]
        if doc.get("format") != FORMAT or not isinstance(keys, dict):
            raise ValueError("unknown format")
        for kid, entry in keys.items():
            v = entry["version"]
            if not isinstance(kid, str) or isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"bad entry {kid!r}")
            if not isinstance(entry.get("signed_sha256"), str):
                raise ValueError(f"bad entry {kid!r}")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _refused(
            f"the rollback record {path} is damaged ({type(exc).__name__}): the versions already "
            "accepted for this cache are unknown",
            remedy=f"if the published cache is known to be genuine, remove {path}; "
            "the next verify-cache or build-cache records it again",
        ) from None
    return keys


def highest_accepted(cache_dir: Path, *, tolerant: bool = False) -> int:
    """The highest version in the record, over every key; 0 when none.

    With ``tolerant``, a damaged record counts as empty (the builder numbers
    its next manifest; verify-cache will still refuse the damaged record).
    """
    try:
        keys = read_record(cache_dir)
    except VerifyError:
        if not tolerant:
            raise
        return 0
    return max((int(e["version"]) for e in keys.values()), default=0)


def signed_digest(signed: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of a manifest's ``signed`` part."""
    return hashlib.sha256(canonical_json(signed)).hexdigest()


def check_not_rolled_back(
    cache_dir: Path,
    keyid: str,
    signed: Mapping[str, Any],
    *,
    remedy: str | None = None,
    tolerant: bool = False,
) -> int | None:
    """Refuse ``signed`` (already signature-checked) if it is older than what was accepted.

    Returns the recorded version for ``keyid`` (None when none).  ``remedy``
    replaces the default one (for verify-cache) in the error.  With
    ``tolerant`` (the builder, which replaces it), a damaged record checks
    nothing.

    Raises
    ------
    VerifyError
        ``reason = "rollback"``: its version is below the recorded one, or
        equal to it but a different manifest; or the record is damaged.
    """
    try:
        entry = read_record(cache_dir).get(keyid)
    except VerifyError:
        if not tolerant:
            raise
        return None
    if entry is None:
        return None
    floor = int(entry["version"])
    version = signed.get("version")
    remedy = remedy or (
        "a cache older than one already accepted was put back: publish the current cache again with "
        "`doit build-cache` (it signs a newer version); never fly the older one"
    )
    if isinstance(version, int) and not isinstance(version, bool) and version < floor:
        raise _refused(
            f"rollback refused: manifest version {version} is older than version {floor} already "
            f"accepted for this cache (signer {keyid[:16]}…, record {accepted_path(cache_dir)})",
            remedy=remedy,
        )
    if version == floor and signed_digest(signed) != entry["signed_sha256"]:
        raise _refused(
            f"rollback refused: manifest version {version} differs from the version {floor} manifest "
            f"already accepted for this cache (signer {keyid[:16]}…): a replayed or re-signed manifest",
            remedy=remedy,
        )
    return floor


def record_accepted(cache_dir: Path, keyid: str, signed: Mapping[str, Any]) -> bool:
    """Record ``signed`` as accepted for ``keyid``, unless this or a higher version already is.

    Atomic and serialised (see the module docstring).  A damaged record is
    replaced.  Returns whether the record changed.
    """
    import filelock

    version = int(signed["version"])
    path = accepted_path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path.with_name("accepted.lock")), timeout=_LOCK_TIMEOUT_S)
    with lock:
        try:
            keys = read_record(cache_dir)
        except VerifyError:
            keys = {}
        old = keys.get(keyid)
        digest = signed_digest(signed)
        if old is not None and int(old["version"]) >= version:
            return False  # never lowered; an equal version keeps the manifest first accepted
        keys = dict(keys)
        keys[keyid] = {
            "version": version,
            "signed_sha256": digest,
            "build_id": signed.get("build_id"),
            "accepted_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        data = (
            json.dumps({"format": FORMAT, "keys": keys}, indent=1, sort_keys=True) + "\n"
        ).encode()
        atomic_write(path, data, durable=True)
        fsync_dir(path.parent)
    return True
