"""Flow control: the tiles phase against servers that say "slow down" (429).

A loopback tile server in its own process (so it does not share the
client's GIL) serves distinct tiles (every JPEG differs by a comment
segment), after ``--latency-ms``, and answers 429 by a policy:

(1) ``share``: 20 % of all requests, retries included, 429 with
    ``Retry-After: 1``.  Target: 0 tiles lost, requests <= 1.5 x tiles.
(2) ``rate``: it serves at most R requests a second (a bucket of 3: a
    burst of 3 passes) and answers 429 above it, without ``Retry-After``.  Target: throughput
    >= 0.85 R, 429s <= 10 % of requests after the first 3 seconds.
(3) ``none``: no 429.  Target: no slower than before this change (the
    code at ``--before``, run from a ``git archive`` in the same run), and
    >= 10 x the naive loop (one ``httpx.get`` per tile, one at a time).
(4) nothing listening: ``doit build-cache`` exits 20 within 5 s.
(5) a Flights API answering 429 with ``Retry-After: 1`` twice, then the flight.
(6) revalidation: ``doit build-cache`` cold, then the server's imagery
    changes for a third of the tiles, then a rebuild with ``TILE_MAX_AGE=0``;
    a line per ``--reval-pattern``: ``scattered`` (every third tile of the
    fetch order: nearly every anchor's block holds one, the worst case) and
    ``block`` (the western third, contiguous, as providers publish survey
    blocks); code in ``flow_reval.py``.  Target: it downloads exactly those (the rest 304), describes only
    what depends on them (with windows: the anchors whose block covers a
    changed tile, counted here from the tile grid), and takes at most half
    the cold build's time: the median over ``--reval-runs`` pairs (at
    least 3) of rebuild / cold, each cold build in the same pair, with
    Python's bytecode cached for both (and the median ratio of the builds'
    CPU seconds, less moved by other load).

Rows (1) and (3) run the code at ``--before`` too, in the same run; row (6)
the code at ``--reval-before`` when given (its pairs interleaved with this
tree's).

    python bench/bench_flow.py [--before 8759e87] [--rate 100] [--latency-ms 5]
        [--rows 1,2,3,4,5,6] [--reval-buffer-m 500] [--reval-runs 11] [--reval-change pixels]
        [--reval-before REV] [--reval-pattern scattered,block]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import flow_reval  # noqa: E402  (row 6)

# -- the server (its own process) --------------------------------------------


def serve(cfg: dict[str, Any]) -> None:
    """Run the tile server; print its port; run until stdin closes."""
    import random
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cachebuild.providers.synthetic import synthetic_tile_bytes
    from cachebuild.tilemath import Tile

    bases = [synthetic_tile_bytes(Tile(68600 + i, 45900, 17)) for i in range(16)]
    log: list[tuple[float, int]] = []
    lock = threading.Lock()
    rng = random.Random(7)
    state = {"tat": time.monotonic()}
    t0 = time.monotonic()

    def throttle() -> bool:
        if cfg["mode"] == "share":
            return rng.random() < cfg["share"]
        if cfg["mode"] == "rate":
            now = time.monotonic()
            tat = max(state["tat"], now)
            if tat - now > (cfg["burst"] - 1) / cfg["rate"] + 1e-9:
                return True
            state["tat"] = tat + 1.0 / cfg["rate"]
        return False

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *a: Any) -> None:
            pass

        def _send(self, status: int, data: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/stats":
                with lock:
                    data = json.dumps(log).encode()
                self._send(200, data, {"Content-Type": "application/json"})
                return
            time.sleep(cfg["latency_s"])
            with lock:
                th = throttle()
                log.append((time.monotonic() - t0, 429 if th else 200))
            if th:
                headers = {"Retry-After": cfg["retry_after"]} if cfg.get("retry_after") else {}
                self._send(429, b"slow down", headers)
                return
            z, x, y = (int(p) for p in self.path.rsplit(".", 1)[0].strip("/").split("/")[-3:])
            base = bases[(x * 7 + y) % len(bases)]
            note = self.path.encode()
            body = base[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + base[2:]
            self._send(200, body, {"Content-Type": "image/jpeg"})

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(httpd.server_address[1], flush=True)
    sys.stdin.read()


class ServerProcess:
    def __init__(self, **cfg: Any):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def template(self) -> str:
        return f"http://127.0.0.1:{self.port}/{{z}}/{{x}}/{{y}}.jpg"

    def log(self) -> list[tuple[float, int]]:
        import httpx

        return [tuple(r) for r in httpx.get(f"http://127.0.0.1:{self.port}/stats").json()]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait()


# -- clients ------------------------------------------------------------------

FETCH = """
import json, sys, time
from pathlib import Path
from cachebuild.tiles.fetch import fetch_tiles
from cachebuild.tilemath import LngLatBbox
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
try:
    s = fetch_tiles(bbox=LngLatBbox(*a["box"]), zooms=[17], provider_spec=a["template"],
                    store_root=Path(a["tmp"]) / "store", out_dir=Path(a["tmp"]) / "out",
                    env=a["env"], concurrency=a["concurrency"], progress=False)
    out = {"present": s["present"], "error": None}
except Exception as exc:
    out = {"present": 0, "error": str(exc)[:200]}
out["seconds"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def fetch(
    code: Path, srv: ServerProcess, box: Any, tmp: Path, *, concurrency: int = 8, **env: str
) -> dict[str, Any]:
    """fetch_tiles of the code under ``code`` (this tree, or an archive of --before), in a child."""
    arg = {
        "box": list(box),
        "template": srv.template(),
        "tmp": str(tmp),
        "concurrency": concurrency,
        "env": {"HTTP_TIMEOUT": "20", "HTTP_RETRIES": "3", "HTTP_BACKOFF": "0.2", **env},
    }
    tmp.mkdir(parents=True, exist_ok=True)
    environ = {**os.environ, "PYTHONPATH": str(code)}
    p = subprocess.run(
        [sys.executable, "-c", FETCH, json.dumps(arg)],
        capture_output=True,
        text=True,
        env=environ,
        cwd=tmp,
    )
    if p.returncode:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def area_of(n_tiles: int) -> Any:
    import math

    from cachebuild.tilemath import LngLatBbox, count_tiles

    side = math.ceil(math.sqrt(n_tiles))
    w, n = 8.45, 47.45
    dx = 360 / 2**17
    dy = dx * math.cos(math.radians(n))
    box = LngLatBbox(w + 1e-6, n - side * dy, w + side * dx - 1e-6, n)
    return box, count_tiles(box, [17])


def naive(srv: ServerProcess, box: Any, limit: int) -> float:
    """Tiles a second of one ``httpx.get`` per tile, one at a time."""
    import httpx

    from cachebuild.tilemath import tiles

    wanted = list(tiles(box, [17]))[:limit]
    t0 = time.perf_counter()
    for t in wanted:
        httpx.get(f"http://127.0.0.1:{srv.port}/{t.z}/{t.x}/{t.y}.jpg", timeout=20)
    return len(wanted) / (time.perf_counter() - t0)


def archive(rev: str, dest: Path, paths: tuple[str, ...] = ("cachebuild",)) -> Path:
    tar = subprocess.run(["git", "archive", rev, *paths], cwd=REPO, capture_output=True)
    if tar.returncode:
        raise SystemExit(tar.stderr.decode())
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar.stdout, check=True)
    return dest


# -- the rows -----------------------------------------------------------------


def row_share(code: dict[str, Path], tmp: Path, latency_s: float, n_tiles: int) -> list[str]:
    box, n = area_of(n_tiles)
    out = []
    for name, path in code.items():
        srv = ServerProcess(mode="share", share=0.2, retry_after="1", latency_s=latency_s)
        try:
            r = fetch(path, srv, box, tmp / f"share-{name}")
            log = srv.log()
        finally:
            srv.close()
        lost = n - r["present"]
        ratio = len(log) / n
        ok = "PASS" if lost == 0 and ratio <= 1.5 and not r["error"] else "FAIL"
        got = f"failed: {r['error'][:70]}…" if r["error"] else f"{lost} lost"
        out.append(
            f"| (1) 20 % 429, Retry-After: 1 | {name} | {n} tiles, {got}, "
            f"{ratio:.2f} requests/tile, {r['seconds']:.1f} s | {ok if name == 'now' else ''} |"
        )
    return out


def row_rate(here: Path, tmp: Path, latency_s: float, rate: float, seconds: float) -> list[str]:
    box, n = area_of(int(rate * seconds))
    srv = ServerProcess(mode="rate", rate=rate, burst=3, latency_s=latency_s)
    try:
        r = fetch(here, srv, box, tmp / "rate", concurrency=8, FETCH_DEADLINE="10m")
        log = srv.log()
    finally:
        srv.close()
    after = [s for t, s in log if t >= 3.0]
    span = max(t for t, _ in log) - 3.0
    good = sum(1 for s in after if s == 200)
    thr = good / span / rate
    share = sum(1 for s in after if s == 429) / max(len(after), 1)
    ok = "PASS" if thr >= 0.85 and share <= 0.10 and r["present"] == n else "FAIL"
    return [
        f"| (2) serves {rate:g} req/s, 429 above | now | {n} tiles, {n - r['present']} lost, "
        f"after 3 s: {thr:.2f} R, {share:.1%} 429s, {r['seconds']:.1f} s | {ok} |"
    ]


def row_none(code: dict[str, Path], tmp: Path, latency_s: float, n_tiles: int) -> list[str]:
    box, n = area_of(n_tiles)
    rates = {}
    srv = ServerProcess(mode="none", latency_s=latency_s)
    try:
        base = naive(srv, box, min(n, 300))
        for i in range(3):  # best of three, interleaved: the machine is shared
            for name, path in code.items():
                r = fetch(path, srv, box, tmp / f"none-{name}-{i}")
                rates[name] = max(rates.get(name, 0.0), r["present"] / r["seconds"])
    finally:
        srv.close()
    now, before = rates["now"], rates.get("before", rates["now"])
    ok = "PASS" if now >= 0.9 * before and now >= 10 * base else "FAIL"
    return [
        f"| (3) no 429 | now vs before | {n} tiles: {now:,.0f} vs {before:,.0f} tiles/s "
        f"({now / before:.2f}x), {now / base:.1f}x the naive loop ({base:,.0f}/s) | {ok} |"
    ]


def row_dead(tmp: Path) -> list[str]:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    flight = tmp / "f.json"
    flight.write_text(
        json.dumps(
            {
                "takeoff_origin": {"lat": 47.37, "lon": 8.54, "alt_m": 400},
                "waypoints": [{"lat": 47.37, "lon": 8.54, "alt_m": 100}],
            }
        )
    )
    env = {**os.environ, "CACHEBUILD_HOME": str(tmp / "home")}
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            str(Path(sys.executable).parent / "doit"),
            "build-cache",
            f"FLIGHT={flight}",
            "BUFFER_M=300",
            f"PROVIDER=http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.jpg",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    sec = time.perf_counter() - t0
    ok = "PASS" if p.returncode == 20 and sec <= 5 else "FAIL"
    return [f"| (4) nothing listening | now | exit {p.returncode} in {sec:.1f} s | {ok} |"]


def row_flights() -> list[str]:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    fid = "3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b"
    flight = {
        "flight_id": fid,
        "takeoff_origin": {"lat": 47.37, "lon": 8.54, "alt_m": 400},
        "waypoints": [{"lat": 47.37, "lon": 8.54, "alt_m": 100}],
    }
    hits = []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            hits.append(time.monotonic())
            if len(hits) <= 2:
                self.send_response(429)
                self.send_header("Retry-After", "1")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = json.dumps(flight).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    from cachebuild.inputs.flights_api import fetch_flight

    t0 = time.perf_counter()
    try:
        got, _ = fetch_flight(fid, url=f"http://127.0.0.1:{httpd.server_address[1]}", token="t")
        result = "PASS" if got.flight_id == fid else "FAIL"
        what = f"the flight after {len(hits)} requests"
    except Exception as exc:
        result, what = "FAIL", f"{type(exc).__name__}: {str(exc)[:80]}"
    finally:
        httpd.shutdown()
    sec = time.perf_counter() - t0
    return [
        f"| (5) Flights API: 429 (Retry-After: 1) twice | now | {what}, {sec:.1f} s | {result} |"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--before", default="8759e87", help="the code to compare with (git rev)")
    ap.add_argument("--latency-ms", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=100.0, help="R of row (2), requests/s")
    ap.add_argument("--rate-seconds", type=float, default=15.0)
    ap.add_argument("--share-tiles", type=int, default=100)
    ap.add_argument("--tiles", type=int, default=2000, help="tiles of row (3)")
    ap.add_argument("--reval-buffer-m", type=float, default=500.0)
    ap.add_argument(
        "--reval-runs",
        type=int,
        default=11,
        help="row (6): pairs, the median taken",
    )
    ap.add_argument("--reval-change", choices=("pixels", "bytes"), default="pixels", help="row (6)")
    ap.add_argument(
        "--reval-before", default=None, help="row (6): also run this git rev's code, interleaved"
    )
    ap.add_argument(
        "--reval-pattern",
        default=",".join(flow_reval.PATTERNS),
        help="row (6): which third changes, comma-separated: scattered (every third tile), "
        "block (the western third); a line each",
    )
    ap.add_argument("--rows", default="1,2,3,4,5,6")
    args = ap.parse_args()
    latency = args.latency_ms / 1000
    rows = set(args.rows.split(","))
    lines = ["| server | code | result | target |", "| --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        code = {"now": REPO, "before": archive(args.before, Path(tempfile.mkdtemp(dir=tmp)))}
        if "1" in rows:
            lines += row_share(code, tmp, latency, args.share_tiles)
        if "2" in rows:
            lines += row_rate(REPO, tmp, latency, args.rate, args.rate_seconds)
        if "3" in rows:
            lines += row_none(code, tmp, latency, args.tiles)
        if "4" in rows:
            lines += row_dead(tmp)
        if "5" in rows:
            lines += row_flights()
        if "6" in rows:
            reval = {"now": REPO}
            if args.reval_before:
                where = Path(tempfile.mkdtemp(dir=tmp))
                before = archive(args.reval_before, where, flow_reval.BUILD_PATHS)
                reval = {args.reval_before: before, **reval}
            lines += flow_reval.row_revalidate(
                tmp, args.reval_buffer_m, max(3, args.reval_runs), args.reval_change,
                tuple(args.reval_pattern.split(",")), reval,
            )  # fmt: skip
    print(f"before = {args.before}; loopback latency {args.latency_ms:g} ms\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    else:
        main()
