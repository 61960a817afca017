"""The content-addressed object store shared by every flight and cache.

Objects (tile images) are named by the SHA-256 of their bytes and written
once: to a temporary name in the store's own ``tmp/`` directory, then
renamed into place, so a kill at any instant never leaves a partial object
under a real name.  Which object a provider served for a tile is recorded in
``refs.sqlite`` (WAL mode, safe for concurrent builds), so a tile fetched
once is never fetched again, whichever flight asks for it.

Layout::

    <root>/objects/ab/abcdef…   one file per object (full hex digest)
    <root>/tmp/                 in-flight writes, <pid>-<random> names
    <root>/refs.sqlite          (provider, z, x, y) -> sha256
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["TileStore", "sha256_hex"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tile_refs (
    provider TEXT NOT NULL,
    z INTEGER NOT NULL,
    x INTEGER NOT NULL,
    y INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (provider, z, x, y)
) WITHOUT ROWID;
"""


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``.

    >>> sha256_hex(b"")[:12]
    'e3b0c44298fc'
    """
    return hashlib.sha256(data).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TileStore:
    """A content-addressed store rooted at ``root`` (created if missing)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = None

    # -- objects -----------------------------------------------------------

    def path(self, digest: str) -> Path:
        """Where the object named ``digest`` lives (it may not exist)."""
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.objects / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def get(self, digest: str, *, verify: bool = False) -> bytes:
        """The bytes of an object; with ``verify`` their hash is checked."""
        data = self.path(digest).read_bytes()
        if verify and sha256_hex(data) != digest:
            raise ValueError(f"store object {digest} is corrupt (hash mismatch)")
        return data

    def put(self, data: bytes) -> str:
        """Store ``data`` (once) and return its digest."""
        digest = sha256_hex(data)
        final = self.path(digest)
        if final.is_file():
            return digest
        final.parent.mkdir(exist_ok=True)
        tmp = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, final)
        return digest

    def clean_tmp(self, older_than_s: float = 3600.0) -> int:
        """Remove leftovers of killed writers; returns how many were removed.

        A temp file is removed when its writer's pid is gone, or when it is
        older than ``older_than_s`` (pids are reused).
        """
        removed = 0
        now = time.time()
        for entry in os.scandir(self.tmp):
            pid_part = entry.name.split("-", 1)[0]
            try:
                stale = not _pid_alive(int(pid_part))
            except ValueError:
                stale = True
            try:
                if stale or now - entry.stat().st_mtime > older_than_s:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    # -- refs: which object a provider served for a tile -----------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.root / "refs.sqlite", timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def lookup_refs(
        self, provider: str, tiles: Iterable[tuple[int, int, int]]
    ) -> dict[tuple[int, int, int], str]:
        """Known digests for ``(z, x, y)`` tiles of ``provider`` whose object exists."""
        db = self._conn()
        wanted = list(tiles)
        found: dict[tuple[int, int, int], str] = {}
        for i in range(0, len(wanted), 5000):
            chunk = wanted[i : i + 5000]
            db.execute("CREATE TEMP TABLE IF NOT EXISTS q (z INTEGER, x INTEGER, y INTEGER)")
            db.execute("DELETE FROM q")
            db.executemany("INSERT INTO q VALUES (?, ?, ?)", chunk)
            rows = db.execute(
                "SELECT r.z, r.x, r.y, r.sha256 FROM q JOIN tile_refs r "
                "ON r.provider = ? AND r.z = q.z AND r.x = q.x AND r.y = q.y",
                (provider,),
            )
            for z, x, y, digest in rows:
                found[(z, x, y)] = digest
        return {t: d for t, d in found.items() if self.path(d).is_file()}

    def record_refs(self, provider: str, refs: Iterable[tuple[tuple[int, int, int], str]]) -> None:
        """Remember which object ``provider`` served for each tile."""
        db = self._conn()
        rows = [(provider, z, x, y, d) for (z, x, y), d in refs]
        if not rows:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO tile_refs VALUES (?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def iter_objects(self) -> Iterator[Path]:
        for sub in sorted(self.objects.iterdir()):
            if sub.is_dir():
                yield from sorted(sub.iterdir())

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> "TileStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
