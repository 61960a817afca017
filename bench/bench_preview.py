"""Coverage map of a 10k-tile cache: cachebuild's preview vs a naive render.

Builds a cache-like directory with an MBTiles file of N tiles (one synthetic
JPEG reused for every tile: decoding cost is what matters), then renders the
preview with :func:`cachebuild.preview.render_preview` (JPEG DCT scaling,
streamed) and with a naive loop that decodes every tile at full size and
resizes it, in the same run.  Target: cachebuild < 1 s at 10k tiles.

    python bench/bench_preview.py [--tiles 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
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


def make_cache(root: Path, n: int) -> LngLatBbox:
    side = int(math.sqrt(n))
    t0 = tile(8.54, 47.37, 17)
    nw, se = bounds(Tile(t0.x, t0.y, 17)), bounds(Tile(t0.x + side - 1, t0.y + side - 1, 17))
    eps = 1e-7
    bbox = LngLatBbox(nw.west + eps, se.south + eps, se.east - eps, nw.north - eps)
    data = synthetic_tile_bytes(t0)
    conn = sqlite3.connect(root / "tiles.mbtiles")
    conn.execute("CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob)")
    rows = ((17, t0.x + i, 2**17 - 1 - (t0.y + j), data) for i in range(side) for j in range(side))
    conn.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    ids = [tile_id(Tile(t0.x + i, t0.y + j, 17)) for i in range(side) for j in range(side)]
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bbox = make_cache(root, args.tiles)
        ours, base = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            r = render_preview(root, root / "preview.png")
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            naive(root, bbox)
            base.append(time.perf_counter() - t)
    o, b = statistics.median(ours), statistics.median(base)
    print(f"{'tiles':>7} {'naive s':>9} {'cachebuild s':>13} {'ratio':>7}   preview {r['width']}x{r['height']}")
    print(f"{r['present']:>7} {b:>9.2f} {o:>13.2f} {o / b:>7.2f}")


if __name__ == "__main__":
    main()
