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

Measured on loopback (docs/benchmarks.md): one object per SFTP file costs
four round trips and about 2.5 ms each; a pack moves the same objects at the
link's bulk rate.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..store import pid_alive

__all__ = [
    "DEFAULT_PACK_BYTES",
    "PACK_SUFFIX",
    "PART_SUFFIX",
    "STALE_PART_S",
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


def iter_pack(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every member of the pack at ``path``.

    Raises
    ------
    PackCorruptError
        Not a tar, or a member that is not a regular file named by a digest.
    """
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                name = info.name
                if not info.isreg() or len(name) != 64 or not set(name) <= _HEX:
                    raise PackCorruptError(f"{path.name}: unexpected member {name!r}")
                fh = tar.extractfile(info)
                assert fh is not None
                yield name, fh.read()
    except tarfile.TarError as exc:
        raise PackCorruptError(f"{path.name}: not a pack ({exc})") from None


def unpack_into(path: Path, store: Any) -> tuple[int, int]:
    """Put every member of a pack into ``store`` (a :class:`~cachebuild.store.TileStore`).

    Returns ``(objects, bytes)``.  A member whose bytes do not hash to its
    name stops the unpack with :class:`PackCorruptError` (the members before
    it are in the store under their true names: nothing wrong is stored).
    """
    from ..store import sha256_hex

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


def settle_incoming(incoming: Path, store: Any, *, now: float | None = None) -> dict[str, int]:
    """Unpack every complete pack in ``incoming`` into ``store``; drop stale leftovers.

    Complete packs are ``*.tar`` (and claims of unpackers that died).  A
    corrupt pack is removed (its objects will be found missing and sent
    again).  Returns counts: ``packs``, ``objects``, ``bytes``, ``corrupt``,
    ``stale_parts``.
    """
    now = time.time() if now is None else now
    counts = {"packs": 0, "objects": 0, "bytes": 0, "corrupt": 0, "stale_parts": 0}
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
            n, size = unpack_into(claimed, store)
        except PackCorruptError:
            counts["corrupt"] += 1
        else:
            counts["packs"] += 1
            counts["objects"] += n
            counts["bytes"] += size
        claimed.unlink(missing_ok=True)
    return counts
