"""Warm no-op of `doit build-cache` against `doit list`, at about 1k and 10k tiles.

Each size gets a cold build first (not timed), then REPEAT warm runs of
build-cache and REPEAT runs of `doit list` interleaved, in the same run on
the same machine; the table shows medians and the ratio.  Target: <= 1.3x
and flat in tile count.

    python bench/bench_noop.py [--sizes 1000,10000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _flight_for(n_tiles: int, path: Path) -> str:
    """A one-waypoint flight whose buffer makes about ``n_tiles`` tiles at z17."""
    lat = 47.37
    tile_m = 2 * math.pi * 6378137.0 / 2**17 * math.cos(math.radians(lat))
    side_m = math.sqrt(n_tiles) * tile_m
    path.write_text(json.dumps({"waypoints": [{"lat": lat, "lon": 8.54, "alt_m": 100}]}))
    return f"BUFFER_M={side_m / 2:.0f}"


def _time(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    t = time.perf_counter()
    p = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stderr}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    doit = [sys.executable, "-m", "doit"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, CACHEBUILD_HOME=tmp)
        for n in (int(s) for s in args.sizes.split(",")):
            flight = Path(tmp) / f"flight-{n}.json"
            buffer = _flight_for(n, flight)
            cache = f"CACHE_DIR={tmp}/cache-{n}"
            build = [*doit, "build-cache", f"FLIGHT={flight}", buffer, cache, "REPORT=json"]
            t = time.perf_counter()
            p = subprocess.run(build, env=env, cwd=REPO, capture_output=True, text=True)
            cold = time.perf_counter() - t
            if p.returncode != 0:
                raise SystemExit(p.stderr)
            planned = json.loads(p.stdout.splitlines()[-1])["tiles"]["planned"]
            noop, listing = [], []
            for _ in range(args.repeat):
                noop.append(_time(build, env, REPO))
                listing.append(_time([*doit, "list"], env, REPO))
            last = subprocess.run(build, env=env, cwd=REPO, capture_output=True, text=True)
            assert json.loads(last.stdout.splitlines()[-1])["outcome"] == "up_to_date"
            rows.append((planned, cold, statistics.median(noop), statistics.median(listing)))
    print(f"{'tiles':>8} {'cold build s':>13} {'no-op s':>9} {'doit list s':>12} {'ratio':>7}")
    for planned, cold, noop, listing in rows:
        print(f"{planned:>8} {cold:>13.2f} {noop:>9.3f} {listing:>12.3f} {noop / listing:>7.2f}")
    if len(rows) > 1:
        print(f"no-op growth {rows[0][0]} -> {rows[-1][0]} tiles: {rows[-1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
