"""What each build task wrote: the SHA-256 of its targets when it wrote them.

doit trusts a task's targets while they exist; the build must not sign
bytes it did not make (a staged ``tiles.mbtiles`` replaced behind its
back, size and mtime restored).  So every task records the hash of each
target right after its action (:func:`record`), in
``<build>/.produced.json``, and is up to date only while every target still
hashes to that (:func:`intact`, a doit ``uptodate`` callable): a target
changed by anything else makes its task run again in the same build, before
anything downstream reads it.  :func:`check_signable` is the manifest's last
check of the same thing before it signs.

Hashes come through the build's :class:`~cachebuild._util.statcache.HashCache`:
an untouched target costs a ``stat``, not a read.  The record is written by
rename and not fsynced: a lost record only makes its tasks run again.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from cachebuild._util.fs import atomic_write
from cachebuild._util.hashing import is_sha256_hex
from cachebuild._util.statcache import HASH_CACHE_NAME, HashCache
from cachebuild.errors import BuildError

__all__ = ["PRODUCED_NAME", "record", "intact", "check_signable", "forget"]

PRODUCED_NAME = ".produced.json"
_FORMAT = "cachebuild/produced-v1"
_lock = threading.Lock()
_hash_caches: dict[str, HashCache] = {}
_ledgers: dict[str, tuple[tuple[int, ...] | None, dict[str, str]]] = {}


def _hash_cache(build: Path) -> HashCache:
    key = str(build)
    with _lock:
        if key not in _hash_caches:
            _hash_caches[key] = HashCache(build / HASH_CACHE_NAME)
        return _hash_caches[key]


def _sig(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read(build: Path) -> dict[str, str]:
    """The record of ``build``: target (relative to ``build``) -> SHA-256; empty when none or damaged."""
    path = build / PRODUCED_NAME
    sig = _sig(path)
    cached = _ledgers.get(str(build))
    if cached is not None and cached[0] == sig and sig is not None:
        return dict(cached[1])
    try:
        doc = json.loads(path.read_bytes())
        entries = doc["entries"] if doc.get("format") == _FORMAT else {}
        entries = {k: v for k, v in entries.items() if isinstance(k, str) and is_sha256_hex(v)}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        entries = {}
    _ledgers[str(build)] = (sig, entries)
    return dict(entries)


def _write(build: Path, entries: Mapping[str, str]) -> None:
    path = build / PRODUCED_NAME
    doc = {"format": _FORMAT, "entries": dict(entries)}
    atomic_write(path, json.dumps(doc, sort_keys=True).encode(), durable=False)
    _ledgers[str(build)] = (_sig(path), dict(entries))


def _rel(build: Path, target: str | os.PathLike[str]) -> str:
    return os.path.relpath(os.path.abspath(target), os.path.abspath(build))


def record(build: str | os.PathLike[str], targets: Sequence[str]) -> None:
    """Record the SHA-256 of each of ``targets`` as what its task produced (a doit python-action).

    Each target is made read-only first (``chmod a-w``): published
    releases hard-link these files, and a release is read-only on disk.
    """
    b = Path(build)
    cache = _hash_cache(b)
    digests = {}
    for t in targets:
        if os.path.isfile(t):
            cache.make_read_only(t)
            digests[_rel(b, t)] = cache.sha256(t)[0]
    cache.save()
    with _lock:
        entries = _read(b)
        entries.update(digests)
        _write(b, entries)


def intact(build: str | os.PathLike[str], targets: Sequence[str]) -> bool:
    """True while every target still hashes to what its task recorded (a doit ``uptodate`` callable).

    A missing target or record is False: the task runs and records again.
    """
    b = Path(build)
    entries = _read(b)
    cache = _hash_cache(b)
    try:
        for t in targets:
            want = entries.get(_rel(b, t))
            if want is None or cache.sha256(t)[0] != want:
                return False
    except OSError:
        return False
    finally:
        try:
            cache.save()
        except OSError:  # only a cache (a full disk, say): the next check hashes again
            pass
    return True


def forget(build: str | os.PathLike[str], rels: Sequence[str]) -> None:
    """Drop ``rels`` from the record, so that their tasks run again."""
    b = Path(build)
    with _lock:
        entries = _read(b)
        for rel in rels:
            entries.pop(rel, None)
        _write(b, entries)


def check_signable(build: str | os.PathLike[str], digests: Mapping[str, str]) -> None:
    """Refuse to sign an artifact whose hash is not the one its task recorded.

    ``digests`` maps artifact paths (relative to ``build``) to the SHA-256
    about to be signed.  A mismatch is forgotten from the record, so the
    next build makes the artifact again.

    Raises
    ------
    BuildError
        ``phase="manifest"``, naming the first such artifact.
    """
    b = Path(build)
    entries = _read(b)
    bad = sorted(rel for rel, digest in digests.items() if entries.get(rel) != digest)
    if not bad:
        return
    forget(b, bad)
    rel = bad[0]
    got, want = digests[rel], entries.get(rel)
    raise BuildError(
        f"{rel} in {b} is not what the build wrote (sha256 {got[:12]}…, its task recorded "
        f"{want[:12] + '…' if want else 'nothing'}): it was changed after it was made, and is not signed",
        phase="manifest",
        remedy="run build-cache again: it makes the artifact again; look for what else writes to the build directory",
    )
