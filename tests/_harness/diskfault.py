"""Make the N-th write of an in-process build fail with ENOSPC, and name its site.

:class:`DiskFault` wraps, for as long as it is active, every way a build
writes from Python: ``os.write``, ``os.copy_file_range``, files opened for writing (``open``,
``io.open``, ``os.fdopen``, so ``Path.write_bytes``, ``np.save`` and
buffered writers too: each ``write`` and ``flush``), ``os.fsync`` /
``os.fdatasync``, ``os.link``, ``os.symlink``, ``os.mkdir``, ``shutil.copy2``
and SQLite connections (every data-changing statement and ``commit``: the
store's refs, the descriptor index, the MBTiles file, doit's database).  Each
call is one *write* (``os.write`` to a pipe or a socket is none: paramiko's
and the process pools' wake-up pipes are not the disk); its *site* is the first caller inside ``cachebuild/``,
``targets/`` or doit (``cachebuild/store/objects.py:187 os.write``).

Recording mode (no ``fail_at``, no ``fail_site``) lists every write of a
run in order; with ``fail_at=n`` the n-th write raises ``OSError(ENOSPC)``
(SQLite: ``sqlite3.OperationalError("database or disk is full")``), with
``fail_site=s`` the first write at site ``s`` does (deterministic where
threads interleave writes, as the tiles phase's do); either way every
later write fails too, as on a full disk.  Writes
the C libraries make themselves (ONNX Runtime saving an engine, faiss
writing an index) are not seen: the real run on a small filesystem
(tests/scenarios/test_disk_full.py) covers those.

As a program, ``python -m tests._harness.diskfault N COMMAND ARGS...`` runs
``doit COMMAND ARGS...`` (a real doit process) with its N-th write failing,
and every one after it: a disk that fills during the command
(tests/scenarios/test_sequences.py).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import sqlite3
import stat
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["DiskFault", "full", "main"]

_OURS = (f"{os.sep}cachebuild{os.sep}", f"{os.sep}targets{os.sep}", f"{os.sep}doit{os.sep}")
_WRITE_SQL = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER", "VACUUM")


def _regular(fd: int) -> bool:
    """Whether ``fd`` is a file on a disk (a write to a pipe, a socket or a tty never fills one)."""
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return True  # a closed descriptor: the real write says so


def full(path: Any = None) -> OSError:
    """The error a full disk raises."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([] if path is None else [str(path)]))


class DiskFault:
    """Count (and optionally fail) the writes of the code run while active."""

    def __init__(self, fail_at: int | None = None, fail_site: str | None = None):
        self.fail_at = fail_at
        self.fail_site = fail_site
        self.sites: list[str] = []  # every write, in order
        self.failed: str | None = None  # the site that failed first
        self._lock = threading.Lock()
        self._full = False

    # -- the bookkeeping ----------------------------------------------------------

    @staticmethod
    def _site(kind: str) -> str:
        f = sys._getframe(2)
        while f is not None:
            name = f.f_code.co_filename
            # the one atomic writer (_util/fs.py) is a helper: the site is its caller
            if any(part in name for part in _OURS) and not name.endswith(
                ("diskfault.py", f"_util{os.sep}fs.py")
            ):
                # the path from the package root on: cachebuild/store/objects.py
                start = max(name.rfind(part) for part in _OURS)
                rel = name[start + 1 :].replace(os.sep, "/")
                return f"{rel}:{f.f_lineno} {kind}"
            f = f.f_back
        return f"elsewhere {kind}"

    def _hit(self, kind: str, path: Any = None, sql: bool = False) -> None:
        site = self._site(kind)
        with self._lock:
            self.sites.append(site)
            n = len(self.sites)
            if (self.fail_at is not None and n >= self.fail_at) or site == self.fail_site:
                self._full = True
                if self.failed is None:
                    self.failed = site
            failing = self._full
        if failing:
            if sql:
                raise sqlite3.OperationalError("database or disk is full")
            raise full(path)

    # -- the wrappers -------------------------------------------------------------

    @contextmanager
    def active(self) -> Iterator[DiskFault]:
        fault = self
        real_open, real_io_open, real_fdopen = builtins.open, io.open, os.fdopen
        real = {
            n: getattr(os, n)
            for n in ("write", "fsync", "fdatasync", "link", "symlink", "mkdir", "copy_file_range")
        }
        real_copy2 = shutil.copy2
        real_connect = sqlite3.connect

        class File:
            """A file opened for writing; its writes and flushes count."""

            def __init__(self, fh: Any, path: Any):
                object.__setattr__(self, "_fh", fh)
                object.__setattr__(self, "_path", path)

            def write(self, data: Any) -> Any:
                fault._hit("write", self._path)
                return self._fh.write(data)

            def flush(self) -> None:
                fault._hit("flush", self._path)
                self._fh.flush()

            def close(self) -> None:
                self._fh.close()  # a real close flushes what was written (seen above)

            def __enter__(self) -> Any:
                return self

            def __exit__(self, *exc: Any) -> None:
                self._fh.close()

            def __iter__(self) -> Any:
                return iter(self._fh)

            def __getattr__(self, name: str) -> Any:
                return getattr(self._fh, name)

            def __setattr__(self, name: str, value: Any) -> None:
                setattr(self._fh, name, value)

        def wrap_open(opener: Any) -> Any:
            def opened(file: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
                if not any(c in mode for c in "wax+"):
                    return opener(file, mode, *args, **kw)
                fault._hit("open", file)  # creating or truncating the file
                return File(opener(file, mode, *args, **kw), file)

            return opened

        def wrapped(name: str) -> Any:
            fn = real[name]

            def call(*args: Any, **kw: Any) -> Any:
                if name == "write" and not _regular(args[0]):
                    return fn(*args, **kw)  # a pipe or a socket: a full disk does not fail those
                fault._hit(name, args[0] if args and not isinstance(args[0], int) else None)
                return fn(*args, **kw)

            return call

        def copy2(src: Any, dst: Any, *args: Any, **kw: Any) -> Any:
            fault._hit("copy2", dst)
            return real_copy2(src, dst, *args, **kw)

        class Conn:
            """An SQLite connection; data-changing statements and commits count."""

            def __init__(self, conn: Any):
                object.__setattr__(self, "_conn", conn)

            def _check(self, sql: str) -> None:
                if sql.lstrip().upper().startswith(_WRITE_SQL) or sql.strip().upper() in (
                    "COMMIT",
                    "END",
                ):
                    fault._hit("sqlite", sql=True)

            def execute(self, sql: str, *args: Any) -> Any:
                self._check(sql)
                return self._conn.execute(sql, *args)

            def executemany(self, sql: str, *args: Any) -> Any:
                self._check(sql)
                return self._conn.executemany(sql, *args)

            def executescript(self, sql: str) -> Any:
                self._check(sql)
                return self._conn.executescript(sql)

            def commit(self) -> None:
                if self._conn.in_transaction:
                    fault._hit("sqlite commit", sql=True)
                self._conn.commit()

            def __enter__(self) -> Any:
                return self

            def __exit__(self, et: Any, *rest: Any) -> Any:
                return self._conn.__exit__(et, *rest)

            def __getattr__(self, name: str) -> Any:
                return getattr(self._conn, name)

            def __setattr__(self, name: str, value: Any) -> None:
                setattr(self._conn, name, value)

        def connect(*args: Any, **kw: Any) -> Any:
            return Conn(real_connect(*args, **kw))

        builtins.open = io.open = wrap_open(real_open)  # type: ignore[assignment]
        os.fdopen = wrap_open(real_fdopen)  # type: ignore[assignment]
        for name in real:
            setattr(os, name, wrapped(name))
        shutil.copy2 = copy2  # type: ignore[assignment]
        sqlite3.connect = connect  # type: ignore[assignment]
        try:
            yield self
        finally:
            builtins.open, io.open, os.fdopen = real_open, real_io_open, real_fdopen  # type: ignore[assignment]
            for name, fn in real.items():
                setattr(os, name, fn)
            shutil.copy2 = real_copy2  # type: ignore[assignment]
            sqlite3.connect = real_connect  # type: ignore[assignment]

    def first_of_each_site(self) -> list[tuple[int, str]]:
        """``(n, site)`` of the first write at each site, in order (n counts from 1)."""
        seen: dict[str, int] = {}
        for i, site in enumerate(self.sites, 1):
            seen.setdefault(site, i)
        return sorted((n, s) for s, n in seen.items())


def main(argv: list[str]) -> int:
    """``N COMMAND ARGS...``: run ``doit COMMAND ARGS...`` here with the N-th write failing."""
    from doit.doit_cmd import DoitMain

    fail_at, rest = int(argv[0]), argv[1:]
    sys.argv = ["doit", *rest]  # a doit process, as cachebuild's start-up code sees it
    with DiskFault(fail_at=fail_at).active():
        return int(DoitMain().run(rest))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
