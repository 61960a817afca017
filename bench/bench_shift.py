"""A bbox shifted by 10%: the rebuild against a cold build of the shifted flight.

For each size, in one run on one machine:

1. home A: cold build of a one-waypoint flight of about N tiles at z17
   (not timed for the ratio: it fills the store);
2. home A: the same flight with the waypoint moved east by 10% of the
   area's width, timed: only the new tiles are fetched and described, the
   index, self-test and manifest are rebuilt from stored descriptors;
3. home B (empty store): cold build of the shifted flight, timed.

The ratio (2) / (3) is the figure; target <= 0.15.  Before each build the
bench calls ``os.sync()``: the fill build's dirty pages (hundreds of MB at
20k tiles) would otherwise be written back while the shifted build runs,
and charged to it.  Both builds are real
`doit build-cache` processes; per-phase seconds come from their JSON
reports.  How tiles.mbtiles was written (updated from the last build's
file, or in full) and its size and free pages come from the record the
writer keeps beside it (``.tiles.mbtiles.rows``).  Each build's CPU
seconds (user + system, from ``wait4``) are printed beside its wall time,
and their ratio too: on a VM shared with other work the CPU ratio moves
less with the load than the wall-clock one.

With ``--steps K`` home A moves K times by the shift, each build timed and
shown (each is a 10% shift onto new tiles; the spread shows the noise of one
run), and the updated MBTiles file is seen not to grow; the cold build is of
the last flight, and the ratios of every shift to it are printed with their
median.

With ``--before DIR`` (another checkout, e.g. ``git worktree add DIR main``)
each build runs for both checkouts in turn (fills, then each shift, then
the cold builds), so that both see the same load; each gets its own
homes and its own ratios.

With ``--mbtiles-steps K`` (and no builds) only the MBTiles writer runs:
a square of synthetic z17 tiles moves K times by the shift, each time the
last file updated, and its size and free pages are compared with a file
written from scratch for the same tiles: does the updated file grow?

    python bench/bench_shift.py [--sizes 5000,20000] [--shift 0.1] [--steps 1] [--before DIR]
    python bench/bench_shift.py --mbtiles-steps 50 [--sizes 900]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_noop import REPO, run_child

PHASES = (
    "tiles",
    "mbtiles",
    "engine",
    "describe",
    "preview",
    "index",
    "selftest",
    "manifest",
    "publish",
)
LAT, LON = 47.30, 8.45


def run_timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    """``(wall seconds, CPU seconds, stdout)`` of one child process (CPU: user + system, from ``wait4``)."""
    seconds, usage, out, _ = run_child(argv, env, cwd)
    return seconds, usage.ru_utime + usage.ru_stime, out


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


def mbtiles_steps(n: int, steps: int, shift: float) -> None:
    """The MBTiles writer alone over ``steps`` shifts of an ``n``-tile square: size vs a fresh file."""
    import sqlite3

    import numpy as np

    from cachebuild.providers.synthetic import synthetic_tile_bytes
    from cachebuild.store.objects import TileStore
    from cachebuild.tilemath import LngLatBbox, Tile, tile_id
    from cachebuild.tiles.mbtiles import write_mbtiles
    from cachebuild.tileset import write_tileset

    side = round(math.sqrt(n))
    cols = max(1, round(shift * side))
    x0, y0 = 68640, 45900
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="bench-shift-mbtiles-") as tmp:
        root = Path(tmp)

        def tileset(x: int) -> None:
            with TileStore(root / "store") as store:
                rows = [
                    (tile_id(t), bytes.fromhex(store.put(synthetic_tile_bytes(t))))
                    for t in (
                        Tile(i, j, 17) for i in range(x, x + side) for j in range(y0, y0 + side)
                    )
                ]
            write_tileset(root / "build", np.array(rows, dtype=[("id", "<i8"), ("sha256", "S32")]),
                          np.array([], dtype="<i8"), {})  # fmt: skip

        def write(out: Path, incremental: bool) -> tuple[dict, float]:
            t = time.perf_counter()
            r = write_mbtiles(tileset_dir=root / "build", store_root=root / "store", out_path=out, name="bench",
                              bbox=LngLatBbox(8.0, 47.0, 8.1, 47.1), zooms=[17], incremental=incremental)  # fmt: skip
            return r, time.perf_counter() - t

        tileset(x0)
        write(root / "build" / "tiles.mbtiles", True)
        for k in range(1, steps + 1):
            tileset(x0 + k * cols)
            upd, upd_s = write(root / "build" / "tiles.mbtiles", True)
            if k in (1, steps) or k % max(1, steps // 10) == 0:
                fresh, fresh_s = write(root / "fresh.mbtiles", False)
                with sqlite3.connect(root / "build" / "tiles.mbtiles") as db:
                    pages, free = (
                        db.execute(f"PRAGMA {q}").fetchone()[0]
                        for q in ("page_count", "freelist_count")
                    )
                rows_out.append((k, upd, upd_s, fresh, fresh_s, free / pages))
    print(
        f"{side * side:,} tiles, {cols} of {side} columns new per shift; load {os.getloadavg()[0]:.1f}"
    )
    print()
    print(
        "| shift | written | updated MB | fresh MB | size / fresh | free pages | seconds / fresh write |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for k, upd, upd_s, fresh, fresh_s, free in rows_out:
        print(f"| {k} | {upd['mode']} ({upd['inserted']:,} in, {upd['deleted']:,} out) | "
              f"{upd['bytes'] / 1e6:.2f} | {fresh['bytes'] / 1e6:.2f} | {upd['bytes'] / fresh['bytes']:.3f} | "
              f"{free:.1%} | {upd_s / fresh_s:.2f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="5000,20000")
    ap.add_argument(
        "--shift", type=float, default=0.1, help="shift as a fraction of the area's width"
    )
    ap.add_argument(
        "--steps", type=int, default=1, help="shifted builds in a row (the last is the table's)"
    )
    ap.add_argument(
        "--mbtiles-steps", type=int, default=0, help="only the MBTiles writer, this many shifts"
    )
    ap.add_argument(
        "--before",
        type=Path,
        default=None,
        help="another checkout: its builds interleaved with this one's (before / after)",
    )
    args = ap.parse_args()
    if args.mbtiles_steps:
        for n in (int(s) for s in args.sizes.split(",")):
            mbtiles_steps(n, args.mbtiles_steps, args.shift)
        return
    codes = {"": REPO} if args.before is None else {"before": args.before.resolve(), "this": REPO}
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

            def build(home: str, f: Path, code: Path, buffer: str = buffer) -> tuple:
                env = dict(os.environ, CACHEBUILD_HOME=str(Path(tmp) / home))
                if args.before is not None:  # this checkout's code, or the other's
                    env["PYTHONPATH"] = str(code)
                # what earlier builds left for the kernel to write back is written now, not
                # while this one runs (each timed build starts from the same state)
                os.sync()
                seconds, cpu, out = run_timed(
                    [*doit, "build-cache", f"FLIGHT={f}", buffer, "REPORT=json"], env, code
                )
                return (
                    seconds,
                    cpu,
                    json.loads(out.splitlines()[-1]),
                    mbtiles_record(Path(tmp) / home),
                )

            shifts: dict[str, list] = {c: [] for c in codes}
            for c, code in codes.items():
                print(f"about {n} tiles: filling the store {c}...", file=sys.stderr, flush=True)
                build(f"a-{n}{c}", base, code)
            for step in range(1, args.steps + 1):
                moved = flight(Path(tmp) / f"moved-{n}-{step}.json", LON + step * dlon)
                for c, code in codes.items():  # interleaved: each step, each checkout in turn
                    shifted = build(f"a-{n}{c}", moved, code)
                    shifts[c].append(shifted)
                    rec = shifted[3]
                    print(f"  shifted rebuild {step} {c}: {shifted[0]:.1f} s, mbtiles {rec['mode']}, "
                          f"{rec['size'] / 1e6:.1f} MB, {rec['free']:.1%} free pages; load {os.getloadavg()[0]:.1f}",
                          file=sys.stderr, flush=True)  # fmt: skip
            for c, code in codes.items():
                print(
                    f"  cold build of the shifted flight {c}, empty store ...",
                    file=sys.stderr,
                    flush=True,
                )
                cold = build(f"b-{n}{c}", moved, code)
                rows.append((n, c, shifts[c], cold))
                print(f"  {c} shifted {shifts[c][-1][0]:.1f} s, cold {cold[0]:.1f} s: "
                      f"{shifts[c][-1][0] / cold[0]:.3f}; load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)  # fmt: skip

    print(f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; {os.cpu_count()} CPUs; "
          f"shift {args.shift:.0%} of the width")  # fmt: skip
    print()
    print(
        "| tiles | build | s | CPU s | fetched | described | MBTiles written | "
        + " | ".join(PHASES)
        + " |"
    )
    print(
        "| ---: | --- | ---: | ---: | ---: | ---: | --- | "
        + " | ".join("---:" for _ in PHASES)
        + " |"
    )
    for _, c, shifts_c, cold in rows:
        named = [(f"{c} shifted {k}, warm store".strip() if len(shifts_c) > 1 else f"{c} shifted, warm store".strip(), s)
                 for k, s in enumerate(shifts_c, 1)]  # fmt: skip
        for name, (seconds, cpu, rep, rec) in (*named, (f"{c} cold, empty store".strip(), cold)):
            ph = " | ".join(f"{rep['phases'].get(p, 0):.2f}" for p in PHASES)
            print(
                f"| {rep['tiles']['planned']:,} | {name} | {seconds:.1f} | {cpu:.1f} | {rep['tiles']['fetched']:,} | "
                f"{rep['descriptors']['computed']:,} | {rec['mode']}, {rec['size'] / 1e6:.1f} MB, "
                f"{rec['free']:.1%} free | {ph} |"
            )
    print()
    for n, c, shifts_c, cold in rows:
        each = " / ".join(f"{s[0] / cold[0]:.3f}" for s in shifts_c)
        median = statistics.median(s[0] / cold[0] for s in shifts_c)
        cpu = " / ".join(f"{s[1] / cold[1]:.3f}" for s in shifts_c)
        print(f"about {n:,} tiles{' ' + c if c else ''}: shifted / cold = {each}" + (f" (median {median:.3f})" if len(shifts_c) > 1 else "")
              + f" (target <= 0.15); CPU {cpu}")  # fmt: skip


if __name__ == "__main__":
    main()
