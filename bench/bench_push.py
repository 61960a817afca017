"""Companion push of a ~10k-tile flight: first time and unchanged re-run, vs rsync.

Everything goes through a real OpenSSH sshd on 127.0.0.1 (tests/_harness/sshd.py:
throwaway keys, key auth only), to a "companion" directory on this
machine.  The tile set is made first, untimed, with the built-in synthetic
provider (the workstation's half: flight and tiles).

Rows:

- cachebuild push: connect, probe (one round trip: what is absent), push
  (tile packs over SFTP, unpacked into the store there), as
  ``doit build-cache COMPANION=…`` does before the remote build;
- ``rsync -a`` of the same files (the store's objects and the tile set)
  over the same sshd, where rsync is installed;
- one SFTP file per object (what packs replace), first push only;
- the whole ``doit build-cache COMPANION=…`` on an unchanged flight (the
  issue's target: 0 tile bytes, < 2 s), after a cold remote build.

Medians of ``--repeat`` runs; a first push starts from an empty companion.

    python bench/bench_push.py [--tiles 10000] [--repeat 3] [--no-full] [--no-naive]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _flight(n_tiles: int, path: Path) -> float:
    """A one-waypoint flight; returns the BUFFER_M that makes about ``n_tiles`` tiles at z17."""
    lat = 47.37
    tile_m = 2 * math.pi * 6378137.0 / 2**17 * math.cos(math.radians(lat))
    path.write_text(json.dumps({"waypoints": [{"lat": lat, "lon": 8.54, "alt_m": 100}]}))
    return round(math.sqrt(n_tiles) * tile_m / 2)


def _stage(tmp: Path, n_tiles: int) -> tuple[Path, Path, Path, float]:
    """The workstation's half: flight.json and the tile set in a fresh store."""
    from cachebuild.inputs.flight import flight_area, flight_record, load_flight_file
    from cachebuild.tiles.fetch import fetch_tiles

    flight = tmp / "flight-src.json"
    buffer_m = _flight(n_tiles, flight)
    build, store = tmp / "ws" / "build", tmp / "ws" / "store"
    build.mkdir(parents=True)
    f = load_flight_file(flight)
    (build / "flight.json").write_text(
        json.dumps(flight_record(f), indent=1, sort_keys=True) + "\n"
    )
    fetch_tiles(
        bbox=flight_area(f, buffer_m),
        zooms=[17],
        provider_spec="synthetic",
        store_root=store,
        out_dir=build,
        env={},
        concurrency=8,
        progress=False,
    )
    return flight, build, store, buffer_m


def _push_once(sshd: Any, root: str, build: Path, store: Path) -> tuple[float, dict[str, Any]]:
    """connect + probe + push, as build-cache does; seconds and what was sent."""
    from cachebuild.companion.push import plan_push, push
    from cachebuild.companion.remote import call_agent, start_agent
    from cachebuild.companion.ssh import SshOptions, connect
    from cachebuild.inputs.companion import parse_companion

    cmd = f"{shlex.quote(sys.executable)} -m doit"
    t = time.perf_counter()
    opts = SshOptions(key_path=sshd.client_key, known_hosts=sshd.known_hosts)
    with connect(parse_companion(sshd.target), opts) as conn:
        sftp = conn.open_sftp()
        plan = plan_push(build_dir=build, store_root=store, root=root)
        info = call_agent(conn, cmd, "probe", root, wanted=plan.wanted())
        result = push(
            conn,
            sftp,
            plan,
            set(info["absent"]),
            root=root,
            start_unpack=lambda rels, session: start_agent(
                conn, cmd, "unpack", root, wanted=rels, watch=session
            ),
        )
        sftp.close()
    return time.perf_counter() - t, result.to_dict()


def _naive_once(sshd: Any, root: Path, store: Path) -> float:
    """One SFTP file per object (temp name + rename), no probe: the cost packs avoid."""
    from cachebuild.companion.ssh import SshOptions, connect
    from cachebuild.inputs.companion import parse_companion

    objects = sorted(p for p in (store / "objects").glob("*/*"))
    t = time.perf_counter()
    opts = SshOptions(key_path=sshd.client_key, known_hosts=sshd.known_hosts)
    with connect(parse_companion(sshd.target), opts) as conn:
        sftp = conn.open_sftp()
        for sub in {p.parent.name for p in objects}:
            sftp.mkdir(f"{root}/{sub}")
        for p in objects:
            final = f"{root}/{p.parent.name}/{p.name}"
            with sftp.open(final + ".part", "w") as fh:
                fh.set_pipelined(True)
                fh.write(p.read_bytes())
            sftp.posix_rename(final + ".part", final)
    return time.perf_counter() - t


def _rsync_once(sshd: Any, dest: Path, build: Path, store: Path) -> tuple[float, int]:
    ssh = (
        f"ssh -i {sshd.client_key} -p {sshd.port} -o UserKnownHostsFile={sshd.known_hosts} "
        "-o StrictHostKeyChecking=yes -o BatchMode=yes -o IdentitiesOnly=yes"
    )
    files = [str(store / "objects")] + [
        str(build / n) for n in ("flight.json", "tiles.npy", "missing.npy", "tileset.json")
    ]
    t = time.perf_counter()
    p = subprocess.run(
        ["rsync", "-a", "--stats", "-e", ssh, *files, f"{sshd.user}@127.0.0.1:{dest}/"],
        capture_output=True,
        text=True,
    )
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"rsync failed: {p.stderr}")
    m = re.search(r"Total bytes sent: ([\d,]+)", p.stdout)
    return dt, int(m.group(1).replace(",", "")) if m else -1


def _full(
    sshd: Any, tmp: Path, flight: Path, buffer_m: float, repeat: int
) -> tuple[float, list[float], dict[str, Any]]:
    """doit build-cache COMPANION=…: a cold build, then unchanged re-runs."""
    home, chome = tmp / "full-ws", tmp / "full-companion-home"
    chome.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEBUILD_")}
    env["CACHEBUILD_HOME"] = str(home)
    cmd = f"env CACHEBUILD_HOME={shlex.quote(str(chome))} {shlex.quote(sys.executable)} -m doit"
    argv = [
        sys.executable, "-m", "doit", "build-cache", f"FLIGHT={flight}", f"BUFFER_M={buffer_m}",
        f"COMPANION={sshd.target}", f"SSH_KEY={sshd.client_key}", f"KNOWN_HOSTS={sshd.known_hosts}",
        f"COMPANION_DIR={tmp / 'full-companion'}", f"COMPANION_CMD={cmd}", "REPORT=json",
    ]  # fmt: skip

    def run() -> tuple[float, dict[str, Any]]:
        t = time.perf_counter()
        p = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
        dt = time.perf_counter() - t
        if p.returncode != 0:
            raise SystemExit(f"build-cache failed ({p.returncode}):\n{p.stderr[-3000:]}")
        return dt, json.loads(p.stdout.splitlines()[-1])

    cold, _ = run()
    times, last = [], {}
    for _ in range(repeat):
        dt, last = run()
        times.append(dt)
    assert last["outcome"] == "up_to_date" and last["push"]["bytes"] == 0, last
    return cold, times, last


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiles", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--no-full",
        action="store_true",
        help="skip the whole build-cache no-op (needs a cold remote build)",
    )
    ap.add_argument("--no-naive", action="store_true", help="skip one-SFTP-file-per-object")
    args = ap.parse_args()

    from tests._harness.sshd import Sshd

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        t = time.perf_counter()
        flight, build, store, buffer_m = _stage(tmp, args.tiles)
        n = sum(1 for _ in (store / "objects").glob("*/*"))
        mb = sum(p.stat().st_size for p in (store / "objects").glob("*/*")) / 1e6
        print(
            f"tile set: {n:,} objects, {mb:,.1f} MB (made in {time.perf_counter() - t:.1f} s, untimed); load {os.getloadavg()[0]:.1f}"
        )
        sshd = Sshd(tmp / "sshd").start()
        rows: list[tuple[str, str, str, str, str]] = []
        try:
            firsts, agains, sent, again_sent = [], [], {}, {}
            for i in range(args.repeat):
                root = tmp / f"companion-{i}"
                dt, sent = _push_once(sshd, str(root), build, store)
                firsts.append(dt)
                dt, again_sent = _push_once(sshd, str(root), build, store)
                agains.append(dt)
                shutil.rmtree(root)
            rows.append(
                (
                    "cachebuild push (packs over SFTP)",
                    f"{statistics.median(firsts):.2f}",
                    f"{sent['bytes'] / 1e6:.1f}",
                    f"{statistics.median(agains):.2f}",
                    f"{again_sent['bytes']}",
                )
            )
            if shutil.which("rsync"):
                firsts, agains = [], []
                for i in range(args.repeat):
                    dest = tmp / f"rsync-{i}"
                    dest.mkdir()
                    dt, first_bytes = _rsync_once(sshd, dest, build, store)
                    firsts.append(dt)
                    dt, again_bytes = _rsync_once(sshd, dest, build, store)
                    agains.append(dt)
                    shutil.rmtree(dest)
                rows.append(
                    (
                        "rsync -a over the same sshd",
                        f"{statistics.median(firsts):.2f}",
                        f"{first_bytes / 1e6:.1f}",
                        f"{statistics.median(agains):.2f}",
                        f"{again_bytes}",
                    )
                )
            else:
                print("rsync is not installed: no rsync row (apt-get install rsync)")
            if not args.no_naive:
                dest = tmp / "naive"
                dest.mkdir()
                rows.append(
                    (
                        "one SFTP file per object",
                        f"{_naive_once(sshd, dest, store):.2f}",
                        f"{mb:.1f}",
                        "—",
                        "—",
                    )
                )
            if not args.no_full:
                cold, times, last = _full(sshd, tmp, flight, buffer_m, args.repeat)
                rows.append(
                    (
                        "whole `doit build-cache COMPANION=…`",
                        f"{cold:.2f} (cold, with the remote build)",
                        "—",
                        f"{statistics.median(times):.2f}",
                        f"{last['push']['bytes']}",
                    )
                )
                phases = last["phases"]
                print(
                    "unchanged build-cache phases (s): "
                    + ", ".join(f"{k} {v:.2f}" for k, v in sorted(phases.items()))
                )
        finally:
            sshd.stop()
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print()
    print(
        f"| {args.tiles:,}-tile flight ({n:,} objects, {mb:,.1f} MB) | first push s | MB sent | unchanged re-run s | bytes sent on re-run |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
