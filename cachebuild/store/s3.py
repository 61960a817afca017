"""The shared store in an S3-compatible bucket: ``STORE=s3://bucket/prefix``.

Every operator, CI runner and cluster worker pointing at one bucket reuses
what any of them already fetched or described (Bazel's remote cache, for
tiles and descriptors).  The local store (``$CACHEBUILD_HOME/store``) stays
the working copy and a read-through cache: the later phases (mbtiles,
selftest) read only it, and a second build on the same machine finds
everything there.

Layout under ``s3://bucket/prefix/``; every object is written once and named
by the SHA-256 of its bytes, which is checked on every read: an object that
does not match its name is never used, and is removed (its tiles are
fetched again, its descriptors computed again, and written anew)::

    tiles/<provider>/<z>/<cx>-<cy>/<sha256>.pack         tile packs
    descriptors/<engine key>/<z>/<cx>-<cy>/<sha256>.bin  descriptor batches
    thumbs/<z>/<cx>-<cy>/<sha256>.bin                    coverage-map thumbnail batches (:mod:`cachebuild.localize.s3desc`)
    actions/cas/<sha256>, actions/ac/<key>.json          action cache (:mod:`cachebuild.store.actioncache`)

``<provider>`` is the first 32 hex digits of the SHA-256 of the provider's
identity (its ref namespace in the local store, secret-free); the identity
itself is in each pack's header and checked.  ``<cx>-<cy>`` is the *cell*
of a tile: its column and row shifted right by :data:`CELL_SHIFT`, so one
cell holds up to 32 x 32 tiles of one zoom.

A *pack* is one build's tiles of one cell: a header naming each tile's
``(x, y)``, the SHA-256 of its image and its length, then the images (each
checked against its SHA-256 too).  Packs and descriptor batches, not one
object per tile, because a request costs a round trip: a flight of 10,000
tiles is 10 to 25 cells, so a second machine reads it in a few dozen LISTs
and GETs, not 20,000.  Where packs of several builds show one tile,
the newest wins.  Descriptors stay keyed by (image SHA-256, engine key):
the cell only groups them where a flight will look for them
(:mod:`cachebuild.localize.s3desc`).

Tiles (:class:`TileSync`, used by :mod:`cachebuild.tiles.fetch`): before the
provider is asked for a tile, the packs of its cell are read into the local
store.  Tiles fetched from the provider, and tiles the local store had but
the bucket lacks, are uploaded as new packs.

The client is boto3 (docs/scale.md says why), imported only when a bucket
is used; the endpoint and credentials come from the standard AWS variables
or config files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``...).  Credentials are never part of ``STORE``, a message or
the report.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from cachebuild.errors import BuildError, CacheBuildError, DownloadError, UsageError

__all__ = [
    "CELL_SHIFT",
    "PACK_BYTES",
    "PUSH_BATCH",
    "STATS",
    "S3Store",
    "StoreURL",
    "StoreUnavailable",
    "TileSync",
    "is_remote",
    "open_store",
    "parse_store_url",
    "phase_error",
    "reset_stats",
    "stats_entry",
]

#: Tiles of a cell: ``x >> CELL_SHIFT, y >> CELL_SHIFT`` (32 x 32 tiles).
CELL_SHIFT = 5
#: Tiles waiting for upload before they are pushed mid-fetch.
PUSH_BATCH = 4096
#: A pack is closed once its images reach this many bytes.
PACK_BYTES = 32 << 20
_PACK_MAGIC = b"CBPACK1\n"
#: Requests to the bucket in flight at once.
DEFAULT_CONNECTIONS = 16
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
        return (
            f"the server answered {code} (HTTP {status})",
            "check the S3 service, then build again",
        )
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

    def __init__(
        self, url: StoreURL, *, client: Any = None, connections: int = DEFAULT_CONNECTIONS
    ):
        self.url = url
        self.connections = connections
        self._given = client
        self._lock = threading.Lock()

    @property
    def _client(self) -> Any:
        """The boto3 client, made on first use (so a missing boto3 fails in the phase that needs it)."""
        with self._lock:
            if self._given is None:
                self._given = self._make_client(self.connections)
            return self._given

    @staticmethod
    def _make_client(connections: int) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreUnavailable(
                "STORE=s3://… needs boto3, which is not installed", "pip install 'cachebuild[s3]'"
            ) from None

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

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> builtins.list[Any]:
        """``fn`` over ``items`` with :attr:`connections` in flight; in order."""
        items = list(items)
        if len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(
            min(self.connections, len(items)), thread_name_prefix="cachebuild-s3"
        ) as pool:
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


def _encode_pack(
    identity: str, z: int, t: float, tiles: list[tuple[int, int, str, bytes]]
) -> bytes:
    """A pack: a JSON header (provider, zoom, time, ``[x, y, sha256, length]`` rows), then the images."""
    header = {
        "format": 1,
        "provider": identity,
        "z": z,
        "t": t,
        "tiles": [[x, y, d, len(data)] for x, y, d, data in tiles],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join(
        (_PACK_MAGIC, struct.pack("<I", len(head)), head, *(data for *_, data in tiles))
    )


def _decode_pack(data: bytes) -> tuple[dict[str, Any], list[tuple[int, int, str, bytes]]] | None:
    """The header and ``(x, y, sha256, image)`` of every tile whose image matches its hash; None if malformed."""
    start = len(_PACK_MAGIC) + 4
    if len(data) < start or not data.startswith(_PACK_MAGIC):
        return None
    (n,) = struct.unpack_from("<I", data, len(_PACK_MAGIC))
    try:
        header = json.loads(data[start : start + n])
        pos = start + n
        out = []
        for x, y, d, length in header["tiles"]:
            image = data[pos : pos + int(length)]
            pos += int(length)
            if _sha(image) == d:
                out.append((int(x), int(y), str(d), image))
    except (ValueError, TypeError, KeyError):
        return None
    return (header, out) if pos == len(data) else None


class TileSync:
    """The bucket's side of one tiles phase for one provider (see the module doc).

    Used from the fetch's main thread.  :meth:`pull` before a chunk of
    tiles is fetched, :meth:`fetched` for each tile the provider served,
    :meth:`push` at the end (and whenever :meth:`due`).  Bucket failures
    raise :class:`~cachebuild.errors.DownloadError` (exit 20).

    A cell's packs are read once per fetch; every image in them goes into
    the local store (the bytes came with the pack), so the local copy
    grows by whole cells.
    """

    def __init__(self, remote: S3Store, store: Any, identity: str):
        self.remote = remote
        self.store = store
        self.identity = identity
        self.namespace = _sha(identity.encode())[:32]
        self.pulled = 0
        self._cells: dict[tuple[int, int, int], dict[tuple[int, int], tuple[float, str]]] = {}
        self._queued: dict[tuple[int, int, int], str] = {}

    def _prefix(self, cell: tuple[int, int, int]) -> str:
        return self.remote.url.key("tiles", self.namespace, _cell_part(cell))

    def _read_cell(self, cell: tuple[int, int, int]) -> dict[tuple[int, int], tuple[float, str]]:
        """Every pack of ``cell``: images into the local store; the newest digest of each tile."""
        refs: dict[tuple[int, int], tuple[float, str]] = {}
        for key in self.remote.list(self._prefix(cell)):
            name = key.rsplit("/", 1)[-1]
            if not name.endswith(".pack"):
                continue
            data = self.remote.get_verified(key, name[: -len(".pack")])
            pack = _decode_pack(data) if data is not None else None
            if pack is None:
                continue
            header, tiles = pack
            if header.get("provider") != self.identity or header.get("z") != cell[0]:
                continue
            t = float(header.get("t", 0.0))
            for x, y, d, image in tiles:
                if (x >> CELL_SHIFT, y >> CELL_SHIFT) != cell[1:]:
                    continue
                if not self.store.has(d):
                    self.store.put(image)
                if (x, y) not in refs or refs[(x, y)][0] <= t:
                    refs[(x, y)] = (t, d)
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
        """The tiles the bucket has and ``known`` (the local refs) lacks, now in the local store.

        Returns them with their digests (their refs are recorded locally
        too).  Tiles the local store has and the bucket does not are queued
        for :meth:`push`.
        """
        return self._guard(lambda: self._pull(tiles, known))

    def _pull(
        self, tiles: list[tuple[int, int, int]], known: Mapping[tuple[int, int, int], str]
    ) -> dict[tuple[int, int, int], str]:
        new_cells = sorted({_cell(*t) for t in tiles} - self._cells.keys())
        for cell, refs in zip(new_cells, self.remote.map(self._read_cell, new_cells)):
            self._cells[cell] = refs
        pulled: dict[tuple[int, int, int], str] = {}
        for t in tiles:
            remote = self._remote_ref(t)
            local = known.get(t)
            if local is not None:
                if remote != local:
                    self._queued[t] = local
            elif remote is not None and self.store.has(remote):
                pulled[t] = remote
        if pulled:
            self.store.record_refs(self.identity, pulled.items())
        self.pulled += len(pulled)
        return pulled

    def fetched(self, tile: tuple[int, int, int], digest: str) -> None:
        """The provider served ``digest`` for ``tile`` (it is in the local store)."""
        if self._remote_ref(tile) != digest:
            self._queued[tile] = digest

    def due(self) -> bool:
        return len(self._queued) >= PUSH_BATCH

    def push(self) -> int:
        """Upload the queued tiles as packs (per cell, up to :data:`PACK_BYTES` each); returns how many."""
        return self._guard(self._push)

    def _push(self) -> int:
        by_cell: dict[tuple[int, int, int], list[tuple[int, int, str]]] = {}
        for (z, x, y), d in sorted(self._queued.items()):
            by_cell.setdefault(_cell(z, x, y), []).append((x, y, d))
        now = time.time()

        def put_cell(item: tuple[tuple[int, int, int], list[tuple[int, int, str]]]) -> None:
            cell, rows = item
            pack: list[tuple[int, int, str, bytes]] = []
            size = 0
            for i, (x, y, d) in enumerate(rows):
                try:
                    image = self.store.get(d, verify=True)
                except (OSError, ValueError):  # damaged here: not shared (fetched again next time)
                    image = None
                if image is not None:
                    pack.append((x, y, d, image))
                    size += len(image)
                if pack and (size >= PACK_BYTES or i == len(rows) - 1):
                    data = _encode_pack(self.identity, cell[0], now, pack)
                    self.remote.put(self._prefix(cell) + f"{_sha(data)}.pack", data)
                    pack, size = [], 0
            refs = self._cells.setdefault(cell, {})
            for x, y, d in rows:
                refs[(x, y)] = (now, d)

        self.remote.map(put_cell, sorted(by_cell.items()))
        pushed = len(self._queued)
        self._queued.clear()
        return pushed
