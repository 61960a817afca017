"""The index and self-test phases of successive 10% shifts against a cold build.

In one run on one machine, for a one-waypoint flight of about N tiles at
z17 (the flight of ``bench_shift.py``):

1. home A: cold build (empty store): the baseline;
2. home A: the waypoint moved east by 10% of the area's width, then by
   another 10%, ... (``--shifts``): each a real `doit build-cache` over the
   last build's directory, so the index may reuse the saved IVF quantizer
   and the self-test the kept frame descriptors;
3. home B (empty store): cold build of the last shifted flight.

For each build: the index and selftest phase seconds (from the JSON
report), their sum as a share of the cold build of the same flight (the
issue's budget for everything besides fetching and describing the new
tenth is about 5% of it), whether the quantizer was reused and on what
share of trained vectors, how many self-test frames were described and
reused, recall@10 of the index and the self-test's recall@1 / @5.

The phase seconds include what the build wraps around the two functions
(the action cache hashes their inputs and stores their outputs).  So each
build directory is also kept (hard links: build files are never changed
in place), and after the builds the two functions are timed again in this
process on exactly the inputs each build had (its descriptors, tiles and
engine, and the quantizer and frames the build before it left), one at a
time: the "fn" columns.

    python bench/bench_index_selftest.py [--tiles 20000] [--shifts 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_noop import REPO, run_measured

LAT, LON = 47.30, 8.45


def time_functions(
    snap: Path, before: Path | None, store: Path, scratch: Path
) -> tuple[float, float]:
    """``(index s, selftest s)``: build_index and run_selftest on a build's inputs, in this process."""
    from cachebuild.localize.index import QUANTIZER_FILE, build_index
    from cachebuild.localize.selftest import FRAMES_FILE, run_selftest

    scratch.mkdir()
    for name in ("descriptors.npy", "descriptor_ids.npy", "tiles.npy", "tileset.json", "engine"):
        (scratch / name).symlink_to(snap / name)
    for name in (QUANTIZER_FILE, FRAMES_FILE):
        if before is not None and (before / name).exists():
            shutil.copy(before / name, scratch / name)
    key = json.loads((snap / "engine" / "engine.json").read_text())["key"]
    t = time.perf_counter()
    build_index(
        descriptors_dir=scratch, out_path=scratch / "index.faiss", reuse=True, engine_key=key
    )
    t_index = time.perf_counter() - t
    t = time.perf_counter()
    run_selftest(
        build_dir=scratch, store_root=store, engine_dir=scratch / "engine", index_path=scratch / "index.faiss",
        frames_file=scratch / FRAMES_FILE,
    )  # fmt: skip
    return t_index, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiles", type=int, default=20_000)
    ap.add_argument("--shifts", type=int, default=4)
    ap.add_argument(
        "--shift", type=float, default=0.1, help="each shift, as a fraction of the area's width"
    )
    args = ap.parse_args()
    doit = [sys.executable, "-m", "doit"]
    load0 = os.getloadavg()[0]
    tile_m = 2 * math.pi * 6378137.0 / 2**17 * math.cos(math.radians(LAT))
    side_m = math.sqrt(args.tiles) * tile_m
    buffer = f"BUFFER_M={side_m / 2:.0f}"
    dlon = args.shift * side_m / (111_320.0 * math.cos(math.radians(LAT)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-index-selftest-") as tmp:

        def build(home: str, k: int) -> dict:
            f = Path(tmp) / f"flight-{k}.json"
            f.write_text(
                json.dumps({"waypoints": [{"lat": LAT, "lon": LON + k * dlon, "alt_m": 100}]})
            )
            env = dict(os.environ, CACHEBUILD_HOME=str(Path(tmp) / home))
            seconds, _, out, _ = run_measured(
                [*doit, "build-cache", f"FLIGHT={f}", buffer, "REPORT=json"], env, REPO
            )
            b = Path(tmp) / home / "cache" / "state" / "build"
            # what the index and self-test are (content), with how this build made them (history)
            index = {
                **json.loads((b / "index.json").read_text()),
                **json.loads((b / "index-run.json").read_text()),
            }
            selftest = {
                **json.loads((b / "selftest.json").read_text()),
                **json.loads((b / "selftest-run.json").read_text()),
            }
            print(f"  {home} shift {k}: {seconds:.1f} s", file=sys.stderr, flush=True)
            snap = Path(tmp) / f"snap-{home}-{k}"
            subprocess.run(["cp", "-al", str(b), str(snap)], check=True)
            return {
                "s": seconds, "report": json.loads(out.splitlines()[-1]), "index": index, "selftest": selftest,
                "snap": snap, "store": Path(tmp) / home / "store",
            }  # fmt: skip

        print(f"about {args.tiles} tiles: cold build ...", file=sys.stderr, flush=True)
        rows.append(("cold, empty store", 0, build("a", 0)))
        for k in range(1, args.shifts + 1):
            rows.append((f"shift {k} x {args.shift:.0%}, same home", k, build("a", k)))
        rows.append(
            (
                f"cold, empty store (flight of shift {args.shifts})",
                args.shifts,
                build("b", args.shifts),
            )
        )
        print("timing the functions on each build's inputs ...", file=sys.stderr, flush=True)
        for i, (_, _, r) in enumerate(rows):
            before = rows[i - 1][2]["snap"] if 0 < i < len(rows) - 1 else None
            r["fn"] = time_functions(r["snap"], before, r["store"], Path(tmp) / f"fn-{i}")

    cold_of = {0: rows[0][2]["s"], args.shifts: rows[-1][2]["s"]}
    print(
        f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; {os.cpu_count()} CPUs"
    )
    print()
    print(
        "| build | tiles | s | index s | selftest s | (index + selftest) / cold build | fn: index s "
        "| fn: selftest s | fn: (index + selftest) / cold build | quantizer "
        "| trained-on share | frames described / reused | recall@10 | self-test r@1 / r@5 |"
    )
    print(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"
    )
    for name, k, r in rows:
        ph = r["report"]["phases"]
        q = r["index"].get("quantizer") or {}
        fr = r["selftest"].get("frames") or {}
        # the cold build of this shift's flight: measured for the first and last; the others
        # lie between (same tile count), so the first's is used
        cold = cold_of.get(k, cold_of[0])
        share = (ph.get("index", 0) + ph.get("selftest", 0)) / cold
        fi, fs = r["fn"]
        print(
            f"| {name} | {r['report']['tiles']['planned']:,} | {r['s']:.1f} | {ph.get('index', 0):.2f} "
            f"| {ph.get('selftest', 0):.2f} | {share:.4f} | {fi:.2f} | {fs:.2f} | {(fi + fs) / cold:.4f} "
            f"| {'reused' if q.get('reused') else 'trained'}: "
            f"{r['index']['type']} | {q.get('trained_on_share')} | {fr.get('described')} / {fr.get('reused')} "
            f"| {r['index']['recall_at_10']} | {r['selftest']['recall_at_1']} / {r['selftest']['recall_at_5']} |"
        )
    print()
    shifted = rows[1:-1]
    mean = sum(
        r["report"]["phases"].get("index", 0) + r["report"]["phases"].get("selftest", 0)
        for _, _, r in shifted
    )
    cold_is = rows[0][2]["report"]["phases"]
    fn_mean = sum(sum(r["fn"]) for _, _, r in shifted) / max(len(shifted), 1)
    print(
        f"index + selftest phases: cold {cold_is.get('index', 0) + cold_is.get('selftest', 0):.2f} s, "
        f"shifted mean {mean / max(len(shifted), 1):.2f} s over {len(shifted)} shifts; the functions alone: "
        f"cold {sum(rows[0][2]['fn']):.2f} s, shifted mean {fn_mean:.2f} s"
    )


if __name__ == "__main__":
    main()
