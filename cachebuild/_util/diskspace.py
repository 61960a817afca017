"""A full disk, told as one: which write failed, where space is short, what to do.

A write can fail for lack of space anywhere in a build: a tile object, a
journal line, an ``.npy`` file, a descriptor shard, SQLite (the store's
refs, the descriptor index, the MBTiles file, doit's database), a release
being assembled.  Python reports ``OSError(ENOSPC)`` (or ``EDQUOT`` over a
quota), SQLite ``SQLITE_FULL`` ("database or disk is full").  Each becomes
a :class:`~cachebuild.errors.DiskFullError` (exit 24) naming the phase, the
file when known, and how much room ``STORE`` and ``CACHE_DIR`` have left.

Every write goes to a temporary name first and is renamed into place, so a
full disk leaves the published cache and the store as they were
(tests/scenarios/test_disk_full.py fails each write of a build in turn).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from cachebuild._util.sizes import human_bytes
from cachebuild.errors import DiskFullError

__all__ = ["is_disk_full", "disk_full_error", "free_space_note"]

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_SQLITE_FULL = 13


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk is full."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if type(exc).__module__ == "sqlite3" and (
            getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(exc)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _find(exc: BaseException) -> BaseException:
    """The exception in ``exc``'s chain that says the disk is full (else ``exc``)."""
    cur: BaseException | None = exc
    seen = 0
    while cur is not None and seen < 10:
        if isinstance(cur, OSError) and cur.errno in _FULL_ERRNOS:
            return cur
        if type(cur).__module__ == "sqlite3" and (
            getattr(cur, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(cur)
        ):
            return cur
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return exc


def _free(path: Path) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def free_space_note(places: Mapping[str, str | os.PathLike[str]]) -> str:
    """``"free space: STORE /s 0 B, CACHE_DIR /c 2.0 GiB"`` for ``{"STORE": "/s", ...}``."""
    parts = []
    for name, path in places.items():
        free = _free(Path(path))
        parts.append(f"{name} {path} {'?' if free is None else human_bytes(free)}")
    return "free space: " + ", ".join(parts)


def disk_full_error(
    exc: BaseException, phase: str, places: Mapping[str, str | os.PathLike[str]] | None = None
) -> DiskFullError:
    """The :class:`DiskFullError` for ``exc``, a failure :func:`is_disk_full` recognised."""
    if isinstance(exc, DiskFullError):
        return exc
    found = _find(exc)
    if isinstance(found, OSError):
        where = found.filename or getattr(found, "filename2", None)
        what = found.strerror or os.strerror(found.errno or errno.ENOSPC)
        detail = f"writing {where}: {what}" if where else what
    else:
        detail = f"SQLite: {found}"
    msg = f"disk full during {phase} ({detail})"
    if places:
        msg += "; " + free_space_note(places)
    err = DiskFullError(msg, phase=phase)
    err.__cause__ = exc
    return err
