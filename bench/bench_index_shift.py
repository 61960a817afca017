"""The index phase of a shifted build, this checkout against another (``--before``), interleaved.

Given two descriptor directories of a build (``descriptors.npy`` and
``descriptor_ids.npy``: an area and the same area shifted, e.g. copied from
``state/build/`` after two builds), each round runs, for each checkout in
turn, in a fresh directory and a fresh process: ``build_index`` over the
first (reuse on: it leaves the quantizer and what else the code keeps),
then timed, over the second; as a build's index phase does.  Prints each
round's seconds (with the index's own timings) and the medians.

    python bench/bench_index_shift.py --before /path/to/other/checkout \\
        --first DIR --second DIR [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = """
import json, sys, time
from pathlib import Path
from cachebuild.localize.index import build_index
first, second, out = (Path(a) for a in sys.argv[1:4])
build_index(descriptors_dir=first, out_path=out, reuse=True, engine_key="bench")
t = time.perf_counter()
info = build_index(descriptors_dir=second, out_path=out, reuse=True, engine_key="bench")
info["wall"] = time.perf_counter() - t
print(json.dumps(info))
"""


def one(code: Path, first: Path, second: Path, tmp: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code))
    out = tmp / "index.faiss"
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(first), str(second), str(out)],
        env=env, cwd=code, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="the other checkout")
    ap.add_argument("--first", type=Path, required=True)
    ap.add_argument("--second", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    codes = {"before": args.before.resolve(), "this": REPO}
    got: dict[str, list[dict]] = {k: [] for k in codes}
    print(f"load {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs")
    print("| round | code | index s | read | add | tune | recall@10 | nprobe | reference |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in range(1, args.rounds + 1):
        for name, code in codes.items():
            with tempfile.TemporaryDirectory(prefix="bench-index-shift-") as tmp:
                info = one(code, args.first, args.second, Path(tmp))
            got[name].append(info)
            s = info["seconds"]
            print(f"| {r} | {name} | {info['wall']:.2f} | {s['read']:.2f} | {s['add']:.2f} | "
                  f"{s['tune']:.2f} | {info['recall_at_10']} | {info['params'].get('nprobe')} | "
                  f"{info.get('recall_reference')} |", flush=True)  # fmt: skip
    med = {k: statistics.median(i["wall"] for i in v) for k, v in got.items()}
    print(f"\nmedian index seconds: before {med['before']:.2f}, this {med['this']:.2f} "
          f"({med['this'] / med['before']:.2f}x); load {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
