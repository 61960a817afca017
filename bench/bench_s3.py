"""A second machine with a warm bucket: ``STORE=s3://...`` against a cold build.

In one run, one flight of about N tiles at z17, from an HTTP tile provider
with LATENCY ms per request (in its own process, every tile a distinct
JPEG), each build a real ``doit build-cache`` process with its own empty
``CACHEBUILD_HOME`` (a fresh machine):

1. cold, local store: no bucket (how builds ran before ``STORE=s3://``);
2. cold, empty bucket (the baseline): fetches and describes everything and
   uploads it;
3. a second machine, warm bucket: downloads the tiles and descriptors
   machine 2 uploaded; fetches and describes nothing; its index, self-test
   and coverage map come from the bucket's action cache
   (``cachebuild.store.actioncache``).

The figure is (3) / (2); target <= 0.2.  The bucket is moto's S3 server
(in its own process) on 127.0.0.1: no network round trip, so a real
bucket's latency is not in these figures (docs/scale.md).

    python bench/bench_s3.py [--tiles 3000] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_fetch import ServerProcess
from bench_noop import REPO, run_measured

#: The phases the bucket shares the work of as tiles and descriptors.
SHARED = ("tiles", "describe")
#: The phases the bucket's action cache serves; mbtiles, manifest and the rest run on every machine.
ACTIONS = ("index", "selftest", "preview")
LAT, LON = 47.30, 8.45


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoProcess:
    """moto's S3 server in its own process on 127.0.0.1."""

    def __init__(self, bucket: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from moto.server import main; main()",
                "-H",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("moto's server did not start") from None
                time.sleep(0.1)
        import boto3

        boto3.session.Session().client("s3", **self.client_args()).create_bucket(Bucket=bucket)

    def client_args(self) -> dict[str, str]:
        return {
            "endpoint_url": f"http://127.0.0.1:{self.port}",
            "aws_access_key_id": "bench",
            "aws_secret_access_key": "bench-secret",
            "region_name": "us-east-1",
        }

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiles", type=int, default=3000)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args()
    doit = [sys.executable, "-m", "doit"]
    tile_m = 2 * math.pi * 6378137.0 / 2**17 * math.cos(math.radians(LAT))
    buffer = f"BUFFER_M={math.sqrt(args.tiles) * tile_m / 2:.0f}"
    load0 = os.getloadavg()[0]
    bucket = "bench-maps"
    server = ServerProcess(args.latency_ms / 1000.0, 0.0, "0")
    moto = MotoProcess(bucket)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
            f = Path(tmp) / "flight.json"
            f.write_text(json.dumps({"waypoints": [{"lat": LAT, "lon": LON, "alt_m": 100}]}))

            def build(name: str, home: str, store: str | None) -> None:
                env = dict(os.environ, CACHEBUILD_HOME=str(Path(tmp) / home), **moto.env())
                argv = [
                    *doit,
                    "build-cache",
                    f"FLIGHT={f}",
                    buffer,
                    f"PROVIDER={server.template()}",
                    "REPORT=json",
                ]
                if store:
                    argv.append(f"STORE={store}")
                print(f"{name} ...", file=sys.stderr, flush=True)
                seconds, _, out, _ = run_measured(argv, env, REPO)
                rows.append((name, seconds, json.loads(out.splitlines()[-1])))

            build("cold, local store (no bucket)", "local", None)
            build("cold, empty bucket", "a", f"s3://{bucket}/team")
            build("second machine, warm bucket", "b", f"s3://{bucket}/team")
    finally:
        moto.close()
        server.close()

    print(
        f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; {os.cpu_count()} CPUs; "
        f"provider latency {args.latency_ms:g} ms; bucket: moto on 127.0.0.1"
    )
    print()
    phases = [p for p in rows[0][2]["phases"] if p != "total"]
    print(
        "| build | s | fetched | described | objects read | objects written | action cache hits | "
        + " | ".join(phases)
        + " | rest |"
    )
    print(
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | "
        + " | ".join("---:" for _ in phases)
        + " | ---: |"
    )
    for name, seconds, rep in rows:
        ph = " | ".join(f"{rep['phases'].get(p, 0):.2f}" for p in phases)
        rest = seconds - sum(
            rep["phases"].get(p, 0) for p in phases
        )  # process start, imports, doit
        st = rep["store"]
        print(
            f"| {name} ({rep['tiles']['planned']:,} tiles) | {seconds:.1f} | {rep['tiles']['fetched']:,} | "
            f"{rep['descriptors']['computed']:,} | {st['objects_read']:,} | {st['objects_written']:,} | "
            f"{', '.join(sorted(rep.get('action_cache', {}).get('hits', []))) or '-'} | {ph} | {rest:.2f} |"
        )
    print()
    local, empty, warm = (r[1] for r in rows)
    shared = [sum(r[2]["phases"].get(p, 0) for p in SHARED) for r in rows]
    print(f"second machine, warm bucket / cold, empty bucket = {warm / empty:.3f} (target <= 0.2)")
    print(f"  the phases the bucket shares (tiles + describe): {shared[2] / shared[1]:.3f}")
    served = [sum(r[2]["phases"].get(p, 0) for p in ACTIONS) for r in rows]
    print(
        f"  the phases the action cache serves (index + selftest + preview): {served[2] / served[1]:.3f}"
    )
    print(f"second machine, warm bucket / cold, local store  = {warm / local:.3f}")
    print(f"cold, empty bucket / cold, local store (the cost of uploading) = {empty / local:.3f}")


if __name__ == "__main__":
    main()
