"""bench/bench_gpu.py runs here, on the CPU, with a tiny N: the one command for the GPU machine must not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_gpu_prints_every_stage_and_names_the_slowest(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--tiles", "48", "--distinct", "8",
         "--batch", "16", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for row in ("decode + preprocess, Pillow", "decode, GPU", "infer: ", "index: ", "end to end"):
        assert row in out.stdout, out.stdout
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["slowest"] in figures["rates"] and figures["tiles"] == 48
    assert min(figures["rates"].values()) == figures["rates"][figures["slowest"]]
    assert f"slowest stage alone: {figures['slowest']}" in out.stdout
    assert (
        abs(figures["ratio"] - figures["end_to_end"] / figures["rates"][figures["slowest"]]) < 1e-9
    )
