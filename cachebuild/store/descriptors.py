"""Descriptors kept in the shared store, keyed by (tile content hash, engine key).

A descriptor is a pure function of a tile's image bytes and the engine that
described it, so it is stored once under that pair and reused by every
build, whichever flight, bbox or cache asks for it: a bbox shifted by 10%
describes only the tiles it did not have.  A new model, calibration,
precision, backend version or device is a new engine key, hence a new,
empty store: exactly that engine's descriptors are invalidated.

Per-tile files would be a million files for a million tiles; instead each
engine has append-only *shards* of fixed-size records and an index::

    <store>/descriptors/<engine key>/
        meta.json        {"format": 1, "engine_key", "dim", "dtype": "<f4"}
        index.sqlite     sha256 -> (shard, row); shard -> (name, committed rows)
        shards/<pid>-<random>.f32   raw little-endian float32 rows of ``dim``

Writers never share a shard: each :class:`ShardWriter` appends to its own
file (named by its pid) and commits its rows to the index in batches, after
``fdatasync``: a committed row is always on disk in full.  A writer killed
mid-batch leaves rows past the committed count (or a shard the index never
heard of), which are unreachable and removed by ``doit gc-store``
(:mod:`cachebuild.release.gc`).  Two builds may describe at once: the index is
SQLite in WAL mode and ``INSERT OR IGNORE`` keeps the first of two
descriptors computed for the same image.

numpy is imported inside the functions.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from cachebuild._util.hashing import is_sha256_hex
from cachebuild.errors import CacheBuildWarning
from cachebuild.store.objects import write_rows

__all__ = [
    "DESCRIPTORS_DIR",
    "FORMAT",
    "SHARD_ROWS",
    "COMMIT_ROWS",
    "DescriptorStore",
    "ShardWriter",
    "engine_store_dirs",
]

DESCRIPTORS_DIR = "descriptors"
FORMAT = 1
#: Rows per shard file before the writer starts a new one (64 MiB at 256-d).
SHARD_ROWS = 65_536
#: Rows a writer buffers before it syncs the shard and commits them.
COMMIT_ROWS = 4_096
#: Digests looked up per query.
_LOOKUP_CHUNK = 50_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    rows INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS descriptors (
    sha256 BLOB PRIMARY KEY,
    shard INTEGER NOT NULL,
    row INTEGER NOT NULL
) WITHOUT ROWID;
"""


def engine_store_dirs(store_root: str | os.PathLike[str]) -> list[Path]:
    """Every engine's descriptor directory under a store."""
    base = Path(store_root) / DESCRIPTORS_DIR
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and len(p.name) == 64)


class DescriptorStore:
    """The descriptors of one engine in a store (created if missing).

    Parameters
    ----------
    store_root
        The shared store's root (``STORE``).
    engine_key
        :func:`cachebuild.engine.compile.engine_key` of the engine.
    dim
        Descriptor dimension.  A store made for another dimension is refused.

    Raises
    ------
    ValueError
        For a malformed engine key, or a store whose ``meta.json`` records
        another dimension or format.
    """

    def __init__(self, store_root: str | os.PathLike[str], engine_key: str, dim: int):
        if not is_sha256_hex(engine_key):
            raise ValueError(f"not an engine key: {engine_key!r}")
        self.engine_key = engine_key
        self.dim = int(dim)
        self.row_bytes = 4 * self.dim
        self.root = Path(store_root) / DESCRIPTORS_DIR / engine_key
        self.shards_dir = self.root / "shards"
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.root / "meta.json"
        meta = {"format": FORMAT, "engine_key": engine_key, "dim": self.dim, "dtype": "<f4"}
        try:
            found = json.loads(meta_path.read_text())
        except FileNotFoundError:
            tmp = meta_path.with_name(f".meta.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps(meta, sort_keys=True))
            os.replace(tmp, meta_path)
            found = meta
        if found != meta:
            raise ValueError(f"{meta_path} records {found}, expected {meta}")
        self.meta_path = meta_path
        self._db: sqlite3.Connection | None = None
        self._names: dict[int, str] = {}

    # -- the index -----------------------------------------------------------

    def conn(self) -> sqlite3.Connection:
        """The index database (WAL mode, autocommit; open transactions explicitly)."""
        if self._db is None:
            db = sqlite3.connect(self.root / "index.sqlite", timeout=120, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def shard_path(self, shard: int) -> Path:
        """The file of shard ``shard`` (an id from the index)."""
        name = self._names.get(shard)
        if name is None:
            row = self.conn().execute("SELECT name FROM shards WHERE id = ?", (shard,)).fetchone()
            if row is None:
                raise KeyError(f"no shard {shard} in {self.root}")
            name = self._names[shard] = str(row[0])
        return self.shards_dir / f"{name}.f32"

    def count(self) -> int:
        """Descriptors in the store."""
        return int(self.conn().execute("SELECT COUNT(*) FROM descriptors").fetchone()[0])

    def touch(self) -> None:
        """Record that a build used this engine's descriptors (``gc-store`` evicts the oldest)."""
        try:
            os.utime(self.meta_path)
        except OSError:
            pass

    def lookup(self, digests: Any) -> tuple[Any, Any]:
        """Where the descriptors of ``digests`` are.

        Parameters
        ----------
        digests
            uint8 ``[n, 32]``: raw SHA-256 of tile images.

        Returns
        -------
        tuple of numpy.ndarray
            ``(shard, row)``, int32 ``[n]`` each; ``shard`` is -1 where the
            store has no descriptor, or only one a shard file does not hold
            in full (a torn write: it is described again).
        """
        import numpy as np

        digests = np.ascontiguousarray(digests, dtype=np.uint8).reshape(-1, 32)
        n = len(digests)
        shard = np.full(n, -1, dtype=np.int32)
        row = np.full(n, -1, dtype=np.int32)
        db = self.conn()
        db.execute("CREATE TEMP TABLE IF NOT EXISTS q (i INTEGER PRIMARY KEY, sha256 BLOB)")
        for s in range(0, n, _LOOKUP_CHUNK):
            part = digests[s : s + _LOOKUP_CHUNK]
            db.execute("DELETE FROM q")
            db.executemany(
                "INSERT INTO q VALUES (?, ?)",
                ((s + i, part[i].tobytes()) for i in range(len(part))),
            )
            found = db.execute(
                "SELECT q.i, d.shard, d.row FROM q JOIN descriptors d ON d.sha256 = q.sha256"
            ).fetchall()
            if found:
                a = np.array(found, dtype=np.int64)
                shard[a[:, 0]] = a[:, 1]
                row[a[:, 0]] = a[:, 2]
        db.execute("DELETE FROM q")
        # rows a shard file does not hold in full are not there
        lost: dict[str, int] = {}
        for sid in np.unique(shard[shard >= 0]).tolist():
            try:
                have = self.shard_path(int(sid)).stat().st_size // self.row_bytes
            except (OSError, KeyError):
                have = 0
            bad = (shard == sid) & (row >= have)
            if bad.any():
                self._forget(digests[bad], int(sid))
                lost[self._names.get(int(sid), str(sid))] = int(bad.sum())
            shard[bad] = -1
            row[bad] = -1
        if lost:
            import warnings

            what = ", ".join(f"{n} in shard {name}" for name, n in sorted(lost.items()))
            warnings.warn(
                CacheBuildWarning(
                    f"the descriptor store {self.root} names descriptors its shard files do not hold "
                    f"({what}: deleted or truncated); they are computed again"
                ),
                stacklevel=2,
            )
        return shard, row

    def _forget(self, digests: Any, shard: int) -> None:
        """Drop index rows of ``shard`` for ``digests``: their bytes are gone.

        A committed row is always whole on disk (the shard is synced before
        the commit), so a row past the file's end is damage, never a writer
        in progress; dropping it lets the descriptor computed again be
        recorded (``INSERT OR IGNORE`` would keep the dead row).
        """
        write_rows(
            self.conn(),
            "DELETE FROM descriptors WHERE sha256 = ? AND shard = ?",
            ((bytes(d), shard) for d in digests),
        )

    def read(self, shard: Any, row: Any, out: Any | None = None) -> Any:
        """The descriptors at ``(shard[i], row[i])``, float32 ``[n, dim]``.

        Read with ``preadv`` straight into ``out``, one call per run of
        consecutive rows (no memory map: its page faults cost more than the
        copy, and its pages would stay resident).

        Raises
        ------
        ValueError
            A location the store does not have (``shard`` -1, or past the
            end of its shard file).
        """
        import numpy as np

        shard = np.asarray(shard, dtype=np.int64)
        row = np.asarray(row, dtype=np.int64)
        if out is None or not out.flags.c_contiguous or out.dtype != np.float32:
            into = np.empty((len(shard), self.dim), dtype=np.float32)
            if out is None:
                out = into
            else:
                out[...] = self.read(shard, row, into).reshape(out.shape)
                return out
        if not len(shard):
            return out
        if int(shard.min()) < 0:
            raise ValueError("read() of a descriptor the store does not have")
        view = out.reshape(len(shard), self.dim).data.cast("B")
        # runs: the same shard, consecutive rows
        starts = np.flatnonzero(
            np.concatenate(([True], (np.diff(shard) != 0) | (np.diff(row) != 1)))
        ).tolist()
        fds: dict[int, int] = {}
        try:
            for a, b in zip(starts, [*starts[1:], len(shard)]):
                sid = int(shard[a])
                if sid not in fds:
                    fds[sid] = os.open(self.shard_path(sid), os.O_RDONLY)
                self._read_run(
                    fds[sid], view[a * self.row_bytes : b * self.row_bytes], sid, int(row[a])
                )
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def _read_run(self, fd: int, into: memoryview, sid: int, first: int) -> None:
        """Fill ``into`` from shard ``sid``'s open file ``fd``, from row ``first`` on."""
        done, offset = 0, first * self.row_bytes
        while done < len(into):
            got = os.preadv(fd, [into[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"read() past the end of shard {sid} in {self.root} (row {first})")
            done += got

    def writer(self) -> ShardWriter:
        """A new writer appending to shards of its own."""
        return ShardWriter(self)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> DescriptorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardWriter:
    """Appends descriptors to this process's shard(s) and commits them in batches.

    :meth:`append` returns where each descriptor will be; the rows become
    visible to other processes at the next commit (every
    :data:`COMMIT_ROWS` rows, and at :meth:`close`).  Use as a context
    manager: leaving it by an exception still commits what was written.
    """

    def __init__(self, store: DescriptorStore):
        self.store = store
        self._fh: Any = None
        self._shard_id = -1
        self._shard_rows = 0
        self._committed_rows = 0
        self._pending: list[tuple[bytes, int, int]] = []
        self.appended = 0

    def _new_shard(self) -> None:
        self._close_file()
        name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        db = self.store.conn()
        cur = db.execute("INSERT INTO shards (name, rows) VALUES (?, 0)", (name,))
        self._shard_id = int(cur.lastrowid or 0)
        self.store._names[self._shard_id] = name
        self._fh = open(self.store.shards_dir / f"{name}.f32", "ab")
        self._shard_rows = 0
        self._committed_rows = 0

    def append(self, digests: Any, vectors: Any) -> tuple[Any, Any]:
        """Store ``vectors`` (float32 ``[n, dim]``) under ``digests`` (uint8 ``[n, 32]``).

        Returns
        -------
        tuple of numpy.ndarray
            ``(shard, row)`` of each, int32 ``[n]``.
        """
        import numpy as np

        digests = np.ascontiguousarray(digests, dtype=np.uint8).reshape(-1, 32)
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.shape != (len(digests), self.store.dim):
            raise ValueError(
                f"vectors {vectors.shape} for {len(digests)} digests of dim {self.store.dim}"
            )
        shard = np.empty(len(digests), dtype=np.int32)
        row = np.empty(len(digests), dtype=np.int32)
        done = 0
        while done < len(digests):
            if self._fh is None or self._shard_rows >= SHARD_ROWS:
                self._new_shard()
            k = min(len(digests) - done, SHARD_ROWS - self._shard_rows)
            self._fh.write(vectors[done : done + k].data)
            for i in range(k):
                self._pending.append(
                    (digests[done + i].tobytes(), self._shard_id, self._shard_rows + i)
                )
            shard[done : done + k] = self._shard_id
            row[done : done + k] = np.arange(self._shard_rows, self._shard_rows + k)
            self._shard_rows += k
            done += k
            if len(self._pending) >= COMMIT_ROWS or self._shard_rows >= SHARD_ROWS:
                self.commit()
        self.appended += len(digests)
        return shard, row

    def commit(self) -> None:
        """Sync the shard, then record its new rows in the index."""
        if self._fh is None or not self._pending:
            return
        self._fh.flush()
        os.fdatasync(self._fh.fileno())
        db = self.store.conn()
        for attempt in range(5):
            try:
                db.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError:  # busy beyond the timeout: rare, retry
                if attempt == 4:
                    raise
                time.sleep(0.5)
        try:
            db.executemany("INSERT OR IGNORE INTO descriptors VALUES (?, ?, ?)", self._pending)
            db.execute(
                "UPDATE shards SET rows = ? WHERE id = ?", (self._shard_rows, self._shard_id)
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite ends it itself on some errors (a full disk)
                db.execute("ROLLBACK")
            raise
        self._committed_rows = self._shard_rows
        self._pending = []

    def _close_file(self) -> None:
        if self._fh is not None:
            fh = self._fh
            try:
                self.commit()
            finally:  # closed even when the commit fails (a full disk): no file left open
                self._fh = None
                try:
                    fh.close()
                except OSError:
                    pass  # the commit's error, if any, is the one that matters

    def close(self) -> None:
        """Commit what is pending and close the shard."""
        self._close_file()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        # rows are appended whole before they are queued: what is queued is on
        # disk, so an interrupted describe keeps it for the next run
        self.close()
