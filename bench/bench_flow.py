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
    changes for a third of the tiles, then a rebuild with ``TILE_MAX_AGE=0``.
    Target: it downloads exactly those (the rest 304), describes only
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
        [--rows 1,2,3,4,5,6] [--reval-buffer-m 500] [--reval-runs 5] [--reval-change pixels]
        [--reval-before REV]
"""

from __future__ import annotations

import argparse
import functools
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


@functools.lru_cache(maxsize=8192)
def _repainted(t: Any, version: int) -> bytes:
    """``t``'s imagery at ``version``: new pixels (a painted square), not only new bytes.

    Cached: the server asks for it on every request, 304s included.
    """
    import io

    from PIL import Image, ImageDraw

    from tests._harness.tileserver import tile_bytes

    if version == 0:
        return tile_bytes(t)
    im = Image.open(io.BytesIO(tile_bytes(t))).convert("RGB")
    shade = (40 * version) % 256
    ImageDraw.Draw(im).rectangle([64, 64, 191, 191], fill=(shade, 255 - shade, 128))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _reval_flight(tmp: Path) -> Path:
    flight = tmp / "reval.json"
    flight.write_text(
        json.dumps(
            {
                "takeoff_origin": {"lat": 47.37, "lon": 8.54, "alt_m": 400},
                "waypoints": [
                    {"lat": 47.37, "lon": 8.54, "alt_m": 100},
                    {"lat": 47.375, "lon": 8.55, "alt_m": 100},
                ],
            }
        )
    )
    return flight


def _reval_once(
    home: Path, flight: Path, buffer_m: float, env: dict[str, str], code: Path = REPO
) -> dict[str, Any]:
    """One cold build in a fresh ``home``, a third of the imagery changed, one rebuild, by ``code``."""
    from cachebuild.inputs.flight import flight_area, load_flight_file
    from cachebuild.tilemath import Tile, tiles
    from tests._harness.etagserver import EtagServer
    from tests._harness.tileserver import tile_bytes

    wanted = sorted(tiles(flight_area(load_flight_file(flight), buffer_m), [17]))
    for t in wanted:  # the server's imagery ready, as a real server's is: not made on first ask
        tile_bytes(t)
    srv = EtagServer()
    args = [
        str(Path(sys.executable).parent / "doit"),
        "build-cache",
        f"FLIGHT={flight}",
        f"BUFFER_M={buffer_m:g}",
        "ZOOM=17",
        f"PROVIDER={srv.template(query='')}",
        "REPORT=json",
    ]
    run_env = {**env, "CACHEBUILD_HOME": str(home)}
    if code != REPO:
        run_env["PYTHONPATH"] = str(code)

    def build(*extra: str) -> tuple[float, float, dict[str, Any]]:
        """Wall and CPU seconds (the build's process, user + system) and the report."""
        c0, t0 = _children_cpu(), time.perf_counter()
        p = subprocess.run([*args, *extra], capture_output=True, text=True, env=run_env, cwd=code)
        sec, cpu = time.perf_counter() - t0, _children_cpu() - c0
        if p.returncode:
            raise SystemExit(p.stderr[-2000:])
        return sec, cpu, json.loads(p.stdout.strip().splitlines()[-1])

    try:
        cold, cold_cpu, cold_rep = build()
        changed = wanted[::3]
        for t in changed:
            srv.change(t)
        srv.downloads.clear()
        warm, warm_cpu, rep = build("TILE_MAX_AGE=0")
        exact = set(srv.downloads) == set(changed)
        hit = set(changed)
        covering = (
            sum(  # anchors whose block covers a changed tile (itself, right, lower, diagonal)
                any(
                    Tile(t.x + dx, t.y + dy, t.z) in hit
                    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1))
                )
                for t in wanted
            )
        )
        down, n304 = sum(srv.downloads.values()), sum(srv.not_modified.values())
    finally:
        srv.close()
    return {
        "tiles": len(wanted),
        "changed": len(changed),
        "cold": cold,
        "warm": warm,
        "cpu": warm_cpu / cold_cpu,
        "exact": exact,
        "downloaded": down,
        "not_modified": n304,
        "described": rep["descriptors"]["computed"],
        "anchors": cold_rep["descriptors"]["computed"],
        "covering": covering,
        "phases": {k: (rep["phases"].get(k, 0.0), cold_rep["phases"].get(k, 0.0)) for k in PHASES},
    }


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


#: The phases row (6) shows, rebuild / cold seconds (medians).
PHASES = ("tiles", "describe", "index", "selftest", "preview", "total")


def row_revalidate(
    tmp: Path, buffer_m: float, runs: int, change: str, before: str | None = None
) -> list[str]:
    """Row (6): the median of ``runs`` (cold build, rebuild) pairs, each ratio from its own pair.

    Python's bytecode is cached (under ``tmp``, never in the repository or
    the environment) and one pair runs first untimed, so that neither build
    pays for compiling the modules it imports, as no installed tool does
    after its first run; the server has every tile's image made before the
    cold build asks (the synthetic imagery costs the server ~1 ms a tile to
    make, which no real server spends while answering).  ``change``: ``pixels`` paints a square on the
    changed tiles (new descriptors, a new index), ``bytes`` changes only
    their bytes (a JPEG comment: the same pixels).  ``before``: a git rev
    whose code (from a ``git archive``) runs the same pairs, interleaved
    with this tree's, in the same run.
    """
    from tests._harness import etagserver

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    flight = _reval_flight(tmp)
    code = {"now": REPO}
    if before:
        where = Path(tempfile.mkdtemp(dir=tmp))
        code = {"before": archive(before, where, _BUILD_PATHS), **code}
    painter = etagserver.changed_bytes
    if change == "pixels":
        etagserver.changed_bytes = _repainted
    done: dict[str, list[dict[str, Any]]] = {name: [] for name in code}
    try:
        for name, path in code.items():
            _reval_once(tmp / f"reval-warmup-{name}", flight, buffer_m, env, path)
        for i in range(runs):
            for name, path in code.items():
                home = tmp / f"reval-{name}-{i}"
                done[name].append(_reval_once(home, flight, buffer_m, env, path))
    finally:
        etagserver.changed_bytes = painter
    return [_reval_line(name, done[name], change, before) for name in code]


#: What a ``doit build-cache`` of another rev needs from its tree.
_BUILD_PATHS = ("cachebuild", "targets", "dodo.py", "pyproject.toml")


def _reval_line(name: str, done: list[dict[str, Any]], change: str, before: str | None) -> str:
    """One line of row (6): the medians of ``done``."""
    from statistics import median

    ratios = [r["warm"] / r["cold"] for r in done]
    ratio = median(ratios)
    exact = all(r["exact"] for r in done)
    dependent = all(r["described"] == r["covering"] for r in done)
    ok = exact and dependent and ratio <= 0.5
    last = done[-1]
    phases = ", ".join(
        f"{k} {median(r['phases'][k][0] for r in done):.2f}/"
        f"{median(r['phases'][k][1] for r in done):.2f}"
        for k in PHASES
    )
    label = before if name == "before" else "now"
    return (
        f"| (6) {last['changed']} of {last['tiles']} tiles changed ({change}), TILE_MAX_AGE=0 "
        f"| {label} | {last['downloaded']} downloaded "
        f"({'exactly the changed' if exact else 'NOT the changed'}), {last['not_modified']} 304; "
        f"{last['described']} of {last['anchors']} anchors described "
        f"({'exactly' if dependent else 'NOT'} the {last['covering']} covering a changed tile); "
        f"median of {len(done)}: rebuild "
        f"{median(r['warm'] for r in done):.2f} s vs cold {median(r['cold'] for r in done):.2f} s, "
        f"**{ratio:.2f}x** (each run: {', '.join(f'{x:.2f}' for x in ratios)}; CPU seconds "
        f"{median(r['cpu'] for r in done):.2f}x; "
        f"s rebuild/cold: {phases}) | {'PASS' if ok else 'FAIL'} |"
    )


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
    ap.add_argument("--reval-runs", type=int, default=5, help="row (6): pairs, the median taken")
    ap.add_argument("--reval-change", choices=("pixels", "bytes"), default="pixels", help="row (6)")
    ap.add_argument(
        "--reval-before", default=None, help="row (6): also run this git rev's code, interleaved"
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
            lines += row_revalidate(
                tmp, args.reval_buffer_m, max(3, args.reval_runs), args.reval_change,
                args.reval_before,
            )  # fmt: skip
    print(f"before = {args.before}; loopback latency {args.latency_ms:g} ms\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    else:
        main()
