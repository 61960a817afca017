"""Hashes remembered by ``stat``, with git's index rules.

A file's SHA-256 is remembered together with what ``stat`` says of it, and
trusted again only while all of that is unchanged: device, inode, size,
``mtime_ns`` and ``ctime_ns``.  ``touch -r``, ``cp -p`` and archive tools
can restore an mtime; none can set the ctime, which the kernel moves on
every write, rename onto the name, ``utime`` and ``chmod``.

As git's index does ("racy git"), an entry recorded while the file's
mtime was not yet older than the record is not trusted: a second write
within the same timestamp tick would keep every field equal.  (A write
always moves the mtime, so a ctime moved by ``chmod`` alone, as
:meth:`HashCache.make_read_only` does, leaves an entry settled.)  Such an
entry is hashed again at its next use and, the file being settled by then,
remembered for good.  :func:`racy` decides with the tick of the file's
filesystem: whole-second timestamps (FAT, some network filesystems) get two
seconds, finer ones a margin over the kernel's coarsest clock tick.

Used by :class:`HashCache` (``.sha256-cache.json``: the artifacts' hashes),
:func:`doit_file_checker` (doit's file dependencies), the companion push's
hash cache and the signing key's id cache.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_write
from cachebuild._util.hashing import is_sha256_hex, sha256_file

__all__ = [
    "HASH_CACHE_NAME",
    "HashCache",
    "doit_file_checker",
    "remember_written",
    "wait_past_tick",
    "stat_key",
    "racy",
    "still_valid",
]

#: A timestamp tick on filesystems with sub-second timestamps: above the
#: kernel's coarse clock tick (1/HZ, 10 ms at HZ=100), with a margin.
FINE_TICK_NS = 20_000_000
#: Whole-second filesystems: FAT's mtime has a 2 s resolution.
COARSE_TICK_NS = 2_000_000_000


def stat_key(st: os.stat_result) -> list[int]:
    """What must not change for a remembered hash to hold: device, inode, size, mtime, ctime."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def racy(st_key: list[int], recorded_ns: int) -> bool:
    """True if a write in the same tick as the record could have kept ``st_key`` (git's racy entry).

    ``recorded_ns`` is the wall-clock time (``time.time_ns()``) taken after
    the ``stat`` that gave ``st_key``.  An mtime in the future is racy for
    as long as it is.
    """
    mtime = st_key[3]
    tick = COARSE_TICK_NS if mtime % 1_000_000_000 == 0 else FINE_TICK_NS
    return recorded_ns - mtime < tick


def still_valid(st: os.stat_result, st_key: object, recorded_ns: object) -> bool:
    """True if a hash remembered with ``st_key`` at ``recorded_ns`` still holds for a file whose stat is ``st``."""
    return (
        isinstance(recorded_ns, int)
        and stat.S_ISREG(st.st_mode)
        and stat_key(st) == st_key
        and not racy(stat_key(st), recorded_ns)
    )


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


#: The hash cache's file name in a build directory (never published).
HASH_CACHE_NAME = ".sha256-cache.json"
_HASH_CACHE_FORMAT = "cachebuild/sha256-cache-v2"


class HashCache:
    """SHA-256 of files, remembered for as long as their ``stat`` is unchanged.

    The build hashes its large artifacts once: the MBTiles writer hashes the
    file it wrote and remembers it here; doit's file checker
    (:func:`doit_file_checker`), the record of what each task produced
    (:mod:`cachebuild.release.produced`) and the manifest reuse it instead of
    reading the file again.  An entry is keyed by the file's path (relative
    to the cache file's directory) and holds :func:`stat_key` and the time
    it was recorded; a racy entry (:func:`racy`) is hashed again.

    The cache is a plain JSON file written by rename; one that cannot be
    read (or an older format) is ignored: every file is hashed again.
    Several instances in one process see each other's entries: each reads
    the file again when it changed, and a save merges.

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
        self._seen: tuple[int, int, int, int] | None = (
            None  # the cache file as last read or written
        )
        #: how many lookups were answered from the cache, and how many hashed
        self.hits = 0
        self.misses = 0

    def _file_sig(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

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
                and len(v) == 7
                and all(_int(x) for x in v[:6])
                and is_sha256_hex(v[6])
            }
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}

    def _key(self, path: str | os.PathLike[str]) -> str:
        return os.path.relpath(os.path.abspath(path), self.root)

    def lookup(self, path: str | os.PathLike[str]) -> tuple[str, int] | None:
        """``(hex sha256, size)`` remembered for ``path`` if its stat still matches (and is not racy), else None."""
        with self._lock:
            self._refresh()
            entry = self._entries.get(self._key(path))
        if entry is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not still_valid(st, entry[:5], entry[5]):
            return None
        return entry[6], st.st_size

    def remember(self, path: str | os.PathLike[str], digest: str, st: os.stat_result) -> None:
        """Remember that ``path``, as ``st`` describes it, hashes to ``digest``.

        ``st`` must be taken after the last write (and rename) of the file.
        """
        if not is_sha256_hex(digest):
            raise ValueError(f"digest must be a hex SHA-256, got {digest!r}")
        entry = [*stat_key(st), time.time_ns(), digest]
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
        if stat_key(before) == stat_key(after) and size == after.st_size:
            self.remember(path, digest, after)
        return digest, size

    def settle(self, max_wait_s: float = 0.05) -> int:
        """Hash racy entries again once their tick has passed, so the next run trusts them; returns how many.

        The build calls this once, at its end (the manifest): files written
        moments before their hash was remembered would otherwise be read
        again by the next run.  Waits at most ``max_wait_s`` (entries of
        whole-second filesystems stay racy).
        """
        with self._lock:
            self._refresh()
            pending = [(k, e) for k, e in self._entries.items() if racy(e[:5], e[5])]
        now = time.time_ns()
        waits = [FINE_TICK_NS - (now - e[3]) for _, e in pending if e[3] % 1_000_000_000]
        if not waits or max(waits) > max_wait_s * 1e9:
            return 0
        time.sleep(max(0, max(waits)) / 1e9)
        settled = 0
        for k, e in pending:
            path = os.path.join(self.root, k)
            try:
                before = os.stat(path)
                if stat_key(before) != e[:5]:
                    continue
                digest, _ = sha256_file(path)
                after = os.stat(path)
            except OSError:
                continue
            if digest == e[6] and stat_key(after) == e[:5]:
                self.remember(path, digest, after)
                settled += 1
        return settled

    def remember_unmoved(
        self, path: str | os.PathLike[str], digest: str, before: list[int]
    ) -> None:
        """Remember ``digest`` for ``path`` again when only its ctime moved since ``before``
        (its :func:`stat_key`): a hard link made or removed, a chmod.  Gone: nothing."""
        try:
            after = os.stat(path)
        except OSError:
            return
        if stat_key(after)[:4] == before[:4]:
            self.remember(path, digest, after)

    def make_read_only(self, path: str | os.PathLike[str]) -> None:
        """``chmod a-w`` ``path``, keeping its remembered hash (only the ctime moves)."""
        before = os.stat(path)
        mode = stat.S_IMODE(before.st_mode)
        if not mode & 0o222:
            return
        hit = self.lookup(path)
        os.chmod(path, mode & ~0o222)
        if hit is not None:
            self.remember_unmoved(path, hit[0], stat_key(before))

    def save(self) -> None:
        """Write the cache, merged with what others saved meanwhile; entries of files gone are dropped.

        Not fsynced: a cache lost in a power cut only means hashing again.
        """
        with self._lock:
            if not self._mine:
                return
            self._refresh()
            keep = {
                k: v
                for k, v in self._entries.items()
                if os.path.lexists(os.path.join(self.root, k))
            }
            doc = {"format": _HASH_CACHE_FORMAT, "entries": keep}
            atomic_write(self.path, json.dumps(doc, sort_keys=True).encode(), durable=False)
            self._entries, self._mine, self._seen = keep, {}, self._file_sig()


def wait_past_tick(paths: list[Path]) -> None:
    """Sleep until a timestamp tick has passed since the newest of ``paths`` was written, so
    that a hash remembered now is not racy (:func:`racy`)."""
    newest = max((os.stat(p).st_mtime_ns for p in paths), default=0)
    wait = FINE_TICK_NS - (time.time_ns() - newest)
    if 0 < wait <= FINE_TICK_NS:
        time.sleep(wait / 1e9)


def remember_written(cache_file: str | os.PathLike[str], written: list[tuple[Path, str]]) -> None:
    """Remember the SHA-256 of files hashed as they were written, in the :class:`HashCache` at
    ``cache_file``: one timestamp tick after the last write, so that the entries are not
    racy and the next reader trusts them.  Only a cache: a failure leaves them to be hashed."""
    try:
        wait_past_tick([p for p, _ in written])
        cache = HashCache(cache_file)
        for path, digest in written:
            cache.remember(path, digest, os.stat(path))
        cache.save()
    except OSError:
        pass


def doit_file_checker(cache_file: str | os.PathLike[str]) -> type:
    """A doit file checker (``check_file_uptodate``) that hashes through a :class:`HashCache`.

    A file dependency's state is ``[dev, ino, size, mtime_ns, ctime_ns,
    recorded_ns, "sha256:<hex>"]``.  While the stat is unchanged and the
    record not racy (:func:`racy`) the file is unmodified; otherwise its
    SHA-256 (remembered in ``cache_file`` by the writer, or hashed once
    there) decides.  A state of doit's own form (an older cachebuild)
    is decided by its hash too.

    The class has doit's checker interface (``exists``, ``info``,
    ``check_modified``, ``get_state``, ``CheckerError``) without importing
    doit; its name is kept so that doit does not treat older states as
    another checker's.
    """
    cache = HashCache(cache_file)

    def digest(path: str) -> str:
        value, _ = cache.sha256(path)
        cache.save()
        return "sha256:" + value

    def fresh(st: os.stat_result, state: Any) -> bool:
        return (
            isinstance(state, (list, tuple))
            and len(state) == 7
            and still_valid(st, list(state[:5]), state[5])
        )

    class HashCacheChecker:
        CheckerError = OSError

        def exists(self, file_path: str) -> bool:
            return os.path.exists(file_path)

        def info(self, file_path: str) -> os.stat_result:
            return os.stat(file_path)

        def check_modified(self, file_path: str, file_stat: os.stat_result, state: Any) -> bool:
            if fresh(file_stat, state):
                return False
            if not isinstance(state, (list, tuple)) or not state or not isinstance(state[-1], str):
                return True
            return state[-1] != digest(file_path)

        def get_state(self, dep: str, current_state: Any) -> Any:
            st = os.stat(dep)
            if fresh(st, current_state):
                return None
            value = digest(dep)
            return [*stat_key(st), time.time_ns(), value]

    return HashCacheChecker
