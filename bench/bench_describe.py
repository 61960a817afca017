"""Benchmark the describe stage against a plain ONNX Runtime loop.

Usage::

    .venv/bin/python bench/bench_describe.py --tiles 2000 --batch 64 --threads 2

Builds a temporary store of N distinct 256x256 JPEG tiles and the default
model's engine, then, alternating, ``--repeat`` times:

* ours: :func:`cachebuild.localize.describe.describe_tiles`, wall time of the whole
  call (engine load, decoding overlapped with inference, writing the files);
* baseline: the simplest loop, same model, same tiles, same batch size and
  the same number of ONNX Runtime intra-op threads (ORT's other settings
  left at their defaults): decode and preprocess every tile with Pillow
  and numpy into one float32 array, then ``session.run`` batch by batch on
  slices of it.  Reported as pure inference (the ``session.run`` loop) and
  as decode + inference, sequential.  It holds all N tiles as float32 in
  memory (786 KiB a tile).

The ratio that matters is ours / (decode + inference); the target is >= 0.8
(``--check`` makes a miss exit 1).  Medians over the repeats are shown, as
the machine may be shared.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from cachebuild.engine.compile import compile_engine
from cachebuild.engine.model import write_default_model
from cachebuild.localize.describe import DESCRIPTORS_FILE, default_decode_threads, describe_tiles
from cachebuild.store.objects import TileStore
from cachebuild.tileset import tile_dtype, write_tileset


def make_jpeg(rng: np.random.Generator) -> bytes:
    """A distinct 256 px tile, about 20 KiB as JPEG at quality 85."""
    coarse = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    img = np.asarray(coarse.resize((256, 256), Image.Resampling.BICUBIC)).astype(np.int16)
    img = np.clip(img + rng.integers(-16, 17, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def build_world(root: Path, n: int) -> tuple[Path, Path, list[Path], float]:
    rng = np.random.default_rng(0)
    store = TileStore(root / "store")
    rows, paths, size = [], [], 0
    for i in range(n):
        data = make_jpeg(rng)
        size += len(data)
        digest = store.put(data)
        rows.append(
            ((17 << 58) | ((60000 + i % 64) << 29) | (40000 + i // 64), bytes.fromhex(digest))
        )
    tiles = np.sort(np.array(rows, dtype=tile_dtype()), order="id")
    raw = np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(n, 32)
    paths = [store.path(raw[i].tobytes().hex()) for i in range(n)]
    write_tileset(root / "tileset", tiles, np.zeros(0, np.int64), {})
    return root / "tileset", root / "store", paths, size / max(n, 1)


def baseline(
    model: Path, paths: list[Path], batch: int, threads: int
) -> tuple[float, float, float, np.ndarray]:
    """(decode s, session.run s, total s, descriptors) of the simplest sequential loop.

    Every tile is decoded and preprocessed straight into one float32
    ``[N, 3, 256, 256]`` array (1.5 GiB for 2000 tiles, allocated and
    touched before timing), then each batch is a contiguous slice handed to
    ``session.run``: no per-batch copies.  The baseline at its best.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    session.run(None, {"tiles": np.zeros((1, 3, 256, 256), np.float32)})  # warm-up, not timed

    # allocated and touched before the clock starts: no page faults are timed
    x = np.ones((len(paths), 3, 256, 256), np.float32)
    start = time.perf_counter()
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        # the same arithmetic as ours (x / 255 - 0.5 in float32), in place
        np.divide(rgb.transpose(2, 0, 1), np.float32(255), out=x[i])
        x[i] -= np.float32(0.5)
    decoded = time.perf_counter()
    out = np.empty((len(paths), 256), np.float32)
    for s in range(0, len(paths), batch):
        out[s : s + batch] = session.run(None, {"tiles": x[s : s + batch]})[0]
    end = time.perf_counter()
    return decoded - start, end - decoded, end - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=2000, help="tiles in the store (2000)")
    parser.add_argument("--batch", type=int, default=64, help="tiles per engine call (64)")
    parser.add_argument(
        "--threads", type=int, default=2, help="ONNX Runtime intra-op threads, both sides (2)"
    )
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=None,
        help="our decoder threads (default: one per usable CPU, at nice +5)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each (3)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the ratio is below 0.8")
    args = parser.parse_args(argv)
    decoders = args.decode_threads or default_decode_threads()

    with tempfile.TemporaryDirectory(prefix="bench-describe-") as tmp:
        root = Path(tmp)
        print(f"building {args.tiles} JPEG tiles ...", file=sys.stderr)
        tileset_dir, store_root, paths, mean_size = build_world(root, args.tiles)
        model = write_default_model(root / "model.onnx")
        compile_engine(
            model_path=model, calibration_path=None, precision="fp32", out_dir=root / "engine"
        )

        ours, dec, inf, seq = [], [], [], []
        agree = 1.0
        for r in range(args.repeat):
            result = describe_tiles(
                tileset_dir=tileset_dir,
                store_root=store_root,
                engine_dir=root / "engine",
                out_dir=root / "out",
                batch_size=args.batch,
                threads=args.threads,
                progress=False,
                decode_threads=decoders,
            )
            ours.append(result["seconds"])
            d, i, total, ref = baseline(model, paths, args.batch, args.threads)
            dec.append(d)
            inf.append(i)
            seq.append(total)
            mine = np.load(root / "out" / DESCRIPTORS_FILE)
            agree = min(agree, float(np.min(np.sum(mine * ref, axis=1))))
            print(
                f"  run {r + 1}: ours {args.tiles / result['seconds']:.0f}/s, "
                f"baseline decode+infer {args.tiles / total:.0f}/s",
                file=sys.stderr,
            )

    n = args.tiles

    def rate(seconds: list[float]) -> float:
        return n / statistics.median(seconds)

    def best(seconds: list[float]) -> float:
        return n / min(seconds)

    base = rate(seq)
    print(
        f"describe benchmark: {n} JPEG tiles (mean {mean_size / 1024:.1f} KiB), "
        f"batch {args.batch}, "
        f"ORT intra-op threads {args.threads} (both), our decoder threads {decoders} (nice +5), "
        f"{args.repeat} alternating runs, onnxruntime {ort.__version__}"
    )
    print(f"| {'stage':<44} | {'tiles/s (median)':>16} | {'best':>6} | {'vs decode+infer':>15} |")
    print(f"|{'-' * 46}|{'-' * 18}|{'-' * 8}|{'-' * 17}|")
    rows = [
        ("ours: describe_tiles (overlapped, all-in)", rate(ours), best(ours)),
        ("baseline: decode + preprocess (1 thread)", rate(dec), best(dec)),
        ("baseline: pure inference (session.run only)", rate(inf), best(inf)),
        ("baseline: decode + inference, sequential", base, best(seq)),
    ]
    for name, median, top in rows:
        print(f"| {name:<44} | {median:>16.0f} | {top:>6.0f} | {median / base:>14.2f}x |")
    ratio = rate(ours) / base
    print(
        f"ratio ours / (decode + inference) = {ratio:.2f} (target >= 0.8); "
        f"min cosine ours vs baseline = {agree:.6f}"
    )
    return 1 if args.check and ratio < 0.8 else 0


if __name__ == "__main__":
    sys.exit(main())
