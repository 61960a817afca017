"""Packs: many small store objects in one file, so a push is one stream, not
thousands of round trips.

A pack is a plain POSIX tar (``tar tvf`` lists it) whose members are named
by the SHA-256 of their bytes.  The workstation uploads each pack over SFTP
to ``incoming/<session>-<n>.tar.part`` and renames it to ``….tar`` once
complete; the companion's agent, started with the push, *claims* each
complete pack as it arrives (renames it to ``….tar.claimed-<pid>``, so two
unpackers never take the same one), puts every member into the store —
checking that its bytes hash to its name, a temp file and a rename each
(:meth:`TileStore.put`) — and removes the pack, while the next pack is on
its way.

An interrupted push leaves complete packs (unpacked by the next run, before
it decides what is missing: what arrived is never sent again) and at most
one partial ``.part`` per session (never read; removed when stale).

Whoever can write into ``incoming/`` can hand the agent any file, so a pack
is read as hostile input: only plain regular members (no sparse, link,
device or directory member), each at most :data:`MAX_MEMBER_BYTES` and
wholly inside the file, in a file of at most :data:`MAX_PACK_FILE_BYTES` —
what the agent holds in memory is bounded by one member.  A pack that fails
any check is *quarantined*: moved to ``incoming/quarantine/`` (the newest
:data:`QUARANTINE_KEEP` are kept for a look) and reported, never retried,
so it cannot wedge later pushes; its objects, if wanted, are sent again.

One object per SFTP file costs several round trips each; a pack moves the
same objects at the link's bulk rate (bench/bench_push.py, docs/benchmarks.md).
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cachebuild.store.objects import pid_alive, sha256_hex

__all__ = [
    "DEFAULT_PACK_BYTES",
    "PACK_SUFFIX",
    "PART_SUFFIX",
    "STALE_PART_S",
    "MAX_MEMBER_BYTES",
    "MAX_PACK_FILE_BYTES",
    "QUARANTINE_DIR",
    "QUARANTINE_KEEP",
    "PackCorruptError",
    "group_into_packs",
    "build_pack",
    "iter_pack",
    "unpack_into",
    "settle_incoming",
]

#: A pack holds objects up to about this many bytes (one larger object gets a pack of its own).
DEFAULT_PACK_BYTES = 8 << 20
PACK_SUFFIX = ".tar"
PART_SUFFIX = ".part"
_CLAIMED = ".claimed-"
#: A partial upload untouched this long is a leftover of a dead push.
STALE_PART_S = 3600.0
_HEX = frozenset("0123456789abcdef")
#: The largest member a pack may hold: far above any tile image.
MAX_MEMBER_BYTES = 64 << 20
#: The largest pack file read (packs are about DEFAULT_PACK_BYTES; one larger object gets its own).
MAX_PACK_FILE_BYTES = MAX_MEMBER_BYTES + (1 << 20)
#: Under ``incoming/``: packs that failed a check, moved aside.
QUARANTINE_DIR = "quarantine"
#: Quarantined packs kept (the newest); older ones are removed.
QUARANTINE_KEEP = 8
_PLAIN = (tarfile.REGTYPE, tarfile.AREGTYPE)


class PackCorruptError(ValueError):
    """A pack member's bytes do not hash to its name, or the pack is not a tar."""


def group_into_packs(
    objects: Iterable[tuple[str, int]], limit: int = DEFAULT_PACK_BYTES
) -> Iterator[list[tuple[str, int]]]:
    """Group ``(digest, size)`` pairs, in order, into packs of about ``limit`` bytes.

    >>> [len(p) for p in group_into_packs([("a", 4), ("b", 4), ("c", 4)], limit=8)]
    [2, 1]
    """
    pack: list[tuple[str, int]] = []
    size = 0
    for digest, n in objects:
        if pack and size + n > limit:
            yield pack
            pack, size = [], 0
        pack.append((digest, n))
        size += n
    if pack:
        yield pack


def build_pack(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar holding each ``(digest, data)`` as a member named ``digest``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for digest, data in members:
            info = tarfile.TarInfo(digest)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _member(path: Path, info: tarfile.TarInfo, file_size: int) -> str:
    """Why ``info`` is not a member a pack may hold, or ``""``."""
    name = info.name
    if len(name) != 64 or not set(name) <= _HEX:
        return f"unexpected member {name!r}"
    if info.type not in _PLAIN or info.sparse is not None:
        kind = (
            "sparse"
            if info.sparse is not None or info.type == tarfile.GNUTYPE_SPARSE
            else repr(info.type)
        )
        return f"member {name[:12]}… is not a plain regular file ({kind})"
    if info.size > MAX_MEMBER_BYTES:
        return f"member {name[:12]}… declares {info.size:,} bytes (at most {MAX_MEMBER_BYTES:,})"
    if info.offset_data + info.size > file_size:
        return f"member {name[:12]}… declares {info.size:,} bytes past the end of the file"
    return ""


def iter_pack(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every member of the pack at ``path``, one member in memory at a time.

    Raises
    ------
    PackCorruptError
        Not a tar; larger than :data:`MAX_PACK_FILE_BYTES`; a member that is
        not a plain regular file named by a digest, is larger than
        :data:`MAX_MEMBER_BYTES`, or reaches past the end of the file.
    """
    file_size = path.stat().st_size
    if file_size > MAX_PACK_FILE_BYTES:
        raise PackCorruptError(f"{path.name}: {file_size:,} bytes, larger than a pack may be")
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                why = _member(path, info, file_size)
                if why:
                    raise PackCorruptError(f"{path.name}: {why}")
                fh = tar.extractfile(info)
                assert fh is not None
                data = fh.read(info.size)
                if len(data) != info.size:
                    raise PackCorruptError(f"{path.name}: member {info.name[:12]}… is cut short")
                yield info.name, data
    except PackCorruptError:
        raise
    except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError) as exc:
        raise PackCorruptError(f"{path.name}: not a pack ({type(exc).__name__}: {exc})") from None


def unpack_into(path: Path, store: Any) -> tuple[int, int]:
    """Put every member of a pack into ``store`` (a :class:`~cachebuild.store.objects.TileStore`).

    Returns ``(objects, bytes)``.  A member whose bytes do not hash to its
    name stops the unpack with :class:`PackCorruptError` (the members before
    it are in the store under their true names: nothing wrong is stored).
    """

    objects = size = 0
    for name, data in iter_pack(path):
        if sha256_hex(data) != name:
            raise PackCorruptError(f"{path.name}: member {name[:12]}… does not hash to its name")
        store.put(data)
        objects += 1
        size += len(data)
    return objects, size


def _pid_of_claim(name: str) -> int | None:
    try:
        return int(name.rsplit(_CLAIMED, 1)[1])
    except (IndexError, ValueError):
        return None


def _quarantine(incoming: Path, claimed: Path, base: str, now: float) -> str:
    """Move a failed pack aside (keeping the newest :data:`QUARANTINE_KEEP`); its new path."""
    qdir = incoming / QUARANTINE_DIR
    qdir.mkdir(exist_ok=True)
    target = qdir / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}-{base}"
    try:
        os.replace(claimed, target)
    except OSError:  # cannot move it: never leave it to be claimed again
        claimed.unlink(missing_ok=True)
        return "(removed)"
    kept = sorted(qdir.iterdir(), key=lambda p: p.name, reverse=True)
    for old in kept[QUARANTINE_KEEP:]:
        old.unlink(missing_ok=True)
    return str(target)


def settle_incoming(incoming: Path, store: Any, *, now: float | None = None) -> dict[str, Any]:
    """Unpack every complete pack in ``incoming`` into ``store``; drop stale leftovers.

    Complete packs are ``*.tar`` (and claims of unpackers that died).  A
    pack that fails a check is quarantined (its objects will be found
    missing and sent again).  Returns counts: ``packs``, ``objects``,
    ``bytes``, ``corrupt`` (quarantined), ``stale_parts``, and
    ``quarantined``: a line per quarantined pack, where it went and why.
    """
    now = time.time() if now is None else now
    counts: dict[str, Any] = {"packs": 0, "objects": 0, "bytes": 0, "corrupt": 0, "stale_parts": 0}
    counts["quarantined"] = []
    if not incoming.is_dir():
        return counts
    me = os.getpid()
    for entry in sorted(os.scandir(incoming), key=lambda e: e.name):
        name = entry.name
        if name.endswith((PART_SUFFIX, ".done")):  # in flight, or a watcher's marker
            try:
                if now - entry.stat().st_mtime > STALE_PART_S:
                    os.unlink(entry.path)
                    counts["stale_parts"] += 1
            except FileNotFoundError:
                pass
            continue
        if _CLAIMED in name:
            pid = _pid_of_claim(name)
            if pid is not None and pid != me and pid_alive(pid):
                continue  # another unpacker is on it
            base = name.rsplit(_CLAIMED, 1)[0]
        elif name.endswith(PACK_SUFFIX):
            base = name
        else:
            continue
        claimed = incoming / f"{base}{_CLAIMED}{me}"
        try:
            os.rename(entry.path, claimed)
        except FileNotFoundError:
            continue  # claimed by someone else first
        try:
            if not entry.is_file(follow_symlinks=False):  # a link, FIFO or device is never read
                raise PackCorruptError(f"{base}: not a regular file")
            n, size = unpack_into(claimed, store)
        except (PackCorruptError, MemoryError) as exc:
            why = (
                str(exc).replace(claimed.name, base)
                if isinstance(exc, PackCorruptError)
                else f"{base}: too large"
            )
            counts["corrupt"] += 1
            counts["quarantined"].append(f"{why} -> {_quarantine(incoming, claimed, base, now)}")
            continue
        except OSError:
            os.replace(
                claimed, incoming / base
            )  # the store failed (disk full): the next run tries again
            raise
        counts["packs"] += 1
        counts["objects"] += n
        counts["bytes"] += size
        claimed.unlink(missing_ok=True)
    return counts
