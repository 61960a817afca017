"""Atomic publish: the new cache replaces the old one in one rename.

The published cache is ``<cache_dir>/current``, a symlink to a complete
release directory ``releases/<build_id>-v<version>-<random>``.  A release is
assembled under a temporary name (hard links to the staged artifacts, which
every phase writes by rename and never in place; a copy where links are not
possible), renamed into place, and only then does ``current`` move: a
``current.tmp`` symlink renamed over ``current``.  A crash at any instant
leaves ``current`` pointing at the old release or the new one, never at a
mix.  Leftovers of a crash are removed by :func:`clean_leftovers` on the next
run.  The previous release is kept, so a reader that resolved ``current``
just before a publish still finds its files.

A release is read-only on disk, its files and its directories (the staged
files are made read-only by the task that wrote them, see
:mod:`cachebuild.release.produced`, so linking them changes nothing the build's
hash cache remembers).  Whatever removes a release uses
:func:`remove_tree`.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cachebuild._util.fs import fsync_dir
from cachebuild._util.statcache import HASH_CACHE_NAME, HashCache, stat_key
from cachebuild.inputs.config import Paths

__all__ = [
    "publish",
    "published_manifest_bytes",
    "release_intact",
    "clean_leftovers",
    "current_release",
    "remove_tree",
    "make_tree_read_only",
]

KEEP_RELEASES = 2


def current_release(paths: Paths) -> Path | None:
    """The release directory ``current`` points at, or None before the first publish."""
    try:
        target = os.readlink(paths.current)
    except OSError:
        return None
    release = (paths.cache_dir / target).resolve()
    return release if release.is_dir() else None


def release_intact(release: Path, signed: Mapping[str, Any]) -> bool:
    """Every target of the manifest is there with its recorded length.

    A stat per artifact (a dozen files), not a hash: cheap enough for the
    warm no-op.  ``verify-cache`` re-hashes everything.
    """
    for rel, meta in signed["targets"].items():
        try:
            if (release / rel).stat().st_size != meta["length"]:
                return False
        except OSError:
            return False
    return (release / "signer.pub").is_file()


def published_manifest_bytes(paths: Paths) -> bytes | None:
    release = current_release(paths)
    if release is None:
        return None
    try:
        return (release / "manifest.json").read_bytes()
    except OSError:
        return None


def make_tree_read_only(root: Path) -> None:
    """``chmod a-w`` every file and directory under ``root`` (and ``root``), directories last.

    A file already read-only is not touched (its ctime, which the build's
    hash cache compares, stays).
    """
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o222:
                os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o222)
        mode = stat.S_IMODE(os.stat(dirpath).st_mode)
        if mode & 0o222:
            os.chmod(dirpath, mode & ~0o222)


def remove_tree(path: str | os.PathLike[str], *, ignore_errors: bool = True) -> None:
    """Remove a directory tree that may be read-only (a release): its directories are made writable first."""
    p = os.fspath(path)
    if not os.path.isdir(p) or os.path.islink(p):
        if os.path.lexists(p) and not ignore_errors:
            os.unlink(p)
        return
    for dirpath, dirs, _files in os.walk(p):
        for d in [dirpath, *(os.path.join(dirpath, d) for d in dirs)]:
            try:
                if not os.path.islink(d):
                    os.chmod(d, stat.S_IMODE(os.stat(d).st_mode) | stat.S_IRWXU)
            except OSError:
                pass
    shutil.rmtree(p, ignore_errors=ignore_errors)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish(paths: Paths, files: list[str]) -> Path:
    """Publish the staged ``files`` (relative to ``paths.build``) as the new cache.

    Returns the new release directory.
    """
    with _hashes_kept(paths.build, files):
        return _publish(paths, files)


@contextmanager
def _hashes_kept(build: Path, files: list[str]) -> Iterator[None]:
    """Keep the build's remembered hashes across linking and pruning.

    A hard link made or removed moves the file's ctime, which the hash cache
    compares (:mod:`cachebuild._util.statcache`): without this, the next run would
    read every artifact again.  A file whose device, inode, size and mtime
    are unchanged keeps its hash.
    """
    cache = HashCache(build / HASH_CACHE_NAME)
    known = {}
    for rel in files:
        hit = cache.lookup(build / rel)
        if hit is not None:
            known[rel] = (hit[0], stat_key(os.stat(build / rel)))
    yield
    for rel, (digest, before) in known.items():
        cache.remember_unmoved(build / rel, digest, before)
    try:
        cache.save()
    except OSError:  # only a cache (a full disk, say): the next run hashes again
        pass


def _publish(paths: Paths, files: list[str]) -> Path:
    manifest = json.loads((paths.build / "manifest.json").read_text())
    signed = manifest["signed"]
    # a fresh name every time: a damaged release is replaced, never reused
    name = f"{signed['build_id'][:16]}-v{signed['version']}-{uuid.uuid4().hex[:6]}"
    paths.releases.mkdir(parents=True, exist_ok=True)
    final = paths.releases / name
    tmp = paths.releases / f".tmp-{name}-{os.getpid()}"
    for rel in files:
        _link_or_copy(paths.build / rel, tmp / rel)
    for sub in tmp.rglob("*"):
        if sub.is_file():
            with open(sub, "rb") as fh:
                os.fsync(fh.fileno())
    make_tree_read_only(tmp)
    os.replace(tmp, final)
    fsync_dir(paths.releases)
    link_tmp = paths.cache_dir / f".current.tmp-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(os.path.join("releases", name), link_tmp)
    os.replace(link_tmp, paths.current)
    fsync_dir(paths.cache_dir)
    _prune(paths, keep={name})
    return final


def _prune(paths: Paths, keep: set[str]) -> None:
    """Keep the current release and the newest KEEP_RELEASES - 1 others; remove the rest."""
    others = [
        p
        for p in paths.releases.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in keep
    ]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[KEEP_RELEASES - 1 :]:
        remove_tree(old)


def clean_leftovers(paths: Paths) -> list[str]:
    """Remove what a killed run left behind; returns what was removed."""
    removed: list[str] = []
    if paths.cache_dir.is_dir():
        for entry in paths.cache_dir.iterdir():
            if entry.name.startswith(".current.tmp-"):
                entry.unlink(missing_ok=True)
                removed.append(str(entry))
    if paths.releases.is_dir():
        for entry in paths.releases.iterdir():
            if entry.name.startswith(".tmp-"):
                remove_tree(entry)
                removed.append(str(entry))
    if paths.build.is_dir():
        # temp files: ".name.tmp-<pid>…" (most writers) and ".name.<pid>-<hex>.tmp" (manifest.atomic_write)
        for entry in [*paths.build.rglob(".*.tmp-*"), *paths.build.rglob(".*.tmp")]:
            try:
                entry.unlink()
                removed.append(str(entry))
            except OSError:
                pass
    return removed
