"""Real imagery: recall and position error of frames centred anywhere, on a NAIP orthophoto at z17.

Builds caches from a real orthophoto (a USDA NAIP quarter quad, public
domain, 5 m: tests/data/real/README.md) through the GeoTIFF provider
(``PROVIDER=<file>.tif``, zoom 17, the built-in model), one per area size
(``BUFFER_M`` around a fixed flight) and window stride, and measures frames
centred anywhere (rotated +-10 degrees, rescaled +-10%, re-lit) three ways:

- ``self-test``: the build's own self-test, from its report (frames cut
  from the cache's tiles, at most one per interior tile);
- ``client``: frames cut from the orthophoto itself (GDAL, not the tiles)
  by an onboard client that reads only the cache's documented files
  (tests/_harness/realimagery.py), its results scored by the build's own
  scoring (:func:`cachebuild.localize.selftest_score.score`: a hit is a
  place holding half the frame's ground);
- ``other year``: the client's frames cut from the same ground flown in
  another year and season (2014-07-20; the cache is built from 2020-08-31).

Where the cache has a second stage (windows.json's ``cells``) the
self-test and the client re-rank the index's first candidates by their
cells; ``stage 1`` rows give the index's order alone, and ``--rerank K:S``
rows the second stage with K candidates and shifts of up to S cells.

Stride 1 (one descriptor per tile) is the baseline; 4 is the default.
Prints tiles, indexed places, frames, recall@1, recall@5, median and p95
position error in metres.  No figure is asserted.

    .venv/bin/python bench/bench_real.py [--buffers 900 1300] [--strides 1 4 8] [--frames 300] [--imagery DIR]
        [--rerank 100:1 200:1 50:2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cachebuild.localize.selftest_score import score  # noqa: E402
from tests._harness import realimagery as ri  # noqa: E402

Z = 17


def build(home: Path, ortho: Path, flight: Path, buffer_m: int, stride: int) -> dict[str, Any]:
    """One build in ``home`` (a real ``doit build-cache`` process); its JSON report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEBUILD_")}
    env.update(CACHEBUILD_HOME=str(home), XDG_DATA_HOME=str(home / "data"))
    argv = [sys.executable, "-m", "doit", "build-cache", f"FLIGHT={flight}"]
    argv += [f"PROVIDER={ortho}", f"ZOOM={Z}", f"BUFFER_M={buffer_m}"]
    argv += [f"WINDOW_STRIDE={stride}", "SELFTEST_QUERIES=400", "REPORT=json"]
    p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"build failed (exit {p.returncode}):\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def client_figures(
    client: ri.OnboardClient, ortho: Path, frames: Any, stage2: bool = True
) -> dict[str, Any]:
    """The client's frames cut from ``ortho``, searched (both stages, or the index's order alone) and scored."""
    area = client.area(Z)
    ground = ri.Ground(ortho, area)
    images = np.stack([ri.cut(ground, f) for f in frames])
    ids, rows = client.search(images, k=5, stage2=stage2)
    x, y = np.floor(frames[:, 0]).astype(np.int64), np.floor(frames[:, 1]).astype(np.int64)
    params = np.column_stack([frames[:, 0] - x - 0.5, frames[:, 1] - y - 0.5, frames[:, 2:]])
    out = score(ids, x, y, np.full(len(x), Z), params)
    # the documented route (positions.npy footprints) must agree with the build's scoring
    hits = ri.footprint_hits(rows, frames, Z)
    assert abs(float(hits[:, 0].mean()) - out["recall_at_1"]) < 1e-3, "positions.npy disagrees"
    return out


def row(label: str, tiles: int, places: int, f: dict[str, Any]) -> str:
    def m(v: Any) -> str:
        return "inf" if v is None else f"{v:.0f}"

    return (
        f"| {label} | {tiles} | {places:,} | {f['frames']} | {f['recall_at_1']:.3f} | "
        f"{f['recall_at_5']:.3f} | {m(f['median_error_m'])} | {m(f['p95_error_m'])} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--buffers", type=int, nargs="+", default=[900, 1300])
    ap.add_argument("--strides", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument(
        "--rerank",
        nargs="*",
        default=[],
        metavar="K:S",
        help="also run the client's second stage with K candidates and shifts of up to S cells",
    )
    ap.add_argument("--imagery", type=Path, help=f"the imagery directory (else ${ri.IMAGERY_ENV}…)")
    args = ap.parse_args()
    if args.imagery:
        os.environ[ri.IMAGERY_ENV] = str(args.imagery)
    ortho, other = ri.find_imagery(ri.NAIP_2020), ri.find_imagery(ri.NAIP_2014)
    if ortho is None:
        raise SystemExit(f"no {ri.NAIP_2020} in {ri.imagery_dirs()} (tests/data/real/README.md)")
    print(
        f"# {ortho.name} (cache), {other.name if other else 'no other year'}; z{Z}, built-in model"
    )
    print(
        "| area, stride: frames from | tiles | places | frames | recall@1 | recall@5 | median m | p95 m |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        flight = ri.write_flight(Path(tmp) / "flight.json")
        for buffer_m in args.buffers:
            home = Path(tmp) / f"home-{buffer_m}"  # one store per area: tiles cut once
            home.mkdir()
            for stride in args.strides:
                t0 = time.perf_counter()
                report = build(home, ortho, flight, buffer_m, stride)
                seconds = time.perf_counter() - t0
                client = ri.OnboardClient(home / "cache" / "current")
                tiles, places = report["tiles"]["planned"], client.index.ntotal
                st = report["selftest"]
                own = {
                    "frames": st["queries"],
                    **{k: st[k] for k in ("recall_at_1", "recall_at_5")},
                    **{k: st[k] for k in ("median_error_m", "p95_error_m")},
                }
                label = f"{buffer_m} m, stride {stride}"
                print(row(f"{label}: self-test ({seconds:.0f} s build)", tiles, places, own))
                if st.get("stage1"):
                    first = {"frames": st["queries"], **st["stage1"]}
                    print(row(f"{label}: self-test, stage 1", tiles, places, first))
                frames = ri.draw_frames(client.area(Z), args.frames, args.seed)
                print(row(f"{label}: client", tiles, places, client_figures(client, ortho, frames)))
                if client.cells:
                    f = client_figures(client, ortho, frames, stage2=False)
                    print(row(f"{label}: client, stage 1", tiles, places, f))
                    built = dict(client.cells)
                    for ks in args.rerank:  # the re-ranking's settings, tried on the same frames
                        k, shifts = (int(v) for v in ks.split(":"))
                        client.cells.update(candidates=k, offsets=shifts)
                        f = client_figures(client, ortho, frames)
                        print(row(f"{label}: client, {k} candidates, ±{shifts}", tiles, places, f))
                    client.cells = built
                if other is not None:
                    f = client_figures(client, other, frames)
                    print(row(f"{label}: client, other year", tiles, places, f))
                sys.stdout.flush()


if __name__ == "__main__":
    main()
