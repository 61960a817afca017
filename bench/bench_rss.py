"""Peak RSS of a cold `doit build-cache`, per stage, against the index's size.

For each size, in one run on one machine:

1. baseline: a Python process that imports what a build imports (numpy,
   Pillow, onnxruntime, faiss, cryptography, doit) and loads the default
   model's engine: the constant a build cannot do without;
2. a cold build of a one-waypoint flight of about N tiles at z17 (empty
   home), while this script reads ``/proc/<pid>/status`` every
   ``--interval`` seconds: the largest VmRSS seen during each stage (a stage
   runs from its ``.. <task>`` line on stderr to the next one) and VmHWM,
   the kernel's peak, as each stage ends; the stage whose end first shows
   the final VmHWM is where the peak was.  The whole build's peak is the
   kernel's ru_maxrss from ``os.wait4``.

The target (issue 6): peak RSS = the index's size + a constant, that is,
``peak - index`` does not grow with the area.  Printed: peak, index size,
peak - index, and peak - index - baseline.

    python bench/bench_rss.py [--sizes 10000,100000] [--interval 0.02]

A 100k cold build takes 15-30 minutes on two shared cores.  Issue 6's run
on the 16-core GPU machine is ``python bench/bench_rss.py --sizes 250000``:
it also prints tiles per second per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_noop import REPO, _flight_for

BASELINE = """
import os, resource, sys, tempfile
from pathlib import Path
import numpy, PIL.Image, onnxruntime, faiss, cryptography.hazmat.primitives.asymmetric.ed25519, doit
from cachebuild.engine.compile import compile_engine, load_engine
from cachebuild.engine.model import write_default_model
with tempfile.TemporaryDirectory() as tmp:
    model = write_default_model(Path(tmp) / "model.onnx")
    compile_engine(model_path=model, calibration_path=None, precision="fp32", out_dir=Path(tmp) / "engine")
    runner = load_engine(Path(tmp) / "engine")
    runner.run(numpy.zeros((64, 3, *runner.input_hw), numpy.float32))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _status(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` in bytes, or (0, 0) once the process is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


def measured_build(argv: list[str], env: dict[str, str], interval: float) -> dict:
    """Run one build; per-stage peaks, the whole peak, seconds and its JSON report."""
    stages: list[dict] = [{"stage": "(start)", "max_rss": 0, "hwm_end": 0}]
    lock = threading.Lock()
    err_lines: list[str] = []
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.PIPE, text=True)

        def read_stderr() -> None:
            assert p.stderr is not None
            for line in p.stderr:
                err_lines.append(line)
                if line.startswith(".. "):
                    hwm = _status(p.pid)[1]
                    with lock:
                        stages[-1]["hwm_end"] = max(stages[-1]["hwm_end"], hwm)
                        stages.append({"stage": line[3:].strip(), "max_rss": 0, "hwm_end": 0})

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        status = usage = None
        while status is None:
            pid, st, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                status, usage = st, ru
                break
            rss, hwm = _status(p.pid)
            with lock:
                stages[-1]["max_rss"] = max(stages[-1]["max_rss"], rss)
                stages[-1]["hwm_end"] = max(stages[-1]["hwm_end"], hwm)
            time.sleep(interval)
        seconds = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        reader.join(5)
        out.seek(0)
        stdout = out.read()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}):\n{''.join(err_lines)[-3000:]}")
    peak = usage.ru_maxrss * 1024
    # the last stage's end is the process's end: its VmHWM is the whole peak
    stages[-1]["hwm_end"] = max(stages[-1]["hwm_end"], peak)
    peak_stage = next(s["stage"] for s in stages if s["hwm_end"] >= peak)
    return {
        "seconds": seconds,
        "peak": peak,
        "peak_stage": peak_stage,
        "stages": [s for s in stages if s["stage"] != "(start)" or s["max_rss"]],
        "report": json.loads(stdout.splitlines()[-1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between RSS samples")
    args = ap.parse_args()
    mib = 1 << 20
    load0 = os.getloadavg()[0]
    base = subprocess.run(
        [sys.executable, "-c", BASELINE], cwd=REPO, capture_output=True, text=True, check=True
    )  # fmt: skip
    baseline = int(base.stdout.split()[-1])
    print(f"baseline (imports + engine loaded + one batch of 64): {baseline / mib:.0f} MiB",
          file=sys.stderr, flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            home = Path(tmp) / f"home-{n}"
            flight = Path(tmp) / f"flight-{n}.json"
            env = dict(os.environ, CACHEBUILD_HOME=str(home))
            argv = [sys.executable, "-m", "doit", "build-cache", f"FLIGHT={flight}", _flight_for(n, flight),
                    "REPORT=json"]  # fmt: skip
            print(f"cold build, about {n} tiles ...", file=sys.stderr, flush=True)
            r = measured_build(argv, env, args.interval)
            staged = home / "cache" / "state" / "build"
            r["index_bytes"] = (staged / "index.faiss").stat().st_size
            r["index_type"] = json.loads((staged / "index.json").read_text())["type"]
            r["planned"] = r["report"]["tiles"]["planned"]
            rows.append(r)
            print(f"  {r['planned']:,} tiles: peak {r['peak'] / mib:.0f} MiB in {r['peak_stage']}, index "
                  f"{r['index_bytes'] / mib:.1f} MiB, {r['seconds']:.0f} s; load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)  # fmt: skip
    print(f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; {os.cpu_count()} CPUs; "
          f"RSS sampled every {args.interval:g} s")  # fmt: skip
    print()
    print("| tiles | cold build s | peak RSS MiB | peak in | index | index MiB | peak - index MiB "
          "| baseline MiB | peak - index - baseline MiB |")  # fmt: skip
    print("| ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        rest = r["peak"] - r["index_bytes"]
        print(f"| {r['planned']:,} | {r['seconds']:.0f} | {r['peak'] / mib:.0f} | {r['peak_stage']} | "
              f"{r['index_type']} | {r['index_bytes'] / mib:.1f} | {rest / mib:.0f} | {baseline / mib:.0f} | "
              f"{(rest - baseline) / mib:.0f} |")  # fmt: skip
    print()
    names = list(dict.fromkeys(s["stage"] for r in rows for s in r["stages"]))
    print("Largest sampled VmRSS per stage, MiB (VmHWM at the stage's end in brackets):")
    print()
    print("| tiles | " + " | ".join(names) + " |")
    print("| ---: | " + " | ".join("---:" for _ in names) + " |")
    for r in rows:
        by = {s["stage"]: s for s in r["stages"]}
        cells = " | ".join(
            f"{by[s]['max_rss'] / mib:.0f} ({by[s]['hwm_end'] / mib:.0f})"
            if by.get(s, {}).get("max_rss")
            else "-"
            for s in names
        )
        print(f"| {r['planned']:,} | {cells} |")
    print()
    phases = [p for p in PHASES if any(r["report"]["phases"].get(p) for r in rows)]
    print("Tiles per second per stage (planned tiles / the stage's seconds in the build's report; "
          "the whole build last):")  # fmt: skip
    print()
    print("| tiles | " + " | ".join(phases) + " | build |")
    print("| ---: | " + " | ".join("---:" for _ in phases) + " | ---: |")
    for r in rows:
        ph = r["report"]["phases"]
        cells = " | ".join(f"{r['planned'] / ph[p]:,.0f}" if ph.get(p) else "-" for p in phases)
        print(f"| {r['planned']:,} | {cells} | {r['planned'] / r['seconds']:,.0f} |")


#: The build's stages, in order, as its JSON report names them.
PHASES = (
    "tiles",
    "mbtiles",
    "engine",
    "describe",
    "preview",
    "index",
    "selftest",
    "manifest",
    "publish",
)


if __name__ == "__main__":
    main()
