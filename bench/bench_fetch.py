"""Tile fetch: cachebuild's tiles phase against a naive sequential loop.

A tile server runs on 127.0.0.1 in its own process (so it does not share
the client's GIL), answering every request after LATENCY ms (a CDN's round
trip: without it a loopback server answers in microseconds and nothing
needs concurrency).  Every tile is a distinct JPEG (a shared image with the
tile's name in a comment segment), so the content-addressed store
deduplicates nothing.  With ``--429`` a share of first requests is answered
429 with ``Retry-After``; the retry gets the tile.

(a) naive: ``httpx.get`` per tile, no connection pooling, one at a time,
    sleeping ``Retry-After`` on a 429; each tile written to a file.  For
    context, the same loop with one pooled ``httpx.Client`` too.
(b) cachebuild: ``fetch_tiles`` into a fresh store (pooled connections,
    CONCURRENCY workers, retries, image check, content-addressed store,
    refs and journal).

"lost" counts planned tiles that did not arrive whole: it must be 0.

    python bench/bench_fetch.py [--tiles 5000] [--naive-tiles 1000] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# -- the server (its own process) --------------------------------------------


def serve(latency_s: float, share_429: float, retry_after: str) -> None:
    """Run the tile server; print its port on stdout; run until stdin closes."""
    import io
    import threading
    from collections import Counter
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cachebuild.providers.synthetic import synthetic_tile_bytes
    from cachebuild.tilemath import Tile

    bases = [synthetic_tile_bytes(Tile(68600 + i, 45900, 17)) for i in range(16)]
    attempts: Counter[str] = Counter()
    stats = {"requests": 0, "429": 0, "tiles": 0}
    lock = threading.Lock()

    def body(path: str, z: int, x: int, y: int) -> bytes:
        base = bases[(x * 7 + y) % len(bases)]
        note = path.encode()
        return base[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + base[2:]

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
                    self._send(
                        200, json.dumps(stats).encode(), {"Content-Type": "application/json"}
                    )
                return
            with lock:
                n = attempts[self.path]
                attempts[self.path] += 1
                stats["requests"] += 1
            time.sleep(latency_s)
            h = hashlib.sha256(self.path.encode()).digest()
            if n == 0 and int.from_bytes(h[:8], "big") / 2**64 < share_429:
                with lock:
                    stats["429"] += 1
                self._send(429, b"slow down", {"Retry-After": retry_after})
                return
            try:
                z, x, y = (int(p) for p in self.path.rsplit(".", 1)[0].strip("/").split("/")[-3:])
            except ValueError:
                self._send(400, b"bad path", {})
                return
            with lock:
                stats["tiles"] += 1
            self._send(200, body(self.path, z, x, y), {"Content-Type": "image/jpeg"})

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(httpd.server_address[1], flush=True)
    sys.stdin.read()  # until the parent closes it
    _ = io


class ServerProcess:
    def __init__(self, latency_s: float, share_429: float, retry_after: str):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(latency_s), str(share_429), retry_after],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def template(self) -> str:
        return f"http://127.0.0.1:{self.port}/{{z}}/{{x}}/{{y}}.jpg"

    def stats(self) -> dict[str, int]:
        import httpx

        return dict(httpx.get(f"http://127.0.0.1:{self.port}/stats").json())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait()


# -- the clients --------------------------------------------------------------


def area_of(n_tiles: int) -> Any:
    """A square box over Zürich of about ``n_tiles`` z17 tiles."""
    from cachebuild.tilemath import LngLatBbox, count_tiles

    side = math.ceil(math.sqrt(n_tiles))
    w, n = 8.45, 47.45
    dx = 360 / 2**17
    dy = dx * math.cos(math.radians(n))
    box = LngLatBbox(w + 1e-6, n - side * dy, w + side * dx - 1e-6, n)
    return box, count_tiles(box, [17])


def naive(
    server: ServerProcess, wanted: list[Any], out: Path, *, pooled: bool = False
) -> dict[str, Any]:
    import httpx

    from cachebuild.providers.base import check_image

    out.mkdir(parents=True, exist_ok=True)
    got = retries = 0
    client = httpx.Client() if pooled else None
    get = client.get if client is not None else httpx.get
    t0 = time.perf_counter()
    for t in wanted:
        url = f"http://127.0.0.1:{server.port}/{t.z}/{t.x}/{t.y}.jpg"
        for _ in range(5):
            r = get(url, timeout=20)
            if r.status_code == 429:
                retries += 1
                time.sleep(float(r.headers.get("retry-after", "1")))
                continue
            if r.status_code == 200 and check_image(r.content) is None:
                (out / f"{t.z}-{t.x}-{t.y}.jpg").write_bytes(r.content)
                got += 1
            break
    seconds = time.perf_counter() - t0
    if client is not None:
        client.close()
    return {"tiles": len(wanted), "seconds": seconds, "lost": len(wanted) - got, "retries": retries}


def cachebuild_fetch(
    server: ServerProcess, box: Any, n: int, tmp: Path, concurrency: int
) -> dict[str, Any]:
    from cachebuild.store.objects import TileStore
    from cachebuild.tiles.fetch import fetch_tiles

    env = {"HTTP_TIMEOUT": "20", "HTTP_RETRIES": "3", "HTTP_BACKOFF": "0.2"}
    t0 = time.perf_counter()
    s = fetch_tiles(
        bbox=box,
        zooms=[17],
        provider_spec=server.template(),
        store_root=tmp / "store",
        out_dir=tmp / "out",
        env=env,
        concurrency=concurrency,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    with TileStore(tmp / "store") as store:
        objects = sum(1 for _ in store.iter_objects())
    lost = n - s["present"] + (s["present"] - objects if objects < s["present"] else 0)
    return {"tiles": n, "seconds": seconds, "lost": lost, "retries": server.stats()["requests"] - n}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiles", type=int, default=5000)
    ap.add_argument(
        "--naive-tiles",
        type=int,
        default=1000,
        help="tiles the naive loop fetches (it is slow; its rate does not depend on the count)",
    )
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--share-429", type=float, default=0.05)
    ap.add_argument("--retry-after", default="1")
    ap.add_argument("--concurrency", default="8,32")
    args = ap.parse_args()
    from cachebuild.tilemath import tiles

    box, n = area_of(args.tiles)
    wanted = list(tiles(box, [17]))
    latency = args.latency_ms / 1000
    rows = []
    for share in (0.0, args.share_429):
        label = f"{share:.0%}" + (f" (Retry-After: {args.retry_after})" if share else "")
        with tempfile.TemporaryDirectory() as tmp:
            srv = ServerProcess(latency, share, args.retry_after)
            try:
                k = min(args.naive_tiles, n)
                base = naive(srv, wanted[:k], Path(tmp) / "naive")
            finally:
                srv.close()
        rows.append(("(a) naive loop: httpx.get per tile", label, base, base))
        print(f"naive {label}: {base['tiles'] / base['seconds']:.1f} tiles/s", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            srv = ServerProcess(latency, share, args.retry_after)
            try:
                pooled = naive(srv, wanted[:k], Path(tmp) / "pooled", pooled=True)
            finally:
                srv.close()
        rows.append(("sequential loop, one pooled httpx.Client", label, pooled, base))
        print(f"pooled {label}: {pooled['tiles'] / pooled['seconds']:.1f} tiles/s", file=sys.stderr)
        for c in (int(v) for v in args.concurrency.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                srv = ServerProcess(latency, share, args.retry_after)
                try:
                    r = cachebuild_fetch(srv, box, n, Path(tmp), c)
                finally:
                    srv.close()
            rows.append((f"(b) cachebuild fetch_tiles, CONCURRENCY={c}", label, r, base))
            print(
                f"cachebuild c={c} {label}: {r['tiles'] / r['seconds']:.1f} tiles/s",
                file=sys.stderr,
            )

    print(
        f"Loopback server in its own process, {args.latency_ms:g} ms latency per request, "
        f"{n:,} z17 tiles (naive loop: the first {min(args.naive_tiles, n):,}).\n"
    )
    print("| client | 429 share | tiles | retries | lost | s | tiles/s | vs naive |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, label, r, base in rows:
        rate = r["tiles"] / r["seconds"]
        ratio = rate / (base["tiles"] / base["seconds"])
        print(
            f"| {name} | {label} | {r['tiles']:,} | {r['retries']} | {r['lost']} | {r['seconds']:.1f} | "
            f"{rate:,.0f} | {ratio:.1f}× |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(float(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
    else:
        main()
