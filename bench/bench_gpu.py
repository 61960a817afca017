"""Tiles/s per stage of the descriptor pipeline, and end to end, on whatever this machine has.

Usage (the GPU machine: one command; here: a small N)::

    .venv/bin/python bench/bench_gpu.py --tiles 100000
    .venv/bin/python bench/bench_gpu.py --tiles 2000 --backend onnxruntime

Builds a temporary store of JPEG tiles (``--distinct`` different images,
default 4096, repeated under distinct tile ids up to ``--tiles``: decoding
and inference cost the same, and building 100k distinct JPEGs would take
longer than the benchmark) and the default model's engine with
``--backend`` (``auto``: TensorRT where it imports and a GPU is present,
else ONNX Runtime).  Then measures, each alone:

* decode, Pillow: decode + preprocess every tile into float32 NCHW, split
  over the decoder threads the describe stage uses;
* decode, GPU: ``torchvision.io.decode_jpeg(..., device="cuda")`` in
  batches plus the same preprocessing on the GPU, where torchvision and a
  CUDA device import (file reads included, as for Pillow);
* infer: the engine's ``run`` on batches already in memory;
* index: :func:`cachebuild.localize.index.build_index` on N unit descriptors
  (``INDEX=auto``; on the GPU where faiss has one);

and end to end: :func:`cachebuild.localize.describe.describe_tiles` (decoding
overlapped with inference) followed by ``build_index`` on its output.
Every rate is shown against the slowest of the pipeline's own stages
(Pillow decode, infer, index), the baseline measured in the same run; the
target is end to end >= 0.8 of it (``--check`` makes a miss exit 1).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_describe import make_jpeg  # noqa: E402

from cachebuild.engine.compile import compile_engine, load_engine
from cachebuild.engine.interface import read_engine_json  # noqa: E402
from cachebuild.engine.model import write_default_model  # noqa: E402
from cachebuild.localize.decode import decode_batch as _decode_batch
from cachebuild.localize.decode import default_decode_threads
from cachebuild.localize.describe import describe_tiles  # noqa: E402
from cachebuild.localize.index import build_index  # noqa: E402
from cachebuild.store.objects import TileStore  # noqa: E402
from cachebuild.tileset import tile_dtype, write_tileset  # noqa: E402


def build_world(root: Path, n: int, distinct: int) -> tuple[Path, Path, list[Path], float]:
    """A tile set of ``n`` tiles over ``distinct`` JPEG images; ``(tileset, store, paths, mean bytes)``."""
    rng = np.random.default_rng(0)
    store = TileStore(root / "store")
    digests, size = [], 0
    for _ in range(min(n, distinct)):
        data = make_jpeg(rng)
        size += len(data)
        digests.append(bytes.fromhex(store.put(data)))
    rows = [
        ((17 << 58) | ((60000 + i % 1024) << 29) | (40000 + i // 1024), digests[i % len(digests)])
        for i in range(n)
    ]
    tiles = np.sort(np.array(rows, dtype=tile_dtype()), order="id")
    raw = np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(n, 32)
    paths = [store.path(raw[i].tobytes().hex()) for i in range(n)]
    write_tileset(root / "tileset", tiles, np.zeros(0, np.int64), {})
    return root / "tileset", root / "store", paths, size / max(len(digests), 1)


def decode_pillow(paths: list[Path], batch: int, workers: int, size: tuple[int, int]) -> float:
    """Seconds to decode + preprocess every tile, each batch split over ``workers`` threads."""
    buf = np.empty((batch, 3, *size), np.float32)
    ids = np.zeros(len(paths), np.int64)
    chunk = -(-batch // workers)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s in range(0, len(paths), batch):
            part = paths[s : s + batch]
            futures = [
                pool.submit(
                    _decode_batch, part[c : c + chunk], ids[c : c + chunk], size, buf[c : c + chunk]
                )
                for c in range(0, len(part), chunk)
            ]
            for f in futures:
                f.result()
    return time.perf_counter() - start


def gpu_decoder() -> tuple[Any, str]:
    """``(decode function, note)``; the function is None with the reason where there is no GPU decode."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        return None, "torch/torchvision not installed"
    import torch
    import torchvision
    from torchvision.io import decode_jpeg

    if not torch.cuda.is_available():
        return None, "no CUDA device for torch"

    def run(paths: list[Path], batch: int, size: tuple[int, int]) -> float:
        start = time.perf_counter()
        for s in range(0, len(paths), batch):
            datas = [
                torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
                for p in paths[s : s + batch]
            ]
            imgs = decode_jpeg(datas, device="cuda")
            x = torch.stack(imgs).float().div_(255.0).sub_(0.5)
            assert x.shape[1:] == (3, *size)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    return (
        run,
        f"torchvision {torchvision.__version__} decode_jpeg on {torch.cuda.get_device_name(0)}",
    )


def infer(runner: Any, n: int, batch: int) -> float:
    """Seconds for the engine to describe ``n`` tiles already in memory, in batches."""
    h, w = runner.input_hw
    x = np.random.default_rng(1).random((batch, 3, h, w), dtype=np.float32) - 0.5
    runner.run(x[:2])  # warm-up, not timed
    start = time.perf_counter()
    for s in range(0, n, batch):
        runner.run(x[: min(batch, n - s)])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=100_000, help="tiles (100000)")
    parser.add_argument(
        "--distinct", type=int, default=4096, help="distinct JPEG images among them (4096)"
    )
    parser.add_argument("--batch", type=int, default=256, help="tiles per engine call (256)")
    parser.add_argument("--backend", default="auto", help="auto | tensorrt | onnxruntime (auto)")
    parser.add_argument(
        "--threads", type=int, default=None, help="engine threads (ONNX Runtime; default all)"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when end to end < 0.8 of the slowest stage"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    n, batch = args.tiles, args.batch
    workers = default_decode_threads()

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root = Path(tmp)
        print(f"building {n} tiles over {min(n, args.distinct)} JPEG images ...", file=sys.stderr)
        tileset, store, paths, mean_size = build_world(root, n, args.distinct)
        model = write_default_model(root / "model.onnx")
        t = time.perf_counter()
        compile_engine(model_path=model, calibration_path=None, precision="fp32", backend=args.backend,
                       out_dir=root / "engine", timing_cache_dir=root / "tc")  # fmt: skip
        compile_s = time.perf_counter() - t
        record = read_engine_json(root / "engine")
        runner = load_engine(root / "engine", threads=args.threads)
        size = tuple(int(v) for v in runner.input_hw)

        print("stage: decode (Pillow) ...", file=sys.stderr)
        s_pil = decode_pillow(paths, batch, workers, size)  # type: ignore[arg-type]
        gpu_decode, gpu_note = gpu_decoder()
        s_gpu = None
        if gpu_decode is not None:
            print("stage: decode (GPU) ...", file=sys.stderr)
            gpu_decode(paths[: min(n, batch)], batch, size)  # warm-up: CUDA context, nvjpeg handles
            s_gpu = gpu_decode(paths, batch, size)
        print("stage: infer ...", file=sys.stderr)
        s_inf = infer(runner, n, batch)
        del runner
        print("stage: end to end (describe, then index) ...", file=sys.stderr)
        d = describe_tiles(tileset_dir=tileset, store_root=store, engine_dir=root / "engine", out_dir=root / "out",
                           batch_size=batch, threads=args.threads, progress=False)  # fmt: skip
        t = time.perf_counter()
        info = build_index(descriptors_dir=root / "out", out_path=root / "index.faiss")
        s_idx = time.perf_counter() - t
        s_e2e = d["seconds"] + s_idx

    rates = {
        "decode (Pillow)": n / s_pil,
        "infer": n / s_inf,
        "index": n / s_idx,
    }
    slowest = min(rates, key=lambda k: rates[k])
    base = rates[slowest]
    rows: list[tuple[str, float | None, str]] = [
        (f"decode + preprocess, Pillow, {workers} threads", rates["decode (Pillow)"], ""),
        (f"decode + preprocess, GPU ({gpu_note})" if s_gpu else f"decode, GPU: not run ({gpu_note})",
         n / s_gpu if s_gpu else None, "not a pipeline stage yet"),
        (f"infer: {record['backend']} on {record['device'][:40]}", rates["infer"], f"batch {batch}"),
        (f"index: {info['type']} on {info.get('device', 'cpu')}", rates["index"], f"recall@10 {info['recall_at_10']}"),
        ("end to end: describe (overlapped) + index", n / s_e2e, f"describe {d['tiles_per_s']:.0f}/s"),
    ]  # fmt: skip
    ratio = (n / s_e2e) / base
    print(
        f"GPU pipeline benchmark: {n} tiles ({min(n, args.distinct)} distinct JPEGs, mean "
        f"{mean_size / 1024:.1f} KiB, {size[0]}x{size[1]}), {platform.node()} ({os.cpu_count()} CPUs, "
        f"{platform.machine()}), engine {record['backend']} {record['backend_version']} on "
        f"{record['device']} (compiled in {compile_s:.1f} s)"
    )
    print(f"| {'stage':<64} | {'tiles/s':>9} | {'vs slowest stage':>16} | {'note':<26} |")
    print(f"|{'-' * 66}|{'-' * 11}|{'-' * 18}|{'-' * 28}|")
    for name, rate, note in rows:
        shown = f"{rate:>9.0f}" if rate else f"{'-':>9}"
        rel = f"{rate / base:>15.2f}x" if rate else f"{'-':>16}"
        print(f"| {name[:64]:<64} | {shown} | {rel} | {note[:26]:<26} |")
    print(
        f"slowest stage alone: {slowest} ({base:.0f} tiles/s); end to end / slowest = {ratio:.2f} (target >= 0.8)"
    )
    if record["backend"] == "onnxruntime" and not str(record["device"]).startswith("cuda:"):
        seq = n / (s_pil + s_inf + s_idx)
        print(
            f"the engine runs on the CPU, so decode and infer share its {os.cpu_count()} cores: the three "
            f"stages one after another give {seq:.0f} tiles/s; end to end / that = {(n / s_e2e) / seq:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({
            "tiles": n, "rates": rates, "gpu_decode": (n / s_gpu) if s_gpu else None, "end_to_end": n / s_e2e,
            "slowest": slowest, "ratio": ratio, "engine": {k: record[k] for k in ("backend", "backend_version", "device")},
            "index": {k: info.get(k) for k in ("type", "device", "recall_at_10")},
        }, indent=1))  # fmt: skip
    return 1 if args.check and ratio < 0.8 else 0


if __name__ == "__main__":
    sys.exit(main())
