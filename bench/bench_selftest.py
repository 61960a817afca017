"""Self-test recall on the demo flight and a larger one, by frame offset and model.

Builds each flight with `doit build-cache` (default model, cbnet-v2), then
runs :func:`cachebuild.localize.selftest.run_selftest` on the built cache with more
frames than a build uses, at three largest frame-centre offsets: 1/8 tile
and 1/4 (the self-test's near-centre frames, a quarter as many) and 1/2
(the centre anywhere in the tile: what a build reports since issue 21).
For comparison the same caches are built with cbnet-v1, the previous
default, rebuilt from the git history (skipped where git is not there).

    python bench/bench_selftest.py [--large 10000] [--queries 500]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_noop import REPO, run_measured

V1_COMMIT = "9fac0fe"  # the seed: cbnet-v1
OFFSETS = (0.125, 0.25, 0.5)


def v1_model(path: Path) -> Path | None:
    """cbnet-v1's ONNX file, built by its own code from the git history."""
    try:
        src = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{V1_COMMIT}:cachebuild/engine/model.py"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    mod_path = path.with_suffix(".py")
    mod_path.write_text(src)
    spec = importlib.util.spec_from_file_location("cbnet_v1", mod_path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path.write_bytes(mod.build_default_model())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--large", type=int, default=10_000, help="tiles of the larger flight")
    ap.add_argument("--queries", type=int, default=500, help="frames per offset")
    args = ap.parse_args()
    from cachebuild.localize.selftest import run_selftest

    doit = [sys.executable, "-m", "doit"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-selftest-") as tmp:
        env = dict(os.environ, CACHEBUILD_HOME=str(Path(tmp) / "home"))
        large = Path(tmp) / "large.json"
        lat = 47.42
        large.write_text(json.dumps({"waypoints": [{"lat": lat, "lon": 8.62, "alt_m": 100}]}))
        side = math.sqrt(args.large) * 2 * math.pi * 6378137.0 / 2**17 * math.cos(math.radians(lat))
        flights = [
            ("demo", [f"FLIGHT={REPO / 'examples' / 'flights' / 'demo.json'}"]),
            ("larger", [f"FLIGHT={large}", f"BUFFER_M={side / 2:.0f}"]),
        ]
        models = [("cbnet-v2 (default)", [])]
        v1 = v1_model(Path(tmp) / "cbnet-v1.onnx")
        if v1 is not None:
            models.append(("cbnet-v1", [f"MODEL={v1}"]))
        for fname, fargs in flights:
            for mname, margs in models:
                cache = Path(tmp) / f"cache-{fname}-{len(rows)}"
                print(f"{fname}, {mname}: building ...", file=sys.stderr, flush=True)
                _, _, out, _ = run_measured(
                    [*doit, "build-cache", *fargs, *margs, f"CACHE_DIR={cache}", "REPORT=json"],
                    env,
                    REPO,
                )
                rep = json.loads(out.splitlines()[-1])
                b = cache / "state" / "build"
                index = json.loads((b / "index.json").read_text())
                res = {}
                for off in OFFSETS[:-1]:
                    r = run_selftest(
                        build_dir=b, store_root=Path(tmp) / "home" / "store", engine_dir=b / "engine",
                        index_path=b / "index.faiss", queries=args.queries, max_offset=off,
                    )  # fmt: skip
                    # near_centre: a quarter of the frames, centres within off of a tile centre
                    a = r["near_centre"]
                    res[off] = (a["recall_at_1"], a["recall_at_5"], a["queries"])
                    # the headline: every frame, centred anywhere (issue 21)
                    res[0.5] = (r["recall_at_1"], r["recall_at_5"], r["queries"])
                rows.append(
                    (fname, rep["tiles"]["planned"], mname, index["type"], rep["selftest"], res)
                )
    print(f"up to {args.queries} frames at offsets 1/8 and 1/4, a quarter as many at 1/2 (fewer where fewer "
          "tiles have all eight neighbours); rotation +-10 deg, scale +-10 %, brightness x(1 +- 0.2) +- 10")  # fmt: skip
    print()
    head = " | ".join(f"offset <= {o:g} tile: r@1 / r@5 (frames)" for o in OFFSETS)
    print(f"| flight | tiles | model | index | {head} | build's own self-test r@1 / r@5 |")
    print("| --- | ---: | --- | --- | " + " | ".join("---" for _ in OFFSETS) + " | --- |")
    for fname, tiles, mname, kind, own, res in rows:
        cells = " | ".join(f"{res[o][0]:.3f} / {res[o][1]:.3f} ({res[o][2]})" for o in OFFSETS)
        print(
            f"| {fname} | {tiles:,} | {mname} | {kind} | {cells} | "
            f"{own['recall_at_1']} / {own['recall_at_5']} ({own['queries']} frames) |"
        )


if __name__ == "__main__":
    main()
