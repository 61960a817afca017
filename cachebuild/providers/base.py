"""What every provider shares: the interface, the tile error, the image check
and URL/path templates.

Pillow is imported inside :func:`check_image`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Collection
from typing import Protocol, runtime_checkable

from cachebuild import __version__
from cachebuild.errors import DownloadError, UsageError
from cachebuild.tilemath import Tile, quadkey

__all__ = [
    "DEFAULT_TILE_SIZE",
    "MAX_TILE_BYTES",
    "USER_AGENT",
    "PLACEHOLDERS",
    "Provider",
    "TileFetchError",
    "check_image",
    "template_placeholders",
    "fill_template",
]

DEFAULT_TILE_SIZE = 256
#: The most bytes a tile may have, from any provider: a 256-pixel JPEG, PNG
#: or WebP is far smaller; a local file or row above it is refused unread.
MAX_TILE_BYTES = 4 << 20
USER_AGENT = f"cachebuild/{__version__} (+https://example.invalid/cachebuild)"

#: Every placeholder a template may use; which ones a provider accepts is
#: its own business (a directory tree takes neither ``{s}`` nor ``{key}``).
PLACEHOLDERS = ("z", "x", "y", "-y", "q", "s", "key")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


@runtime_checkable
class Provider(Protocol):
    """What the tiles phase needs from a provider.

    Attributes
    ----------
    identity
        Stable, secret-free name of what the provider serves; the tile
        store's ref namespace.  Two providers with one identity must serve
        the same bytes for a tile.
    concurrency
        How many :meth:`fetch` calls are worth running at once.

    A provider may also have an ``int`` attribute ``retries``, the number of
    requests it repeated so far; the tiles phase shows it in its progress
    line and summary; and a ``str`` attribute ``published``, the provider
    ``tileset.json`` names when that is not ``identity`` (the pushed tiles
    on a companion name the workstation's provider).
    """

    identity: str
    concurrency: int

    def fetch(self, tile: Tile) -> bytes | None:
        """The tile's image bytes, or None when the provider has no image for it.

        Thread-safe.  Raises :class:`TileFetchError` when this tile failed
        (after retries) and any other :class:`~cachebuild.errors.DownloadError`
        when no tile can succeed (credentials refused).
        """
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


class TileFetchError(DownloadError):
    """One tile could not be fetched after retries; the fetch goes on without it.

    Parameters
    ----------
    message
        What failed, naming the tile and the URL template (never the key).
    tile
        The tile.
    """

    def __init__(self, message: str, *, tile: Tile, remedy: str | None = None):
        super().__init__(message, remedy=remedy)
        self.tile = tile


def check_image(data: bytes, tile_size: int | None = DEFAULT_TILE_SIZE) -> str | None:
    """Why ``data`` is not a whole tile image, or None when it is one.

    The image must be JPEG, PNG or WebP, decode completely (a truncated
    body fails) and, unless ``tile_size`` is None, be ``tile_size`` pixels
    square.  Error pages (HTML, JSON) and empty bodies fail.

    >>> check_image(b"<html>rate limited</html>")
    'not an image (25 bytes)'
    """
    if not data:
        return "empty body"
    from PIL import Image, UnidentifiedImageError

    try:
        if tile_size is not None:
            size = _header_size(data)
            if size is not None and size != (tile_size, tile_size):
                return f"image is {size[0]}x{size[1]}, not {tile_size}x{tile_size}"
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in _IMAGE_FORMATS:
                return f"unexpected image format {im.format}"
            if tile_size is not None and im.size != (tile_size, tile_size):
                return f"image is {im.size[0]}x{im.size[1]}, not {tile_size}x{tile_size}"
            if im.format == "JPEG":
                # decode at 1/8 scale: every byte is still read (a truncated
                # body still fails), at half the cost
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except UnidentifiedImageError:
        return f"not an image ({len(data)} bytes)"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return f"broken image ({type(exc).__name__}: {exc})"
    return None


def _header_size(data: bytes) -> tuple[int, int] | None:
    """The pixel size a JPEG, PNG or WebP header declares (Pillow's lazy open), or None for another format.

    Read through the format's own Pillow class: ``Image.open`` would first
    warn about, or refuse, a "decompression bomb" of a huge declared size,
    which is simply the wrong size here.  No pixel is decoded.
    """
    if data[:3] == b"\xff\xd8\xff":
        from PIL.JpegImagePlugin import JpegImageFile as cls
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        from PIL.PngImagePlugin import PngImageFile as cls  # type: ignore[assignment]
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        from PIL.WebPImagePlugin import WebPImageFile as cls  # type: ignore[assignment]
    else:
        return None
    with cls(io.BytesIO(data)) as im:
        return im.size


def template_placeholders(
    template: str, allowed: Collection[str] = PLACEHOLDERS, *, what: str = "PROVIDER template"
) -> set[str]:
    """The placeholders of a template; UsageError for unknown or malformed ones.

    Parameters
    ----------
    template
        A URL or path with ``{name}`` placeholders.
    allowed
        The placeholders this kind of provider accepts.
    what
        How the error messages name the template.

    >>> sorted(template_placeholders("https://{s}.t.example/{z}/{x}/{-y}.png?k={key}"))
    ['-y', 'key', 's', 'x', 'z']
    """
    found = set(_PLACEHOLDER_RE.findall(template))
    unknown = sorted(found - set(allowed))
    remedy = "placeholders: " + ", ".join("{" + p + "}" for p in allowed)
    if unknown:
        names = ", ".join("{" + u + "}" for u in unknown)
        raise UsageError(f"{what} has unknown placeholder(s) {names}", remedy=remedy)
    rest = _PLACEHOLDER_RE.sub("", template)
    if "{" in rest or "}" in rest:
        raise UsageError(f"{what} has an unbalanced {{ or }}", remedy=remedy)
    if "q" not in found and not ({"z", "x"} <= found and found & {"y", "-y"}):
        raise UsageError(
            f"{what} names no tile: it needs {{z}}, {{x}} and {{y}} (or {{-y}}), or {{q}}",
            remedy=remedy,
        )
    return found


def fill_template(template: str, tile: Tile, **extra: str) -> str:
    """``template`` with the tile's placeholders (and ``extra`` ones) filled in.

    >>> fill_template("/{z}/{x}/{-y}.png", Tile(3, 1, 2))
    '/2/3/2.png'
    """
    values = {
        "z": str(tile.z),
        "x": str(tile.x),
        "y": str(tile.y),
        "-y": str((1 << tile.z) - 1 - tile.y),
        **extra,
    }
    if "{q}" in template:
        values["q"] = quadkey(tile)
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)
