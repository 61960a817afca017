"""The index over a windowed area: IVF lists 4 sqrt(N) against sqrt(N), nprobe bisected or predicted, in one run.

Builds the index three ways over the same ``descriptors.npy`` with the
build's own :func:`~cachebuild.localize.index.build_index`:

- ``4√N, bisect``: the plan before 2026-12-07 (the baseline);
- ``√N, bisect``: fewer lists, nprobe found by searching the ladder;
- ``√N, predicted``: what a build does now (nprobe predicted from list ranks, one search confirms).

Prints train/add/tune/total seconds, nprobe and recall@10 for each, and
the ratios to the baseline.  The descriptors come from ``--build-dir`` (a
build's ``state/build`` directory); without it a cold build of ``--tiles``
synthetic tiles is made first (10k tiles: about 1-2 minutes).  No figure
is asserted.

    python bench/bench_index_lists.py [--tiles 10000] [--build-dir DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_noop import REPO, run_measured  # noqa: E402
from bench_shift import LAT, LON, flight  # noqa: E402

from cachebuild.localize import index as index_mod  # noqa: E402
from cachebuild.localize import index_tune  # noqa: E402


def cold_build(tmp: Path, tiles: int) -> Path:
    tile_m = 2 * math.pi * 6378137.0 / 2**17 * math.cos(math.radians(LAT))
    f = flight(tmp / "f.json", LON)
    env = dict(os.environ, CACHEBUILD_HOME=str(tmp / "home"), XDG_DATA_HOME=str(tmp / "data"))
    cmd = [sys.executable, "-m", "doit", "build-cache", f"FLIGHT={f}"]
    run_measured([*cmd, f"BUFFER_M={math.sqrt(tiles) * tile_m / 2:.0f}"], env, REPO)
    return tmp / "home" / "cache" / "state" / "build"


def one(build_dir: Path, out: Path, lists: int, predict: bool) -> dict:
    real_predict = index_tune.predict_nprobe
    index_mod._LISTS_PER_ROOT = lists
    if not predict:  # the bisection only: no prediction to start from
        index_tune.predict_nprobe = lambda *a, **k: None  # type: ignore[assignment]
    try:
        t = time.perf_counter()
        info = index_mod.build_index(descriptors_dir=build_dir, out_path=out, kind="ivf")
        info["seconds"]["total"] = time.perf_counter() - t
    finally:
        index_tune.predict_nprobe = real_predict
        index_mod._LISTS_PER_ROOT = 1
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=10_000)
    ap.add_argument("--build-dir", type=Path)
    ap.add_argument("--repeat", type=int, default=3, help="medians of this many runs, interleaved")
    args = ap.parse_args()
    print(f"load average at the start: {os.getloadavg()[0]:.1f}")
    ways = {"4√N, bisect": (4, False), "√N, bisect": (1, False), "√N, predicted": (1, True)}
    with tempfile.TemporaryDirectory(prefix="bench-index-lists-") as tmp:
        build_dir = args.build_dir or cold_build(Path(tmp), args.tiles)
        runs: dict[str, list[dict]] = {w: [] for w in ways}
        for _ in range(args.repeat):
            for way, (lists, predict) in ways.items():
                runs[way].append(one(build_dir, Path(tmp) / "i.faiss", lists, predict))
    base = statistics.median(r["seconds"]["total"] for r in runs["4√N, bisect"])
    print(f"\n{runs['√N, predicted'][0]['ntotal']:,} places, median of {args.repeat}")
    print(
        "| lists, nprobe | type | train s | add s | tune s | total s | nprobe | recall@10 | / baseline |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for way, rs in runs.items():
        med = {
            k: statistics.median(r["seconds"][k] for r in rs)
            for k in ("train", "add", "tune", "total")
        }
        r = rs[0]
        print(
            f"| {way} | {r['type']} | {med['train']:.1f} | {med['add']:.1f} | {med['tune']:.1f} | "
            f"{med['total']:.1f} | {r['params']['nprobe']} | {r['recall_at_10']} | {med['total'] / base:.2f} |"
        )


if __name__ == "__main__":
    main()
