"""Who uses the shared store: a shared/exclusive lock and a registry of caches.

Builds read and write the store while ``doit gc-store`` may remove from it,
so the two take one lock, ``<store>/gc.lock``, with ``flock``: every build
action that touches the store holds it *shared* (any number of builds at
once), garbage collection holds it *exclusive*.  A build that finds the
collector running waits for it and says so; the collector does not wait
(exit 50).  flock locks die with their holder, so a killed process never
leaves the store locked.

Every cache that uses a store registers its directory under
``<store>/caches/`` (one small file per cache, written by the build under
the shared lock), so the collector knows every cache whose releases and
staged build it must keep, wherever ``CACHE_DIR`` points.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TextIO

from cachebuild.errors import LockHeldError

__all__ = [
    "LOCK_NAME",
    "CACHES_DIR",
    "StoreLock",
    "register_cache",
    "registered_caches",
    "store_user",
]

LOCK_NAME = "gc.lock"
CACHES_DIR = "caches"


class StoreLock:
    """``flock`` on ``<store>/gc.lock``: shared (builds) or exclusive (gc-store).

    Parameters
    ----------
    store_root
        The store.
    exclusive
        Exclusive (the collector) or shared (a build).
    wait
        Wait for the lock (builds) or raise :class:`LockHeldError` at once.
    stream
        Where a waiting build says what it waits for (stderr by default).
    """

    def __init__(
        self,
        store_root: str | os.PathLike[str],
        *,
        exclusive: bool,
        wait: bool = True,
        stream: TextIO | None = None,
    ):
        self.path = Path(store_root) / LOCK_NAME
        self.exclusive = exclusive
        self.wait = wait
        self.stream = stream
        self._fd: int | None = None

    def acquire(self) -> StoreLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not self.wait:
                    what = "a build is using" if self.exclusive else "gc-store is collecting"
                    raise LockHeldError(
                        f"{what} the store ({self.path} is locked)",
                        remedy="wait for it to finish and run the command again",
                    ) from None
                stream = self.stream or sys.stderr
                stream.write(f"waiting for gc-store to finish with the store ({self.path}) ...\n")
                stream.flush()
                fcntl.flock(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _entry(store_root: Path, cache_dir: Path) -> Path:
    digest = hashlib.sha256(str(cache_dir).encode()).hexdigest()[:24]
    return store_root / CACHES_DIR / f"{digest}.json"


def register_cache(store_root: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> None:
    """Record that the cache at ``cache_dir`` uses this store (idempotent, atomic)."""
    root = Path(store_root)
    cache = Path(cache_dir).absolute()
    path = _entry(root, cache)
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps({"cache_dir": str(cache)}))
    os.replace(tmp, path)


def registered_caches(store_root: str | os.PathLike[str], *, prune: bool = False) -> list[Path]:
    """The cache directories registered with this store.

    With ``prune``, entries whose cache directory is gone are removed (its
    data is then unreferenced).
    """
    base = Path(store_root) / CACHES_DIR
    out: list[Path] = []
    if not base.is_dir():
        return out
    for entry in sorted(base.glob("*.json")):
        try:
            cache = Path(json.loads(entry.read_text())["cache_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if cache.is_dir():
            out.append(cache)
        elif prune:
            entry.unlink(missing_ok=True)
    return out


@contextmanager
def store_user(store: str, cache_dir: str | None = None) -> Iterator[None]:
    """Hold the store's shared lock (gc-store waits) and register the cache with it.

    Every action that reads or writes the store runs inside this, so
    ``doit gc-store`` never removes what a running build is using, and
    knows every cache directory that uses the store.
    """
    with StoreLock(store, exclusive=False):
        if cache_dir is not None:
            register_cache(store, cache_dir)
        yield
