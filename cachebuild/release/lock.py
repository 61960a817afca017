"""The cache lock: one build (or clean) of a cache at a time.

doit has no run lock, so the wrapper holds this one across the whole run,
doit's database included.  It is an OS file lock (flock through
``filelock``): a holder killed with SIGKILL frees it at once.  The holder's
pid is written beside it so a refused build can say who holds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from cachebuild.errors import LockHeldError

if TYPE_CHECKING:
    import filelock

__all__ = ["CacheLock"]


class CacheLock:
    """Take the lock at ``path`` without waiting, or raise :class:`LockHeldError`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.pid_file = self.path.with_name(self.path.name + ".pid")
        self._lock: filelock.BaseFileLock | None = None

    def acquire(self) -> CacheLock:
        import filelock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.path), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except filelock.Timeout:
            holder = self.holder()
            who = f"pid {holder}" if holder else "a process whose pid is not recorded yet"
            raise LockHeldError(
                f"another build holds the lock {self.path} ({who})",
                remedy="wait for it to finish, or stop that process; the lock frees itself "
                "when its holder exits",
            ) from None
        self._lock = lock
        tmp = self.pid_file.with_name(f".{self.pid_file.name}.{os.getpid()}")
        try:
            tmp.write_text(f"{os.getpid()}\n")
            os.replace(tmp, self.pid_file)
        except OSError:  # only for messages (a full disk, say): the lock itself is held
            tmp.unlink(missing_ok=True)
        return self

    def holder(self) -> int | None:
        """The pid recorded by the current holder, if any."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._lock is not None:
            try:
                if self.holder() == os.getpid():
                    self.pid_file.unlink()
            except OSError:
                pass
            self._lock.release()
            self._lock = None

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
