"""``PROVIDER=pushed:<dir>``: the tiles a workstation pushed, served from the store.

The remote half of a companion build resolves its tiles from what was
pushed, never from the network: ``<dir>`` holds the workstation's tile set
(``tiles.npy``: tile id -> SHA-256, ``missing.npy``, ``tileset.json``) and
``push.json`` (which store the objects were pushed into).  Each planned
tile is read from the store by its hash; a tile the workstation found
missing is missing here too (None); a tile the workstation never planned
means the two disagree about the area — an error, not a gap.

The identity is ``pushed:<aggregate_sha256>``: the same pushed tile set is
the same provider, wherever it was pushed to (it keys the store's refs).
What the companion's ``tileset.json`` names as its provider is
:attr:`PushedProvider.published`, the workstation's provider as the pushed
``tileset.json`` names it: the same flight gives the same cache on a
companion as on the workstation.
"""

from __future__ import annotations

import json
from pathlib import Path

from cachebuild._util.cpus import usable_cpus
from cachebuild.errors import DownloadError, UsageError
from cachebuild.tilemath import Tile, tile_id
from cachebuild.tileset import hex_digests, read_missing, read_summary, read_tiles

__all__ = ["PREFIX", "PUSH_FILE", "PushedProvider", "open_pushed", "pushed_dir"]

PREFIX = "pushed:"
PUSH_FILE = "push.json"


def pushed_dir(spec: str) -> Path:
    """The directory of a ``pushed:<dir>`` spec, absolute.

    >>> str(pushed_dir("pushed:/srv/cb/inbox/ab12"))
    '/srv/cb/inbox/ab12'
    """
    spec = spec.strip()
    if not spec.startswith(PREFIX) or not spec[len(PREFIX) :]:
        raise UsageError(f"PROVIDER={spec!r} is not pushed:<directory>")
    return Path(spec[len(PREFIX) :]).expanduser().absolute()


class PushedProvider:
    """Serves the tiles of a pushed tile set from the local store.

    Parameters
    ----------
    directory
        The pushed tile set's directory.

    Raises
    ------
    UsageError
        No complete pushed tile set there.
    """

    def __init__(self, directory: Path):

        self.directory = Path(directory)
        try:
            summary = read_summary(self.directory)
            meta = json.loads((self.directory / PUSH_FILE).read_text())
            tiles = read_tiles(self.directory)
            missing = read_missing(self.directory)
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(
                f"PROVIDER=pushed:{self.directory}: no complete pushed tile set there ({type(exc).__name__})",
                remedy="run build-cache with COMPANION=… from the workstation: it pushes the tile set",
            ) from None
        self.identity = f"pushed:{summary['aggregate_sha256']}"
        #: the provider the workstation fetched these tiles from, as its tileset.json names it
        self.published = str(summary.get("provider") or self.identity)
        self.concurrency = min(8, usable_cpus())
        self.store_root = Path(meta["store"])
        self._digests = dict(zip(tiles["id"].tolist(), hex_digests(tiles)))
        self._missing = set(missing.tolist())

    def fetch(self, tile: Tile) -> bytes | None:
        """The pushed image of ``tile``; None for a tile the workstation found missing."""

        tid = tile_id(tile)
        digest = self._digests.get(tid)
        name = f"{tile.z}/{tile.x}/{tile.y}"
        if digest is None:
            if tid in self._missing:
                return None
            raise DownloadError(
                f"tile {name} is not in the pushed tile set {self.directory}: the companion planned "
                "another area than the workstation",
                remedy="install the same cachebuild version on the workstation and the companion",
            )
        try:
            return (self.store_root / "objects" / digest[:2] / digest).read_bytes()
        except FileNotFoundError:
            raise DownloadError(
                f"tile {name}: its image {digest[:12]}… was not pushed into {self.store_root}",
                remedy="run build-cache from the workstation again: the push sends what is missing",
            ) from None

    def close(self) -> None:
        pass


def open_pushed(spec: str) -> PushedProvider:
    """The provider for ``PROVIDER=pushed:<dir>``."""
    return PushedProvider(pushed_dir(spec))
