"""Benchmark describe on a Dask cluster against describe in the build's process.

Usage::

    .venv/bin/python bench/bench_dask.py --tiles 1000 --workers 2
    .venv/bin/python bench/bench_dask.py --tiles 20000 --workers 1,4,8,16   # a GPU machine

Builds a temporary store of N distinct 256x256 JPEG tiles (as
bench_describe.py does) and the default model's engine, then measures
:func:`cachebuild.localize.describe.describe_tiles` the way a build calls it
(``reuse=True``), with an empty descriptor store before every run so every
tile is described:

* local: in this process (no ``DASK_SCHEDULER``): the baseline;
* ``local:N`` cold: ``DASK_SCHEDULER=local:N``, all-in: the LocalCluster of
  N worker processes is started, the engine sent and loaded, the tiles
  described, the cluster stopped;
* N workers, standing: a LocalCluster of N worker processes started before
  the clock, reached as ``tcp://`` like a cluster that is already running
  (``dask scheduler`` + ``dask worker``), after one untimed warm-up run so
  each worker has loaded the engine;
* with ``--bucket``, N workers, standing, tiles from the bucket: the same
  cluster with ``STORE=s3://...`` (moto's server on 127.0.0.1, in its own
  process, holding the tiles as the build's packs): each worker reads the
  packs of its batches' cells into its own copy, which is emptied before
  every run, so every run pays for reading the bucket (docs/scale.md).

For each worker count the three alternate, ``--repeat`` times, so each
ratio compares runs made under the same load (the machine may be shared);
rows show tiles/s (median) and the ratio to the local runs of the same
turns.  Every run's descriptors are compared with a local run's (max
|difference|).  The time to start a ``local:N`` cluster, send the engine
and stop it, alone, is printed under the table.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_describe import build_world  # noqa: E402

from cachebuild._util.cpus import usable_cpus  # noqa: E402
from cachebuild.engine.compile import compile_engine  # noqa: E402
from cachebuild.engine.model import write_default_model  # noqa: E402
from cachebuild.localize.daskexec import DaskExecutor  # noqa: E402
from cachebuild.localize.describe import DESCRIPTORS_FILE, describe_tiles  # noqa: E402


def run(
    root: Path, store: Path, batch: int, scheduler: str | None, threads: int | None
) -> tuple[float, np.ndarray]:
    """Seconds of one describe with an empty descriptor store, and its descriptors."""
    shutil.rmtree(store / "descriptors", ignore_errors=True)
    result = describe_tiles(
        tileset_dir=root / "tileset",
        store_root=store,
        engine_dir=root / "engine",
        out_dir=root / "out",
        batch_size=batch,
        threads=threads,
        progress=False,
        reuse=True,
        dask_scheduler=scheduler,
    )
    assert result["computed"] == result["tiles"], result
    return float(result["seconds"]), np.load(root / "out" / DESCRIPTORS_FILE)


def forget_bucket_copies() -> int:
    """On a worker: drop the tile images it read from the bucket (the next run reads them again)."""
    from cachebuild.localize import daskexec

    daskexec._PACKS_READ.clear()
    gone = 0
    for root in [r for r in daskexec._STORES if r.endswith("cachebuild-tiles")]:
        daskexec._STORES.pop(root).close()
        shutil.rmtree(root, ignore_errors=True)
        gone += 1
    return gone


def fill_bucket(bucket: str, tileset: Path, store: Path, identity: str) -> str:
    """Put the tiles in the bucket as a build's tiles phase does (one pack per cell); the STORE URL."""
    import hashlib
    from collections import defaultdict

    from cachebuild.store.s3 import CELL_SHIFT, StoreURL, _cell_part, _encode_pack, open_store
    from cachebuild.tileset import hex_digests, read_tiles

    url = StoreURL(bucket, "bench")
    remote = open_store(str(url))
    cells: dict[tuple[int, int, int], list[tuple[int, int, str, bytes]]] = defaultdict(list)
    tiles = read_tiles(tileset)
    for tid, d in zip(tiles["id"].tolist(), hex_digests(tiles)):
        z, x, y = tid >> 58, (tid >> 29) & ((1 << 29) - 1), tid & ((1 << 29) - 1)
        image = (store / "objects" / d[:2] / d).read_bytes()
        cells[(z, x >> CELL_SHIFT, y >> CELL_SHIFT)].append((x, y, d, image))
    ns = hashlib.sha256(identity.encode()).hexdigest()[:32]
    for cell, tiles in cells.items():
        data = _encode_pack(identity, cell[0], time.time(), tiles)
        remote.put(
            url.key("tiles", ns, _cell_part(cell)) + f"{hashlib.sha256(data).hexdigest()}.pack",
            data,
        )
    return str(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=1000, help="tiles in the store (1000)")
    parser.add_argument("--batch", type=int, default=64, help="tiles per batch (64, as BATCH)")
    parser.add_argument("--workers", default="2", help="Dask worker counts, comma-separated (2)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each row (3)")
    parser.add_argument("--no-cold", action="store_true", help="skip the local:N all-in rows")
    parser.add_argument(
        "--bucket", action="store_true", help="add workers reading tiles from a bucket (moto)"
    )
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.workers.split(",") if c.strip()]

    from distributed import Client, LocalCluster

    from cachebuild.localize.daskexec import workers_read_bucket

    moto = None
    if args.bucket:
        from bench_s3 import MotoProcess

        moto = MotoProcess("bench-dask")
        os.environ.update(moto.env())  # this process and the cluster's worker processes

    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        root = Path(tmp)
        print(f"building {args.tiles} JPEG tiles ...", file=sys.stderr)
        _, store, _, mean_size = build_world(root, args.tiles)
        model = write_default_model(root / "model.onnx")
        compile_engine(
            model_path=model, calibration_path=None, precision="fp32", out_dir=root / "engine"
        )

        _, ref = run(root, store, args.batch, None, None)  # warm-up; the reference descriptors
        identity = "bench:synthetic"
        url = (
            fill_bucket("bench-dask", root / "tileset", store, identity) if moto is not None else ""
        )
        # each worker count: its rows alternate with local runs, so the ratio
        # compares runs made under the same load (the machine may be shared)
        groups: list[
            tuple[int, list[float], list[tuple[str, list[float], float]], float | None]
        ] = []
        for n in counts:
            start = None
            if not args.no_cold:
                t0 = time.perf_counter()
                with DaskExecutor(f"local:{n}", engine_dir=root / "engine", store_root=store):
                    pass
                start = time.perf_counter() - t0
            with LocalCluster(
                n_workers=n, threads_per_worker=2, processes=True, host="127.0.0.1",
                dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
                silence_logs=logging.CRITICAL,
            ) as cluster:  # fmt: skip
                threads = max(1, usable_cpus() // (2 * n))
                run(
                    root, store, args.batch, cluster.scheduler_address, threads
                )  # warm-up: engine loaded
                local: list[float] = []
                cold: list[float] = []
                standing: list[float] = []
                from_bucket: list[float] = []
                diff = 0.0
                for _ in range(args.repeat):
                    local.append(run(root, store, args.batch, None, None)[0])
                    if not args.no_cold:
                        seconds, d = run(root, store, args.batch, f"local:{n}", None)
                        cold.append(seconds)
                        diff = max(diff, float(np.abs(d - ref).max()))
                    seconds, d = run(root, store, args.batch, cluster.scheduler_address, threads)
                    standing.append(seconds)
                    diff = max(diff, float(np.abs(d - ref).max()))
                    if moto is not None:
                        with Client(cluster.scheduler_address, set_as_default=False) as client:
                            client.run(forget_bucket_copies)
                        with workers_read_bucket(url, identity):
                            seconds, d = run(
                                root, store, args.batch, cluster.scheduler_address, threads
                            )
                        from_bucket.append(seconds)
                        diff = max(diff, float(np.abs(d - ref).max()))
                rows = [(f"{n} workers, standing cluster (tcp://)", standing, diff)]
                if from_bucket:
                    rows.append(
                        (f"{n} workers, standing, tiles from the bucket", from_bucket, diff)
                    )
                if cold:
                    rows.insert(0, (f"DASK_SCHEDULER=local:{n} (cold, all-in)", cold, diff))
                groups.append((n, local, rows, start))
                print(f"  {n} workers done", file=sys.stderr)

    n = args.tiles
    print(
        f"describe on Dask: {n} JPEG tiles (mean {mean_size / 1024:.1f} KiB), batch {args.batch}, "
        f"{usable_cpus()} usable CPUs, every tile described each run (empty descriptor store), "
        f"median of {args.repeat} runs alternating with the local runs they are compared with"
    )
    print(f"| {'describe':<44} | {'tiles/s':>8} | {'vs local':>8} | {'max |diff|':>10} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 12}|")
    for _, local, rows, _ in groups:
        base = n / statistics.median(local)
        print(
            f"| {'local (in the build process), same turns':<44} | {base:>8.0f} | {1:>7.2f}x | {0:>10.1e} |"
        )
        for name, times, diff in rows:
            rate = n / statistics.median(times)
            print(f"| {name:<44} | {rate:>8.0f} | {rate / base:>7.2f}x | {diff:>10.1e} |")
    if moto is not None:
        moto.close()
    for workers, _, _, start in groups:
        if start is not None:
            print(
                f"local:{workers}: starting the cluster, sending the engine and stopping it alone: {start:.1f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
