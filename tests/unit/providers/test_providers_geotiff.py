"""Tests for cachebuild.providers.geotiff: an orthophoto in UTM cut into
Web-Mercator tiles.

The test rasters are small GeoTIFFs in EPSG:32632 (UTM 32N, over Zürich)
whose red band is a function of easting and green of northing, so every tile
pixel can be checked against the value the source has at that pixel's
centre, found by transforming its Mercator coordinates back to UTM.  A y-flip
or a shifted tile would be off by tens of levels.  The last test reads the
cache's MBTiles back with GDAL's own MBTiles driver.
"""

from __future__ import annotations

import io
import sys
import warnings
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cachebuild.errors import CacheBuildWarning, UsageError
from cachebuild.providers import open_provider
from cachebuild.providers.base import Provider
from cachebuild.providers.geotiff import GeoTiffProvider, mercator_bounds
from cachebuild.tilemath import LngLatBbox, Tile, tile, tiles

rasterio = pytest.importorskip(
    "rasterio", reason="the GeoTIFF provider needs rasterio (the geotiff extra)"
)
from affine import Affine  # noqa: E402
from rasterio.warp import transform  # noqa: E402

RES_M = 0.5
SIZE_PX = 800  # 400 m square
CORNER = (8.538, 47.374)  # lon, lat of the north-west corner
UTM = "EPSG:32632"


def utm_origin() -> tuple[float, float]:
    (e,), (n,) = transform("EPSG:4326", UTM, [CORNER[0]], [CORNER[1]])
    return e, n


def expected(e: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Red and green the source has at UTM (e, n)."""
    e0, n0 = utm_origin()
    span = SIZE_PX * RES_M
    return (e - e0) / span * 255, (n0 - n) / span * 255


def write_geotiff(
    path: Path,
    *,
    bands: int = 3,
    hole_west_half: bool = False,
    nodata: int | None = None,
    crs: str | None = UTM,
    dtype: str = "uint8",
) -> Path:
    e0, n0 = utm_origin()
    e = e0 + (np.arange(SIZE_PX) + 0.5) * RES_M
    n = n0 - (np.arange(SIZE_PX) + 0.5) * RES_M
    red, green = expected(e[None, :].repeat(SIZE_PX, 0), n[:, None].repeat(SIZE_PX, 1))
    layers = [red, green, np.full_like(red, 128)][: min(bands, 3)]
    if bands == 4:
        layers.append(np.full_like(red, 255))
    if hole_west_half:  # transparent with an alpha band, else the nodata value
        for layer in layers[-1:] if bands == 4 else layers:
            layer[:, : SIZE_PX // 2] = 0 if nodata is None else nodata
    data = np.stack(layers).astype(dtype)
    profile: dict[str, Any] = dict(
        driver="GTiff",
        width=SIZE_PX,
        height=SIZE_PX,
        count=len(layers),
        dtype=dtype,
        transform=Affine(RES_M, 0.0, e0, 0.0, -RES_M, n0),
        nodata=nodata,
    )
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def pixel_centres_utm(t: Tile) -> tuple[np.ndarray, np.ndarray]:
    left, bottom, right, top = mercator_bounds(t)
    xs = left + (np.arange(256) + 0.5) * (right - left) / 256
    ys = top - (np.arange(256) + 0.5) * (top - bottom) / 256
    x, y = np.meshgrid(xs, ys)
    e, n = transform("EPSG:3857", UTM, x.ravel(), y.ravel())
    return np.asarray(e).reshape(256, 256), np.asarray(n).reshape(256, 256)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)


@pytest.fixture
def ortho(tmp_path: Path) -> Path:
    return write_geotiff(tmp_path / "ortho.tif")


INSIDE = tile(CORNER[0] + 0.0025, CORNER[1] - 0.0018, 17)  # in the middle of the raster


def test_mercator_bounds_agree_with_mercantile() -> None:
    mercantile = pytest.importorskip("mercantile")
    for t in (INSIDE, Tile(0, 0, 0), Tile(3, 5, 4)):
        assert mercator_bounds(t) == pytest.approx(
            tuple(mercantile.xy_bounds(t.x, t.y, t.z)), abs=1e-6
        )


def test_a_tile_matches_the_source_pixel_for_pixel(ortho: Path) -> None:
    with closing(open_provider(str(ortho), env={})) as p:
        assert isinstance(p, GeoTiffProvider)
        assert isinstance(p, Provider)
        data = p.fetch(INSIDE)
    assert data is not None and data[:3] == b"\xff\xd8\xff"
    img = decode(data)
    e, n = pixel_centres_utm(INSIDE)
    e0, n0 = utm_origin()
    span = SIZE_PX * RES_M
    inside = (e > e0 + 3) & (e < e0 + span - 3) & (n < n0 - 3) & (n > n0 - span + 3)
    assert inside.mean() > 0.5
    red, green = expected(e, n)
    for band, want in ((0, red), (1, green)):
        err = np.abs(img[..., band][inside] - want[inside])
        assert err.mean() < 1.5, band
        assert np.percentile(err, 99) < 6, band
    assert np.abs(img[..., 2][inside] - 128).max() < 6
    # the tile really spans a gradient: a flipped or shifted cut would not match
    assert np.ptp(green[inside]) > 60 and np.ptp(red[inside]) > 60


def test_outside_is_no_tile_and_the_edge_is_black(ortho: Path) -> None:
    far = Tile(INSIDE.x - 10, INSIDE.y, INSIDE.z)
    with closing(open_provider(f"geotiff:{ortho}", env={})) as p:
        assert p.fetch(far) is None
        edge = tile(CORNER[0] + 1e-6, CORNER[1] - 1e-6, 17)  # holds the north-west corner
        data = p.fetch(edge)
    assert data is not None
    img = decode(data)
    e, n = pixel_centres_utm(edge)
    e0, n0 = utm_origin()
    outside = (e < e0 - 3) | (n > n0 + 3)
    assert 0.05 < outside.mean() < 0.95
    assert np.percentile(img[outside], 99) < 12  # black, JPEG ringing aside


def test_same_file_same_bytes_and_identity(ortho: Path, tmp_path: Path) -> None:
    a, b = GeoTiffProvider(ortho), GeoTiffProvider(ortho)
    with closing(a), closing(b):
        assert a.fetch(INSIDE) == b.fetch(INSIDE)
        assert a.identity == b.identity and a.identity.startswith(
            "geotiff:v1:256px:bilinear:jpeg90:sha256="
        )
    other = write_geotiff(tmp_path / "other.tif", bands=1)
    with closing(GeoTiffProvider(other)) as c:
        assert c.identity != a.identity
        grey = Image.open(io.BytesIO(c.fetch(INSIDE) or b""))
        assert grey.mode == "L"


@pytest.mark.parametrize(
    "bands, nodata", [(4, None), (3, 0), (1, 7)], ids=["rgba", "rgb-nodata", "grey-nodata"]
)
def test_alpha_and_nodata_are_not_coverage(tmp_path: Path, bands: int, nodata: int | None) -> None:
    path = write_geotiff(tmp_path / "hole.tif", bands=bands, hole_west_half=True, nodata=nodata)
    west = tile(CORNER[0] + 0.0003, CORNER[1] - 0.0018, 17)
    east = tile(CORNER[0] + 0.0045, CORNER[1] - 0.0018, 17)
    with closing(GeoTiffProvider(path)) as p:
        assert p.fetch(west) is None  # all of it in the hole
        assert p.fetch(east) is not None
    whole = write_geotiff(tmp_path / "whole.tif", bands=bands, nodata=nodata)
    with closing(GeoTiffProvider(whole)) as p:
        assert p.fetch(west) is not None  # covered, without the hole


def test_threads_share_nothing(ortho: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    wanted = list(
        tiles(LngLatBbox(CORNER[0], CORNER[1] - 0.0036, CORNER[0] + 0.0054, CORNER[1]), [17])
    )
    with closing(GeoTiffProvider(ortho)) as p:
        serial = [p.fetch(t) for t in wanted]
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(p.fetch, wanted * 3)) == serial * 3


@pytest.mark.parametrize(
    "kind, message",
    [
        ("no crs", "no CRS"),
        ("uint16", "8-bit"),
        ("not a raster", "not a raster"),
        ("missing", "no such GeoTIFF"),
    ],
)
def test_unusable_files_are_refused(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / "bad.tif"
    if kind == "no crs":
        write_geotiff(path, crs=None)
    elif kind == "uint16":
        write_geotiff(path, dtype="uint16")
    elif kind == "not a raster":
        path.write_text("hello")
    with pytest.raises(UsageError, match=message) as info:
        open_provider(str(path), env={})
    assert info.value.exit_code == 2


def test_without_rasterio_the_error_says_how_to_get_it(
    ortho: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "rasterio", None)
    with pytest.raises(UsageError, match="needs rasterio") as info:
        open_provider(str(ortho), env={})
    assert "cachebuild[geotiff]" in info.value.remedy


def test_through_the_cache_mbtiles_gdal_sees_the_source(ortho: Path, tmp_path: Path) -> None:
    """fetch -> store -> MBTiles (TMS rows) -> GDAL's MBTiles driver: same colours at the same place."""
    from cachebuild.tiles.fetch import fetch_tiles
    from cachebuild.tiles.mbtiles import write_mbtiles

    area = LngLatBbox(
        CORNER[0] + 0.0005, CORNER[1] - 0.0031, CORNER[0] + 0.0049, CORNER[1] - 0.0005
    )
    s = fetch_tiles(
        bbox=area,
        zooms=[17],
        provider_spec=str(ortho),
        store_root=tmp_path / "store",
        out_dir=tmp_path / "build",
        env={},
        progress=False,
    )
    assert s["missing"] == 0 and s["present"] == s["planned"] >= 4
    out = tmp_path / "build" / "tiles.mbtiles"
    write_mbtiles(
        tileset_dir=tmp_path / "build",
        store_root=tmp_path / "store",
        out_path=out,
        name="ortho",
        bbox=area,
        zooms=[17],
    )
    e0, n0 = utm_origin()
    es = e0 + np.array([60.0, 150.0, 230.0, 300.0])
    ns = n0 - np.array([80.0, 300.0, 160.0, 250.0])
    xs, ys = transform(UTM, "EPSG:3857", es.tolist(), ns.tolist())
    with rasterio.open(out) as ds:
        assert ds.driver == "MBTiles"
        got = np.array([v[:3] for v in ds.sample(zip(xs, ys))], dtype=float)
    red, green = expected(es, ns)
    assert np.abs(got[:, 0] - red).max() < 6
    assert np.abs(got[:, 1] - green).max() < 6


@pytest.mark.parametrize("bands", [4, 2])
def test_a_last_band_that_is_not_a_mask_is_left_out(tmp_path: Path, bands: int) -> None:
    """A NAIP-like raster (RGB + near-infrared, no colour interpretation): not read as alpha."""
    path = write_geotiff(tmp_path / "rgbn.tif", bands=3 if bands == 4 else 1)
    with rasterio.open(path) as src:
        data, profile = src.read(), dict(src.profile)
    nir = (np.add.outer(np.arange(SIZE_PX), np.arange(SIZE_PX)) % 200 + 20).astype("uint8")
    profile.update(count=bands, photometric="RGB" if bands == 4 else "MINISBLACK")
    out = tmp_path / "with-nir.tif"
    ci = rasterio.enums.ColorInterp
    with rasterio.open(out, "w", **profile) as ds:
        ds.write(np.concatenate([data, nir[None]]))
        # as NAIP files carry it: colour band(s), then an undefined one
        colour = [ci.red, ci.green, ci.blue] if bands == 4 else [ci.gray]
        ds.colorinterp = [*colour, ci.undefined]
    with rasterio.open(out) as src:
        assert ci.alpha not in src.colorinterp
    with pytest.warns(CacheBuildWarning, match=f"band {bands} is not marked alpha"):
        p = GeoTiffProvider(out)
    with closing(p), closing(GeoTiffProvider(path)) as plain:
        assert p.identity != plain.identity and f":bands=1-{bands - 1}:" in p.identity
        got, want = p.fetch(INSIDE), plain.fetch(INSIDE)
        assert got is not None and want is not None
        # the same picture as the raster without the band: opaque, the same colours
        assert np.abs(decode(got) - decode(want)).max() <= 2


def test_an_unmarked_mask_band_is_still_alpha(tmp_path: Path) -> None:
    path = write_geotiff(tmp_path / "rgba.tif", bands=4, hole_west_half=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheBuildWarning)
        p = GeoTiffProvider(path)
    with closing(p):
        assert ":bands=" not in p.identity
