"""Files written whole or not at all: one atomic writer, with the durability said at each call.

``durable=False`` is atomic against a killed process (temp file, rename):
build state, made durable by publish's fsync of every release file before
it becomes current.  ``durable=True`` also fsyncs the file before the rename,
for what must survive a power cut by itself (the model, the manifest, the
accepted-version record, keys).  A caller that needs the rename itself to
survive a power cut fsyncs the directory too (:func:`fsync_dir`).
:func:`write_exclusive` creates a file once, fsynced, among concurrent
creators (the development signing key).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

__all__ = ["atomic_save_npy", "atomic_write", "fsync_dir", "temp_name", "write_exclusive"]


def temp_name(path: Path) -> Path:
    """A temp file beside ``path``, unique per process and call (``publish.clean_leftovers`` removes strays)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | os.PathLike[str], data: bytes, *, durable: bool) -> None:
    """Replace ``path`` with ``data`` in one rename; fsync the file first when ``durable``."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_npy(path: str | os.PathLike[str], array: Any) -> None:
    """``numpy.save`` to ``path`` through a temp file and a rename (build state: not fsynced)."""
    import numpy as np

    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so a rename inside it survives a power cut (or a file, by path)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` (mode 0600) holding ``data``, unless it exists.

    The bytes go to a private temporary file first, which is then hard-linked
    to ``path``: ``link`` fails if ``path`` exists, so exactly one of several
    concurrent creators wins and no one ever sees a half-written key.

    Returns
    -------
    bool
        True if this call created ``path``.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        _write_synced(os.open(tmp, flags, 0o600), data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # No hard links on this file system: create in place (O_EXCL
            # still elects one winner; losers wait for complete content).
            pass
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            return False
        _write_synced(fd, data)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _write_synced(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
