"""bench/bench_rss.py and bench/bench_noop.py run here with a tiny area: the scripts behind issue 6's figures must not rot.

No timing is asserted: only that each prints its table, that the figures
hang together, and that ``--keep`` leaves a home a no-op can run against.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = ("tiles", "mbtiles", "model", "engine", "describe", "index", "selftest", "manifest")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, *args], check=False, capture_output=True, text=True, timeout=600, cwd=cwd
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_bench_rss_names_the_peak_stage_and_subtracts_the_index(tmp_path: Path) -> None:
    out = _run(
        [str(REPO / "bench" / "bench_rss.py"), "--sizes", "60", "--interval", "0.01"], tmp_path
    )
    row = next(
        line for line in out.stdout.splitlines() if re.match(r"\| \d", line) and "Flat" in line
    )
    cells = [c.strip() for c in row.strip("|").split("|")]
    planned, _, peak, stage, kind, index_mib, rest, baseline, over = cells
    assert int(planned.replace(",", "")) >= 60
    assert stage in STAGES, row
    assert kind == "IDMap2,Flat"  # exact search below 10k tiles
    assert float(peak) > float(baseline) > 50, row  # a build holds at least what its imports hold
    assert abs(float(peak) - float(index_mib) - float(rest)) <= 1, row
    assert abs(float(rest) - float(baseline) - float(over)) <= 1, row
    # the per-stage table: one column per task that ran, a figure under the peak's stage
    head = next(
        line
        for line in out.stdout.splitlines()
        if line.startswith("| tiles | ") and "describe" in line
    )
    assert {c.strip() for c in head.strip("|").split("|")} >= {"tiles", *STAGES}
    assert "peak" in out.stderr and "baseline" in out.stderr


def _bench_noop():
    spec = importlib.util.spec_from_file_location("bench_noop", REPO / "bench" / "bench_noop.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_noop_keeps_its_homes_for_another_no_op(tmp_path: Path) -> None:
    keep = tmp_path / "homes"
    out = _run(
        [
            str(REPO / "bench" / "bench_noop.py"),
            "--sizes",
            "60",
            "--repeat",
            "1",
            "--keep",
            str(keep),
        ],
        tmp_path,
    )
    assert re.search(r"^\| [\d,]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out.stdout, re.MULTILINE), (
        out.stdout
    )
    assert "no-op" in out.stderr and "doit list" in out.stderr  # figures as they are measured
    home, flight = keep / "home-60", keep / "flight-60.json"
    assert (home / "cache" / "state" / "build" / "index.faiss").is_file() and flight.is_file()
    buffer = _bench_noop()._flight_for(
        60, tmp_path / "same.json"
    )  # the same BUFFER_M as the bench's
    again = subprocess.run(
        [sys.executable, "-m", "doit", "build-cache", f"FLIGHT={flight}", buffer, "REPORT=json"],
        check=False, capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "CACHEBUILD_HOME": str(home)},
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.splitlines()[-1])["outcome"] == "up_to_date"
