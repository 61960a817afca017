"""A bbox shifted by 10%: the rebuild against a cold build of the shifted flight.

For each size, in one run on one machine:

1. home A: cold build of a one-waypoint flight of about N tiles at z17
   (not timed for the ratio: it fills the store);
2. home A: the same flight with the waypoint moved east by 10% of the
   area's width, timed: only the new tiles are fetched and described, the
   index, self-test and manifest are rebuilt from stored descriptors;
3. home B (empty store): cold build of the shifted flight, timed.

The ratio (2) / (3) is the figure; target <= 0.15.  Both builds are real
`doit build-cache` processes; per-phase seconds come from their JSON
reports.  How tiles.mbtiles was written (updated from the last build's
file, or in full) and its size and free pages come from the record the
writer keeps beside it (``.tiles.mbtiles.rows``).

With ``--steps K`` home A moves K times by the shift, each build timed (the
last one is the shifted build of the table), to show that the updated
MBTiles file does not grow over many shifts; the cold build is of the last
flight.

    python bench/bench_shift.py [--sizes 5000,20000] [--shift 0.1] [--steps 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from bench_noop import REPO, run_measured

PHASES = ("tiles", "mbtiles", "engine", "describe", "preview", "index", "selftest", "manifest", "publish")
LAT, LON = 47.30, 8.45


def flight(path: Path, lon: float) -> Path:
    path.write_text(json.dumps({"waypoints": [{"lat": LAT, "lon": lon, "alt_m": 100}]}))
    return path


def mbtiles_record(home: Path) -> dict:
    """How the last build wrote tiles.mbtiles, its size and free pages (the writer's record)."""
    path = home / "cache" / "state" / "build" / ".tiles.mbtiles.rows"
    try:
        head = json.loads(path.read_bytes().split(b"\n", 1)[0])
    except (OSError, ValueError):
        return {"mode": "?", "size": 0, "free": 0.0}
    written = head.get("written", {})
    return {
        "mode": written.get("mode", "?"),
        "size": head["file"]["size"],
        "free": head["free_pages"] / max(1, head["pages"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5000,20000")
    ap.add_argument("--shift", type=float, default=0.1, help="shift as a fraction of the area's width")
    ap.add_argument("--steps", type=int, default=1, help="shifted builds in a row (the last is the table's)")
    args = ap.parse_args()
    doit = [sys.executable, "-m", "doit"]
    rows = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-shift-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            tile_m = 2 * math.pi * 6378137.0 / 2**17 * math.cos(math.radians(LAT))
            side_m = math.sqrt(n) * tile_m
            buffer = f"BUFFER_M={side_m / 2:.0f}"
            dlon = args.shift * side_m / (111_320.0 * math.cos(math.radians(LAT)))
            base = flight(Path(tmp) / f"base-{n}.json", LON)

            def build(home: str, f: Path, buffer: str = buffer) -> tuple[float, int, dict, dict]:
                env = dict(os.environ, CACHEBUILD_HOME=str(Path(tmp) / home))
                seconds, rss, out, _ = run_measured(
                    [*doit, "build-cache", f"FLIGHT={f}", buffer, "REPORT=json"], env, REPO
                )
                return seconds, rss, json.loads(out.splitlines()[-1]), mbtiles_record(Path(tmp) / home)

            print(f"about {n} tiles: filling the store ...", file=sys.stderr, flush=True)
            build(f"a-{n}", base)
            for step in range(1, args.steps + 1):
                moved = flight(Path(tmp) / f"moved-{n}-{step}.json", LON + step * dlon)
                shifted = build(f"a-{n}", moved)
                rec = shifted[3]
                print(f"  shifted rebuild {step}: {shifted[0]:.1f} s, mbtiles {rec['mode']}, "
                      f"{rec['size'] / 1e6:.1f} MB, {rec['free']:.1%} free pages; load {os.getloadavg()[0]:.1f}",
                      file=sys.stderr, flush=True)  # fmt: skip
            print("  cold build of the shifted flight, empty store ...", file=sys.stderr, flush=True)
            cold = build(f"b-{n}", moved)
            rows.append((n, shifted, cold))
            print(f"  shifted {shifted[0]:.1f} s, cold {cold[0]:.1f} s: {shifted[0] / cold[0]:.3f}; "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)  # fmt: skip

    print(f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; {os.cpu_count()} CPUs; "
          f"shift {args.shift:.0%} of the width")  # fmt: skip
    print()
    print("| tiles | build | s | fetched | described | MBTiles written | " + " | ".join(PHASES) + " |")
    print("| ---: | --- | ---: | ---: | ---: | --- | " + " | ".join("---:" for _ in PHASES) + " |")
    for _, shifted, cold in rows:
        for name, (seconds, _, rep, rec) in (("shifted, warm store", shifted), ("cold, empty store", cold)):
            ph = " | ".join(f"{rep['phases'].get(p, 0):.2f}" for p in PHASES)
            print(
                f"| {rep['tiles']['planned']:,} | {name} | {seconds:.1f} | {rep['tiles']['fetched']:,} | "
                f"{rep['descriptors']['computed']:,} | {rec['mode']}, {rec['size'] / 1e6:.1f} MB, "
                f"{rec['free']:.1%} free | {ph} |"
            )
    print()
    for n, shifted, cold in rows:
        print(f"about {n:,} tiles: shifted / cold = {shifted[0] / cold[0]:.3f} (target <= 0.15)")


if __name__ == "__main__":
    main()
