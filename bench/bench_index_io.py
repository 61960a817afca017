"""The index phase's own reads (issue 21's shifted build): fingerprints and the self-test's index load.

In one run, on the same random float32 vectors (``--rows`` x ``--dim``):

- fingerprints: the quantizer's per-vector fingerprints as they were (a
  blake2b call per row, the baseline, written out here) against
  :func:`cachebuild.localize.index_quantizer._fingerprints` (one
  whole-array hash a chunk), both over chunks of 16,384 rows as the
  index phase's scan reads them;
- index load: an IVF index over them written to disk, then read back with
  :func:`cachebuild.localize.index_files.load_index` copied (the baseline)
  and ``mapped=True`` (what the self-test does), and the same 200 queries
  searched through each: the answers must agree.

Each figure is the median of ``--repeat`` runs, alternating baseline and
new.  Prints a table with the ratios.

    python bench/bench_index_io.py [--rows 320000] [--dim 256] [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_noop import timed  # noqa: E402

from cachebuild.localize.index_files import _faiss, load_index  # noqa: E402
from cachebuild.localize.index_quantizer import _fingerprints  # noqa: E402

CHUNK_ROWS = 16_384  # build_index's chunk_rows


def blake2b_rows(chunk: Any) -> Any:
    """The fingerprints as they were before (format 1): a blake2b call per row."""
    raw = b"".join(hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in chunk)
    return np.frombuffer(raw, dtype="<u8")


def chunked(fn: Any, x: Any, rows: int = CHUNK_ROWS) -> Any:
    """``fn`` over ``x`` in chunks of ``rows``, as the index phase's scan reads descriptors.npy."""
    return np.concatenate([fn(x[i : i + rows]) for i in range(0, len(x), rows)])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=320_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    faiss = _faiss()
    x = np.random.default_rng(0).standard_normal((args.rows, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows: dict[str, list[float]] = {k: [] for k in ("blake2b", "whole", "read", "mapped")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        nlist = max(1, int(np.sqrt(args.rows)))
        index = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(args.dim), args.dim, nlist, faiss.METRIC_INNER_PRODUCT
        )
        index.train(x[: min(len(x), 64 * nlist)])
        index.add(x)
        index.nprobe = 16
        faiss.write_index(index, str(path))
        queries = x[:200]
        for _ in range(args.repeat):
            rows["blake2b"].append(timed(lambda: chunked(blake2b_rows, x))[0])
            rows["whole"].append(timed(lambda: chunked(_fingerprints, x))[0])
            for key, mapped in (("read", False), ("mapped", True)):
                t, loaded = timed(lambda m=mapped: load_index(path, mapped=m))
                rows[key].append(t)
                answers = loaded.search(queries, 10)[1]
                if key == "read":
                    want = answers
                elif not np.array_equal(answers, want):
                    sys.exit("the mapped index answered differently")
                del loaded
        size = path.stat().st_size
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{args.rows:,} x {args.dim} float32 vectors; IVF{nlist} index of {size / 1e6:,.0f} MB; "
          f"median of {args.repeat}, alternating\n")  # fmt: skip
    print("| step | baseline s | this s | this / baseline |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| fingerprints: blake2b a row → one whole-array hash | {med['blake2b']:.3f} "
          f"| {med['whole']:.3f} | {med['whole'] / med['blake2b']:.3f} |")  # fmt: skip
    print(f"| self-test's index load: copied → mapped (same answers) | {med['read']:.3f} "
          f"| {med['mapped']:.4f} | {med['mapped'] / med['read']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
