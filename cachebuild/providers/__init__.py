"""Tile providers behind one interface.

A provider turns a tile into its image bytes, or ``None`` when it has no
image for that tile.  :func:`open_provider` reads the ``PROVIDER`` spec:

``synthetic``
    The built-in offline imagery (:mod:`cachebuild.providers.synthetic`).
``http://…`` or ``https://…``
    A URL template (:mod:`.xyz`): ``{z}``, ``{x}``, ``{y}``, ``{-y}`` (TMS
    row), ``{q}`` (quadkey), ``{s}`` (subdomain, from ``SUBDOMAINS``) and
    ``{key}`` (``CACHEBUILD_API_KEY``); extra headers from
    ``CACHEBUILD_HTTP_HEADERS``.
``….mbtiles``
    An MBTiles file, read-only.
a directory, ``dir:<path>``, or a path with placeholders
    A tree of image files: ``<dir>/{z}/{x}/{y}.jpg`` (or .jpeg, .png,
    .webp), or as the template says, e.g. ``dir:/data/{z}/{x}/{-y}.png``.
``….tif``, ``….tiff`` or ``geotiff:<path>``
    A georeferenced orthophoto in any CRS, cut into Web-Mercator tiles
    (:mod:`.geotiff`; needs rasterio).

Each provider has an :attr:`~Provider.identity`: a stable, secret-free
string that is the tile store's ref namespace.  :func:`source_stamp` is the
cheap stand-in the no-op check uses for local sources.

Nothing heavy is imported here: httpx, Pillow, sqlite3 and rasterio are
imported when a provider is opened.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cachebuild.errors import UsageError
from cachebuild.providers.base import (
    DEFAULT_TILE_SIZE,
    PLACEHOLDERS,
    USER_AGENT,
    Provider,
    TileFetchError,
    check_image,
    fill_template,
    template_placeholders,
)
from cachebuild.providers.geotiff import GEOTIFF_EXTENSIONS, GeoTiffProvider, geotiff_stamp
from cachebuild.providers.local import (
    DEFAULT_MBTILES_CONCURRENCY,
    DirectoryProvider,
    MBTilesProvider,
    SyntheticProvider,
    _template_root,
    mbtiles_stamp,
    tree_stamp,
)
from cachebuild.providers.xyz import XyzProvider, _key_forms
from cachebuild.providers.xyzconfig import (
    API_KEY_ENV,
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_BACKOFF_S,
    DEFAULT_HTTP_CONCURRENCY,
    DEFAULT_RETRIES,
    DEFAULT_RETRY_AFTER_MAX_S,
    DEFAULT_SUBDOMAINS,
    DEFAULT_TIMEOUT_S,
    HEADERS_ENV,
    HttpConfig,
    parse_headers,
)

if TYPE_CHECKING:
    import httpx

__all__ = [
    "API_KEY_ENV",
    "HEADERS_ENV",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_RETRIES",
    "DEFAULT_BACKOFF_S",
    "DEFAULT_BACKOFF_MAX_S",
    "DEFAULT_RETRY_AFTER_MAX_S",
    "DEFAULT_HTTP_CONCURRENCY",
    "DEFAULT_MBTILES_CONCURRENCY",
    "DEFAULT_SUBDOMAINS",
    "DEFAULT_TILE_SIZE",
    "USER_AGENT",
    "PLACEHOLDERS",
    "Provider",
    "TileFetchError",
    "HttpConfig",
    "SyntheticProvider",
    "XyzProvider",
    "MBTilesProvider",
    "DirectoryProvider",
    "GeoTiffProvider",
    "open_provider",
    "provider_kind",
    "source_stamp",
    "check_image",
    "fill_template",
    "template_placeholders",
]

_ACCEPTED_SPECS = (
    "synthetic (built-in, offline); "
    "an http:// or https:// URL template with {z}, {x} and {y} or {-y} (or {q}), "
    "optionally {s} (SUBDOMAINS) and {key} (CACHEBUILD_API_KEY); "
    "the path of a .mbtiles file; "
    "a directory of {z}/{x}/{y}.jpg|png|webp files, or dir:/path/{z}/{x}/{-y}.png; "
    "or a GeoTIFF (.tif, .tiff, or geotiff:/path)"
)


def provider_kind(spec: str) -> str:
    """Which kind of provider a ``PROVIDER`` spec names, without opening it.

    One of ``synthetic``, ``xyz``, ``mbtiles``, ``dir``, ``geotiff``,
    ``pushed`` (companion mode: the tile set a workstation pushed, see
    :mod:`cachebuild.providers.pushed`), or ``unknown``.  Looks at the
    text and, for a bare path, whether it is a directory.

    >>> [provider_kind(s) for s in ("", "https://t/{z}/{x}/{y}.png", "a.mbtiles", "dir:/t", "o.TIF", "bing")]
    ['synthetic', 'xyz', 'mbtiles', 'dir', 'geotiff', 'unknown']
    """
    spec = spec.strip()
    low = spec.lower()
    if low in ("", "synthetic"):
        return "synthetic"
    if spec.startswith("pushed:"):
        return "pushed"
    if low.startswith(("http://", "https://")):
        return "xyz"
    if low.startswith("dir:"):
        return "dir"
    if low.startswith("geotiff:"):
        return "geotiff"
    if "://" in spec:
        return "unknown"
    if low.endswith(".mbtiles"):
        return "mbtiles"
    if low.endswith(GEOTIFF_EXTENSIONS):
        return "geotiff"
    if "\0" in spec:  # no path holds one (os.path raises on it)
        return "unknown"
    if "{" in spec or os.path.isdir(os.path.expanduser(spec)):
        return "dir"
    return "unknown"


def _local_path(spec: str) -> str:
    spec = spec.strip()
    for prefix in ("dir:", "geotiff:"):
        if spec.lower().startswith(prefix):
            return spec[len(prefix) :]
    return spec


def source_stamp(spec: str) -> str | None:
    """A cheap stamp of a local source, for the tiles task's no-op check.

    A directory tree: every directory's mtime (:func:`.local.tree_stamp`);
    a GeoTIFF: path, size, mtime.  None for other kinds (a URL template is
    its own stamp; MBTiles files and pushed tile sets are stamped by the
    plan).  Never raises:
    a missing source is reported when the provider is opened.
    """
    kind = provider_kind(spec)
    if kind == "geotiff":
        return geotiff_stamp(_local_path(spec))
    if kind == "mbtiles":  # its WAL, when it has one (the plan stamps the file itself)
        return mbtiles_stamp(spec.strip())
    if kind == "dir":
        from pathlib import Path

        path = os.path.abspath(os.path.expanduser(_local_path(spec)))
        root = _template_root(path) if "{" in path else Path(path)
        return f"dir:{path}:{tree_stamp(root)}"
    return None


def open_provider(
    spec: str, *, env: Mapping[str, str], client: httpx.Client | None = None
) -> Provider:
    """The provider a ``PROVIDER`` spec names.

    Parameters
    ----------
    spec
        See the module docstring.
    env
        The environment: ``CACHEBUILD_API_KEY``, ``CACHEBUILD_HTTP_HEADERS``,
        ``HTTP_TIMEOUT``, ``HTTP_RETRIES``, ``HTTP_BACKOFF``, ``RATE_LIMIT``,
        ``SUBDOMAINS``.
    client
        An ``httpx.Client`` for URL templates (tests inject one).

    Raises
    ------
    UsageError
        For a spec of no accepted form, a bad template, a missing key, bad
        headers, or a missing or unreadable local source; before any
        request is made.

    >>> open_provider("synthetic", env={}).identity
    'synthetic:v1'
    """
    if "\0" in spec:  # not from a command line or environment, but never a traceback
        raise UsageError("PROVIDER has a NUL byte", remedy=f"use {_ACCEPTED_SPECS}")
    kind = provider_kind(spec)
    if kind == "pushed":
        from cachebuild.providers.pushed import open_pushed

        return open_pushed(spec.strip())
    if kind == "synthetic":
        return SyntheticProvider()
    if kind == "xyz":
        return XyzProvider(
            spec.strip(),
            api_key=env.get(API_KEY_ENV) or None,
            config=HttpConfig.from_env(env),
            headers=parse_headers(env.get(HEADERS_ENV)),
            client=client,
        )
    if kind == "mbtiles":
        return MBTilesProvider(spec.strip())
    if kind == "dir":
        return DirectoryProvider(_local_path(spec))
    if kind == "geotiff":
        return GeoTiffProvider(_local_path(spec))
    shown = spec
    for s in _key_forms(env.get(API_KEY_ENV)):
        shown = shown.replace(s, "***")
    why = "" if "://" in spec or not spec.strip() else " (no such file or directory)"
    raise UsageError(
        f"PROVIDER={shown!r} is not a tile provider{why}", remedy=f"use {_ACCEPTED_SPECS}"
    )
