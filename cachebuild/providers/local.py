"""Providers that read local data: the built-in synthetic imagery, an MBTiles
file and a directory tree of tile images.

sqlite3 is imported when an MBTiles file is opened.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from cachebuild._util.cpus import usable_cpus
from cachebuild._util.hashing import sha256_file
from cachebuild.errors import DownloadError, UsageError
from cachebuild.providers.base import (
    DEFAULT_TILE_SIZE,
    MAX_TILE_BYTES,
    TileFetchError,
    check_image,
    fill_template,
    template_placeholders,
)
from cachebuild.providers.mbtilesfile import connect_readonly, read_tile, tile_length
from cachebuild.providers.synthetic import SYNTHETIC_VERSION, synthetic_tile_bytes
from cachebuild.tilemath import Tile

if TYPE_CHECKING:
    import sqlite3

__all__ = [
    "DEFAULT_MBTILES_CONCURRENCY",
    "DEFAULT_LOCAL_CONCURRENCY",
    "MAX_QUERY_STEPS",
    "TREE_EXTENSIONS",
    "DIRECTORY_PLACEHOLDERS",
    "SyntheticProvider",
    "MBTilesProvider",
    "DirectoryProvider",
    "mbtiles_stamp",
    "tree_fingerprint",
    "tree_stamp",
]

DEFAULT_MBTILES_CONCURRENCY = 4
DEFAULT_LOCAL_CONCURRENCY = min(8, usable_cpus())
#: Extensions a bare directory's ``{z}/{x}/{y}.<ext>`` files may have, in the order tried.
TREE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: The placeholders a directory template may use: no ``{s}``, no ``{key}``.
DIRECTORY_PLACEHOLDERS = ("z", "x", "y", "-y", "q")


class SyntheticProvider:
    """The built-in offline imagery; no network, never missing a tile."""

    def __init__(self) -> None:

        self.identity = f"synthetic:v{SYNTHETIC_VERSION}"
        self.concurrency = usable_cpus()

    def fetch(self, tile: Tile) -> bytes | None:

        return synthetic_tile_bytes(tile)

    def close(self) -> None:
        pass


# -- MBTiles ---------------------------------------------------------------------

#: SQLite steps (VM instructions) one tile's query may take: an indexed
#: lookup takes a few hundred, a scan of an unindexed 100,000-row table a few
#: million; a view that never ends (a recursive CTE) is stopped here.
MAX_QUERY_STEPS = 50_000_000
_STEPS_PER_TICK = 10_000
_CHECKPOINT = "sqlite3 {path} 'PRAGMA wal_checkpoint(TRUNCATE)'"


def mbtiles_stamp(path: str | os.PathLike[str]) -> str | None:
    """The no-op check's stamp of an MBTiles file's write-ahead log (``-wal``): None when it has none.

    A change committed in WAL mode sits in ``<file>-wal`` and leaves the main
    file's size and mtime as they were; the stamp makes the tiles phase run,
    and the provider refuses the file until it is checkpointed.
    """
    wal = Path(os.fspath(path) + "-wal").expanduser().absolute()
    try:
        st = wal.stat()
    except (OSError, ValueError):
        return None
    return f"wal:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}" if st.st_size else None


class _Budget:
    """A query's step budget, as an SQLite progress handler: past it, the query is interrupted."""

    def __init__(self) -> None:
        self.ticks = 0
        self.tripped = False

    def reset(self) -> None:
        self.ticks, self.tripped = 0, False

    def __call__(self) -> int:
        self.ticks += 1
        self.tripped = self.ticks * _STEPS_PER_TICK > MAX_QUERY_STEPS
        return int(self.tripped)


def _connect_guarded(path: Path) -> tuple[sqlite3.Connection, _Budget]:
    """A read-only, immutable connection whose values and queries are bounded.

    No string or blob may exceed :data:`MAX_TILE_BYTES` (SQLite refuses to
    make one: a view returning ``zeroblob(900000000)`` allocates nothing),
    no query may run past :data:`MAX_QUERY_STEPS`, functions a schema may
    call are limited to innocuous ones, and temporary data goes to a file.
    Nothing is ever written: triggers cannot fire.
    """
    import sqlite3

    conn = connect_readonly(path, check_same_thread=False)
    # Connection.setlimit is new in Python 3.11: on 3.10 each tile's length is
    # asked first (tile_length), which bounds plain and zeroblob values too
    setlimit = getattr(conn, "setlimit", None)
    if setlimit is not None:
        setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_TILE_BYTES + 1024)  # type: ignore[attr-defined]
    for pragma in ("trusted_schema = OFF", "query_only = ON", "temp_store = FILE"):
        conn.execute(f"PRAGMA {pragma}")
    budget = _Budget()
    conn.set_progress_handler(budget, _STEPS_PER_TICK)
    return conn, budget


class MBTilesProvider:
    """Tiles read from an MBTiles file (read-only, one connection per thread).

    Raises
    ------
    UsageError
        When the file is missing or is not an MBTiles file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        import sqlite3

        self.path = Path(path).expanduser().absolute()
        if not self.path.is_file():
            raise UsageError(
                f"PROVIDER={self.path}: no such MBTiles file", remedy="check the PROVIDER path"
            )
        if mbtiles_stamp(self.path) is not None:
            # the file is read immutable, as hashed: a change still in the WAL would be neither
            raise UsageError(
                f"PROVIDER={self.path} has changes in its write-ahead log ({self.path.name}-wal) "
                "not yet in the file itself",
                remedy=f"close the program writing it, then run {_CHECKPOINT.format(path=shlex.quote(str(self.path)))}",
            )
        try:
            conn, _ = _connect_guarded(self.path)
            try:
                row = conn.execute(
                    "SELECT type FROM sqlite_master WHERE name = 'tiles' AND type IN ('table', 'view')"
                ).fetchone()
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"PROVIDER={self.path} is not an MBTiles file ({exc})") from None
        if row is None:
            raise UsageError(f"PROVIDER={self.path} is not an MBTiles file: it has no tiles table")
        self._tiles_kind = row[0]
        self.identity = f"mbtiles:sha256={sha256_file(self.path)[0]}"
        self.concurrency = DEFAULT_MBTILES_CONCURRENCY
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []

    def _conn(self) -> tuple[sqlite3.Connection, _Budget]:
        held = getattr(self._local, "conn", None)
        if held is None:
            # closed by close() from another thread, once the workers are done
            held = self._local.conn = _connect_guarded(self.path)
            with self._lock:
                self._conns.append(held[0])
        return held

    def fetch(self, tile: Tile) -> bytes | None:
        import sqlite3

        name = f"tile {tile.z}/{tile.x}/{tile.y}"
        conn, budget = self._conn()
        budget.reset()
        try:
            if not hasattr(conn, "setlimit") and (tile_length(conn, tile) or 0) > MAX_TILE_BYTES:
                raise sqlite3.DataError("string or blob too big")
            data = read_tile(conn, tile)
        except sqlite3.DataError as exc:  # "string or blob too big": SQLite refused to make it
            raise TileFetchError(
                f"{name} in {self.path}: over {MAX_TILE_BYTES} bytes ({exc})", tile=tile
            ) from None
        except sqlite3.Error as exc:
            if budget.tripped:  # every tile would take as long: stop the fetch
                raise DownloadError(
                    f"PROVIDER={self.path}: reading {name} took over {MAX_QUERY_STEPS:,} SQLite steps "
                    f"(its tiles {self._tiles_kind} is not a plain indexed table)",
                    remedy="use an MBTiles file whose tiles table has the unique index "
                    "(zoom_level, tile_column, tile_row) the spec describes",
                ) from None
            raise TileFetchError(f"{name}: {self.path}: {exc}", tile=tile) from exc
        if data is None:
            return None
        why = (
            "over the size limit"
            if len(data) > MAX_TILE_BYTES
            else check_image(data, DEFAULT_TILE_SIZE)
        )
        if why is not None:
            raise TileFetchError(f"{name} in {self.path}: {why}", tile=tile)
        return data

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()


# -- directory tree ----------------------------------------------------------------


def _template_root(template: str) -> Path:
    """The directory above the first placeholder of a path template."""
    head = template.split("{", 1)[0]
    return Path(head if head.endswith(os.sep) else os.path.dirname(head) or ".")


def _inside(root: Path, path: str) -> bool:
    """Whether ``path``, normalised (no symlinks resolved), lies under ``root``."""
    top = os.path.normpath(str(root))
    return os.path.normpath(path).startswith(top.rstrip(os.sep) + os.sep)


def tree_fingerprint(root: Path) -> str:
    """Hex SHA-256 over every file below ``root``: relative path, size, mtime.

    Any added, removed, renamed, resized or rewritten file changes it; the
    bytes are not read.
    """
    h = hashlib.sha256()
    stack = [root]
    entries: list[tuple[str, int, int]] = []
    while stack:
        here = stack.pop()
        with os.scandir(here) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=True):
                    st = entry.stat(follow_symlinks=True)
                    entries.append((os.path.relpath(entry.path, root), st.st_size, st.st_mtime_ns))
    for rel, size, mtime in sorted(entries):
        h.update(f"{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def tree_stamp(root: Path) -> str:
    """A cheap stamp of a tile tree for the no-op check: the mtime of every directory.

    Adding, removing or renaming a file (how tile tools write) changes its
    directory's mtime; only directories are listed, never every file.
    """
    h = hashlib.sha256()
    stack = [root]
    while stack:
        here = stack.pop()
        try:
            st = here.stat()
            h.update(f"{here}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            with os.scandir(here) as it:
                stack.extend(Path(e.path) for e in it if e.is_dir(follow_symlinks=True))
        except OSError:
            h.update(f"{here}\0missing\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _read_regular(path: str) -> bytes:
    """At most :data:`MAX_TILE_BYTES` + 1 bytes of a regular file (a FIFO or device is refused, never waited on)."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb", closefd=True) as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        return fh.read(MAX_TILE_BYTES + 1)  # never more: a huge file is refused, not read


class DirectoryProvider:
    """Tiles read from image files in a directory tree.

    Parameters
    ----------
    template
        A path with placeholders (``{z}``, ``{x}``, ``{y}``, ``{-y}``,
        ``{q}``), e.g. ``/data/tiles/{z}/{x}/{-y}.png``; or a directory,
        which means ``<dir>/{z}/{x}/{y}.<ext>`` with ``<ext>`` one of
        :data:`TREE_EXTENSIONS`.

    A missing file, or an empty one, is no tile; a file that is not a whole
    image fails the tile.  The identity fingerprints the tree (every file's
    name, size and mtime), so the store never serves a tile the tree has
    since replaced.

    Raises
    ------
    UsageError
        For a template with ``{s}``, ``{key}`` or an unknown placeholder,
        or a directory that does not exist.
    """

    def __init__(self, template: str | os.PathLike[str]):
        if "\0" in os.fspath(template):
            raise UsageError(
                "PROVIDER directory template has a NUL byte", remedy="check the PROVIDER path"
            )
        text = os.path.expanduser(os.fspath(template))
        if "{" in text:
            template_placeholders(text, DIRECTORY_PLACEHOLDERS, what="PROVIDER directory template")
            self.template = os.path.abspath(text)
            self.root = _template_root(self.template)
            self.extensions: tuple[str, ...] = ("",)
            shown = self.template
        else:
            self.root = Path(os.path.abspath(text))
            self.template = os.path.join(str(self.root), "{z}", "{x}", "{y}")
            self.extensions = tuple("." + e for e in TREE_EXTENSIONS)
            shown = self.template + ".{" + ",".join(TREE_EXTENSIONS) + "}"
        if not self.root.is_dir():
            raise UsageError(
                f"PROVIDER={os.fspath(template)}: no such directory {self.root}",
                remedy="check the PROVIDER path",
            )
        self.identity = f"dir:{shown}@{tree_fingerprint(self.root)}"
        self.concurrency = DEFAULT_LOCAL_CONCURRENCY

    def fetch(self, tile: Tile) -> bytes | None:
        base = fill_template(self.template, tile)
        if not _inside(self.root, base):
            # a template like {q}.. makes ".." of the empty quadkey at zoom 0: a tile never leaves the tree
            raise TileFetchError(
                f"tile {tile.z}/{tile.x}/{tile.y}: {base} is outside the tile directory {self.root}",
                tile=tile,
            )
        for ext in self.extensions:
            path = base + ext
            try:
                data = _read_regular(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise TileFetchError(
                    f"tile {tile.z}/{tile.x}/{tile.y}: {path}: {exc.strerror}", tile=tile
                ) from None
            if not data:
                return None  # tile tools write empty files for "nothing here"
            why = (
                f"over {MAX_TILE_BYTES} bytes"
                if len(data) > MAX_TILE_BYTES
                else check_image(data, DEFAULT_TILE_SIZE)
            )
            if why is not None:
                raise TileFetchError(f"tile {tile.z}/{tile.x}/{tile.y}: {path}: {why}", tile=tile)
            return data
        return None

    def close(self) -> None:
        pass
