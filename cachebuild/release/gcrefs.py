"""What the known caches reference in the store: what ``doit gc-store`` keeps.

Known caches: those registered with the store (:mod:`cachebuild.store.lock`),
the command's own ``CACHE_DIR``, and any cache directory directly under
``$CACHEBUILD_HOME``.  A cache references, for its published releases (the
current one and the one kept before it) and its staged build alike, the
image of every tile in ``tiles.npy`` and, for the engine in
``engine/engine.json``, the descriptor of each of those images (built with
windows, ``windows.json``: each anchor's block of window descriptors,
:mod:`cachebuild.store.windowkeys`); and, by content, every action-cache
output it holds a file of.

numpy is imported inside the functions.  The collection itself is
:mod:`cachebuild.release.gc`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cachebuild._util.hashing import is_sha256_hex, sha256_file
from cachebuild._util.statcache import HASH_CACHE_NAME, HashCache
from cachebuild.store.actioncache import OUTPUTS
from cachebuild.store.lock import registered_caches
from cachebuild.store.windowkeys import MODES, STRIDES, block_digests, namespace, neighbours

__all__ = ["known_caches", "referenced", "referenced_actions"]


def known_caches(
    store_root: Path, cache_dir: Path | None = None, home: Path | None = None
) -> list[Path]:
    """Every cache directory that may use the store (see the module notes)."""

    found = set(registered_caches(store_root, prune=True))
    if cache_dir is not None and cache_dir.is_dir():
        found.add(cache_dir.absolute())
    if home is not None and home.is_dir():
        for d in home.iterdir():
            if d.is_dir() and ((d / "releases").is_dir() or (d / "state" / "build").is_dir()):
                found.add(d.absolute())
    return sorted(found)


def _unique_rows(parts: list[Any]) -> Any:
    """Sorted unique rows of uint8 ``[k, 32]`` arrays, as a void ``[k]`` array."""
    import numpy as np

    if not parts:
        return np.zeros(0, dtype=np.dtype((np.void, 32)))
    allrows = np.ascontiguousarray(np.concatenate(parts)).view(np.dtype((np.void, 32))).ravel()
    return np.unique(allrows)


def _cache_dirs(cache: Path) -> list[Path]:
    """The staged build and every release directory of a cache."""
    dirs = [cache / "state" / "build"]
    releases = cache / "releases"
    if releases.is_dir():
        dirs += [r for r in sorted(releases.iterdir()) if r.is_dir() and not r.name.startswith(".")]
    return dirs


def referenced_actions(caches: Iterable[Path]) -> set[str]:
    """SHA-256 of every action-cache output (index, self-test, preview) the caches hold.

    Those artifacts are the action cache's objects (:mod:`cachebuild.store.actioncache`)
    by content, so an object is referenced when a cache has a file with its hash.
    A release's hashes come from its manifest (the index alone can be hundreds
    of MB: gc-store does not read every release's again); a file the manifest
    does not list, and the staged build's files, are hashed, the latter
    through the build's hash cache.
    """

    names = sorted({n for outputs in OUTPUTS.values() for n in outputs})
    found: set[str] = set()
    for cache in caches:
        for d in _cache_dirs(cache):
            listed = _manifest_hashes(d / "manifest.json") if d.parent.name == "releases" else {}
            hashes = HashCache(d / HASH_CACHE_NAME) if d.name == "build" else None
            for name in names:
                if name in listed:
                    found.add(listed[name])
                    continue
                try:
                    found.add(
                        hashes.sha256(d / name)[0]
                        if hashes is not None
                        else sha256_file(d / name)[0]
                    )
                except OSError:
                    continue
    return found


def _manifest_hashes(path: Path) -> dict[str, str]:
    """``{artifact name: sha256}`` of a manifest (unverified: gc only keeps more for a wrong one); {} if unreadable."""

    try:
        targets = json.loads(path.read_bytes())["signed"]["targets"]
        return {
            str(name): str(t["hashes"]["sha256"])
            for name, t in targets.items()
            if is_sha256_hex(t["hashes"]["sha256"])
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def referenced(caches: Iterable[Path]) -> tuple[Any, dict[str, Any]]:
    """``(tile digests, {engine key: digests})`` referenced by ``caches``.

    Digests are sorted unique ``numpy.void`` (32 bytes) arrays.
    """
    import numpy as np

    tiles: list[Any] = []
    per_engine: dict[str, list[Any]] = {}
    for cache in caches:
        for d in _cache_dirs(cache):
            try:
                arr = np.load(d / "tiles.npy", allow_pickle=False)
            except (OSError, ValueError):
                continue
            digests = np.ascontiguousarray(arr["sha256"]).view(np.uint8).reshape(len(arr), 32)
            tiles.append(digests)
            try:
                key = json.loads((d / "engine" / "engine.json").read_text())["key"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            per_engine.setdefault(str(key), []).append(digests)
            blocks = _window_blocks(d, str(key), arr)
            if blocks is not None:
                per_engine.setdefault(blocks[0], []).append(blocks[1])
    return _unique_rows(tiles), {k: _unique_rows(v) for k, v in per_engine.items()}


def _window_blocks(d: Path, engine_key: str, tiles: Any) -> tuple[str, Any] | None:
    """``(store key, block digests)`` of a cache built with windows (its windows.json), else None."""
    import numpy as np

    try:
        rec = json.loads((d / "windows.json").read_text())
        stride, mode = int(rec["stride"]), str(rec["mode"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if stride == 1 or mode not in MODES or stride not in STRIDES or not is_sha256_hex(engine_key):
        return None
    tiles = tiles[np.argsort(tiles["id"], kind="stable")]
    raw = np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(len(tiles), 32)
    nb = neighbours(tiles["id"])
    return namespace(engine_key, stride, mode), block_digests(raw, nb, stride, mode)
