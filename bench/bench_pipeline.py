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

With ``--companion``, instead: push while fetching (issue 23's third
target).  A real OpenSSH sshd on 127.0.0.1 (tests/_harness/sshd.py) and a
"companion" directory on this machine, as bench_push.py; in one run, on
the same server and CONCURRENCY, a cold ``doit build-cache COMPANION=…``
with (d) ``PIPELINE=0`` (the push starts after the download) and (e)
``PIPELINE=1`` (packs pushed as the tiles arrive), each with a fresh
workstation home and companion.  From each report: the download's end
and the push's end, both from the start of the build's tasks, and their
ratio (target (e) <= 1.10).

    python bench/bench_pipeline.py [--tiles 2000] [--latency-ms 300] [--concurrency 8] [--stride 4]
    python bench/bench_pipeline.py --companion [--tiles 2000] [--latency-ms 40] [--concurrency 8]
        [--rounds 3] [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
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


def _run_build(
    argv: list[str], cwd: Path, env: dict[str, str], what: str
) -> tuple[float, str, dict[str, Any]]:
    """``(wall s, stderr, JSON report)`` of one build; exits naming ``what`` when it fails."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{what} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return wall, p.stderr, json.loads([ln for ln in p.stdout.splitlines() if ln.strip()][-1])


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
    wall, stderr, report = _run_build(argv, REPO, env, f"build PIPELINE={pipeline}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return {
        "wall": wall,
        "rss_mib": int(rss.group(1)) / 1024 if rss else float("nan"),
        "report": report,
    }


def companion_build(
    srv: ServerProcess,
    flight: Path,
    tmp: Path,
    sshd: Any,
    concurrency: int,
    pipeline: str,
    code: Path = REPO,
) -> dict[str, Any]:
    """A cold companion build in fresh homes (``code``: the checkout that builds, here and
    there): the download's and the push's ends (s from the start of the tasks), their ratio,
    the report."""
    tag = f"{pipeline}-{len(list(tmp.glob('ws-*')))}"
    home, chome = tmp / f"ws-{tag}", tmp / f"companion-home-{tag}"
    chome.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEBUILD_")}
    env.update(CACHEBUILD_HOME=str(home), XDG_DATA_HOME=str(home / "data"), PYTHONPATH=str(code))
    cmd = (
        f"env CACHEBUILD_HOME={shlex.quote(str(chome))} XDG_DATA_HOME={shlex.quote(str(chome))} "
        f"PYTHONPATH={shlex.quote(str(code))} {shlex.quote(sys.executable)} -m doit"
    )
    argv = [
        sys.executable, "-m", "doit", "build-cache", f"FLIGHT={flight}", "BUFFER_M=0", "ZOOM=17",
        f"PROVIDER={srv.template()}", f"CONCURRENCY={concurrency}", f"PIPELINE={pipeline}",
        f"COMPANION={sshd.target}", f"SSH_KEY={sshd.client_key}", f"KNOWN_HOSTS={sshd.known_hosts}",
        f"COMPANION_DIR={tmp / f'companion-{tag}'}", f"COMPANION_CMD={cmd}", "REPORT=json",
    ]  # fmt: skip
    wall, _, report = _run_build(argv, code, env, f"companion build PIPELINE={pipeline} ({code})")
    push_end = float(report["pipeline"]["wall_s"])  # from the tasks' start to the push's end
    download_end = push_end - float(report["push"]["after_download_s"])
    return {
        "wall": wall,
        "download_end": download_end,
        "push_end": push_end,
        "ratio": push_end / download_end,
        "report": report,
    }


def main_companion(args: Any) -> None:
    """Push while fetching against the real sshd: (d) PIPELINE=0, (e) PIPELINE=1, and with
    ``--before DIR`` (e') PIPELINE=1 from that checkout; ``--rounds`` of them interleaved."""
    from tests._harness.sshd import Sshd

    runs: list[tuple[str, str, Path]] = [("(d) `PIPELINE=0`", "0", REPO)]
    if args.before is not None:
        runs.append(("(e') `PIPELINE=1`, --before", "1", args.before.resolve()))
    runs.append(("(e) `PIPELINE=1`", "1", REPO))
    got: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in runs}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        box, n = area_of(args.tiles)
        flight = tmp / "flight.json"
        write_flight(flight, box)
        sshd = Sshd(tmp / "sshd").start()
        srv = ServerProcess(args.latency_ms / 1000, 0.0, "1")
        try:
            for _ in range(args.rounds):
                for label, pipeline, code in runs:
                    r = companion_build(srv, flight, tmp, sshd, args.concurrency, pipeline, code)
                    got[label].append(r)
                    print(f"{label}: push end {r['ratio']:.3f}x download end", file=sys.stderr)
        finally:
            srv.close()
            sshd.stop()
    print(
        f"Loopback tile server in its own process, {args.latency_ms:g} ms a request, "
        f"CONCURRENCY={args.concurrency}, {n:,} z17 tiles, a real sshd on 127.0.0.1, "
        f"{os.cpu_count()} CPUs, {args.rounds} round(s) interleaved (median; each run).\n"
    )
    print(
        "| cold companion build | download end s | push end s | push end / download end "
        "| each | push end − download end, each (s) |"
    )
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for label, rs in got.items():
        m = sorted(rs, key=lambda r: r["ratio"])[len(rs) // 2]
        each = ", ".join(f"{r['ratio']:.3f}" for r in rs)
        after = ", ".join(f"{r['push_end'] - r['download_end']:.2f}" for r in rs)
        print(
            f"| {label} | {m['download_end']:.1f} | {m['push_end']:.1f} | {m['ratio']:.3f} "
            f"| {each} | {after} |"
        )
    print("\n(target: (e) <= 1.10)")
    d, e = got[runs[0][0]][-1], got[runs[-1][0]][-1]
    for label, r in (("d", d), ("e", e)):
        phases = {k: round(v, 2) for k, v in r["report"]["phases"].items()}
        print(f"\n({label}) phases: {json.dumps(phases)}")
        print(f"({label}) push: {json.dumps(r['report']['push'])}")
        print(f"({label}) pipeline: {json.dumps(r['report']['pipeline'])}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--latency-ms", type=float, default=300.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--companion", action="store_true", help="push while fetching: (d), (e)")
    ap.add_argument(
        "--rounds", type=int, default=1, help="companion: rounds of the runs, interleaved"
    )
    ap.add_argument(
        "--before", type=Path, default=None, help="companion: another checkout's (e), interleaved"
    )
    args = ap.parse_args()
    if args.companion:
        main_companion(args)
        return
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
