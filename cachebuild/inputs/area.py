"""Refuse an absurd area up front: before the lock, before any download.

A flight with a huge buffer, a route across a continent or a high zoom can
name billions of tiles.  :func:`check_area` counts them (O(1) per zoom, no
listing) and refuses, with the count and the bytes the build would need:

- more tiles than ``MAX_TILES`` (default :data:`DEFAULT_MAX_TILES`);
- more bytes than the disks that would hold them have free.

The bytes are an estimate, :data:`BYTES_PER_TILE` a tile, from what a
build writes per tile:

============================  =====================================
the store (``STORE``)         the image (:data:`IMAGE_BYTES_ESTIMATE`),
                              its descriptor (1 KiB), its ref (~0.1 KiB)
the cache (``CACHE_DIR``)     the image again in ``tiles.mbtiles``,
                              ``descriptors.npy`` (1 KiB), the index
                              (1 KiB), ``tiles.npy`` (40 B)
============================  =====================================

Satellite JPEG tiles of 256 pixels are mostly 10-30 KiB (the built-in
synthetic ones 14-20 KiB); PNG tiles can be larger, so the estimate is only
a guard against the absurd, not a promise.  Tiles the cache's staged build
already planned are not counted again (an unchanged or shrunk area is never
refused for disk), and in companion mode the workstation counts only its
store (the companion checks its own disk: docs/companion.md).

:func:`check_area` also checks the provider's arguments
(:func:`cachebuild.inputs.providercheck.check_provider`): it is the build's one call,
before the lock, for everything it can refuse before downloading.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachebuild._util.sizes import human_bytes
from cachebuild.errors import AreaTooLargeError
from cachebuild.inputs.config import DEFAULT_MAX_TILES
from cachebuild.inputs.providercheck import check_provider
from cachebuild.providers import provider_kind
from cachebuild.tilemath import LngLatBbox, count_tiles

__all__ = [
    "DEFAULT_MAX_TILES",
    "IMAGE_BYTES_ESTIMATE",
    "STORE_BYTES_PER_TILE",
    "CACHE_BYTES_PER_TILE",
    "BYTES_PER_TILE",
    "AreaEstimate",
    "estimate_area",
    "check_area",
    "free_bytes",
]

#: What one tile image is taken to weigh (a 256-pixel satellite JPEG, rounded up).
IMAGE_BYTES_ESTIMATE = 32 << 10
#: Store bytes a new tile costs: image, descriptor (256 float32), ref row.
STORE_BYTES_PER_TILE = IMAGE_BYTES_ESTIMATE + 1024 + 128
#: Cache bytes a tile costs: its image in tiles.mbtiles, descriptors.npy, index, tiles.npy.
CACHE_BYTES_PER_TILE = IMAGE_BYTES_ESTIMATE + 1024 + 1024 + 64
BYTES_PER_TILE = STORE_BYTES_PER_TILE + CACHE_BYTES_PER_TILE


@dataclass(frozen=True)
class AreaEstimate:
    """What an area would cost: ``tiles`` planned, ``new_tiles`` not yet staged, bytes per place."""

    tiles: int
    new_tiles: int
    store_bytes: int
    cache_bytes: int

    @property
    def bytes(self) -> int:
        return self.store_bytes + self.cache_bytes


def _staged_planned(cache_dir: Path) -> int:
    """Tiles the cache's staged build planned (its small tileset.json), 0 if none."""
    try:
        return int(
            json.loads((cache_dir / "state" / "build" / "tileset.json").read_text())["planned"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (what a mkdir would land on)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> tuple[int, int]:
    """``(free bytes, device)`` of the filesystem ``path`` is (or would be) on."""
    p = _existing(path)
    return shutil.disk_usage(p).free, os.stat(p).st_dev


def estimate_area(
    bbox: Any, zooms: Any, *, cache_dir: Path, store_only: bool = False
) -> AreaEstimate:
    """Tiles in ``bbox`` at ``zooms`` and the bytes a build of them would write."""

    n = count_tiles(LngLatBbox(*bbox), zooms)
    new = max(0, n - _staged_planned(cache_dir))
    return AreaEstimate(
        tiles=n,
        new_tiles=new,
        store_bytes=new * STORE_BYTES_PER_TILE,
        cache_bytes=0 if store_only else new * CACHE_BYTES_PER_TILE,
    )


def check_area(
    settings: Any, bbox: Any, *, free: Callable[[Path], tuple[int, int]] | None = None
) -> AreaEstimate:
    """Refuse the area of ``bbox`` if it has more than ``MAX_TILES`` tiles or does not fit on disk,
    and a provider spec the arguments already show is wrong
    (:func:`~cachebuild.inputs.providercheck.check_provider`).

    Parameters
    ----------
    settings
        The :class:`~cachebuild.inputs.config.Settings` (zooms, ``max_tiles``,
        store, cache directory, provider, companion).
    bbox
        ``(west, south, east, north)``.
    free
        ``path -> (free bytes, device)``; :func:`free_bytes` by default
        (tests inject one).

    Raises
    ------
    AreaTooLargeError
        Exit 2, phase ``area``: the message gives the tile count, the
        estimated bytes and the limit or the free bytes.
    UsageError
        Exit 2, phase ``arguments``: the provider's template, key or headers.
    """

    if hasattr(settings, "env"):
        check_provider(settings)

    pushed = provider_kind(settings.provider) == "pushed"  # its tiles are in the store already
    est = estimate_area(
        bbox,
        settings.zooms,
        cache_dir=settings.cache_dir,
        store_only=settings.companion is not None,
    )
    zooms = ",".join(str(z) for z in settings.zooms)
    what = (
        f"the area ({', '.join(f'{v:.6f}' for v in bbox)}) at zoom {zooms} has {est.tiles:,} tiles, "
        f"about {human_bytes(est.tiles * BYTES_PER_TILE)} at {BYTES_PER_TILE // 1024} KiB a tile"
    )
    limit = getattr(settings, "max_tiles", DEFAULT_MAX_TILES)
    if est.tiles > limit:
        raise AreaTooLargeError(
            f"{what}: more than MAX_TILES={limit:,}; nothing was downloaded",
            remedy="check the flight's waypoints, BUFFER_M and ZOOM; if the area is meant, "
            f"raise MAX_TILES (e.g. MAX_TILES={est.tiles})",
        )
    needs: dict[int, list[Any]] = {}
    places = [("STORE", settings.store, 0 if pushed else est.store_bytes)]
    if settings.companion is None:
        places.append(("CACHE_DIR", settings.cache_dir, est.cache_bytes))
    for name, path, n in places:
        if n <= 0:
            continue
        avail, dev = (free or free_bytes)(path)
        entry = needs.setdefault(dev, [avail, 0, []])
        entry[1] += n
        entry[2].append(f"{name}={path}")
    for avail, need, names in needs.values():
        if need > avail:
            raise AreaTooLargeError(
                f"{what}; the {est.new_tiles:,} tiles not built yet need about {human_bytes(need)} on the disk of "
                f"{' and '.join(names)}, which has {human_bytes(avail)} free; nothing was downloaded",
                remedy="free disk space (`doit gc-store` removes tiles no cache uses), put STORE or "
                "CACHE_DIR on a larger disk, or make the area smaller (BUFFER_M, ZOOM)",
            )
    return est
