"""Coverage map of a 10k-tile cache: cachebuild's preview vs a naive render.

Builds a cache-like directory with an MBTiles file of N tiles (one synthetic
JPEG reused for every tile: decoding cost is what matters; each row gets its
own SHA-256 in tiles.npy, as distinct tiles would), then renders, in the
same run:

- naive: decode every tile at full size, resize, paste (the baseline);
- cold: :func:`cachebuild.preview.render_preview` with an empty thumbnail
  store: every tile decoded once at 1/8 scale, its thumbnail kept;
- warm: the same with the thumbnails there (what every later preview of
  those images costs: ``doit preview-cache``, a rebuild after a changed
  origin, a shifted bbox's old tiles).

Target: warm < 1 s at 10k tiles.

    python bench/bench_preview.py [--tiles 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachebuild.preview import _geometry, render_preview  # noqa: E402
from cachebuild.synthetic import synthetic_tile_bytes  # noqa: E402
from cachebuild.tiles import LngLatBbox, Tile, bounds, tile, tile_id  # noqa: E402
from cachebuild.tileset import tile_dtype  # noqa: E402


def make_cache(root: Path, n: int) -> LngLatBbox:
    side = int(math.sqrt(n))
    t0 = tile(8.54, 47.37, 17)
    nw, se = bounds(Tile(t0.x, t0.y, 17)), bounds(Tile(t0.x + side - 1, t0.y + side - 1, 17))
    eps = 1e-7
    bbox = LngLatBbox(nw.west + eps, se.south + eps, se.east - eps, nw.north - eps)
    data = synthetic_tile_bytes(t0)
    conn = sqlite3.connect(root / "tiles.mbtiles")
    conn.execute("CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob)")
    conn.execute("CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)")  # as MBTiles files have
    rows = ((17, t0.x + i, 2**17 - 1 - (t0.y + j), data) for i in range(side) for j in range(side))
    conn.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    ids = [tile_id(Tile(t0.x + i, t0.y + j, 17)) for i in range(side) for j in range(side)]
    tiles = np.zeros(len(ids), dtype=tile_dtype())
    tiles["id"] = ids
    tiles["sha256"] = [hashlib.sha256(b"%d" % i).digest() for i in ids]
    np.save(root / "tiles.npy", np.sort(tiles, order="id"))
    np.save(root / "missing.npy", np.zeros(0, dtype="<i8"))
    (root / "tileset.json").write_text(
        json.dumps({"bbox": list(bbox), "zooms": [17], "planned": len(ids), "present": len(ids), "missing": 0})
    )
    wp = [{"lat": 47.37, "lon": 8.54, "alt_m": 100.0}, {"lat": 47.36, "lon": 8.56, "alt_m": 100.0}]
    (root / "flight.json").write_text(json.dumps({"flight_id": None, "takeoff_origin": None, "waypoints": wp}))
    return bbox


def naive(root: Path, bbox: LngLatBbox) -> None:
    from PIL import Image

    geo = _geometry(bbox, 17, 1024)
    canvas = Image.new("RGB", (geo.width, geo.height))
    conn = sqlite3.connect(root / "tiles.mbtiles")
    for col, row, data in conn.execute("SELECT tile_column, tile_row, tile_data FROM tiles"):
        box = geo.tile_box(col, 2**17 - 1 - row)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        canvas.paste(img.resize((box[2] - box[0], box[3] - box[1])), box[:2])
    conn.close()
    canvas.save(root / "naive.png")


def main() -> None:
    import shutil

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = root / "store"
        bbox = make_cache(root, args.tiles)
        cold, warm, base = [], [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            naive(root, bbox)
            base.append(time.perf_counter() - t)
            shutil.rmtree(store, ignore_errors=True)
            t = time.perf_counter()
            c = render_preview(root, root / "preview.png", store=store)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = render_preview(root, root / "preview.png", store=store)
            warm.append(time.perf_counter() - t)
            assert c["thumbnails_made"] == r["thumbnails_reused"] == r["present"], (c, r)
    b = statistics.median(base)
    print(f"preview {r['width']}x{r['height']}, {r['present']:,} tiles, mode {r['mode']}, medians of {args.repeat}")
    print(f"{'render':<34} {'s':>7} {'vs naive':>9}")
    for name, xs in (
        ("naive (full decode, resize)", base),
        ("cachebuild, cold (no thumbnails)", cold),
        ("cachebuild, warm (thumbnails)", warm),
    ):
        m = statistics.median(xs)
        print(f"{name:<34} {m:>7.2f} {m / b:>9.3f}")


if __name__ == "__main__":
    main()
