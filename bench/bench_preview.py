"""Coverage map of a 10k-tile cache: a build's preview stage vs a naive render and the old cold path.

Builds a cache-like directory of N distinct 256-px JPEG tiles (about 20 KiB
each): the images in a tile store, an MBTiles file holding the same images,
``tiles.npy`` naming each by its SHA-256, and the default model's engine.
Then, in the same run, ``--repeat`` times, alternating:

- describe, thumbnails off / on: :func:`cachebuild.localize.describe.describe_tiles`
  as a build runs it (``reuse=True``), into an empty descriptor store each
  time (the tile objects shared), without and with making each image's
  coverage-map thumbnail from the pixels it decoded for the engine (what a
  build does now).  Reported as tiles/s, and, steadier on a shared
  machine, as CPU: :func:`cachebuild.store.thumbs.thumbnail_of` timed alone over
  decoded tiles, against describe's CPU time (all threads) per tile;
- naive: decode every tile at full size, resize, paste (the baseline);
- old cold path: :func:`cachebuild.tiles.preview.render_preview` with a store
  that has no thumbnails (what the first map of new imagery cost before
  describe made them): every image decoded at 1/8 scale, its thumbnail kept;
- after describe: ``render_preview`` with the store describe just filled
  (the preview stage of a build: every thumbnail there, no tile decoded);
- warm: the same again (``preview-cache``, a rebuild after a changed
  origin).

Target: the preview stage after describe < 1 s at 10k tiles; the
thumbnails cost describe no more than a few percent.

    python bench/bench_preview.py [--tiles 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_describe import make_jpeg  # noqa: E402  (the same distinct ~20 KiB tiles)
from bench_noop import timed  # noqa: E402

from cachebuild.engine.compile import compile_engine  # noqa: E402
from cachebuild.engine.model import write_default_model  # noqa: E402
from cachebuild.localize.describe import describe_tiles  # noqa: E402
from cachebuild.store.objects import TileStore  # noqa: E402
from cachebuild.tilemath import LngLatBbox, Tile, bounds, tile, tile_id  # noqa: E402
from cachebuild.tiles.preview import _geometry, render_preview  # noqa: E402
from cachebuild.tileset import tile_dtype  # noqa: E402


def make_cache(root: Path, n: int) -> tuple[LngLatBbox, int]:
    """The cache directory (root) and its images in ``root/objects-store``; returns (bbox, tiles)."""
    side = int(math.sqrt(n))
    t0 = tile(8.54, 47.37, 17)
    nw, se = bounds(Tile(t0.x, t0.y, 17)), bounds(Tile(t0.x + side - 1, t0.y + side - 1, 17))
    eps = 1e-7
    bbox = LngLatBbox(nw.west + eps, se.south + eps, se.east - eps, nw.north - eps)
    rng = np.random.default_rng(0)
    store = TileStore(root / "objects-store")
    conn = sqlite3.connect(root / "tiles.mbtiles")
    conn.execute(
        "CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob)"
    )
    conn.execute(
        "CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)"
    )  # as MBTiles files have
    rows = []
    for i in range(side):
        for j in range(side):
            data = make_jpeg(rng)
            t = Tile(t0.x + i, t0.y + j, 17)
            rows.append((tile_id(t), bytes.fromhex(store.put(data))))
            conn.execute("INSERT INTO tiles VALUES (?, ?, ?, ?)", (17, t.x, 2**17 - 1 - t.y, data))
    conn.commit()
    conn.close()
    store.close()
    np.save(root / "tiles.npy", np.sort(np.array(rows, dtype=tile_dtype()), order="id"))
    np.save(root / "missing.npy", np.zeros(0, dtype="<i8"))
    (root / "tileset.json").write_text(
        json.dumps(
            {
                "bbox": list(bbox),
                "zooms": [17],
                "planned": len(rows),
                "present": len(rows),
                "missing": 0,
            }
        )
    )
    wp = [{"lat": 47.37, "lon": 8.54, "alt_m": 100.0}, {"lat": 47.36, "lon": 8.56, "alt_m": 100.0}]
    (root / "flight.json").write_text(
        json.dumps({"flight_id": None, "takeoff_origin": None, "waypoints": wp})
    )
    return bbox, len(rows)


def fresh_store(root: Path, name: str) -> Path:
    """A store with the shared tile objects and nothing else (no descriptors, no thumbnails)."""
    store = root / name
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    os.symlink(root / "objects-store" / "objects", store / "objects")
    return store


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


def thumb_cost(root: Path, k: int = 2000) -> float:
    """CPU seconds of :func:`thumbnail_of` per tile, on the Pillow images describe decodes (best of 3)."""
    from cachebuild.localize.decode import _decode_image
    from cachebuild.store.thumbs import thumbnail_of

    conn = sqlite3.connect(root / "tiles.mbtiles")
    images = [
        _decode_image(io.BytesIO(d), (256, 256))
        for (d,) in conn.execute(f"SELECT tile_data FROM tiles LIMIT {k}")
    ]
    conn.close()
    best = math.inf
    for _ in range(3):
        t = time.process_time()
        for im in images:
            thumbnail_of(im)
        best = min(best, (time.process_time() - t) / len(images))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiles", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t_setup = time.perf_counter()
        bbox, n = make_cache(root, args.tiles)
        engine = root / "engine"
        compile_engine(
            model_path=write_default_model(root / "model.onnx"),
            calibration_path=None,
            precision="fp32",
            out_dir=engine,
        )
        print(
            f"setup: {n:,} distinct tiles, {time.perf_counter() - t_setup:.0f} s", file=sys.stderr
        )

        def describe(store: Path, thumbnails: bool) -> dict:
            return describe_tiles(
                tileset_dir=root, store_root=store, engine_dir=engine, out_dir=root / "described",
                batch_size=args.batch, progress=False, reuse=True, thumbnails=thumbnails,
            )  # fmt: skip

        d_off: list[float] = []
        d_on: list[float] = []
        cpu_off: list[float] = []
        base: list[float] = []
        cold: list[float] = []
        after: list[float] = []
        warm: list[float] = []
        for k in range(args.repeat):
            # describe, both ways, alternating which goes first (the machine may be shared)
            for thumbnails in (False, True) if k % 2 == 0 else (True, False):
                store = fresh_store(root, f"store-{'on' if thumbnails else 'off'}")
                cpu = time.process_time()
                s, r = timed(lambda store=store, on=thumbnails: describe(store, on))
                cpu = time.process_time() - cpu
                assert r["engine_runs"] == n and r["thumbnails"] == (n if thumbnails else 0), r
                (d_on if thumbnails else d_off).append(n / s)
                if not thumbnails:
                    cpu_off.append(cpu / n)
            # previews: naive; old cold path (no thumbnails); after describe; warm
            s, _ = timed(lambda: naive(root, bbox))
            base.append(s)
            s, c = timed(lambda: render_preview(root, root / "cold.png", store=root / "store-off"))
            cold.append(s)
            assert c["thumbnails_made"] == n, c
            s, a = timed(lambda: render_preview(root, root / "after.png", store=root / "store-on"))
            after.append(s)
            assert a["thumbnails_made"] == 0 and a["thumbnails_reused"] == n, a
            s, _ = timed(lambda: render_preview(root, root / "warm.png", store=root / "store-on"))
            warm.append(s)
        thumb_s = thumb_cost(root)
        # the two maps differ by rounding only (describe's box average vs the 1/8-scale decode)
        from PIL import Image

        with Image.open(root / "cold.png") as ci, Image.open(root / "after.png") as ai:
            diff = np.abs(np.asarray(ci, dtype=int) - np.asarray(ai, dtype=int))

    off, on = statistics.median(d_off), statistics.median(d_on)
    print(
        f"describe, {n:,} tiles, batch {args.batch}, medians of {args.repeat}, load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'describe':<36} {'tiles/s':>8} {'vs off':>7}")
    print(f"{'thumbnails off':<36} {off:>8.0f} {1:>7.3f}")
    print(f"{'thumbnails on (a build)':<36} {on:>8.0f} {on / off:>7.3f}")
    print(f"  per run (off / on): {' '.join(f'{a:.0f}/{b:.0f}' for a, b in zip(d_off, d_on))}")
    c = statistics.median(cpu_off)
    print(
        f"CPU per tile: describe (thumbnails off, all threads) {c * 1e3:.2f} ms; "
        f"thumbnail_of alone {thumb_s * 1e6:.0f} us = {thumb_s / c:.1%} of it"
    )
    print()
    b, c0 = statistics.median(base), statistics.median(cold)
    print(
        f"preview {a['width']}x{a['height']}, {n:,} tiles, mode {a['mode']}, medians of {args.repeat}"
    )
    print(f"{'render':<36} {'s':>7} {'vs naive':>9} {'vs old cold':>12}")
    for name, xs in (
        ("naive (full decode, resize)", base),
        ("old cold path (no thumbnails)", cold),
        ("preview stage after describe", after),
        ("warm (thumbnails, again)", warm),
    ):
        m = statistics.median(xs)
        print(f"{name:<36} {m:>7.2f} {m / b:>9.3f} {m / c0:>12.3f}")
    print(f"  after describe, per run: {' '.join(f'{x:.2f}' for x in after)} s")
    print(
        f"map after describe vs old cold path: mean |diff| {diff.mean():.2f}, max {diff.max()} (of 255)"
    )


if __name__ == "__main__":
    main()
