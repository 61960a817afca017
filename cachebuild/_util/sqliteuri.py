"""SQLite URIs for file paths, and the read-only, immutable open every MBTiles reader uses.

A URI built by string formatting (``f"file:{path}?mode=ro"``) breaks on a
path with ``#`` or ``?`` (SQLite ends the path there and opens, or creates,
another file) and on ``%``; :meth:`pathlib.Path.as_uri` percent-encodes
every such byte, which SQLite decodes back.

``immutable=1`` makes SQLite read the file's own bytes only: no lock is
taken and no journal or write-ahead log beside the file is ever read or
replayed, so a ``tiles.mbtiles-journal`` planted beside a published file
cannot change what it serves, and what is read is exactly what was hashed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

if TYPE_CHECKING:
    import sqlite3

__all__ = ["sqlite_uri", "connect_immutable"]


def sqlite_uri(path: str | os.PathLike[str], **params: str) -> str:
    """The ``file:`` URI of ``path`` (made absolute) with query ``params``.

    >>> sqlite_uri("/data/a b#1?.mbtiles", mode="ro")
    'file:///data/a%20b%231%3F.mbtiles?mode=ro'
    """
    uri = Path(path).absolute().as_uri()
    return f"{uri}?{urlencode(params)}" if params else uri


def connect_immutable(
    path: str | os.PathLike[str], *, check_same_thread: bool = True
) -> sqlite3.Connection:
    """Open an SQLite file read-only and immutable (``mode=ro&immutable=1``).

    Nothing can be written through the connection, and no journal or WAL
    file beside it is read: the bytes of the file alone are the database.
    Only for files nothing writes while they are read (a published or
    staged MBTiles file, a provider whose bytes were hashed).
    """
    import sqlite3

    return sqlite3.connect(
        sqlite_uri(path, mode="ro", immutable="1"), uri=True, check_same_thread=check_same_thread
    )
