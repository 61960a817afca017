"""Cold build and warm no-op of `doit build-cache` at 1k, 10k and 100k tiles.

For each size, in one run on one machine:

1. a cold build (empty home), timed per phase, with the peak RSS of the
   doit process (``os.wait4``: the kernel's ru_maxrss for that child) and
   the size of the index it built: peak RSS should be the index plus a
   constant, not grow with the area otherwise;
2. REPEAT warm no-op runs of build-cache interleaved with REPEAT runs of
   `doit list` (which loads the same task graph); medians and their
   ratio.  Target: <= 1.3x and flat in tile count.

    python bench/bench_noop.py [--sizes 1000,10000,100000] [--repeat 5] [--keep DIR]
        [--before DIR]

``--before DIR`` (another checkout, e.g. ``git worktree add --detach DIR
REV``): each no-op is also run with that checkout's code, interleaved with
this one's on the same home, and the table gives both and their ratio.

Each size's figures also go to stderr as soon as they are measured.
``--keep DIR`` builds the homes under DIR and leaves them there (to time or
trace the no-op again without another cold build).  Given homes an earlier
``--keep`` run left, the "cold build" is itself a no-op (its stage rates
print as "-" and its RSS is the no-op's): only the no-op is timed again.

A 100k cold build takes several minutes on two cores (most of it fetching
the synthetic tiles and describing them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STAGES = ("tiles", "mbtiles", "describe", "index", "manifest")


def _flight_for(n_tiles: int, path: Path) -> str:
    """A one-waypoint flight whose buffer makes about ``n_tiles`` tiles at z17."""
    lat = 47.37
    tile_m = 2 * math.pi * 6378137.0 / 2**17 * math.cos(math.radians(lat))
    side_m = math.sqrt(n_tiles) * tile_m
    path.write_text(json.dumps({"waypoints": [{"lat": lat, "lon": 8.54, "alt_m": 100}]}))
    return f"BUFFER_M={side_m / 2:.0f}"


def timed(fn: Any) -> tuple[float, Any]:
    """``(seconds, result)`` of ``fn()``: the in-process timer the benches share."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run_measured(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, str, str]:
    """``(seconds, peak RSS bytes, stdout, stderr)`` of one child process."""
    seconds, usage, stdout, stderr = run_child(argv, env, cwd)
    return seconds, usage.ru_maxrss * 1024, stdout, stderr


def run_child(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, Any, str, str]:
    """``(seconds, its resource usage from wait4, stdout, stderr)`` of one child process;
    exits naming it when it fails."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}):\n{stderr[-3000:]}")
    return seconds, usage, stdout, stderr


def _time(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    return run_measured(argv, env, cwd)[0]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="build the homes under this folder and keep them")
    ap.add_argument("--before", type=Path, help="another checkout: its no-ops interleaved")
    args = ap.parse_args()
    doit = [sys.executable, "-m", "doit"]
    noop_rows, cold_rows, before_rows = [], [], []
    load0 = os.getloadavg()[0]
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.nullcontext(str(args.keep))
        if args.keep
        else tempfile.TemporaryDirectory(prefix="bench-noop-")
    ) as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            home = Path(tmp) / f"home-{n}"
            env = dict(os.environ, CACHEBUILD_HOME=str(home))
            flight = Path(tmp) / f"flight-{n}.json"
            build = [
                *doit,
                "build-cache",
                f"FLIGHT={flight}",
                _flight_for(n, flight),
                "REPORT=json",
            ]
            print(f"cold build, about {n} tiles ...", file=sys.stderr, flush=True)
            cold, rss, out, _ = run_measured(build, env, REPO)
            report = json.loads(out.splitlines()[-1])
            planned = report["tiles"]["planned"]
            staged = home / "cache" / "state" / "build"
            index_bytes = (staged / "index.faiss").stat().st_size
            index_kind = json.loads((staged / "index.json").read_text())["type"]
            phases = report["phases"]
            cold_rows.append(
                (planned, cold, phases, rss, index_bytes, index_kind, report["selftest"])
            )
            noop, listing, earlier = [], [], []
            for _ in range(args.repeat):
                noop.append(_time(build, env, REPO))
                listing.append(_time([*doit, "list"], env, REPO))
                if args.before is not None:  # the other checkout's code, on the same home
                    earlier.append(_time(build, env, args.before.resolve()))
            for code in [REPO] + ([args.before.resolve()] if args.before else []):
                last = json.loads(run_measured(build, env, code)[2].splitlines()[-1])
                assert last["outcome"] == "up_to_date", (code, last)
            noop_rows.append((planned, statistics.median(noop), statistics.median(listing)))
            if earlier:
                before_rows.append((planned, statistics.median(earlier), statistics.median(noop)))
            print(f"  {planned:,} tiles: cold {cold:.1f} s, peak RSS {rss / (1 << 20):.0f} MiB, index "
                  f"{index_kind} {index_bytes / (1 << 20):.1f} MiB; no-op {noop_rows[-1][1]:.3f} s, "
                  f"doit list {noop_rows[-1][2]:.3f} s; load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)  # fmt: skip
    mib = 1 << 20
    print(
        f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; {os.cpu_count()} CPUs"
    )
    print()
    print("| tiles | no-op s | `doit list` s | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for planned, noop_s, list_s in noop_rows:
        print(f"| {planned:,} | {noop_s:.3f} | {list_s:.3f} | {noop_s / list_s:.2f} |")
    if before_rows:
        print(f"\n| tiles | no-op before ({args.before}) s | no-op now s | now / before |")
        print("| ---: | ---: | ---: | ---: |")
        for planned, then_s, now_s in before_rows:
            print(f"| {planned:,} | {then_s:.3f} | {now_s:.3f} | {now_s / then_s:.2f} |")
    if len(noop_rows) > 1:
        print(f"\nno-op growth {noop_rows[0][0]:,} -> {noop_rows[-1][0]:,} tiles: "
              f"{noop_rows[-1][1] / noop_rows[0][1]:.2f}x (`doit list`, which does no per-tile work, "
              f"{noop_rows[-1][2] / noop_rows[0][2]:.2f}x: the machine's load)")  # fmt: skip
    print()
    stage_cols = " | ".join(f"{s} tiles/s" for s in STAGES)
    print(
        f"| tiles | cold build s | {stage_cols} | selftest s | peak RSS MiB | index | index MiB | RSS - index MiB |"
    )
    print(
        "| ---: | ---: | "
        + " | ".join("---:" for _ in STAGES)
        + " | ---: | ---: | --- | ---: | ---: |"
    )
    for planned, cold, phases, rss, index_bytes, kind, _ in cold_rows:
        rates = " | ".join(f"{planned / phases[s]:,.0f}" if phases.get(s) else "-" for s in STAGES)
        print(
            f"| {planned:,} | {cold:.1f} | {rates} | {phases.get('selftest', 0):.1f} | {rss / mib:.0f} | {kind} | "
            f"{index_bytes / mib:.1f} | {(rss - index_bytes) / mib:.0f} |"
        )
    print()
    for planned, *_, selftest in cold_rows:
        print(f"self-test at {planned:,} tiles: {selftest}")


if __name__ == "__main__":
    main()
