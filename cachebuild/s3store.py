"""The shared store in an S3-compatible bucket: ``STORE=s3://bucket/prefix``.

Every operator, CI runner and cluster worker pointing at one bucket reuses
what any of them already fetched or described (Bazel's remote cache, for
tiles and descriptors).  The local store (``$CACHEBUILD_HOME/store``) stays
the working copy and a read-through cache: the later phases (mbtiles,
selftest) read only it, and a second build on the same machine finds
everything there.

Layout under ``s3://bucket/prefix/``; every object is written once and named
by the SHA-256 of its bytes, which is checked on every read: an object that
does not match its name is never used (the tile is fetched again, the
descriptor computed again, and the object written again)::

    objects/ab/<sha256>                                  tile images
    refs/<provider>/<z>/<cx>-<cy>/<sha256>.json          which image a provider
                                                         served for each tile
    descriptors/<engine key>/<z>/<cx>-<cy>/<sha256>.bin  descriptor batches

``<provider>`` is the first 32 hex digits of the SHA-256 of the provider's
identity (its ref namespace in the local store, secret-free); the identity
itself is inside each ref object and checked.  ``<cx>-<cy>`` is the *cell*
of a tile: its column and row shifted right by :data:`CELL_SHIFT`, so one
cell holds up to 64 x 64 tiles of one zoom.  Refs and descriptors are
written in batches, one object per cell and build, so a flight of 10,000
tiles costs a few LISTs and GETs for its refs and descriptors, not 20,000.
A tile shown by refs of several builds takes the newest.

Descriptors stay keyed by (image SHA-256, engine key): the cell only
groups them where a flight will look for them.

Tiles (:class:`TileSync`, used by :mod:`cachebuild.fetch`): before the
provider is asked for a tile, the bucket's refs for its cell are read and a
tile the bucket has is downloaded into the local store.  Tiles fetched from
the provider, and tiles the local store had but the bucket lacks, are
uploaded, objects first, then their refs.  Descriptors
(:func:`pull_descriptors`, :func:`push_descriptors`, around describe): the
ones the local descriptor store lacks are imported from the bucket's
batches for the flight's cells; afterwards the ones the bucket lacks are
uploaded.

The client is boto3 (docs/scale.md says why), imported only when a bucket
is used; the endpoint and credentials come from the standard AWS variables
or config files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``...).  Credentials are never part of ``STORE``, a message or
the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from .errors import BuildError, CacheBuildError, DownloadError, UsageError

__all__ = [
    "CELL_SHIFT",
    "PUSH_BATCH",
    "STATS",
    "StoreURL",
    "S3Store",
    "StoreUnavailable",
    "TileSync",
    "parse_store_url",
    "is_remote",
    "open_store",
    "pull_descriptors",
    "push_descriptors",
    "stats_entry",
    "reset_stats",
]

#: Tiles of a cell: ``x >> CELL_SHIFT, y >> CELL_SHIFT`` (64 x 64 tiles).
CELL_SHIFT = 6
#: Tiles waiting for upload before they are pushed mid-fetch.
PUSH_BATCH = 4096
#: Requests to the bucket in flight at once.
DEFAULT_CONNECTIONS = 16
_DESC_MAGIC = b"CBDESC1\n"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")

#: Objects moved this process (the report's ``store``): every GET and PUT.
STATS: dict[str, int] = {"objects_read": 0, "objects_written": 0}
_STATS_LOCK = threading.Lock()


def _count(name: str, n: int = 1) -> None:
    with _STATS_LOCK:
        STATS[name] += n


def reset_stats() -> None:
    with _STATS_LOCK:
        STATS.update(objects_read=0, objects_written=0)


def stats_entry(url: str) -> dict[str, Any]:
    """The report's ``store`` object: the URL and the objects moved."""
    with _STATS_LOCK:
        return {"url": url, **STATS}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the URL -------------------------------------------------------------------


class StoreURL(NamedTuple):
    """``s3://bucket/prefix`` (the prefix without slashes at either end)."""

    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)


def is_remote(raw: str) -> bool:
    """True when ``STORE`` names a URL rather than a directory.

    >>> is_remote("s3://maps/store"), is_remote("/var/cache/store")
    (True, False)
    """
    return "://" in raw


def parse_store_url(raw: str) -> StoreURL:
    """``STORE=s3://bucket[/prefix]``, validated.

    Credentials have no place in it (they would show in ``ps``, logs and
    reports): a URL with ``user:secret@`` or a query is refused without
    being echoed.

    >>> parse_store_url("s3://maps/team/store/")
    StoreURL(bucket='maps', prefix='team/store')

    Raises
    ------
    UsageError
        For another scheme, credentials or a query in the URL, or a bad
        bucket name.
    """
    scheme, _, rest = raw.partition("://")
    if scheme.lower() != "s3":
        raise UsageError(
            f"STORE={scheme}://…: only s3:// URLs are supported",
            remedy="STORE=s3://bucket/prefix, or a local directory",
        )
    netloc, _, prefix = rest.partition("/")
    if "@" in netloc or "?" in rest or "#" in rest:
        raise UsageError(
            "STORE must not hold credentials or a query (the value is not shown here)",
            remedy="set STORE=s3://bucket/prefix and give the credentials as AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role",
        )
    if not _BUCKET.match(netloc):
        raise UsageError(
            f"STORE=s3://{netloc}: {netloc!r} is not an S3 bucket name",
            remedy="3-63 lower-case letters, digits, dots and hyphens",
        )
    prefix = prefix.strip("/")
    if any(ord(c) < 32 for c in prefix) or "//" in prefix:
        raise UsageError(f"STORE={raw!r}: the prefix has empty parts or control characters")
    return StoreURL(netloc, prefix)


# -- the bucket ----------------------------------------------------------------


class StoreUnavailable(Exception):
    """The bucket could not be read or written; ``str()`` is secret-free."""

    def __init__(self, message: str, remedy: str):
        super().__init__(message)
        self.message = message
        self.remedy = remedy


def _describe_exc(exc: BaseException) -> tuple[str, str]:
    """A secret-free reason and a remedy for a botocore exception."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return "no AWS credentials", (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role"
        )
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "?"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        if code in ("NoSuchBucket",):
            return f"the bucket does not exist ({code})", "create the bucket, or fix STORE"
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "401"):
            return f"access refused ({code}, HTTP {status})", (
                "check the AWS credentials and the bucket policy (read, write and list on the prefix)"
            )
        return f"the server answered {code} (HTTP {status})", "check the S3 service, then build again"
    if isinstance(exc, (ConnectionError, HTTPClientError)):
        return f"no connection ({type(exc).__name__})", (
            "check AWS_ENDPOINT_URL and the network, then build again (what was fetched is kept locally)"
        )
    return f"{type(exc).__name__}", "check the S3 service and AWS settings, then build again"


class S3Store:
    """Objects in the bucket of ``url``; boto3 is imported here.

    Parameters
    ----------
    url
        The bucket and prefix.
    client
        A boto3 S3 client (tests and benchmarks inject one); by default one
        is made from the standard AWS configuration.
    connections
        Requests in flight at once.
    """

    def __init__(self, url: StoreURL, *, client: Any = None, connections: int = DEFAULT_CONNECTIONS):
        self.url = url
        self.connections = connections
        self._client = client if client is not None else self._make_client(connections)

    @staticmethod
    def _make_client(connections: int) -> Any:
        import boto3
        from botocore.config import Config

        custom = bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=max(10, connections),
            # an endpoint of one's own (MinIO, Ceph, a test server) on an IP or
            # a plain host name: bucket in the path
            s3={"addressing_style": "path"} if custom else None,
        )
        return boto3.session.Session().client("s3", config=config)

    def _call(self, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (BotoCoreError, ClientError) as exc:
            reason, remedy = _describe_exc(exc)
            raise StoreUnavailable(f"the shared store {self.url}: {reason}", remedy) from None

    def get(self, key: str) -> bytes | None:
        """The object's bytes; None when there is none."""
        from botocore.exceptions import ClientError

        def fetch() -> bytes | None:
            try:
                body = self._client.get_object(Bucket=self.url.bucket, Key=key)["Body"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            try:
                return bytes(body.read())
            finally:
                body.close()

        data = self._call(fetch)
        if data is not None:
            _count("objects_read")
        return data

    def put(self, key: str, data: bytes) -> None:
        self._call(lambda: self._client.put_object(Bucket=self.url.bucket, Key=key, Body=data))
        _count("objects_written")

    def delete(self, key: str) -> None:
        """Remove an object (one found corrupt); failures are ignored."""
        try:
            self._call(lambda: self._client.delete_object(Bucket=self.url.bucket, Key=key))
        except StoreUnavailable:
            pass

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix``."""

        def walk() -> list[str]:
            keys: list[str] = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.url.bucket, Prefix=prefix
            )
            for page in pages:
                keys.extend(str(o["Key"]) for o in page.get("Contents", ()))
            return keys

        return self._call(walk)

    def check(self) -> None:
        """Fail early (StoreUnavailable) when the bucket cannot be listed."""
        self._call(lambda: self._client.list_objects_v2(Bucket=self.url.bucket, Prefix=self.url.key(""), MaxKeys=1))

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``fn`` over ``items`` with :attr:`connections` in flight; in order."""
        items = list(items)
        if len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(min(self.connections, len(items)), thread_name_prefix="cachebuild-s3") as pool:
            return list(pool.map(fn, items))

    # -- verified, named-by-hash objects -----------------------------------------

    def get_verified(self, key: str, digest: str) -> bytes | None:
        """The object at ``key`` when its SHA-256 is ``digest``; a corrupt one is removed."""
        data = self.get(key)
        if data is None:
            return None
        if _sha(data) != digest:
            self.delete(key)
            return None
        return data

    def object_key(self, digest: str) -> str:
        return self.url.key("objects", digest[:2], digest)


def open_store(url: str, *, client: Any = None) -> S3Store:
    """An :class:`S3Store` for ``STORE=url``."""
    return S3Store(parse_store_url(url), client=client)


def phase_error(exc: StoreUnavailable, phase: str) -> CacheBuildError:
    """The phase's error (tiles: exit 20, describe: exit 21) for a bucket that failed."""
    if phase == "tiles":
        return DownloadError(exc.message, remedy=exc.remedy)
    return BuildError(exc.message, remedy=exc.remedy, phase=phase)


def _cell(z: int, x: int, y: int) -> tuple[int, int, int]:
    return (z, x >> CELL_SHIFT, y >> CELL_SHIFT)


def _cell_part(cell: tuple[int, int, int]) -> str:
    z, cx, cy = cell
    return f"{z}/{cx}-{cy}/"


# -- tiles ---------------------------------------------------------------------


class TileSync:
    """The bucket's side of one tiles phase for one provider (see the module doc).

    Used from the fetch's main thread.  :meth:`pull` before a chunk of
    tiles is fetched, :meth:`fetched` for each tile the provider served,
    :meth:`push` at the end (and whenever :meth:`due`).  Bucket failures
    raise :class:`~cachebuild.errors.DownloadError` (exit 20).
    """

    def __init__(self, remote: S3Store, store: Any, identity: str):
        self.remote = remote
        self.store = store
        self.identity = identity
        self.namespace = _sha(identity.encode())[:32]
        self.pulled = 0
        self._cells: dict[tuple[int, int, int], dict[tuple[int, int], tuple[float, str]]] = {}
        self._bad: set[str] = set()  # objects the bucket lacks or holds corrupt
        self._objects: dict[str, None] = {}  # digests to upload (ordered set)
        self._refs: list[tuple[tuple[int, int, int], str]] = []

    def _refs_prefix(self, cell: tuple[int, int, int]) -> str:
        return self.remote.url.key("refs", self.namespace, _cell_part(cell))

    def _read_cell(self, cell: tuple[int, int, int]) -> dict[tuple[int, int], tuple[float, str]]:
        refs: dict[tuple[int, int], tuple[float, str]] = {}
        keys = [k for k in self.remote.list(self._refs_prefix(cell)) if k.endswith(".json")]
        for key in keys:
            digest = key.rsplit("/", 1)[-1][: -len(".json")]
            data = self.remote.get_verified(key, digest)
            try:
                doc = json.loads(data) if data is not None else None
                if not doc or doc.get("provider") != self.identity or int(doc["z"]) != cell[0]:
                    continue
                t = float(doc["t"])
                for x, y, d in doc["tiles"]:
                    if (x >> CELL_SHIFT, y >> CELL_SHIFT) != cell[1:] or len(d) != 64:
                        continue
                    if (x, y) not in refs or refs[(x, y)][0] <= t:
                        refs[(x, y)] = (t, str(d))
            except (ValueError, TypeError, KeyError):
                continue
        return refs

    def _remote_ref(self, tile: tuple[int, int, int]) -> str | None:
        z, x, y = tile
        hit = self._cells.get(_cell(z, x, y), {}).get((x, y))
        return hit[1] if hit else None

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except StoreUnavailable as exc:
            raise phase_error(exc, "tiles") from None

    def pull(
        self, tiles: list[tuple[int, int, int]], known: Mapping[tuple[int, int, int], str]
    ) -> dict[tuple[int, int, int], str]:
        """Download the tiles the bucket has and ``known`` (the local refs) lacks.

        Returns the tiles now in the local store, with their digests (their
        refs are recorded there too).  Tiles the local store has and the
        bucket does not are queued for :meth:`push`.
        """
        return self._guard(lambda: self._pull(tiles, known))

    def _pull(
        self, tiles: list[tuple[int, int, int]], known: Mapping[tuple[int, int, int], str]
    ) -> dict[tuple[int, int, int], str]:
        new_cells = sorted({_cell(*t) for t in tiles} - self._cells.keys())
        for cell, refs in zip(new_cells, self.remote.map(self._read_cell, new_cells)):
            self._cells[cell] = refs
        wanted: dict[str, list[tuple[int, int, int]]] = {}
        for t in tiles:
            remote = self._remote_ref(t)
            local = known.get(t)
            if local is not None:
                if remote != local:
                    self._queue(t, local, ref=True)
            elif remote is not None:
                wanted.setdefault(remote, []).append(t)

        def download(digest: str) -> tuple[str, bool]:
            data = self.remote.get_verified(self.remote.object_key(digest), digest)
            if data is None:
                return digest, False
            self.store.put(data)
            return digest, True

        pulled: dict[tuple[int, int, int], str] = {}
        for digest, ok in self.remote.map(download, wanted):
            if ok:
                for t in wanted[digest]:
                    pulled[t] = digest
            else:
                self._bad.add(digest)
        if pulled:
            self.store.record_refs(self.identity, pulled.items())
        self.pulled += len(pulled)
        return pulled

    def _queue(self, tile: tuple[int, int, int], digest: str, *, ref: bool) -> None:
        self._objects[digest] = None
        if ref:
            self._refs.append((tile, digest))

    def fetched(self, tile: tuple[int, int, int], digest: str) -> None:
        """The provider served ``digest`` for ``tile`` (it is in the local store)."""
        remote = self._remote_ref(tile)
        if remote != digest or digest in self._bad:
            self._queue(tile, digest, ref=remote != digest)

    def due(self) -> bool:
        return len(self._objects) + len(self._refs) >= PUSH_BATCH

    def push(self) -> int:
        """Upload the queued objects, then their refs (one object per cell); returns how many tiles."""
        return self._guard(self._push)

    def _push(self) -> int:
        digests = list(self._objects)
        self.remote.map(lambda d: self.remote.put(self.remote.object_key(d), self.store.get(d)), digests)
        self._objects.clear()
        self._bad.difference_update(digests)
        by_cell: dict[tuple[int, int, int], list[list[Any]]] = {}
        for (z, x, y), d in self._refs:
            by_cell.setdefault(_cell(z, x, y), []).append([x, y, d])
        now = time.time()

        def put_refs(item: tuple[tuple[int, int, int], list[list[Any]]]) -> None:
            cell, rows = item
            doc = {"format": 1, "provider": self.identity, "z": cell[0], "t": now, "tiles": sorted(rows)}
            data = json.dumps(doc, separators=(",", ":")).encode()
            self.remote.put(self._refs_prefix(cell) + f"{_sha(data)}.json", data)
            known = self._cells.setdefault(cell, {})
            for x, y, d in rows:
                known[(x, y)] = (now, d)

        self.remote.map(put_refs, sorted(by_cell.items()))
        pushed = len(self._refs)
        self._refs = []
        return pushed


# -- descriptors ---------------------------------------------------------------


def _encode_batch(digests: Any, vectors: Any) -> bytes:
    import numpy as np

    n, dim = vectors.shape
    return b"".join(
        (
            _DESC_MAGIC,
            struct.pack("<II", dim, n),
            np.ascontiguousarray(digests, dtype=np.uint8).tobytes(),
            np.ascontiguousarray(vectors, dtype="<f4").tobytes(),
        )
    )


def _decode_batch(data: bytes, dim: int) -> tuple[Any, Any] | None:
    """``(digests uint8 [n, 32], vectors float32 [n, dim])``, or None for another format or dim."""
    import numpy as np

    head = len(_DESC_MAGIC) + 8
    if len(data) < head or not data.startswith(_DESC_MAGIC):
        return None
    d, n = struct.unpack_from("<II", data, len(_DESC_MAGIC))
    if d != dim or len(data) != head + n * (32 + 4 * dim):
        return None
    digests = np.frombuffer(data, dtype=np.uint8, count=32 * n, offset=head).reshape(n, 32)
    vectors = np.frombuffer(data, dtype="<f4", count=n * dim, offset=head + 32 * n).reshape(n, dim)
    return digests, vectors


class _FlightDescriptors(NamedTuple):
    key: str
    dim: int
    raw: Any  # uint8 [n, 32], the tiles' image digests
    cells: Any  # int64 [n], the cell of each tile (packed)
    order: Any  # tile indices sorted by cell
    bounds: Any  # where each cell's run starts in ``order`` (and the end)


def _flight(build_dir: Path) -> _FlightDescriptors:
    import numpy as np

    from .tileset import read_tiles

    engine = json.loads((build_dir / "engine" / "engine.json").read_text())
    tiles = read_tiles(build_dir)
    n = len(tiles)
    raw = np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(n, 32)
    ids = np.asarray(tiles["id"], dtype=np.int64)
    z = ids >> 58
    x = (ids >> 29) & ((1 << 29) - 1)
    y = ids & ((1 << 29) - 1)
    cells = (z << 50) | ((x >> CELL_SHIFT) << 25) | (y >> CELL_SHIFT)
    order = np.argsort(cells, kind="stable")
    sc = cells[order]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]]) if n else np.zeros(0, dtype=np.int64)
    return _FlightDescriptors(
        str(engine["key"]), int(engine["descriptor_dim"]), raw, cells, order, np.r_[starts, n]
    )


def _cell_of(packed: int) -> tuple[int, int, int]:
    return (packed >> 50, (packed >> 25) & ((1 << 25) - 1), packed & ((1 << 25) - 1))


def _desc_prefix(remote: S3Store, key: str, cell: tuple[int, int, int]) -> str:
    return remote.url.key("descriptors", key, _cell_part(cell))


#: Cells whose batches are read at a time (bounds the memory a pull holds).
_CELLS_AT_ONCE = 64


def pull_descriptors(remote: S3Store, store_root: Path, build_dir: Path) -> dict[int, set[bytes]]:
    """Import the descriptors the local store lacks from the bucket's batches.

    Reads the batches of every cell of the flight's tiles (a batch whose
    hash does not match its name is skipped and removed).  Returns, per cell
    (packed), the image digests the bucket has there: what
    :func:`push_descriptors` need not upload.

    Raises
    ------
    BuildError
        ``phase="describe"`` (exit 21) when the bucket fails.
    """
    try:
        return _pull_descriptors(remote, Path(store_root), Path(build_dir))
    except StoreUnavailable as exc:
        raise phase_error(exc, "describe") from None


def _pull_descriptors(remote: S3Store, store_root: Path, build_dir: Path) -> dict[int, set[bytes]]:
    import numpy as np

    from .descstore import DescriptorStore

    f = _flight(build_dir)
    have: dict[int, set[bytes]] = {}
    if not len(f.raw):
        return have
    with DescriptorStore(store_root, f.key, f.dim) as ds:
        shard, _ = ds.lookup(f.raw)
        lacking = {f.raw[i].tobytes() for i in np.flatnonzero(shard < 0).tolist()}
        cell_ids = [int(f.cells[f.order[s]]) for s in f.bounds[:-1].tolist()]

        def read_cell(packed: int) -> list[tuple[Any, Any]]:
            prefix = _desc_prefix(remote, f.key, _cell_of(packed))
            out = []
            for k in remote.list(prefix):
                name = k.rsplit("/", 1)[-1]
                if not name.endswith(".bin"):
                    continue
                data = remote.get_verified(k, name[: -len(".bin")])
                batch = _decode_batch(data, f.dim) if data is not None else None
                if batch is not None:
                    out.append(batch)
            return out

        with ds.writer() as writer:
            for s in range(0, len(cell_ids), _CELLS_AT_ONCE):
                part = cell_ids[s : s + _CELLS_AT_ONCE]
                for packed, batches in zip(part, remote.map(read_cell, part)):
                    seen = have.setdefault(packed, set())
                    for digests, vectors in batches:
                        rows = []
                        for i in range(len(digests)):
                            d = digests[i].tobytes()
                            seen.add(d)
                            if d in lacking and bool(np.all(np.isfinite(vectors[i]))):
                                lacking.discard(d)
                                rows.append(i)
                        if rows:
                            writer.append(digests[rows], vectors[rows])
    return have


def push_descriptors(
    remote: S3Store, store_root: Path, build_dir: Path, have: Mapping[int, set[bytes]]
) -> int:
    """Upload, one batch per cell, the flight's descriptors the bucket lacks; returns how many.

    Raises
    ------
    BuildError
        ``phase="describe"`` (exit 21) when the bucket fails.
    """
    try:
        return _push_descriptors(remote, Path(store_root), Path(build_dir), have)
    except StoreUnavailable as exc:
        raise phase_error(exc, "describe") from None


def _push_descriptors(remote: S3Store, store_root: Path, build_dir: Path, have: Mapping[int, set[bytes]]) -> int:
    import numpy as np

    from .descstore import DescriptorStore

    f = _flight(build_dir)
    todo: list[tuple[int, Any]] = []
    for s, e in zip(f.bounds[:-1].tolist(), f.bounds[1:].tolist()):
        packed = int(f.cells[f.order[s]])
        seen = have.get(packed, set())
        rows: dict[bytes, int] = {}
        for i in f.order[s:e].tolist():
            d = f.raw[i].tobytes()
            if d not in seen and d not in rows:
                rows[d] = i
        if rows:
            todo.append((packed, np.fromiter(rows.values(), dtype=np.int64, count=len(rows))))
    if not todo:
        return 0
    with DescriptorStore(store_root, f.key, f.dim) as ds:
        pushed = 0
        for s in range(0, len(todo), _CELLS_AT_ONCE):
            batches = []
            for packed, idx in todo[s : s + _CELLS_AT_ONCE]:
                digests = f.raw[idx]
                shard, row = ds.lookup(digests)
                ok = shard >= 0
                if not ok.any():
                    continue
                data = _encode_batch(digests[ok], ds.read(shard[ok], row[ok]))
                key = _desc_prefix(remote, f.key, _cell_of(packed)) + f"{_sha(data)}.bin"
                batches.append((key, data))
                pushed += int(ok.sum())
            remote.map(lambda kd: remote.put(*kd), batches)
    return pushed
