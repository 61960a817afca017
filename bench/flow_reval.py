"""Row (6) of bench_flow.py: revalidation, a rebuild with ``TILE_MAX_AGE=0`` after new imagery.

``doit build-cache`` cold, then the server's imagery changes for a third
of the tiles, then a rebuild with ``TILE_MAX_AGE=0``; each (cold build,
rebuild) pair in a fresh home, then the rebuild once more with nothing
changed (every tile a 304: what revalidating the area costs by itself, the
floor under the ratio).  Which third (``--reval-pattern``):

- ``scattered``: every third tile of the fetch order, so about 98% of the
  anchors have a changed tile in their block (the worst case for windows);
- ``block``: the western third of the area, contiguous, as providers
  publish new imagery in survey blocks.

Run from bench_flow.py (``--rows 6``); see its docstring for the target.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

#: The patterns of changed tiles row (6) knows.
PATTERNS = ("scattered", "block")

#: What a ``doit build-cache`` of another rev needs from its tree.
BUILD_PATHS = ("cachebuild", "targets", "dodo.py", "pyproject.toml")


def changed_tiles(wanted: list[Any], pattern: str) -> list[Any]:
    """A third of ``wanted`` (sorted by column, then row): every third, or the western third."""
    if pattern == "scattered":
        return wanted[::3]
    if pattern == "block":
        return wanted[: -(-len(wanted) // 3)]
    raise ValueError(f"unknown pattern {pattern!r}")


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
    home: Path,
    flight: Path,
    buffer_m: float,
    env: dict[str, str],
    code: Path = REPO,
    pattern: str = "scattered",
) -> dict[str, Any]:
    """One cold build in a fresh ``home``, a third of the imagery changed by ``pattern``, one rebuild,
    one more with nothing changed, by ``code``."""
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

    served: list[float] = []  # the server's CPU seconds (this process's) during each build

    def build(*extra: str) -> tuple[float, float, dict[str, Any]]:
        """Wall and CPU seconds (the build's process, user + system) and the report."""
        c0, s0, t0 = _children_cpu(), _own_cpu(), time.perf_counter()
        p = subprocess.run([*args, *extra], capture_output=True, text=True, env=run_env, cwd=code)
        sec, cpu = time.perf_counter() - t0, _children_cpu() - c0
        served.append(_own_cpu() - s0)
        if p.returncode:
            raise SystemExit(p.stderr[-2000:])
        return sec, cpu, json.loads(p.stdout.strip().splitlines()[-1])

    try:
        cold, cold_cpu, cold_rep = build()
        changed = changed_tiles(wanted, pattern)
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
        # the floor revalidation sets: the same rebuild with nothing changed (every tile a 304)
        unchanged, _, _ = build("TILE_MAX_AGE=0")
    finally:
        srv.close()
    return {
        "tiles": len(wanted),
        "changed": len(changed),
        "cold": cold,
        "warm": warm,
        "unchanged": unchanged,
        "cpu": warm_cpu / cold_cpu,
        "cpu_s": (warm_cpu, cold_cpu),
        "server_cpu_s": (served[1], served[0]),
        "exact": exact,
        "downloaded": down,
        "not_modified": n304,
        "described": rep["descriptors"]["computed"],
        "anchors": cold_rep["descriptors"]["computed"],
        "covering": covering,
        "frames": (rep.get("selftest_frames") or {}).get("described"),
        "frames_cold": (cold_rep.get("selftest_frames") or {}).get("described"),
        "phases": {k: (_phases(rep)[k], _phases(cold_rep)[k]) for k in PHASES},
    }


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _own_cpu() -> float:
    """This process's CPU seconds: while a build runs, its loopback server's (a real server's
    are not spent on the build's machine)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


#: The phases row (6) shows, rebuild / cold seconds (medians); ``ahead``: the
#: describe-ahead stage, which runs inside the tiles phase while tiles arrive.
PHASES = ("tiles", "ahead", "describe", "index", "selftest", "preview", "model", "total")


def _phases(rep: dict[str, Any]) -> dict[str, float]:
    """A report's seconds by :data:`PHASES`."""
    out = {k: float(rep["phases"].get(k, 0.0)) for k in PHASES}
    stages = (rep.get("pipeline") or {}).get("stages") or {}
    out["ahead"] = float(stages.get("describe_ahead", 0.0))
    return out


def row_revalidate(
    tmp: Path,
    buffer_m: float,
    runs: int,
    change: str,
    patterns: tuple[str, ...] = PATTERNS,
    code: dict[str, Path] | None = None,
) -> list[str]:
    """Row (6): per pattern and code, the median of ``runs`` (cold build, rebuild) pairs, each ratio from its own pair.

    Python's bytecode is cached (under ``tmp``, never in the repository or
    the environment) and one pair runs first untimed, so that neither build
    pays for compiling the modules it imports, as no installed tool does
    after its first run; the server has every tile's image made before the
    cold build asks (the synthetic imagery costs the server ~1 ms a tile to
    make, which no real server spends while answering).  ``change``:
    ``pixels`` paints a square on the changed tiles (new descriptors, a new
    index), ``bytes`` changes only their bytes (a JPEG comment: the same
    pixels).  ``code``: name -> tree (default: this one, ``now``); a
    ``before`` tree (an archive of a git rev) runs the same pairs,
    interleaved with this tree's, in the same run.  Each line also gives
    both builds' CPU seconds and the loopback server's (this process's,
    during each build): it shares the machine's cores with the build, as
    a real server does not, and answers as many requests in the rebuild
    as in the cold build.
    """
    from tests._harness import etagserver

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    flight = _reval_flight(tmp)
    code = code or {"now": REPO}
    painter = etagserver.changed_bytes
    if change == "pixels":
        etagserver.changed_bytes = _repainted
    done: dict[tuple[str, str], list[dict[str, Any]]] = {
        (pattern, name): [] for pattern in patterns for name in code
    }
    try:
        for name, path in code.items():
            _reval_once(tmp / f"reval-warmup-{name}", flight, buffer_m, env, path, patterns[0])
        for i in range(runs):
            for pattern, name in done:
                home = tmp / f"reval-{pattern}-{name}-{i}"
                done[pattern, name].append(
                    _reval_once(home, flight, buffer_m, env, code[name], pattern)
                )
    finally:
        etagserver.changed_bytes = painter
    return [_reval_line(name, pattern, rows, change) for (pattern, name), rows in done.items()]


def _reval_line(name: str, pattern: str, done: list[dict[str, Any]], change: str) -> str:
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
    return (
        f"| (6) {last['changed']} of {last['tiles']} tiles changed ({pattern}, {change}), "
        f"TILE_MAX_AGE=0 | {name} | {last['downloaded']} downloaded "
        f"({'exactly the changed' if exact else 'NOT the changed'}), {last['not_modified']} 304; "
        f"{last['described']} of {last['anchors']} anchors described "
        f"({'exactly' if dependent else 'NOT'} the {last['covering']} covering a changed tile); "
        f"self-test frames described {last['frames']} (cold build {last['frames_cold']}); "
        f"median of {len(done)}: rebuild "
        f"{median(r['warm'] for r in done):.2f} s vs cold {median(r['cold'] for r in done):.2f} s, "
        f"**{ratio:.2f}x** (each run: {', '.join(f'{x:.2f}' for x in ratios)}; nothing changed, "
        f"every tile a 304: {median(r['unchanged'] for r in done):.2f} s, "
        f"{median(r['unchanged'] / r['cold'] for r in done):.2f}x; CPU seconds "
        f"{median(r['cpu'] for r in done):.2f}x, "
        f"{median(r['cpu_s'][0] for r in done):.2f} / {median(r['cpu_s'][1] for r in done):.2f} s; "
        f"the loopback server's CPU s during rebuild/cold "
        f"{median(r['server_cpu_s'][0] for r in done):.2f}/"
        f"{median(r['server_cpu_s'][1] for r in done):.2f}; "
        f"s rebuild/cold: {phases}) | {'PASS' if ok else 'FAIL'} |"
    )
