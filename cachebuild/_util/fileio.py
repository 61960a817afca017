"""Copying a file in the kernel, and asking the kernel to start writing a file back.

:func:`copy_file` uses ``copy_file_range`` (no pass through Python; a shared
extent where the filesystem can), falling back to read and write where the
kernel or filesystem lacks it.  :func:`start_writeback` is Linux
``sync_file_range(SYNC_FILE_RANGE_WRITE)``: advice that lets a later fsync
find little left to write, never durability itself.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["CHUNK", "copy_file", "start_writeback", "start_writeback_of"]

#: Bytes read at a time when a file is copied through Python: memory stays flat.
CHUNK = 1 << 17
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the dirty pages, do not wait
#: copy_file_range's failures that mean "not here" (old kernel, some network or FUSE filesystems).
_NO_COPY_RANGE = (errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM)


def copy_file(src: Path, dst: Path, chunk: int = CHUNK) -> None:
    """Copy ``src`` to a new file ``dst`` in the kernel (``copy_file_range``), or through Python where it cannot.

    A ``src`` that shrinks under the copy leaves ``dst`` short: the caller
    checks what it copied.
    """
    copy_range = getattr(os, "copy_file_range", None)  # Linux only
    with open(src, "rb", buffering=0) as fi, open(dst, "xb", buffering=0) as fo:
        left = os.fstat(fi.fileno()).st_size
        try:
            while left > 0 and copy_range is not None:
                n = copy_range(fi.fileno(), fo.fileno(), min(left, 1 << 30))
                if n == 0:  # the file shrank under us
                    return
                left -= n
            if copy_range is not None:
                return
        except OSError as exc:
            # no copy_file_range here: copy what is left by read and write;
            # anything else (ENOSPC) is an error
            if exc.errno not in _NO_COPY_RANGE:
                raise
        shutil.copyfileobj(fi, fo, chunk)


@functools.cache
def _sync_file_range() -> Any:
    import ctypes

    try:  # the interpreter's own symbols hold libc's (find_library would run ldconfig)
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int) -> bool:
    """Ask the kernel to start writing ``fd``'s dirty pages to disk now, without waiting for them.

    Advice, not durability (that is an fsync).  Returns False where it is
    not available, or refused (a bad descriptor).
    """
    fn = _sync_file_range()
    return fn is not None and fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0


def start_writeback_of(path: str | os.PathLike[str]) -> bool:
    """:func:`start_writeback` of the file at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return start_writeback(fd)
    finally:
        os.close(fd)
