"""What overlapping windows cost a build: WINDOW_STRIDE=4 against 1, cold and warm, in one run.

For each size, real ``doit build-cache`` processes in fresh homes (one
home per stride, the synthetic provider): a cold build, then the warm
no-op, with per-phase seconds from the JSON reports, peak RSS, the
self-test's recall@1 (final, and stage 1: the index before re-ranking)
and the cache's places.  Printed: each build's
seconds and the ratio of stride 4 to stride 1 (issue 21's targets: cold at
most 2.5x, the no-op unchanged).  No figure is asserted.

    python bench/bench_windows.py [--sizes 10000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_noop import REPO, run_measured  # noqa: E402
from bench_shift import LAT, LON, flight  # noqa: E402


def build(tmp: Path, home: str, f: Path, *args: str) -> tuple[float, int, dict]:
    env = dict(os.environ, CACHEBUILD_HOME=str(tmp / home), XDG_DATA_HOME=str(tmp / home / "data"))
    os.sync()
    seconds, rss, out, _ = run_measured(
        [sys.executable, "-m", "doit", "build-cache", f"FLIGHT={f}", *args, "REPORT=json"],
        env,
        REPO,
    )
    return seconds, rss, json.loads(out.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000")
    args = ap.parse_args()
    print(f"load average at the start: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-windows-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            tile_m = 2 * math.pi * 6378137.0 / 2**17 * math.cos(math.radians(LAT))
            buffer = f"BUFFER_M={math.sqrt(n) * tile_m / 2:.0f}"
            f = flight(Path(tmp) / f"f-{n}.json", LON)
            rows = {}
            for stride in (1, 4):
                home = f"s{stride}-{n}"
                cold = build(Path(tmp), home, f, buffer, f"WINDOW_STRIDE={stride}")
                warm = build(Path(tmp), home, f, buffer, f"WINDOW_STRIDE={stride}")
                rows[stride] = (cold, warm)
            print(f"\nabout {n} tiles ({rows[1][0][2]['tiles']['planned']} planned)")
            print(
                "| stride | places | cold s | describe s | index s | selftest s | peak RSS MB | no-op s "
                "| r@1 | r@1 stage 1 |"
            )
            print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for stride, (cold, warm) in rows.items():
                rep = cold[2]
                ph = rep.get("phases", {})
                print(
                    f"| {stride} | {rep.get('describe', {}).get('windows', '?')} | {cold[0]:.1f} | "
                    f"{ph.get('describe', 0):.1f} | {ph.get('index', 0):.1f} | {ph.get('selftest', 0):.1f} | "
                    f"{cold[1] / 1e6:.0f} | {warm[0]:.2f} | {rep['selftest']['recall_at_1']} | "
                    f"{(rep['selftest'].get('stage1') or {}).get('recall_at_1', '-')} |"
                )
            print(
                f"ratios 4/1: cold {rows[4][0][0] / rows[1][0][0]:.2f}x, "
                f"describe {rows[4][0][2]['phases']['describe'] / rows[1][0][2]['phases']['describe']:.2f}x, "
                f"no-op {rows[4][1][0] / rows[1][1][0]:.2f}x"
            )


if __name__ == "__main__":
    main()
