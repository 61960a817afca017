"""Hostile input, measured: peak RSS under decompression bombs and the lock's release after a signal.

Issue 19's figures, in one run on this machine:

1. peak RSS (wait4's ru_maxrss, read from a small launcher process) of a
   good ``doit build-cache`` of the same small area (the baseline), of a
   build whose tile server answers every tile with a 1 MiB gzip that decodes
   to 1 GiB (CONCURRENCY=2), and of one whose Flights API answers with such a
   body; target: every bomb under 1 GB, refused with exit 20 / 93;
2. seconds from SIGTERM (and SIGINT) to the build's exit, and whether the
   cache lock is free then, against a server that drips one byte every 0.5 s;
   target: the lock free within 2 s.

    python bench/bench_hostile.py [--repeat 3]

The servers and the measuring launcher are the tests' own
(tests/scenarios/test_http_hostile.py), so the bench and the tests measure
the same thing.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cachebuild.release.lock import CacheLock  # noqa: E402
from tests._harness import tileserver  # noqa: E402
from tests.conftest import Cb, write_flight  # noqa: E402
from tests.scenarios.test_http_hostile import (  # noqa: E402
    DripServer,
    _BombApi,
    bomb,
    run_measured,
)

MIB = 1 << 20


def _peak(kind: str, tmp: Path) -> tuple[int, int]:
    """(exit code, peak RSS bytes) of one build of ``kind``: good, tile-bomb or flight-bomb."""
    cb = Cb(home=tmp / "home")
    cb.home.mkdir(parents=True)
    flight = write_flight(tmp / "f.json")
    if kind == "flight-bomb":
        api = _BombApi()
        try:
            env = cb.env(FLIGHTS_API_URL=api.url, FLIGHTS_API_TOKEN="tok-123456")
            r, rss = run_measured(cb, tmp, "FLIGHT=3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b", env=env)
        finally:
            api.close()
        return r.code, rss
    srv = tileserver.TileServer()
    try:
        if kind == "tile-bomb":
            reply = tileserver.Reply(
                200, bomb(), {"Content-Encoding": "gzip", "Content-Type": "image/jpeg"}
            )
            srv.fault_rate(reply, 1.0, attempts=1000)
        args = [f"FLIGHT={flight}", "BUFFER_M=100", f"PROVIDER={srv.template(query='')}"]
        r, rss = run_measured(cb, tmp, *args, "CONCURRENCY=2", "STRICT=0", env=cb.env())
    finally:
        srv.close()
    return r.code, rss


def _release(sig: int, tmp: Path) -> tuple[int, float, bool]:
    """(exit code, seconds from ``sig`` to exit, lock free then) of a build stuck on a dripping server."""
    cb = Cb(home=tmp / "home")
    cb.home.mkdir(parents=True)
    drip = DripServer()
    try:
        flight = write_flight(tmp / "f.json")
        p = cb.popen(
            "build-cache", f"FLIGHT={flight}", "BUFFER_M=100", f"PROVIDER={drip.template()}"
        )
        deadline = time.monotonic() + 120
        while drip.requests < 2 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        sent = time.monotonic()
        p.send_signal(sig)
        p.communicate(timeout=60)
        took = time.monotonic() - sent
        try:
            with CacheLock(cb.cache_dir / "build.lock"):
                free = True
        except Exception:
            free = False
    finally:
        drip.close()
    return p.returncode, took, free


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as d:
        root = Path(d)
        n = 0

        def fresh() -> Path:
            nonlocal n
            n += 1
            (root / str(n)).mkdir()
            return root / str(n)

        print(
            f"## Peak RSS under decompression bombs (median of {opts.repeat}; target < 1024 MiB)\n"
        )
        print("| build | exit | peak RSS MiB | vs good build |")
        print("| --- | ---: | ---: | ---: |")
        base = None
        for kind in ("good", "tile-bomb", "flight-bomb"):
            runs = [_peak(kind, fresh()) for _ in range(opts.repeat)]
            peak = statistics.median(r for _, r in runs)
            base = base or peak
            codes = sorted({c for c, _ in runs})
            print(
                f"| {kind} | {','.join(map(str, codes))} | {peak / MIB:.0f} | {peak / base:.2f}x |"
            )
        print(
            f"\n## Signal to exit against a dripping server (median of {opts.repeat}; target lock free < 2 s)\n"
        )
        print("| signal | exit | seconds to exit | lock free then |")
        print("| --- | ---: | ---: | --- |")
        for sig in (signal.SIGTERM, signal.SIGINT):
            runs = [_release(sig, fresh()) for _ in range(opts.repeat)]
            took = statistics.median(t for _, t, _ in runs)
            codes = sorted({c for c, _, _ in runs})
            free = all(f for _, _, f in runs)
            print(
                f"| {sig.name} | {','.join(map(str, codes))} | {took:.2f} | {'yes' if free else 'NO'} |"
            )


if __name__ == "__main__":
    main()
