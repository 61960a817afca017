"""A GeoTIFF orthophoto (any CRS) cut into Web-Mercator tiles with rasterio.

Each tile is warped straight from the source into its 256-pixel
EPSG:3857 grid (GDAL's warper, bilinear, one resampling step), then encoded
as JPEG.  Pixels the source does not cover are black; a tile the source
does not touch at all is no tile (missing), so the coverage check sees
where the orthophoto ends.  The same file always gives the same bytes, so
tiles are stored and hashed like any provider's.

The source must be 8-bit: 1 band (grey), 2 (grey + alpha), 3 (RGB) or 4
(RGB + alpha); its nodata value, if any, counts as "not covered".  A last
band not marked as alpha is taken as alpha only when its pixels are almost
all 0 or 255; otherwise (a 4-band NAIP raster's near-infrared) it is left
out, with a warning, and the tile set's identity says which bands it used.

rasterio and numpy are imported when a GeoTIFF is opened; rasterio is the
optional ``geotiff`` extra (``pip install 'cachebuild[geotiff]'``).
"""

from __future__ import annotations

import io
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachebuild._util.cpus import usable_cpus
from cachebuild._util.hashing import sha256_file
from cachebuild.errors import CacheBuildWarning, DownloadError, UsageError
from cachebuild.providers.base import DEFAULT_TILE_SIZE, TileFetchError
from cachebuild.tilemath import EARTH_RADIUS_M, Tile

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "GEOTIFF_EXTENSIONS",
    "GEOTIFF_CUT_VERSION",
    "DEFAULT_JPEG_QUALITY",
    "MAX_BLOCK_BYTES",
    "MAX_SOURCE_PIXELS_PER_TILE",
    "GeoTiffProvider",
    "mercator_bounds",
    "geotiff_stamp",
]

#: File names that mean a GeoTIFF (any other raster GDAL reads: ``geotiff:<path>``).
GEOTIFF_EXTENSIONS = (".tif", ".tiff")
#: Bumped whenever the cut tiles' bytes would change (resampling, encoding):
#: part of the identity, so old cuts are not reused.
GEOTIFF_CUT_VERSION = 1
DEFAULT_JPEG_QUALITY = 90

#: A raster whose one block (strip or tile) is larger than this is refused
#: when it is opened: GDAL reads a block whole, so one read would allocate it.
MAX_BLOCK_BYTES = 256 << 20
#: The warper reads every full-resolution pixel under a tile: a source this
#: much finer than the zoom needs (about 23x per axis) is refused before it is
#: read, not left to allocate gigabytes or run for hours.
MAX_SOURCE_PIXELS_PER_TILE = 1 << 25

_HALF_WORLD_M = math.pi * EARTH_RADIUS_M
_INSTALL = "pip install 'cachebuild[geotiff]' (or pip install rasterio)"


def mercator_bounds(t: Tile) -> tuple[float, float, float, float]:
    """A tile's (left, bottom, right, top) in EPSG:3857 metres.

    >>> [round(v) for v in mercator_bounds(Tile(0, 0, 1))]
    [-20037508, 0, 0, 20037508]
    """
    size = 2 * _HALF_WORLD_M / (1 << t.z)
    left = -_HALF_WORLD_M + t.x * size
    top = _HALF_WORLD_M - t.y * size
    return left, top - size, left + size, top


def geotiff_stamp(path: str | os.PathLike[str]) -> str:
    """A cheap stamp for the no-op check: path, size, mtime and cut version."""
    p = Path(path).expanduser().absolute()
    try:
        st = p.stat()
    except OSError:
        return f"geotiff:{p}:missing"
    return f"geotiff:{p}:{st.st_size}:{st.st_mtime_ns}:v{GEOTIFF_CUT_VERSION}"


def _looks_like_alpha(path: Path, band: int) -> bool:
    """Whether ``band`` reads as a mask: at least 99% of sampled pixels are 0 or 255.

    Samples a 3 x 3 grid of 64-pixel windows (blocks are bounded by
    MAX_BLOCK_BYTES, so this reads at most nine blocks).
    """
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as src:
        size = 64
        samples = []
        for fy in (0.2, 0.5, 0.8):
            for fx in (0.2, 0.5, 0.8):
                col = max(0, min(src.width - size, int(src.width * fx)))
                row = max(0, min(src.height - size, int(src.height * fy)))
                samples.append(src.read(band, window=Window(col, row, size, size)).ravel())
    values = np.concatenate(samples)
    return bool(np.mean((values == 0) | (values == 255)) >= 0.99)


def _alpha_band(path: Path, count: int, colorinterp: Any) -> tuple[int, str]:
    """``(alpha band or 0, identity suffix)``: a last band not marked alpha is one only if it looks
    like a mask; otherwise (NAIP's near-infrared) it is left out, with a warning."""
    from rasterio.enums import ColorInterp

    alpha = [i + 1 for i, ci in enumerate(colorinterp) if ci == ColorInterp.alpha]
    if alpha or count not in (2, 4):
        return (alpha[0] if alpha else 0), ""
    if _looks_like_alpha(path, count):  # RGBA without the colour interpretation set
        return count, ""
    import warnings

    warnings.warn(
        CacheBuildWarning(
            f"PROVIDER={path}: band {count} is not marked alpha and its values vary "
            f"(near-infrared?): tiles use band(s) 1-{count - 1} only"
        ),
        stacklevel=3,
    )
    return 0, f":bands=1-{count - 1}"


class GeoTiffProvider:
    """Web-Mercator tiles cut from a georeferenced raster.

    Parameters
    ----------
    path
        The GeoTIFF (or any raster GDAL opens that has a CRS).
    quality
        JPEG quality of the cut tiles.
    tile_size
        Tile edge in pixels.

    Raises
    ------
    UsageError
        When rasterio is not installed, or the file is missing, not a
        raster, has no CRS, or is not 8-bit with 1 to 4 bands.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        quality: int = DEFAULT_JPEG_QUALITY,
        tile_size: int = DEFAULT_TILE_SIZE,
    ):
        self.path = Path(path).expanduser().absolute()
        if not self.path.is_file():
            raise UsageError(
                f"PROVIDER={self.path}: no such GeoTIFF file", remedy="check the PROVIDER path"
            )
        try:
            import rasterio
            from rasterio.warp import transform_bounds
        except ImportError:
            raise UsageError(
                f"PROVIDER={self.path} is a GeoTIFF, which needs rasterio", remedy=_INSTALL
            ) from None
        try:
            with rasterio.open(self.path) as src:
                crs, bounds, count = src.crs, src.bounds, src.count
                dtypes, colorinterp, nodata = set(src.dtypes), src.colorinterp, src.nodata
                width, height, blocks = src.width, src.height, src.block_shapes
        except rasterio.errors.RasterioError as exc:
            raise UsageError(
                f"PROVIDER={self.path} is not a raster GDAL can read ({exc})"
            ) from None
        block = max((bh * bw for bh, bw in blocks), default=0) * count
        if block > MAX_BLOCK_BYTES:
            raise UsageError(
                f"PROVIDER={self.path} is {width}x{height} pixels stored in blocks of {block:,} bytes "
                f"(over {MAX_BLOCK_BYTES >> 20} MiB): reading one pixel would load a whole block",
                remedy="re-tile it: gdal_translate -co TILED=YES -co COMPRESS=DEFLATE in.tif out.tif",
            )
        if crs is None:
            raise UsageError(
                f"PROVIDER={self.path} has no CRS: it is not georeferenced",
                remedy="give it one: gdal_edit.py -a_srs EPSG:<code> (or use a world file)",
            )
        if dtypes != {"uint8"} or not 1 <= count <= 4:
            raise UsageError(
                f"PROVIDER={self.path} has {count} band(s) of {'/'.join(sorted(dtypes))}; "
                "tiles are cut from 8-bit grey, grey+alpha, RGB or RGBA",
                remedy="convert it: gdal_translate -ot Byte -scale -b 1 -b 2 -b 3 in.tif out.tif",
            )
        self._alpha_band, dropped = _alpha_band(self.path, count, colorinterp)
        last = count - 1 if dropped else count
        self._colour_bands = [b for b in range(1, last + 1) if b != self._alpha_band]
        self._nodata = nodata
        self.tile_size = tile_size
        self.quality = quality
        self.crs = crs
        # the source's footprint in Web Mercator, densified: tiles outside
        # it are not warped at all
        self.footprint = transform_bounds(crs, "EPSG:3857", *bounds, densify_pts=21)
        fl, fb, fr, ft = self.footprint
        # source pixels per square metre of Web Mercator, for the per-tile bound
        self._density = width * height / max((fr - fl) * (ft - fb), 1e-9)
        self.identity = f"geotiff:v{GEOTIFF_CUT_VERSION}:{tile_size}px:bilinear:jpeg{quality}{dropped}:sha256={sha256_file(self.path)[0]}"
        self.concurrency = usable_cpus()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[Any] = []

    def _dataset(self) -> Any:
        ds = getattr(self._local, "ds", None)
        if ds is None:
            import rasterio

            # one handle per thread: a GDAL dataset is not thread-safe
            ds = rasterio.open(self.path)
            self._local.ds = ds
            with self._lock:
                self._open.append(ds)
        return ds

    def _warp(self, t: Tile) -> np.ndarray:
        """The tile's colour bands plus a coverage (alpha) band, uint8 [bands + 1, n, n]."""
        from affine import Affine
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        n = self.tile_size
        left, bottom, right, top = mercator_bounds(t)
        # built directly: rasterio's from_bounds multiplies Affines with `*`,
        # which affine >= 3.1 deprecates
        grid = Affine((right - left) / n, 0.0, left, 0.0, -(top - bottom) / n, top)
        # a warped VRT on exactly the tile's grid: one resampling step, and
        # no in-memory GDAL dataset (rasterio's reproject() into an array
        # races between threads)
        with WarpedVRT(
            self._dataset(),
            crs="EPSG:3857",
            transform=grid,
            width=n,
            height=n,
            resampling=Resampling.bilinear,
            add_alpha=not self._alpha_band,
        ) as vrt:
            indexes = [*self._colour_bands, self._alpha_band or vrt.count]
            return vrt.read(indexes)

    def fetch(self, tile: Tile) -> bytes | None:
        """The tile cut from the raster as JPEG, or None where the raster has nothing."""
        left, bottom, right, top = mercator_bounds(tile)
        fl, fb, fr, ft = self.footprint
        if right <= fl or left >= fr or top <= fb or bottom >= ft:
            return None
        under = (min(right, fr) - max(left, fl)) * (min(top, ft) - max(bottom, fb)) * self._density
        if under > MAX_SOURCE_PIXELS_PER_TILE:  # every tile of this zoom is alike: stop the fetch
            raise DownloadError(
                f"PROVIDER={self.path}: tile {tile.z}/{tile.x}/{tile.y} lies over about {under:,.0f} source "
                f"pixels (over {MAX_SOURCE_PIXELS_PER_TILE:,}): the raster is far finer than zoom {tile.z} needs",
                remedy="cut a higher ZOOM, or make a coarser copy first: gdalwarp -tr <metres> in.tif out.tif",
            )
        try:
            import rasterio

            pixels = self._warp(tile)
        except rasterio.errors.RasterioError as exc:
            raise TileFetchError(
                f"tile {tile.z}/{tile.x}/{tile.y}: cutting {self.path} failed: {exc}", tile=tile
            ) from None
        if not pixels[-1].any():
            return None
        from PIL import Image

        colour = pixels[:-1]
        colour[:, pixels[-1] == 0] = 0  # uncovered: black, whatever the warper left
        img = Image.fromarray(
            colour[0] if colour.shape[0] == 1 else colour.transpose(1, 2, 0).copy()
        )
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=self.quality)
        return buf.getvalue()

    def close(self) -> None:
        with self._lock:
            handles, self._open = self._open, []
        for ds in handles:
            ds.close()
