"""Describe while fetching (PIPELINE, issue 23): a cold build against its download alone.

The tile server of bench/bench_fetch.py runs on 127.0.0.1 in its own
process, answering every request after LATENCY ms, every tile a distinct
JPEG; the latency is chosen so that the download alone takes clearly
longer than describing.  In one run, on the same server and CONCURRENCY:

(a) fetch only: ``fetch_tiles`` of the area into a fresh store (the download alone);
(b) a cold ``doit build-cache`` with ``PIPELINE=0`` (phase after phase: today's);
(c) a cold ``doit build-cache`` with ``PIPELINE=1`` (describe while fetching).

Each build runs in a fresh home under GNU ``time -v`` (peak RSS).  Prints
c/a and b/a (target c/a <= 1.15), each build's phases and the pipeline
report of (c).

    python bench/bench_pipeline.py [--tiles 2000] [--latency-ms 300] [--concurrency 8] [--stride 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fetch import ServerProcess, area_of  # noqa: E402


def write_flight(path: Path, box: Any) -> None:
    """A flight whose two waypoints are the box's corners (with BUFFER_M=0 its area is the box)."""
    w, s, e, n = box
    wps = [(n - 1e-6, w + 1e-6), (s + 1e-6, e - 1e-6)]
    doc = {
        "waypoints": [{"lat": a, "lon": b, "alt_m": 120.0} for a, b in wps],
        "takeoff_origin": None,
    }
    path.write_text(json.dumps(doc))


def fetch_only(srv: ServerProcess, box: Any, tmp: Path, concurrency: int) -> float:
    from cachebuild.tiles.fetch import fetch_tiles

    t0 = time.perf_counter()
    s = fetch_tiles(
        bbox=box, zooms=[17], provider_spec=srv.template(), store_root=tmp / "store",
        out_dir=tmp / "out", env={}, concurrency=concurrency, progress=False,
    )  # fmt: skip
    assert s["missing"] == 0, s
    return time.perf_counter() - t0


def build(
    srv: ServerProcess, flight: Path, tmp: Path, concurrency: int, stride: int, pipeline: str
) -> dict[str, Any]:
    """A cold build in a fresh home: ``(wall s, peak RSS MiB, report)``."""
    home = tmp / f"home-{pipeline}"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEBUILD_")}
    env.update(CACHEBUILD_HOME=str(home), XDG_DATA_HOME=str(home / "data"))
    env["PYTHONPATH"] = str(REPO)
    argv = [
        "/usr/bin/time", "-v", sys.executable, "-m", "doit", "build-cache", f"FLIGHT={flight}",
        "BUFFER_M=0", "ZOOM=17", f"PROVIDER={srv.template()}", f"CONCURRENCY={concurrency}",
        f"WINDOW_STRIDE={stride}", f"PIPELINE={pipeline}", "REPORT=json",
    ]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"build PIPELINE={pipeline} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    report = json.loads([ln for ln in p.stdout.splitlines() if ln.strip()][-1])
    return {
        "wall": wall,
        "rss_mib": int(rss.group(1)) / 1024 if rss else float("nan"),
        "report": report,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--latency-ms", type=float, default=300.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--stride", type=int, default=4)
    args = ap.parse_args()
    from cachebuild.inputs.flight import flight_area, load_flight_file
    from cachebuild.tilemath import count_tiles

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        box, _ = area_of(args.tiles)
        flight = tmp / "flight.json"
        write_flight(flight, box)
        area = flight_area(load_flight_file(flight), 0.0)
        n = count_tiles(area, [17])
        srv = ServerProcess(args.latency_ms / 1000, 0.0, "1")
        try:
            (tmp / "a").mkdir()
            a = fetch_only(srv, area, tmp / "a", args.concurrency)
            print(f"(a) fetch only: {a:.1f} s", file=sys.stderr)
            b = build(srv, flight, tmp, args.concurrency, args.stride, "0")
            print(f"(b) PIPELINE=0: {b['wall']:.1f} s", file=sys.stderr)
            c = build(srv, flight, tmp, args.concurrency, args.stride, "1")
            print(f"(c) PIPELINE=1: {c['wall']:.1f} s", file=sys.stderr)
        finally:
            srv.close()
    _print(args, n, a, b, c)


def _print(args: Any, n: int, a: float, b: dict[str, Any], c: dict[str, Any]) -> None:
    desc_b = float(b["report"]["phases"].get("describe", 0.0))
    print(
        f"Loopback tile server in its own process, {args.latency_ms:g} ms a request, "
        f"CONCURRENCY={args.concurrency}, {n:,} z17 tiles, WINDOW_STRIDE={args.stride}, "
        f"{os.cpu_count()} CPUs.\n"
    )
    print("| run | wall s | vs (a) | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| (a) fetch only (the download alone) | {a:.1f} | 1.00 | |")
    for label, r in (("(b) cold build, PIPELINE=0", b), ("(c) cold build, PIPELINE=1", c)):
        print(f"| {label} | {r['wall']:.1f} | {r['wall'] / a:.2f} | {r['rss_mib']:.0f} |")
    slower = max(a, desc_b)
    print(
        f"\nc/a = {c['wall'] / a:.2f} (target <= 1.15), b/a = {b['wall'] / a:.2f}; "
        f"describe alone (b's describe task) {desc_b:.1f} s: c / max(download, describe) = "
        f"{c['wall'] / slower:.2f}"
    )
    for label, r in (("b", b), ("c", c)):
        phases = {k: round(v, 1) for k, v in r["report"]["phases"].items()}
        print(f"\n({label}) phases: {json.dumps(phases)}")
    print(f"\n(c) pipeline: {json.dumps(c['report'].get('pipeline'))}")


if __name__ == "__main__":
    main()
