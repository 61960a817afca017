"""Real aerial imagery for the tests and benches, and an onboard client that localizes in it.

The imagery is a USDA NAIP orthophoto (public domain), not synthetic: see
tests/data/real/README.md for where it comes from, its licence and its
SHA-256.  It is not committed to this repository; :func:`find_imagery`
looks for it where the README says to put it.

:class:`Ground` warps an orthophoto onto the Web-Mercator pixel grid of a
zoom (256 px a tile) with GDAL, straight from the source file: it is how a
camera sees the ground, independently of the tiles a build cut.
:func:`draw_frames` and :func:`cut` make camera-like frames centred
anywhere (rotated, rescaled, re-lit as the build's self-test makes them).
:class:`OnboardClient` reads only a published cache's documented files
(docs/cache-layout.md, "From a camera frame to a position"):
``engine/engine.json``, ``engine/engine.onnx`` (ONNX Runtime),
``index.faiss`` (faiss) and ``positions.npy``, and nothing of cachebuild.

numpy, Pillow, rasterio, onnxruntime and faiss are imported inside.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "IMAGERY_ENV",
    "NAIP_2020",
    "NAIP_2014",
    "SHA256",
    "FLIGHT",
    "find_imagery",
    "write_flight",
    "Area",
    "Ground",
    "draw_frames",
    "cut",
    "lattice_lonlat",
    "OnboardClient",
    "footprint_hits",
    "ground_error_m",
]

REPO = Path(__file__).resolve().parents[2]
#: A directory holding the imagery files (else the places in :func:`imagery_dirs`).
IMAGERY_ENV = "CACHEBUILD_REAL_IMAGERY"
#: NAIP DOQQ m_4709963_se_14, Stutsman County, North Dakota, flown 2020-08-31.
NAIP_2020 = "m_4709963_se_14_1_20200831.tif"
#: The same quarter quad flown 2014-07-20: another season, another year.
NAIP_2014 = "m_4709963_se_14_1_20140720.tif"
SHA256 = {
    NAIP_2020: "e8eb18475678d16a98a44f28b1c777fd0b2c56e9c8afed302a5e071e2e237f90",
    NAIP_2014: "cbb65d34c3f8ad566800677d1f0ba15b221305e46b9873ddb20b5fc922ab6104",
}
#: A flight over the middle of the quarter quad: with BUFFER_M=900 at z17,
#: 153 tiles, all inside the orthophoto.
FLIGHT = [(47.0204, -99.165), (47.0204, -99.145)]


def imagery_dirs() -> list[Path]:
    """Where the imagery may be, in order (tests/data/real/README.md)."""
    dirs = [Path(os.environ[IMAGERY_ENV])] if os.environ.get(IMAGERY_ENV) else []
    shared = [REPO.parent / "shared" / "real-imagery", REPO / "shared" / "real-imagery"]
    return [*dirs, *shared, REPO / "tests" / "data" / "real"]


def find_imagery(name: str) -> Path | None:
    """The imagery file ``name`` (its SHA-256 checked), or None where it is nowhere to be found.

    A file of that name with other bytes is an error, not a skip: it is not the imagery the
    figures were measured on.
    """
    for d in imagery_dirs():
        p = d / name
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            if digest != SHA256[name]:
                raise AssertionError(f"{p}: SHA-256 {digest}, not the {SHA256[name]} expected")
            return p
    return None


def write_flight(path: Path, waypoints: list[tuple[float, float]] = FLIGHT) -> Path:
    """A flight plan (docs/flight-schema.md) along ``waypoints`` at 120 m."""
    doc = {
        "waypoints": [{"lat": a, "lon": b, "alt_m": 120.0} for a, b in waypoints],
        "takeoff_origin": None,
    }
    path.write_text(json.dumps(doc))
    return path


@dataclass(frozen=True)
class Area:
    """The tiles a cache covers at zoom ``z``: a set of (x, y), and their bounding range."""

    z: int
    tiles: frozenset[tuple[int, int]]

    @property
    def x0(self) -> int:
        return min(x for x, _ in self.tiles)

    @property
    def y0(self) -> int:
        return min(y for _, y in self.tiles)

    @property
    def nx(self) -> int:
        return max(x for x, _ in self.tiles) - self.x0 + 1

    @property
    def ny(self) -> int:
        return max(y for _, y in self.tiles) - self.y0 + 1

    def interior(self) -> list[tuple[int, int]]:
        """Tiles whose eight neighbours are in the area: a frame around them is all imagery."""
        return sorted(
            (x, y)
            for x, y in self.tiles
            if all((x + i, y + j) in self.tiles for i in (-1, 0, 1) for j in (-1, 0, 1))
        )


def _unit_x(lon: Any, z: int) -> Any:
    return (lon + 180.0) / 360.0 * 2.0**z


def _unit_y(lat: Any, z: int) -> Any:
    import numpy as np

    r = np.radians(lat)
    return (1.0 - np.log(np.tan(r) + 1.0 / np.cos(r)) / math.pi) / 2.0 * 2.0**z


def _lonlat(x: Any, y: Any, z: int) -> tuple[Any, Any]:
    import numpy as np

    n = 2.0**z
    return x / n * 360.0 - 180.0, np.degrees(np.arctan(np.sinh(math.pi * (1.0 - 2.0 * y / n))))


class Ground:
    """An orthophoto warped onto zoom ``z``'s Web-Mercator pixel grid over an area (256 px a tile)."""

    def __init__(self, path: Path, area: Area, tile: int = 256):
        import numpy as np
        import rasterio
        from affine import Affine
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        half = math.pi * 6_378_137.0
        size = 2 * half / 2**area.z
        self.area, self.tile = area, tile
        left, top = -half + area.x0 * size, half - area.y0 * size
        grid = Affine(size / tile, 0.0, left, 0.0, -size / tile, top)
        with (
            rasterio.open(path) as src,
            WarpedVRT(
                src,
                crs="EPSG:3857",
                transform=grid,
                width=area.nx * tile,
                height=area.ny * tile,
                resampling=Resampling.bilinear,
            ) as vrt,
        ):
            self.pixels = np.ascontiguousarray(vrt.read([1, 2, 3]).transpose(1, 2, 0))


def draw_frames(area: Area, n: int, seed: int) -> Any:
    """``[n, 6]`` frames centred anywhere: centre x, y (tile units), turn (rad), scale, gain, bias.

    As the self-test draws them: an interior tile, the centre anywhere in it,
    turned +-10 degrees, ground size x 1 +- 0.1, brightness x 1 +- 0.2 and
    + up to +-10 grey levels.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    inner = np.array(area.interior(), dtype=np.float64)
    pick = inner[rng.integers(0, len(inner), n)]
    out = np.empty((n, 6))
    out[:, 0:2] = pick + rng.uniform(0.0, 1.0, (n, 2))
    out[:, 2] = np.radians(rng.uniform(-10.0, 10.0, n))
    out[:, 3] = rng.uniform(0.9, 1.1, n)
    out[:, 4] = rng.uniform(0.8, 1.2, n)
    out[:, 5] = rng.uniform(-10.0, 10.0, n)
    return out


def cut(ground: Ground, frame: Any, size: int = 256) -> Any:
    """One frame (uint8 [size, size, 3]) as a downward camera over ``ground`` would take it."""
    import numpy as np
    from PIL import Image

    cx, cy, theta, scale, gain, bias = (float(v) for v in frame)
    t = ground.tile
    px, py = (cx - ground.area.x0) * t, (cy - ground.area.y0) * t
    s = scale * t / size
    a, b, d, e = s * math.cos(theta), -s * math.sin(theta), s * math.sin(theta), s * math.cos(theta)
    h = size / 2
    coeffs = (a, b, px - a * h - b * h, d, e, py - d * h - e * h)
    img = Image.fromarray(ground.pixels).transform(
        (size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
    )
    out = np.asarray(img, dtype=np.float32) * np.float32(gain) + np.float32(bias)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def lattice_lonlat(frames: Any, z: int, grid: int = 16) -> tuple[Any, Any]:
    """Longitude and latitude ``[n, grid * grid]`` of points spread evenly over each frame's ground."""
    import numpy as np

    f = np.asarray(frames, dtype=np.float64)
    g = (np.arange(grid) + 0.5) / grid - 0.5
    u, v = (a.ravel() for a in np.meshgrid(g, g))
    cos, sin, s = np.cos(f[:, 2:3]), np.sin(f[:, 2:3]), f[:, 3:4]
    x = f[:, 0:1] + s * (cos * u - sin * v)
    y = f[:, 1:2] + s * (sin * u + cos * v)
    return _lonlat(x, y, z)


class OnboardClient:
    """Localizes camera frames with a published cache's documented files, and nothing else."""

    def __init__(self, cache: Path):
        import faiss
        import numpy as np
        import onnxruntime as ort

        self.spec = json.loads((cache / "engine" / "engine.json").read_text())["input"]
        self.session = ort.InferenceSession(
            str(cache / "engine" / "engine.onnx"), providers=["CPUExecutionProvider"]
        )
        self.index = faiss.read_index(str(cache / "index.faiss"))
        self.positions = np.load(cache / "positions.npy", allow_pickle=False)
        # the second stage (cache-layout.md), where windows.json names one
        self.cells = json.loads((cache / "windows.json").read_text()).get("cells")
        if self.cells:
            self.cells_session = ort.InferenceSession(
                str(cache / self.cells["model"]), providers=["CPUExecutionProvider"]
            )
            self.place_cells = np.load(cache / self.cells["file"], mmap_mode="r")
            ids = np.load(cache / "descriptor_ids.npy")
            self.cell_order = np.argsort(ids)
            self.cell_ids = ids[self.cell_order]

    def area(self, z: int) -> Area:
        """The tiles the cache covers: the places whose footprint is a whole tile."""
        import numpy as np

        p = self.positions
        x = _unit_x(p["west"], z)
        y = _unit_y(p["north"], z)
        whole = (np.abs(x - np.rint(x)) < 1e-6) & (np.abs(y - np.rint(y)) < 1e-6)
        return Area(z, frozenset(zip(np.rint(x[whole]).astype(int), np.rint(y[whole]).astype(int))))

    def prepare(self, frames: Any) -> Any:
        """Frames (uint8 [n, h, w, 3], RGB) as engine.json's ``input`` says."""
        import numpy as np
        from PIL import Image

        s = self.spec
        assert s["channel_order"] == "RGB" and s["layout"] == "NCHW", s
        h, w = s["size"]
        out = np.empty((len(frames), 3, h, w), dtype=np.dtype(s["dtype"]))
        for i, f in enumerate(frames):
            im = np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BILINEAR))
            x = im.astype(np.float32) * np.float32(s["scale"]) + np.float32(s["offset"])
            out[i] = x.transpose(2, 0, 1)
        return out

    def search(
        self, frames: Any, k: int = 5, batch: int = 32, stage2: bool = True
    ) -> tuple[Any, Any]:
        """``(ids [n, k], positions rows [n, k])`` of each frame's best k places.

        With ``stage2`` and a cache that has one, the index's first
        ``candidates`` are re-ranked by their cells, as cache-layout.md says.
        """
        import numpy as np

        name = self.session.get_inputs()[0].name
        two = bool(stage2 and self.cells)
        found = []
        for s in range(0, len(frames), batch):
            x = self.prepare(frames[s : s + batch])
            d = self.session.run(None, {name: x})[0]
            d = np.ascontiguousarray(d / np.linalg.norm(d, axis=1, keepdims=True), np.float32)
            got = self.index.search(d, self.cells["candidates"] if two else k)[1]
            if two:
                q = self.cells_session.run(None, {self.cells_session.get_inputs()[0].name: x})[0]
                got = np.stack([self._rerank(q[i], got[i]) for i in range(len(got))])
            found.append(got[:, :k])
        ids = np.concatenate(found)
        at = np.searchsorted(self.positions["id"], ids)
        rows = self.positions[np.clip(at, 0, len(self.positions) - 1)]
        assert np.array_equal(rows["id"], ids), "an id the index returned is not in positions.npy"
        return ids, rows

    def _rerank(self, q: Any, cand: Any) -> Any:
        """``cand`` ordered by the best cosine of their cells with ``q`` over shifts of up to ``offsets`` cells."""
        import numpy as np

        rows = self.cell_order[np.searchsorted(self.cell_ids, cand)]
        off, g = int(self.cells["offsets"]), q.shape[-1]
        scores = []
        for r in rows:
            p, best = np.asarray(self.place_cells[r], dtype=np.float32), -2.0
            for dy in range(-off, off + 1):
                for dx in range(-off, off + 1):
                    a = q[:, max(dy, 0) : g + min(dy, 0), max(dx, 0) : g + min(dx, 0)]
                    b = p[:, max(-dy, 0) : g + min(-dy, 0), max(-dx, 0) : g + min(-dx, 0)]
                    den = float(np.linalg.norm(a) * np.linalg.norm(b)) + 1e-12
                    best = max(best, float((a * b).sum()) / den)
            scores.append(best)
        return cand[np.argsort(-np.asarray(scores), kind="stable")]


def footprint_hits(rows: Any, frames: Any, z: int, min_overlap: float = 0.5) -> Any:
    """``[n, k]`` bool: the place's footprint (positions.npy) holds ``min_overlap`` of the frame's ground."""
    lon, lat = lattice_lonlat(frames, z)
    lon, lat = lon[:, None, :], lat[:, None, :]
    inside = (
        (lon >= rows["west"][..., None])
        & (lon < rows["east"][..., None])
        & (lat <= rows["north"][..., None])
        & (lat > rows["south"][..., None])
    )
    return inside.mean(axis=2) >= min_overlap


def ground_error_m(rows: Any, frames: Any, z: int) -> Any:
    """Metres from each frame's centre to its first result's centre (positions.npy's lat/lon)."""
    import numpy as np

    lon, lat = _lonlat(frames[:, 0], frames[:, 1], z)
    dy = (rows["lat"][:, 0] - lat) * 111_320.0
    dx = (rows["lon"][:, 0] - lon) * 111_320.0 * np.cos(np.radians(lat))
    return np.hypot(dx, dy)
