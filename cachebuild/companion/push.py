"""The delta push: what the companion needs for a build, minus what it has.

:func:`plan_push` lists what a remote build of the staged tile set needs,
as paths relative to the ``COMPANION_DIR``:

- every tile image the tile set names, ``store/objects/ab/<sha256>``;
- the model and calibration files when ``MODEL``/``CALIBRATION`` are set,
  ``inputs/<sha256><suffix>`` (named by content: a changed model is a new
  file, an unchanged one is never sent twice); a model with external data
  goes with its data files into ``inputs/<identity>/`` under the names
  the model gives them;
- the flight and tile set, ``inbox/<key>/`` (``key`` hashes the flight
  record and the tile set's aggregate hash): ``flight.json``, ``tiles.npy``,
  ``missing.npy``, ``push.json`` and, last, ``tileset.json`` — its presence
  means the directory is complete.

The companion's agent says which are absent (one round trip); :func:`push`
sends exactly those over SFTP.  Tile images travel in packs
(:mod:`.packs`); every file is written to a temporary name and renamed, so
a cut-off push never leaves a half file under a real name, and the next
run sends only what did not arrive (a partial model upload resumes where
it stopped).  Each tile image is checked against its name as it is read:
a corrupt one is never sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachebuild._util.fs import atomic_write
from cachebuild._util.hashing import canonical_json, sha256_file
from cachebuild._util.statcache import stat_key, still_valid
from cachebuild.companion.agent import DONE_SUFFIX
from cachebuild.companion.errors import CompanionNotReadyError, ConnectionDroppedError
from cachebuild.companion.packs import (
    DEFAULT_PACK_BYTES,
    MAX_MEMBER_BYTES,
    PACK_SUFFIX,
    PART_SUFFIX,
    build_pack,
    group_into_packs,
)
from cachebuild.engine.modelfiles import external_data_files_cached
from cachebuild.errors import StoreObjectError
from cachebuild.store.objects import read_object
from cachebuild.tileset import (
    MISSING_FILE,
    SUMMARY_FILE,
    TILES_FILE,
    hex_digests,
    read_summary,
    read_tiles,
)

__all__ = [
    "INBOX_FILES",
    "CHUNK_BYTES",
    "PushPlan",
    "PushResult",
    "plan_push",
    "push",
    "file_sha256_cached",
]

#: The files of a pushed flight, in upload order: ``tileset.json`` last.
INBOX_FILES = ("flight.json", "tiles.npy", "missing.npy", "push.json", "tileset.json")
#: Bytes per SFTP write call (paramiko splits them into 32 KiB requests, pipelined).
CHUNK_BYTES = 1 << 20
_SUFFIX_RE = re.compile(r"^\.[A-Za-z0-9]{1,12}$")


@dataclass
class PushPlan:
    """What a remote build needs, by path relative to the ``COMPANION_DIR``.

    Attributes
    ----------
    tiles
        ``sha256 -> (local path, size)`` of every tile image, once each.
    inputs
        ``relative path -> (local path, size)`` of model/calibration files.
    inbox
        ``inbox/<key>``, where the flight and tile set go.
    inbox_files
        ``name -> bytes`` of the files that go there.
    remote
        Remote paths (absolute) the build is run with: ``flight``,
        ``tileset_dir``, ``model``, ``calibration``, ``store``, ``cache``.
    """

    tiles: dict[str, tuple[str, int]]
    inputs: dict[str, tuple[Path, int]]
    inbox: str
    inbox_files: dict[str, bytes]
    remote: dict[str, str | None]

    @staticmethod
    def tile_rel(digest: str) -> str:
        return f"store/objects/{digest[:2]}/{digest}"

    def wanted(self) -> list[str]:
        """Every path the build needs, for the agent to check."""
        rels = [self.tile_rel(d) for d in self.tiles]
        rels.extend(self.inputs)
        rels.append(f"{self.inbox}/tileset.json")
        return rels

    def bytes_for(self, absent: set[str]) -> int:
        """Bytes :func:`push` would send for ``absent`` (tile payload, inputs, inbox)."""
        n = sum(size for d, (_, size) in self.tiles.items() if self.tile_rel(d) in absent)
        n += sum(size for rel, (_, size) in self.inputs.items() if rel in absent)
        if f"{self.inbox}/tileset.json" in absent:
            n += sum(len(b) for b in self.inbox_files.values())
        return n

    @property
    def tile_bytes(self) -> int:
        return sum(size for _, size in self.tiles.values())


@dataclass
class PushResult:
    """What one push sent (the report's ``push`` object)."""

    objects: int = 0
    bytes: int = 0
    tile_objects: int = 0
    tile_bytes: int = 0
    files: int = 0
    packs: int = 0
    skipped: int = 0
    settled: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "objects": self.objects,
            "bytes": self.bytes,
            "tile_objects": self.tile_objects,
            "tile_bytes": self.tile_bytes,
            "files": self.files,
            "packs": self.packs,
            "already_there": self.skipped,
        }


def file_sha256_cached(path: Path, cache_file: Path) -> str:
    """SHA-256 of a (large) file, cached against its stat in ``cache_file``."""

    st = path.stat()
    stamp = [str(path), *stat_key(st)]  # size, inode, mtime and ctime, with git's racy rule
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(str(path))
    if (
        isinstance(entry, dict)
        and entry.get("stamp") == stamp
        and still_valid(st, stamp[1:], entry.get("recorded_ns"))
    ):
        return str(entry["sha256"])
    digest = sha256_file(path)[0]
    cache[str(path)] = {"stamp": stamp, "sha256": digest, "recorded_ns": time.time_ns()}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache_file, json.dumps(cache).encode(), durable=False)
    return digest


def _input_rel(path: Path, digest: str) -> str:
    suffix = path.suffix if _SUFFIX_RE.match(path.suffix) else ""
    return f"inputs/{digest}{suffix}"


def _model_dir_inputs(
    model: Path, data: list[str], cache: Path, inputs: dict[str, tuple[Path, int]]
) -> str:
    """Add ``model``'s external data files to ``inputs`` under ``inputs/<identity>/``; returns the model's rel.

    The directory is named by the hash of the model and every data file, so
    a changed data file is a new directory, and an unchanged one is never
    sent twice.
    """

    parts = {loc: file_sha256_cached(model.parent / loc, cache) for loc in data}
    doc = {"model": file_sha256_cached(model, cache), "external_data": parts}
    ident = hashlib.sha256(b"cachebuild-model-v1\0" + canonical_json(doc)).hexdigest()
    for loc in data:
        inputs[f"inputs/{ident}/{loc}"] = (model.parent / loc, (model.parent / loc).stat().st_size)
    suffix = model.suffix if _SUFFIX_RE.match(model.suffix) else ""
    return f"inputs/{ident}/model{suffix}"


def _inbox_key(flight: bytes, aggregate: str, tileset: bytes) -> str:
    """The inbox a pushed flight goes to: keyed by ``tileset.json`` too, so the same tiles from
    another provider are another inbox and the companion's tileset.json names that provider."""
    parts = (b"cachebuild-inbox-v2", flight, aggregate.encode(), tileset)
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:32]


def plan_push(
    *,
    build_dir: Path,
    store_root: Path,
    root: str,
    model: Path | None = None,
    calibration: Path | None = None,
    state_dir: Path | None = None,
) -> PushPlan:
    """List what a remote build of the staged tile set in ``build_dir`` needs.

    Parameters
    ----------
    build_dir
        The workstation's staged build (``flight.json``, ``tiles.npy``,
        ``missing.npy``, ``tileset.json``).
    store_root
        The workstation's tile store.
    root
        The ``COMPANION_DIR``, absolute, as the companion spells it.
    model, calibration
        Files to push, or None.
    state_dir
        Where the hashes of model files are cached by stat.
    """

    tiles: dict[str, tuple[str, int]] = {}
    objects = os.path.join(store_root, "objects")
    for digest in hex_digests(read_tiles(build_dir)):
        if digest not in tiles:
            obj = f"{objects}/{digest[:2]}/{digest}"  # str, not Path: 10k of them on the no-op path
            try:
                tiles[digest] = (obj, os.stat(obj).st_size)
            except FileNotFoundError:
                raise CompanionNotReadyError(
                    f"tile object {digest[:12]}… named by {build_dir / TILES_FILE} is not in the store {store_root}",
                    remedy="run build-cache again: the tiles phase fetches what the store lacks",
                    phase="push",
                ) from None
    inputs: dict[str, tuple[Path, int]] = {}
    remote: dict[str, str | None] = {"model": None, "calibration": None}
    cache = (state_dir or build_dir) / "companion-inputs.json"
    for name, path in (("model", model), ("calibration", calibration)):
        if path is not None:
            rel = _input_rel(path, file_sha256_cached(path, cache))
            listed = cache.with_name("companion-model-files.json")
            data = external_data_files_cached(path, listed) if name == "model" else []
            if data:  # external data travels with the model, beside it under the names it gives
                rel = _model_dir_inputs(path, data, cache, inputs)
            inputs[rel] = (path, path.stat().st_size)
            remote[name] = f"{root}/{rel}"
    flight = (build_dir / "flight.json").read_bytes()
    summary = read_summary(build_dir)
    tileset = (build_dir / SUMMARY_FILE).read_bytes()
    inbox = f"inbox/{_inbox_key(flight, str(summary['aggregate_sha256']), tileset)}"
    push_json = json.dumps(
        {"format": 1, "store": f"{root}/store", "aggregate_sha256": summary["aggregate_sha256"]},
        indent=1,
        sort_keys=True,
    ).encode()
    files = {
        "flight.json": flight,
        "tiles.npy": (build_dir / TILES_FILE).read_bytes(),
        "missing.npy": (build_dir / MISSING_FILE).read_bytes(),
        "push.json": push_json,
        "tileset.json": tileset,
    }
    remote.update(
        flight=f"{root}/{inbox}/flight.json",
        tileset_dir=f"{root}/{inbox}",
        store=f"{root}/store",
        cache=f"{root}/cache",
    )
    return PushPlan(tiles=tiles, inputs=inputs, inbox=inbox, inbox_files=files, remote=remote)


def _read(path: str) -> bytes:
    """A tile object's bytes, checked against its name as they are read.

    A corrupt one (the companion's agent would refuse its pack, every time)
    is removed and raises :class:`~cachebuild.errors.StoreObjectError`: the
    wrapper fetches it again and pushes once more (:mod:`cachebuild.cli.repair`).
    """
    try:
        return read_object(path, what="the push")
    except StoreObjectError as exc:
        exc.phase = "push"
        raise


class _Uploader:
    """SFTP writes through temp names, translating errors at the boundary."""

    def __init__(self, conn: Any, sftp: Any, root: str, result: PushResult, total: int):
        self.conn = conn
        self.sftp = sftp
        self.root = root
        self.result = result
        self.total = total

    def _link_down(self, exc: BaseException) -> bool:
        if isinstance(exc, (EOFError, ConnectionError, TimeoutError)):
            return True  # TimeoutError: nothing heard for dead_after_s
        # paramiko may report the loss before its transport thread notices it
        deadline = time.monotonic() + 1.0
        while self.conn.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def fail(self, what: str, exc: BaseException) -> Exception:
        arrived = (
            f"; {self.result.objects} of {self.total} objects had arrived and are kept"
            if self.total
            else ""
        )
        if self._link_down(exc):
            return ConnectionDroppedError(
                f"the connection to {self.conn.target} was lost during the push ({what}){arrived}",
                phase="push",
            )
        return CompanionNotReadyError(
            f"push to {self.conn.target} failed writing {what}: {exc}{arrived}",
            remedy="check COMPANION_DIR's permissions and free space on the companion",
            phase="push",
        )

    def write(self, rel: str, data: bytes | Path, *, resume: bool = False) -> int:
        """Write ``data`` to ``root/rel`` via a temp name; returns bytes sent."""
        final = f"{self.root}/{rel}"
        part = (
            f"{final}{PART_SUFFIX}" if resume else f"{final}.{uuid.uuid4().hex[:12]}{PART_SUFFIX}"
        )
        try:
            offset = 0
            if resume:
                try:
                    offset = int(self.sftp.stat(part).st_size or 0)
                except OSError:
                    offset = 0
            sent = 0
            with self.sftp.open(part, "r+" if offset else "w") as fh:
                fh.set_pipelined(True)
                if isinstance(data, Path):
                    size = data.stat().st_size
                    if offset > size:
                        fh.truncate(0)
                        offset = 0
                    fh.seek(offset)
                    with open(data, "rb") as src:
                        src.seek(offset)
                        for block in iter(lambda: src.read(CHUNK_BYTES), b""):
                            fh.write(block)
                            sent += len(block)
                else:
                    view = memoryview(data)
                    for i in range(0, len(view), CHUNK_BYTES):
                        fh.write(view[i : i + CHUNK_BYTES])
                    sent = len(data)
            self.sftp.posix_rename(part, final)
        except (OSError, EOFError) as exc:
            raise self.fail(rel, exc) from exc
        except Exception as exc:  # paramiko.SSHException: the channel went away
            if type(exc).__module__.startswith("paramiko"):
                raise self.fail(rel, exc) from exc
            raise
        return sent

    def mkdir(self, rel: str) -> None:
        path = f"{self.root}/{rel}"
        try:
            self.sftp.mkdir(path)
        except OSError as exc:
            try:
                self.sftp.stat(path)
            except OSError:
                raise self.fail(rel, exc) from exc
        except EOFError as exc:
            raise self.fail(rel, exc) from exc


def push(
    conn: Any,
    sftp: Any,
    plan: PushPlan,
    absent: set[str],
    *,
    root: str,
    pack_bytes: int = DEFAULT_PACK_BYTES,
    on_progress: Callable[[PushResult, int, int], None] | None = None,
    start_unpack: Callable[[list[str], str], Any] | None = None,
) -> PushResult:
    """Send what the companion lacks: packs of tiles, input files, the inbox.

    Parameters
    ----------
    conn
        The :class:`~.ssh.Connection` (to tell a dropped link from a refusal).
    sftp
        An SFTP client on it.
    plan
        From :func:`plan_push`.
    absent
        The paths of ``plan.wanted()`` the companion lacks.
    root
        The ``COMPANION_DIR``, absolute.
    pack_bytes
        About how many bytes of tiles go in one pack.
    on_progress
        Called after each pack and file with the result so far, the total
        objects and the total bytes to send.
    start_unpack
        ``start_unpack(paths, session)`` starts the companion's unpacker on
        the packs of ``session`` as they arrive (overlapping the upload) and
        returns a handle with ``result()`` (its answer: ``absent`` among
        ``paths``) and ``cancel()``; :func:`push` ends the session with the
        ``incoming/<session>.done`` marker and waits for the answer.

    Raises
    ------
    ConnectionDroppedError
        The link went away; what arrived is kept and not sent again.
    CompanionNotReadyError
        The companion refused a write (permissions, disk), or objects are
        still absent after the unpack.
    StoreObjectError
        A tile image in this store is corrupt (removed by then; nothing of
        it was sent): the wrapper fetches it again.
    """
    result = PushResult()
    tiles = sorted((d, size) for d, (_, size) in plan.tiles.items() if plan.tile_rel(d) in absent)
    too_big = next(((d, size) for d, size in tiles if size > MAX_MEMBER_BYTES), None)
    if too_big is not None:  # the companion's agent would quarantine its pack, every time
        raise CompanionNotReadyError(
            f"tile object {too_big[0][:12]}… is {too_big[1]:,} bytes; a pack member may be at most "
            f"{MAX_MEMBER_BYTES:,}",
            remedy="the provider served an image far larger than a tile: check PROVIDER",
            phase="push",
        )
    inputs = [(rel, path, size) for rel, (path, size) in plan.inputs.items() if rel in absent]
    inbox_needed = f"{plan.inbox}/tileset.json" in absent
    total_objects = len(tiles) + len(inputs)
    total_bytes = plan.bytes_for(absent)
    result.skipped = len(plan.tiles) + len(plan.inputs) - total_objects
    up = _Uploader(conn, sftp, root, result, total_objects)
    report = on_progress or (lambda r, n, b: None)

    def progress() -> None:
        report(result, total_objects, total_bytes)

    _send_packs(up, plan, tiles, pack_bytes, start_unpack, progress)
    _send_inputs(up, inputs, progress)
    if inbox_needed:
        up.mkdir(plan.inbox)
        for name in INBOX_FILES:
            result.bytes += up.write(f"{plan.inbox}/{name}", plan.inbox_files[name])
            result.files += 1
        progress()
    return result


def _send_packs(
    up: _Uploader,
    plan: PushPlan,
    tiles: list[tuple[str, int]],
    pack_bytes: int,
    start_unpack: Callable[[list[str], str], Any] | None,
    progress: Callable[[], None],
) -> None:
    """Upload ``tiles`` in packs while the companion unpacks them; wait for its answer.

    Raises :class:`CompanionNotReadyError` when objects are still absent
    after the unpack; on any failure the unpacker is stopped (what arrived stays).
    """
    result = up.result
    session = f"{int(time.time())}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    groups = list(group_into_packs(tiles, pack_bytes))
    pending = (
        start_unpack([plan.tile_rel(d) for d, _ in tiles], session)
        if groups and start_unpack
        else None
    )
    try:
        for n, group in enumerate(groups):
            data = build_pack((d, _read(plan.tiles[d][0])) for d, _ in group)
            # the pack's temp name is its final name + ".part": rename = complete
            up.write(f"incoming/{session}-{n:06d}{PACK_SUFFIX}", data, resume=False)
            result.packs += 1
            result.objects += len(group)
            result.tile_objects += len(group)
            result.tile_bytes += sum(size for _, size in group)
            result.bytes += len(data)
            progress()
        if pending is not None:
            up.write(f"incoming/{session}{DONE_SUFFIX}", b"")
            answer = pending.result()
            pending = None
            result.settled = dict(answer.get("settled") or {})
            still = answer.get("absent") or []
            if still:
                raise CompanionNotReadyError(
                    f"after the push, {len(still)} tile object(s) are still absent on {up.conn.target} "
                    f"(e.g. {still[0]}); {result.settled.get('corrupt', 0)} pack(s) were corrupt",
                    remedy="run build-cache again: the missing objects are sent again",
                    phase="push",
                )
    finally:
        if pending is not None:  # the upload failed: stop the unpacker (what arrived stays)
            pending.cancel()


def _send_inputs(
    up: _Uploader, inputs: list[tuple[str, Path, int]], progress: Callable[[], None]
) -> None:
    """Upload the input files (model, its external data, calibration), resuming cut-off ones."""
    result = up.result
    made: set[str] = set()
    for rel, path, _size in inputs:
        parts = rel.split("/")
        for i in range(2, len(parts)):  # a model's directory (external data): inputs/<identity>/...
            if "/".join(parts[:i]) not in made:
                up.mkdir("/".join(parts[:i]))
                made.add("/".join(parts[:i]))
        result.bytes += up.write(rel, path, resume=True)
        result.objects += 1
        result.files += 1
        progress()
