"""The signed manifest that makes a cache directory a published cache.

``<cache>/manifest.json`` is a TUF-style envelope (see
:mod:`cachebuild.signing`) whose ``signed`` part lists every artifact's
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
import stat
import threading
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

from .canonical import canonical_json, is_sha256_hex, sha256_file
from .errors import BuildError, UsageError, VerifyError
from .signing import keyid, sign_envelope, verify_envelope, write_public_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "MANIFEST_NAME",
    "atomic_write",
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

MANIFEST_NAME = "manifest.json"
SIGNER_PUB_NAME = "signer.pub"
MANIFEST_TYPE = "cachebuild/manifest"
SPEC_VERSION = 1
#: UTC timestamps in the manifest, e.g. ``2030-01-01T00:00:00Z``.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

_RESERVED = frozenset({MANIFEST_NAME, SIGNER_PUB_NAME})


# -- identity ----------------------------------------------------------------


def _check_sha256(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not is_sha256_hex(value):
        raise UsageError(f"{name} must be a 64-character lower-case hex SHA-256, got {value!r}")


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
    if isinstance(bbox, (str, bytes)) or len(bbox) != 4:
        raise UsageError(f"bbox must be 4 numbers (west, south, east, north), got {bbox!r}")
    for v in bbox:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UsageError(f"bbox must hold finite numbers, got {bbox!r}")
    if not zooms or any(isinstance(z, bool) or not isinstance(z, int) or z < 0 for z in zooms):
        raise UsageError(f"zooms must be a non-empty list of non-negative integers, got {zooms!r}")
    if takeoff_origin is not None and not isinstance(takeoff_origin, dict):
        raise UsageError(f"takeoff_origin must be a dict or None, got {type(takeoff_origin).__name__}")
    if flight_id is not None and not isinstance(flight_id, str):
        raise UsageError(f"flight_id must be a string or None, got {type(flight_id).__name__}")
    _check_sha256("calibration_sha256", calibration_sha256, optional=True)
    _check_sha256("tiles_sha256", tiles_sha256)
    if not isinstance(engine_key, str) or not engine_key:
        raise UsageError(f"engine_key must be a non-empty string, got {engine_key!r}")
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


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: a unique temp file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- remembered hashes ---------------------------------------------------------

#: The hash cache's file name in a build directory (never published).
HASH_CACHE_NAME = ".sha256-cache.json"
_HASH_CACHE_FORMAT = "cachebuild/sha256-cache-v1"


def _identity_of(st: os.stat_result) -> list[int]:
    """What must not change for a remembered hash to hold: device, inode, size, mtime, ctime."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class HashCache:
    """SHA-256 of files, remembered for as long as their ``stat`` is unchanged.

    The build hashes its large artifacts once: the MBTiles writer hashes the
    file it wrote and remembers it here; doit's file checker
    (:func:`doit_file_checker`) and the manifest reuse it instead of reading
    300 MB again each.  An entry is keyed by the file's path (relative to
    the cache file's directory) and holds the file's device, inode, size,
    ``mtime_ns`` and ``ctime_ns`` when it was hashed.  Any write to the
    file, a rename onto it, ``os.utime`` or ``chmod`` changes the ctime
    (which userland cannot set back), so a changed file is hashed again.
    Known limit, as for git's index: a write in the same timestamp tick as
    the remembering (a jiffy, a few milliseconds) that keeps the size is
    not seen; the build holds its lock, so only a foreign writer could do
    that, and ``verify-cache``, which re-hashes everything, then refuses the
    published cache.

    The cache is a plain JSON file written by rename; one that cannot be
    read is ignored (every file is hashed again).  Several instances in one
    process (the writer's, the checker's, the manifest's) see each other's
    entries: each reads the file again when it changed, and a save merges.

    Parameters
    ----------
    path
        The cache file, e.g. ``<build>/.sha256-cache.json``.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.root = os.path.abspath(self.path.parent)
        self._lock = threading.Lock()  # sha256() may run in several threads
        self._entries: dict[str, list[Any]] = {}
        self._mine: dict[str, list[Any]] = {}  # remembered here, not saved yet
        self._seen: tuple[int, int, int] | None = None  # the cache file as last read or written
        #: how many lookups were answered from the cache, and how many hashed
        self.hits = 0
        self.misses = 0

    def _file_sig(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _refresh(self) -> None:
        """Read the file again if it changed since this instance last read or wrote it."""
        sig = self._file_sig()
        if sig is not None and sig == self._seen:
            return
        self._seen = sig
        self._entries = {**self._read(), **self._mine}

    def _read(self) -> dict[str, list[Any]]:
        try:
            doc = json.loads(self.path.read_bytes())
            if not isinstance(doc, dict) or doc.get("format") != _HASH_CACHE_FORMAT:
                return {}
            return {
                k: v
                for k, v in doc["entries"].items()
                if isinstance(k, str)
                and isinstance(v, list)
                and len(v) == 6
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v[:5])
                and isinstance(v[5], str)
                and is_sha256_hex(v[5])
            }
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}

    def _key(self, path: str | os.PathLike[str]) -> str:
        return os.path.relpath(os.path.abspath(path), self.root)

    def lookup(self, path: str | os.PathLike[str]) -> tuple[str, int] | None:
        """``(hex sha256, size)`` remembered for ``path`` if its stat still matches, else None."""
        with self._lock:
            self._refresh()
            entry = self._entries.get(self._key(path))
        if entry is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or _identity_of(st) != entry[:5]:
            return None
        return entry[5], st.st_size

    def remember(self, path: str | os.PathLike[str], digest: str, st: os.stat_result) -> None:
        """Remember that ``path``, as ``st`` describes it, hashes to ``digest``.

        ``st`` must be taken after the last write (and rename) of the file.
        """
        _check_sha256("digest", digest)
        entry = [*_identity_of(st), digest]
        with self._lock:
            self._refresh()
            self._entries[self._key(path)] = entry
            self._mine[self._key(path)] = entry

    def sha256(self, path: str | os.PathLike[str]) -> tuple[str, int]:
        """``(hex sha256, size)`` of ``path``: remembered, or hashed and remembered.

        The file is remembered only when its stat was the same before and
        after it was read (nothing wrote it meanwhile).
        """
        hit = self.lookup(path)
        with self._lock:
            if hit is not None:
                self.hits += 1
                return hit
            self.misses += 1
        before = os.stat(path)
        digest, size = sha256_file(path)
        after = os.stat(path)
        if _identity_of(before) == _identity_of(after) and size == after.st_size:
            self.remember(path, digest, after)
        return digest, size

    def save(self) -> None:
        """Write the cache, merged with what others saved meanwhile; entries of files gone are dropped.

        Not fsynced: a cache lost in a power cut only means hashing again.
        """
        with self._lock:
            if not self._mine:
                return
            self._refresh()
            keep = {k: v for k, v in self._entries.items() if os.path.lexists(os.path.join(self.root, k))}
            doc = {"format": _HASH_CACHE_FORMAT, "entries": keep}
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                tmp.write_text(json.dumps(doc, sort_keys=True))
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            self._entries, self._mine, self._seen = keep, {}, self._file_sig()


def doit_file_checker(cache_file: str | os.PathLike[str]) -> type:
    """A doit file checker (``check_file_uptodate``) that hashes through a :class:`HashCache`.

    doit's default checker keeps ``(mtime, size, md5)`` per file dependency
    and reads a file whose mtime changed but whose size did not (an MBTiles
    file updated in place keeps its size), and again after the task ran: a
    300 MB MBTiles file that the preview and the manifest depend on was
    read four times after each rebuild.  This one keeps ``(mtime, size,
    "sha256:<hex>")`` and takes the SHA-256 from ``cache_file``, where the
    writer of the file remembered it, or hashes the file once and remembers
    it there.  Like doit's, an unchanged mtime means an unchanged file.

    The class has doit's checker interface (``exists``, ``info``,
    ``check_modified``, ``get_state``, ``CheckerError``) without importing
    doit.
    """
    cache = HashCache(cache_file)

    def digest(path: str) -> str:
        value, _ = cache.sha256(path)
        cache.save()
        return "sha256:" + value

    class HashCacheChecker:
        CheckerError = OSError

        def exists(self, file_path: str) -> bool:
            return os.path.exists(file_path)

        def info(self, file_path: str) -> os.stat_result:
            return os.stat(file_path)

        def check_modified(self, file_path: str, file_stat: os.stat_result, state: Any) -> bool:
            if not isinstance(state, (list, tuple)) or len(state) != 3:
                return True  # another checker's state
            timestamp, size, value = state
            if file_stat.st_mtime == timestamp:
                return False
            if file_stat.st_size != size:
                return True
            return value != digest(file_path)

        def get_state(self, dep: str, current_state: Any) -> Any:
            timestamp = os.path.getmtime(dep)
            if isinstance(current_state, (list, tuple)) and current_state and current_state[0] == timestamp:
                return None
            return timestamp, os.path.getsize(dep), digest(dep)

    return HashCacheChecker


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
) -> dict[str, Any]:
    """Hash the artifacts, sign the manifest and publish it in ``cache_dir``.

    ``signer.pub`` is written first, ``out_name`` last; both atomically
    (temporary file, then ``os.replace``), so a reader sees either the old
    manifest or the complete new one.

    Parameters
    ----------
    cache_dir
        The cache directory.
    artifacts
        Paths relative to ``cache_dir`` (``"tiles.mbtiles"``,
        ``"engine/engine.onnx"``), ``/``-separated.
    identity, build_id
        From :func:`build_identity`.
    info
        Free-form JSON-able facts for the operator (counts, versions).
    key
        The Ed25519 signing key.
    version
        Manifest version, >= 1; the drone can refuse one lower than it saw.
    expires_at
        Timezone-aware expiry, in the future; written in whole UTC seconds.
    out_name
        File name of the manifest.
    hash_cache
        A :class:`HashCache` file (the build passes
        ``<build>/.sha256-cache.json``): an artifact whose stat is unchanged
        since it was hashed is not read again, and the others' hashes are
        remembered there.  None (the default) hashes every artifact and
        writes nothing but the manifest and ``signer.pub``.  Artifacts that
        must be read are hashed in parallel threads (hashlib releases the
        GIL).

    Returns
    -------
    dict
        The envelope as written.

    Raises
    ------
    BuildError
        ``phase="manifest"``: a path is absolute, contains ``..``, escapes
        through a symlink, is missing or is not a file; or an argument is
        malformed.
    UsageError
        ``key`` is not an Ed25519 private key.
    """
    cache_dir = Path(cache_dir)

    def fail(message: str) -> BuildError:
        return BuildError(message, phase="manifest")

    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise fail(f"manifest version must be an integer >= 1, got {version!r}")
    if not isinstance(expires_at, datetime) or expires_at.tzinfo is None:
        raise fail(f"manifest expiry must be a timezone-aware datetime, got {expires_at!r}")
    now = datetime.now(timezone.utc)
    if expires_at <= now:
        raise fail(f"manifest expiry {_format_time(expires_at)} is not in the future")
    _check_sha256("build_id", build_id)
    if not cache_dir.is_dir():
        raise fail(f"cache directory {cache_dir} does not exist")

    root_real = os.path.realpath(cache_dir)
    checked: list[str] = []
    for rel in artifacts:
        problem = _relpath_problem(rel)
        if problem is not None:
            raise fail(f"artifact path {rel!r} {problem}")
        if rel in _RESERVED:
            raise fail(f"artifact path {rel!r} is reserved for the manifest itself")
        if rel in checked:
            raise fail(f"artifact path {rel!r} is listed twice")
        path = cache_dir / rel
        if _escapes(root_real, path):
            raise fail(f"artifact {rel} resolves outside {cache_dir} (symlink)")
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "is missing"
            raise fail(f"artifact {rel} {what} in {cache_dir}")
        checked.append(rel)
    targets = {
        rel: {"length": size, "hashes": {"sha256": digest}}
        for rel, (digest, size) in zip(checked, _hash_all([cache_dir / rel for rel in checked], hash_cache))
    }

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
    try:
        envelope = sign_envelope(signed, key)
        text = json.dumps(envelope, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError) as exc:
        raise fail(f"manifest identity or info is not JSON-representable: {exc}") from exc

    write_public_key(cache_dir / SIGNER_PUB_NAME, key.public_key())
    atomic_write(cache_dir / out_name, (text + "\n").encode("utf-8"))
    log.info(
        "wrote %s: version %d, %d targets, build %s, keyid %s",
        cache_dir / out_name,
        version,
        len(targets),
        build_id[:12],
        keyid(key.public_key()),
    )
    return envelope


def _hash_all(paths: list[Path], cache_file: str | os.PathLike[str] | None) -> list[tuple[str, int]]:
    """``(sha256, size)`` of each file, in order; remembered ones from ``cache_file``, others in threads."""
    from concurrent.futures import ThreadPoolExecutor

    from .cpus import usable_cpus

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
        cache.save()
        log.info("hashed %d artifacts, %d remembered from %s", cache.misses, cache.hits, cache.path.name)
    return [done[i] for i in range(len(paths))]


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
        raise VerifyError(f"manifest field {field!r} is not a UTC time like 2030-01-01T00:00:00Z") from None


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
        raise VerifyError(f"{rel}: length mismatch (manifest {want_len} bytes, file {got_len} bytes)")
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

    Checks, in order: the manifest parses; a trusted key signed it; its
    ``_type`` and ``spec_version``; it has not expired; its version is not
    below ``min_version``; then every target, in sorted order, is inside
    the directory, present, of the listed length and SHA-256.

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
    try:
        envelope = read_manifest(cache_dir, name=name)
    except VerifyError as exc:
        raise _tag(exc, "malformed" if "JSON" in exc.message else "no-manifest")
    try:
        signed = verify_envelope(envelope, trusted)
    except VerifyError as exc:
        raise _tag(exc, "signature")

    if signed.get("_type") != MANIFEST_TYPE:
        raise _refuse("malformed", f"{name} is not a cachebuild manifest (_type {signed.get('_type')!r})")
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
        raise _tag(exc, "malformed")
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

    root_real = os.path.realpath(cache_dir)
    for rel in sorted(targets):
        try:
            _check_target(cache_dir, root_real, rel, targets[rel])
        except VerifyError as exc:
            raise _tag(exc, "malformed" if "malformed" in exc.message else "artifact")
    return signed


#: Why ``verify_cache`` refused, as its VerifyError's ``reason`` (and the
#: verify-cache report's ``reason``): ``no-manifest``, ``malformed``,
#: ``signature`` (modified after signing), ``untrusted-key`` (signed by
#: another key), ``expired``, ``rollback`` (older than accepted, see
#: :mod:`cachebuild.rollback`), ``artifact`` (a file missing or changed).
VERIFY_REASONS = ("no-manifest", "malformed", "signature", "untrusted-key", "expired", "rollback", "artifact")


def _tag(exc: VerifyError, reason: str) -> VerifyError:
    """``exc`` with its ``reason`` set, unless the raiser set a more precise one."""
    if getattr(exc, "reason", None) is None:
        exc.reason = reason  # type: ignore[attr-defined]
    return exc


def _refuse(reason: str, message: str, remedy: str | None = None) -> VerifyError:
    return _tag(VerifyError(message, remedy=remedy), reason)
