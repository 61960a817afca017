"""The action cache: derived artifacts served by the key of their inputs.

The other half of Bazel's remote cache.  The store (and, with
``STORE=s3://...``, the bucket) already shares tiles and descriptors, which
are keyed by content.  The per-cache artifacts derived from them (the index,
the self-test result, the coverage map) are pure functions of a few files
and settings, so every machine that builds the same cache computes the same
thing again.  Here each such *action* gets a key::

    key = SHA-256 of canonical JSON {action, version, inputs: {name: SHA-256 of the file},
                                     values: {setting: value}, engine key}

where ``version`` is the action's declared version plus the SHA-256 of the
source of the modules that compute it (a code change is a new key even when
nobody bumped the version).  Before the action runs, the key is looked up:

- **hit**: a record ``key -> {output name: SHA-256, size}`` names
  content-addressed objects; each is hard-linked to a temp name in the
  build directory (a copy across filesystems), checked there against its
  SHA-256 and renamed into place.  The action does not run.
- **miss**: the action runs; its outputs are stored as objects (named by
  their SHA-256, written once: a hard link to the output where the store
  is on the build's filesystem) and the record is written (once).

Local layout, under the store::

    actions/cas/<ab>/<sha256>       an output's bytes
    actions/ac/<ab>/<key>.json      a record

With a bucket the same objects and records go under ``actions/cas/<sha256>``
and ``actions/ac/<key>.json`` of the bucket's prefix, and a local miss is
looked up there before the action runs (what a second machine saves).

Safety:

- an object whose bytes do not match its name, a record that does not
  parse or does not match its own checksum, or a record whose objects are
  gone is never used: it is removed and the action runs (so nothing here
  is fsynced: a crash that loses or tears a file costs a miss);
- keys and records hold hashes, action names, versions and non-secret
  settings (an index kind, a query count, a date); never a path, a URL, a
  credential or a key's bytes;
- recording is best effort: a store or bucket that cannot be written costs
  a warning, never the build;
- ``doit gc-store`` (:mod:`cachebuild.release.gc`) keeps the objects the known
  caches' artifacts are (by SHA-256) and removes the rest, oldest first.

numpy and boto3 are not imported here.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachebuild._util.fileio import copy_file
from cachebuild._util.fs import atomic_write, temp_name
from cachebuild._util.hashing import is_sha256_hex, sha256_file
from cachebuild._util.statcache import HASH_CACHE_NAME, HashCache, stat_key
from cachebuild.errors import CacheBuildWarning
from cachebuild.store.s3 import StoreUnavailable

__all__ = [
    "ACTIONS_DIR",
    "OUTPUTS",
    "RECORD_FORMAT",
    "Action",
    "ActionCache",
    "action_key",
    "code_version",
]

#: Each cached action's output files, in the build directory.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "index": ("index.faiss", "index.json", "positions.npy"),
    "selftest": ("selftest.json",),
    "preview": ("preview.png",),
}
#: Under the store root (and the bucket's prefix).
ACTIONS_DIR = "actions"
RECORD_FORMAT = 1
#: ``link`` failures that mean "no hard links here" (another filesystem, or none supported).
_NO_LINK = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@functools.cache
def code_version(*modules: str) -> str:
    """SHA-256 over the source files of ``modules`` (``cachebuild.localize.index``...), in order.

    Part of an action's version: changed code is a new key.
    """
    import importlib.util

    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        h.update(name.encode() + b"\0")
        if origin and os.path.isfile(origin):
            with open(origin, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class Action:
    """One cacheable action over a build directory.

    Parameters
    ----------
    name
        ``index``, ``selftest``, ``preview``.
    version
        The declared version and the code's hash (:func:`code_version`).
    inputs
        Input files by name; each enters the key by its SHA-256.
    values
        Settings that change the outputs (JSON values, never secrets).
    engine_key
        The engine's key, or None where the outputs do not depend on it.
    outputs
        Output files by name, written into ``build``.
    build
        The build directory.
    """

    name: str
    version: str
    inputs: Mapping[str, Path]
    values: Mapping[str, Any]
    engine_key: str | None
    outputs: tuple[str, ...]
    build: Path
    _digests: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def input_digests(self) -> dict[str, str]:
        """The inputs' SHA-256, through the build's hash cache: the manifest and
        doit's file checker then find them remembered instead of reading the files again."""
        if not self._digests:
            cache = HashCache(self.build / HASH_CACHE_NAME)
            self._digests.update({n: cache.sha256(p)[0] for n, p in sorted(self.inputs.items())})
            cache.save()
        return dict(self._digests)


def action_key(action: Action) -> str:
    """The action's key: SHA-256 of the canonical JSON of what determines its outputs."""
    return hashlib.sha256(
        _canonical(
            {
                "action": action.name,
                "version": action.version,
                "inputs": action.input_digests(),
                "values": dict(action.values),
                "engine_key": action.engine_key,
                "outputs": list(action.outputs),
            }
        )
    ).hexdigest()


# -- records -------------------------------------------------------------------


def _record_bytes(key: str, action: str, outputs: Mapping[str, tuple[str, int]]) -> bytes:
    body = {
        "format": RECORD_FORMAT,
        "key": key,
        "action": action,
        "outputs": {n: {"sha256": d, "size": s} for n, (d, s) in sorted(outputs.items())},
        "created": round(time.time(), 3),
    }
    body["check"] = hashlib.sha256(_canonical(body)).hexdigest()
    return (json.dumps(body, sort_keys=True, indent=1) + "\n").encode()


def _parse_record(data: bytes, key: str, names: Iterable[str]) -> dict[str, tuple[str, int]] | None:
    """``{output name: (sha256, size)}`` of a sound record for ``key`` with exactly ``names``; else None."""
    try:
        body = json.loads(data)
        check = body.pop("check")
        if hashlib.sha256(_canonical(body)).hexdigest() != check:
            return None
        if body["format"] != RECORD_FORMAT or body["key"] != key:
            return None
        outputs = {str(n): (str(o["sha256"]), int(o["size"])) for n, o in body["outputs"].items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if sorted(outputs) != sorted(names):
        return None
    for digest, size in outputs.values():
        if not is_sha256_hex(digest) or size < 0:
            return None
    return outputs


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_once(path: Path, data: bytes, tmp_dir: Path, digest: str | None = None) -> None:
    """Write ``path`` unless it exists (a hard link from a temp file: never overwrites).

    With ``digest`` (an object named by its hash), an existing file that
    does not hash to it is damaged and replaced.  Not fsynced: see
    :meth:`ActionCache.record`.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"ac-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        tmp.write_bytes(data)
        _place_once(tmp, path, digest)
    finally:
        tmp.unlink(missing_ok=True)


def _place_once(tmp: Path, path: Path, digest: str | None) -> None:
    """Give the file at ``tmp`` the name ``path`` unless a sound one has it (``tmp`` stays)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(tmp, path)
    except FileExistsError:
        if digest is not None and sha256_file(path)[0] != digest:
            os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        if not path.exists():
            os.replace(tmp, path)


def _stage(src: Path, tmp: Path) -> bool:
    """``tmp``: a hard link to ``src`` (True), or a copy of it where links are not possible."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, tmp)
        return True
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
    copy_file(src, tmp)
    return False


def _remember(build: Path, digests: Mapping[str, str]) -> None:
    """Tell the build's hash cache what the outputs hash to, so the manifest does not read them again."""

    cache = HashCache(build / HASH_CACHE_NAME)
    for name, digest in digests.items():
        path = build / name
        cache.remember(path, digest, os.stat(path))
    cache.save()


def _materialize(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably and atomically (a temp name the next build sweeps if killed)."""

    atomic_write(path, data, durable=True)


class ActionCache:
    """Records and objects in a store (and optionally a bucket).

    Parameters
    ----------
    store_root
        The local store; the cache lives in its ``actions/`` directory.
    remote
        An :class:`cachebuild.store.s3.S3Store`, or None.
    warn
        Called with a message for each soft problem (a corrupt object
        removed, a bucket that could not be read or written).
    """

    def __init__(
        self,
        store_root: str | os.PathLike[str],
        remote: Any = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.root = Path(store_root) / ACTIONS_DIR
        self.remote = remote
        self.warn = warn or (lambda msg: warnings.warn(CacheBuildWarning(msg), stacklevel=3))
        #: where the last :meth:`lookup` hit: ``local``, ``bucket`` or None
        self.served_from: str | None = None

    # local paths
    def object_path(self, digest: str) -> Path:
        return self.root / "cas" / digest[:2] / digest

    def record_path(self, key: str) -> Path:
        return self.root / "ac" / key[:2] / f"{key}.json"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    # bucket keys
    def _remote_object(self, digest: str) -> str:
        return self.remote.url.key(ACTIONS_DIR, "cas", digest)

    def _remote_record(self, key: str) -> str:
        return self.remote.url.key(ACTIONS_DIR, "ac", f"{key}.json")

    # -- reading ---------------------------------------------------------------

    def _local_lookup(
        self, key: str, names: tuple[str, ...], build: Path
    ) -> dict[str, tuple[Path, str]] | None:
        """A sound local record's outputs staged at temp names in ``build``: ``{name: (temp, sha256)}``.

        Each object is hard-linked (or, across filesystems, copied) to its
        temp name first and hashed there, so what is checked is what will be
        renamed into place.  None (a miss) when the record is missing or
        damaged, or an object is gone or corrupt (the record and that object
        are removed: the action runs and records anew).
        """
        path = self.record_path(key)
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        outputs = _parse_record(raw, key, names)
        if outputs is None:
            self.warn(f"action cache record {key[:16]}… in {self.root} is damaged; removed it")
            path.unlink(missing_ok=True)
            return None
        staged: dict[str, tuple[Path, str]] = {}
        try:
            for name, (digest, size) in outputs.items():
                tmp = temp_name(build / name)
                if not self._stage_object(digest, size, tmp):
                    path.unlink(missing_ok=True)  # it names what is gone: recompute, record anew
                    return None
                staged[name] = (tmp, digest)
            done, staged = staged, {}
            return done
        finally:
            for tmp, _ in staged.values():
                tmp.unlink(missing_ok=True)

    def _stage_object(self, digest: str, size: int, tmp: Path) -> bool:
        """Object ``digest`` at ``tmp`` (a link, or a copy) if it is there and hashes to its name."""
        obj = self.object_path(digest)
        try:
            linked = _stage(obj, tmp)
            got, n = sha256_file(tmp)
        except OSError:  # gone (or unreadable): a miss
            tmp.unlink(missing_ok=True)
            return False
        if got == digest and n == size:
            return True
        self.warn(f"action cache object {digest[:16]}… in {self.root} is corrupt; removed it")
        try:  # the object read, unless another process replaced it meanwhile
            if not linked or os.path.samestat(os.stat(obj), os.stat(tmp)):
                obj.unlink()
        except OSError:
            pass
        tmp.unlink(missing_ok=True)
        return False

    def _bucket_lookup(
        self, key: str, names: tuple[str, ...], action: str
    ) -> dict[str, bytes] | None:

        try:
            raw = self.remote.get(self._remote_record(key))
            if raw is None:
                return None
            outputs = _parse_record(raw, key, names)
            if outputs is None:
                self.warn(
                    f"action cache record {key[:16]}… in {self.remote.url} is damaged; removed it"
                )
                self.remote.delete(self._remote_record(key))
                return None
            items = sorted(outputs.items())
            datas = self.remote.map(
                lambda it: self.remote.get_verified(self._remote_object(it[1][0]), it[1][0]),
                items,
            )
            got: dict[str, bytes] = {}
            for (name, (digest, size)), data in zip(items, datas):
                if (
                    data is None or len(data) != size
                ):  # missing, or corrupt (get_verified removed it)
                    self.warn(
                        f"action cache object {digest[:16]}… in {self.remote.url} is missing or corrupt; "
                        "computing it again"
                    )
                    self.remote.delete(self._remote_record(key))
                    return None
                got[name] = data
        except StoreUnavailable as exc:
            self.warn(f"action cache: {exc.message}; computing instead")
            return None
        # keep a local copy: the next build on this machine needs no bucket
        try:
            for data in got.values():
                _write_once(self.object_path(_sha(data)), data, self.tmp, _sha(data))
            _write_once(
                self.record_path(key),
                _record_bytes(key, action, {n: (_sha(d), len(d)) for n, d in got.items()}),
                self.tmp,
            )
        except OSError as exc:
            self.warn(
                f"action cache: could not keep a local copy in {self.root}: {exc.strerror or exc}"
            )
        return got

    def lookup(self, action: Action, key: str | None = None) -> bool:
        """On a hit, put the outputs into ``action.build`` and return True.

        Local objects are linked, not written: like every staged file they
        become durable when publish fsyncs the release.
        """
        key = key or action_key(action)
        self.served_from = None
        staged = self._local_lookup(key, action.outputs, action.build)
        if staged is not None:  # links to the checked objects: no bytes written, none fsynced
            for name in action.outputs:
                os.replace(staged[name][0], action.build / name)
                staged[name][0].unlink(missing_ok=True)  # left by a rename onto a link to itself
            _remember(action.build, {name: staged[name][1] for name in action.outputs})
            self.served_from = "local"
            return True
        got = None
        if self.remote is not None:
            got = self._bucket_lookup(key, action.outputs, action.name)
        if got is None:
            return False
        for name in action.outputs:
            _materialize(action.build / name, got[name])
        _remember(action.build, {name: _sha(got[name]) for name in action.outputs})
        self.served_from = "bucket"
        return True

    # -- writing ---------------------------------------------------------------

    def record(self, action: Action, key: str | None = None) -> None:
        """Store the outputs now in ``action.build`` under ``key`` (best effort: warnings only).

        An object is a hard link to the output (the build writes its
        outputs by rename, never in place, as publish's links of them also
        need), or a kernel copy where the store is on another filesystem;
        its hash goes to the build's hash cache for the manifest.  Nothing
        is fsynced: every read checks a record against its own checksum and
        an object against its name, so what a crash loses or tears is a
        miss, never a wrong output.
        """
        key = key or action_key(action)
        cache = HashCache(action.build / HASH_CACHE_NAME)
        staged: dict[str, tuple[Path, str, int, list[int]]] = {}
        try:
            outputs = self._stage_outputs(action, cache, staged)
            if outputs is None:
                return
            record = _record_bytes(key, action.name, outputs)
            try:
                for tmp, digest, _, _ in staged.values():
                    _place_once(tmp, self.object_path(digest), digest)
                _write_once(self.record_path(key), record, self.tmp)
            except OSError as exc:
                self.warn(
                    f"action cache: could not record {action.name} in {self.root}: {exc.strerror or exc}"
                )
        finally:
            self._unstage(action.build, cache, staged)
        if self.remote is not None:
            self._share(action, key, outputs, record)

    def _stage_outputs(
        self, action: Action, cache: HashCache, staged: dict[str, tuple[Path, str, int, list[int]]]
    ) -> dict[str, tuple[str, int]] | None:
        """Each output linked (or copied) to a temp name in ``staged``, and hashed; None: unreadable."""
        for name in action.outputs:
            src = action.build / name
            tmp = self.tmp / f"ac-{os.getpid()}-{uuid.uuid4().hex}"
            try:
                linked = _stage(src, tmp)
                digest, size = cache.sha256(src)  # after the link: its stat is the one remembered
                st = os.stat(src)
                if linked and not os.path.samestat(st, os.stat(tmp)):
                    raise OSError(f"{src} was replaced while it was recorded")
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                self.warn(
                    f"action cache: {action.name} output unreadable, not recorded: {exc.strerror or exc}"
                )
                return None
            staged[name] = (tmp, digest, size, stat_key(st))
        return {n: (digest, size) for n, (_, digest, size, _) in staged.items()}

    @staticmethod
    def _unstage(
        build: Path, cache: HashCache, staged: dict[str, tuple[Path, str, int, list[int]]]
    ) -> None:
        """Remove the temp names; an output whose content is unchanged keeps its hash (links move its ctime)."""
        for name, (tmp, digest, _, before) in staged.items():
            tmp.unlink(missing_ok=True)
            cache.remember_unmoved(build / name, digest, before)
        try:
            cache.save()
        except OSError:  # only a cache: the manifest hashes again
            pass

    def _share(
        self, action: Action, key: str, outputs: dict[str, tuple[str, int]], record: bytes
    ) -> None:
        """Put the record and its objects in the bucket, unless another machine did first."""
        try:
            if self.remote.get(self._remote_record(key)) is not None:
                return  # written once: another machine recorded this key first
            self.remote.map(
                lambda item: self.remote.put(
                    self._remote_object(item[1][0]), (action.build / item[0]).read_bytes()
                ),
                sorted(outputs.items()),
            )
            self.remote.put(self._remote_record(key), record)  # after its objects
        except StoreUnavailable as exc:
            self.warn(f"action cache: could not share {action.name}: {exc.message}")
        except OSError as exc:
            self.warn(f"action cache: could not share {action.name}: {exc.strerror or exc}")
