"""Describe on a Dask cluster (DASK_SCHEDULER), with real parts: real doit
builds, a distributed.LocalCluster of worker processes, and a `dask
scheduler` plus `dask worker` processes on 127.0.0.1, one of them SIGKILLed
mid-describe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cachebuild.errors import CacheBuildError, UsageError
from cachebuild.inputs.config import load_settings, parse_dask_scheduler
from cachebuild.localize.describe import describe_tiles
from cachebuild.release.lock import CacheLock
from cachebuild.store.windowkeys import block_digests, neighbours
from tests.conftest import REPO, Cb, write_flight

# about 12 tiles; one or two per batch, so a cluster gets several batches
SMALL = ("BUFFER_M=200", "ZOOM=17")

#: A warm no-op in-process: did it import dask?
NOOP_PROBE = """
import json, sys
from cachebuild.cli.console import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "dask": sorted(m for m in ("dask", "distributed") if m in sys.modules)}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "raw, parsed",
    [
        ("local:2", ("local", 2)),
        ("tcp://127.0.0.1:8786", ("tcp", "tcp://127.0.0.1:8786")),
        ("tcp://gpu-box.lan:8786", ("tcp", "tcp://gpu-box.lan:8786")),
        ("tcp://[::1]:8786", ("tcp", "tcp://[::1]:8786")),
    ],
)
def test_scheduler_values(raw: str, parsed: tuple[str, object]) -> None:
    assert parse_dask_scheduler(raw) == parsed
    assert (
        load_settings({"DASK_SCHEDULER": raw}, {"CACHEBUILD_HOME": "/tmp/cb"}).dask_scheduler == raw
    )
    assert load_settings({}, {"CACHEBUILD_HOME": "/tmp/cb"}).dask_scheduler is None


@pytest.mark.parametrize(
    "raw",
    [
        "local:0",
        "local:",
        "local:x",
        "tcp://host",
        "tcp://:8786",
        "tcp://h:0",
        "tcp://h:70000",
        "udp://h:1",
        "h:8786",
    ],
)
def test_bad_scheduler_values_name_the_variable(raw: str) -> None:
    with pytest.raises(UsageError) as e:
        load_settings({"DASK_SCHEDULER": raw}, {"CACHEBUILD_HOME": "/tmp/cb"})
    assert "DASK_SCHEDULER" in e.value.message and repr(raw) in e.value.message
    assert "tcp://host:port" in e.value.remedy and e.value.exit_code == 2


def test_unreachable_scheduler_fails_with_21_before_any_work(cb: Cb, tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    f = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={f}", *SMALL, f"DASK_SCHEDULER={address}")
    assert r.code == 21, r.stderr
    rep = r.report
    assert (
        rep["failure_phase"] == "describe"
        and address in rep["error"]
        and "dask scheduler" in rep["remedy"]
    )
    assert address in r.stderr
    assert rep["tasks"]["run"] == []  # nothing fetched, nothing built
    assert not cb.current.exists()
    assert not (cb.home / "store" / "objects").exists() or not any(
        (cb.home / "store" / "objects").rglob("*.*")
    )
    with CacheLock(cb.cache_dir / "build.lock"):  # the lock is free
        pass


def test_a_worker_that_cannot_see_the_store_names_its_host_and_the_tile(tmp_path: Path) -> None:
    from cachebuild.errors import BuildError
    from cachebuild.localize import daskexec

    missing = tmp_path / "elsewhere" / "store"
    tile = (17 << 58) | (68000 << 29) | 45000
    with pytest.raises(BuildError) as e:
        daskexec._tile_paths(str(missing), np.array([tile]), np.zeros((1, 32), np.uint8))
    assert socket.gethostname() in e.value.message and "z=17 x=68000 y=45000" in e.value.message
    assert str(missing) in e.value.message and "same path" in e.value.remedy
    assert e.value.exit_code == 21 and e.value.phase == "describe"
    assert not missing.exists()  # a worker never creates a store of its own


def _store_counts(store: Path) -> tuple[int, int, int]:
    """(descriptors indexed, rows the shards hold, rows the shard files hold) of the one engine."""
    (engine_dir,) = [p for p in (store / "descriptors").iterdir() if p.is_dir()]
    db = sqlite3.connect(engine_dir / "index.sqlite")
    try:
        indexed = db.execute("SELECT COUNT(*) FROM descriptors").fetchone()[0]
        rows = db.execute("SELECT COALESCE(SUM(rows), 0) FROM shards").fetchone()[0]
    finally:
        db.close()
    dim = json.loads((engine_dir / "meta.json").read_text())["dim"]
    on_disk = sum(p.stat().st_size for p in (engine_dir / "shards").iterdir()) // (4 * dim)
    return int(indexed), int(rows), int(on_disk)


def _check_against_local(cb: Cb, tmp_path: Path) -> int:
    """The staged descriptors equal a local describe's (in a store with the same images and no
    descriptors); each window block stored once. Returns N (tiles)."""
    build = cb.cache_dir / "state" / "build"
    stride = json.loads((build / "windows.json").read_text())["stride"]
    shutil.copytree(cb.home / "store" / "objects", tmp_path / "local-store" / "objects")
    local = describe_tiles(
        tileset_dir=build, store_root=tmp_path / "local-store", engine_dir=build / "engine",
        out_dir=tmp_path / "local", progress=False, reuse=True, window_stride=stride,
    )  # fmt: skip
    assert local["executor"] == "local" and local["workers"] == 1
    assert local["computed"] == local["tiles"]
    np.testing.assert_array_equal(
        np.load(build / "descriptor_ids.npy"), np.load(tmp_path / "local" / "descriptor_ids.npy")
    )
    np.testing.assert_allclose(
        np.load(build / "descriptors.npy"),
        np.load(tmp_path / "local" / "descriptors.npy"),
        atol=1e-5,
    )
    # the second stage's cells come through the workers too (int8: a rounding apart at most)
    cells, local_cells = np.load(build / "cells.npy"), np.load(tmp_path / "local" / "cells.npy")
    assert cells.shape == local_cells.shape and (stride == 1) == (cells.size == 0)
    assert np.abs(cells.astype(np.int16) - local_cells).max(initial=0) <= 1
    tiles = np.load(build / "tiles.npy")
    tiles = tiles[np.argsort(tiles["id"])]
    raw = np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(-1, 32)
    blocks = block_digests(raw, neighbours(tiles["id"]), stride, "pooled")
    n = len({bytes(b) for b in blocks})
    assert _store_counts(cb.home / "store") == (n, n, n)
    return len(tiles)


def test_local_cluster_describes_the_same_descriptors_once(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={f}", *SMALL, "BATCH=2", "DASK_SCHEDULER=local:2")
    assert r.code == 0, r.stderr
    rep = r.report
    n = _check_against_local(cb, tmp_path)
    assert rep["descriptors"] == {"computed": n, "reused": 0}
    assert rep["describe"]["executor"] == "dask" and rep["describe"]["workers"] == 2
    assert rep["describe"]["tiles_per_s"] > 0
    assert cb.run("verify-cache").code == 0

    # where the engine runs is no dependency: without DASK_SCHEDULER it is a
    # no-op, and that never imports dask
    p = subprocess.run(
        [sys.executable, "-c", NOOP_PROBE, "build-cache", f"FLIGHT={f}", *SMALL, "BATCH=2", "REPORT=json"],
        cwd=REPO, env=cb.env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    probe, noop = json.loads(p.stdout.splitlines()[-1]), json.loads(p.stdout.splitlines()[-2])
    assert probe == {"code": 0, "dask": []}, p.stderr
    assert noop["outcome"] == "up_to_date"
    assert noop["describe"] == {
        "executor": "local",
        "workers": 0,
        "tiles_per_s": 0.0,
        "windows": 0,
        "windows_per_s": 0.0,
    }

    # a shifted flight with an unreachable scheduler: exit 21, the published cache stays
    published = (cb.current / "manifest.json").read_bytes()
    moved = write_flight(tmp_path / "g.json", lon=8.5400 + 0.0028)
    bad = cb.build(f"FLIGHT={moved}", *SMALL, f"DASK_SCHEDULER=tcp://127.0.0.1:{free_port()}")
    assert bad.code == 21 and bad.report["tasks"]["run"] == []
    assert (cb.current / "manifest.json").read_bytes() == published


# -- a `dask scheduler` and `dask worker`s as processes ------------------------


def can_hide_paths() -> bool:
    """Whether a process can get a mount namespace of its own (root, or unprivileged user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /mnt"],
        capture_output=True, check=False,
    )  # fmt: skip
    return probe.returncode == 0


class Cluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1.

    ``worker_env`` is added to the workers' environment, ``worker_cwd`` is
    their working directory, and ``hide`` a directory the workers see as an
    empty tmpfs (a mount namespace of their own): a machine without the
    build's file system.
    """

    def __init__(
        self,
        tmp: Path,
        workers: int,
        *,
        worker_env: dict[str, str] | None = None,
        worker_cwd: Path | None = None,
        hide: Path | None = None,
    ):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "DASK_DISTRIBUTED__WORKER__DAEMON": "False",
        }
        self.worker_env = {**self.env, **(worker_env or {})}
        self.worker_cwd = worker_cwd or REPO
        self.hide = hide
        self.procs: list[subprocess.Popen[bytes]] = []
        info = tmp / "scheduler.json"
        self.scheduler = self._start(
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(info),
        )
        deadline = time.monotonic() + 60
        while not info.exists() or not info.read_text().strip():
            assert self.scheduler.poll() is None, "dask scheduler exited"
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.1)
        self.address = json.loads(info.read_text())["address"]
        self.workers = []
        for i in range(workers):
            self.workers.append(
                self._start(
                    "worker",
                    self.address,
                    "--no-nanny",
                    "--nthreads",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                    "--local-directory",
                    str(tmp / f"w{i}"),
                    "--name",
                    f"w{i}",
                )  # fmt: skip
            )

    def _start(self, *args: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "dask", *args]
        worker = args[0] == "worker"
        if worker and self.hide is not None:
            mount = 'mount -t tmpfs none "$0" && exec "$@"'
            argv = [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                mount,
                str(self.hide),
                *argv,
            ]
        with open(self.tmp / f"{args[0]}-{len(self.procs)}.log", "wb") as log:
            p = subprocess.Popen(
                argv, cwd=self.worker_cwd if worker else REPO, env=self.worker_env if worker else self.env,
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "dask", workers=2)
    try:
        yield c
    finally:
        c.close()


def test_worker_killed_mid_describe_is_retried_and_each_descriptor_stored_once(
    cb: Cb, tmp_path: Path, cluster: Cluster
) -> None:
    from distributed import Client

    from tests._harness.daskkill import KillOnSecondBatch

    marker = tmp_path / "killed"
    with Client(cluster.address, timeout=30, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=60)
        client.register_plugin(KillOnSecondBatch(str(marker)), name="kill-on-second-batch")

        f = write_flight(tmp_path / "f.json")
        r = cb.build(f"FLIGHT={f}", *SMALL, "BATCH=1", f"DASK_SCHEDULER={cluster.address}")
        assert r.code == 0, r.stderr
        assert marker.exists(), "no worker was killed: the test proved nothing"
        pid = int(marker.read_text().split()[0])
        killed = [w for w in cluster.workers if w.pid == pid]
        assert len(killed) == 1 and killed[0].wait(timeout=30) == -signal.SIGKILL

        rep = r.report
        n = _check_against_local(cb, tmp_path)
        assert rep["descriptors"] == {"computed": n, "reused": 0}
        assert rep["describe"]["executor"] == "dask" and rep["describe"]["workers"] >= 1

        # the surviving worker loaded the engine once, whatever the batches it ran
        from cachebuild.localize import daskexec

        loads = client.run(daskexec.engine_loads)
        engine = cb.cache_dir / "state" / "build" / "engine"
        key = json.loads((engine / "features" / "engine.json").read_text())[
            "key"
        ]  # windows: the feature engine
        assert list(loads.values()) == [{key: 1}]

    # a damaged tile image fails a worker's batch with the error a local describe
    # raises: same class, message and fields (they cross the wire intact)
    build, store = cb.cache_dir / "state" / "build", cb.home / "store"
    tiles = np.load(build / "tiles.npy")
    victim = (
        store / "objects" / bytes(tiles["sha256"][0]).hex()[:2] / bytes(tiles["sha256"][0]).hex()
    )
    errors = []
    for where in (cluster.address, None):
        shutil.rmtree(store / "descriptors")  # every image is described again
        victim.unlink(missing_ok=True)
        victim.write_bytes(b"\xff\xd8 not a jpeg")
        with pytest.raises(CacheBuildError) as e:
            describe_tiles(
                tileset_dir=build, store_root=store, engine_dir=build / "engine", out_dir=tmp_path / "again",
                batch_size=1, progress=False, reuse=True, dask_scheduler=where,
            )  # fmt: skip
        errors.append(e.value)
    remote, local = errors
    assert type(remote) is type(local) and vars(remote) == vars(local) and str(remote) == str(local)
    assert "z=" in remote.message and remote.exit_code == 21


# -- workers on "another machine": tiles from the bucket, no shared file system --


def test_workers_read_tiles_from_the_bucket_and_never_the_build_s_store(tmp_path: Path) -> None:
    """STORE=s3:// and a tcp:// cluster whose workers have their own home, working directory and
    credentials, and (where a mount namespace can be had) see the build's home as an empty directory."""
    pytest.importorskip("moto.server")
    from cachebuild.errors import BuildError
    from cachebuild.localize import daskexec
    from tests._harness.s3server import S3Server

    s3 = S3Server(tmp_path, bucket="maps-dask")
    cb = Cb(home=tmp_path / "home", env_extra=s3.env)
    cb.home.mkdir()
    hide = cb.home if can_hide_paths() else None
    (tmp_path / "worker-home").mkdir()
    (tmp_path / "worker-cwd").mkdir()
    cluster = Cluster(
        tmp_path / "dask", workers=2, hide=hide, worker_cwd=tmp_path / "worker-cwd",
        worker_env={**s3.env, "CACHEBUILD_HOME": str(tmp_path / "worker-home")},
    )  # fmt: skip
    try:
        from distributed import Client

        with Client(cluster.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
        f = write_flight(tmp_path / "f.json")
        url = f"s3://{s3.bucket}/fleet"
        r = cb.build(
            f"FLIGHT={f}", *SMALL, "BATCH=2", f"DASK_SCHEDULER={cluster.address}", f"STORE={url}"
        )
        assert r.code == 0, r.stderr + "".join(
            p.read_text() for p in (tmp_path / "dask").glob("*.log")
        )
        rep = r.report
        n = _check_against_local(
            cb, tmp_path
        )  # the same descriptors as a local describe, each stored once
        assert rep["descriptors"] == {"computed": n, "reused": 0}
        assert rep["describe"]["executor"] == "dask" and rep["describe"]["workers"] == 2

        # every image the workers decoded came from the bucket's packs into their own stores
        tiles = np.load(cb.cache_dir / "state" / "build" / "tiles.npy")
        want = {
            bytes(d).hex()
            for d in np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(-1, 32)
        }
        got = {p.name for p in (tmp_path / "dask").glob("w*/**/cachebuild-tiles/objects/*/*")}
        assert want <= got
        assert not (tmp_path / "worker-home" / "store").exists()
        for text in (r.stdout, r.stderr):
            assert s3.secret_key not in text and s3.access_key not in text

        if hide is not None:  # without the bucket these workers cannot find a single tile
            build = cb.cache_dir / "state" / "build"
            shutil.rmtree(cb.home / "store" / "descriptors")
            with pytest.raises(BuildError) as e:
                describe_tiles(
                    tileset_dir=build, store_root=cb.home / "store", engine_dir=build / "engine",
                    out_dir=tmp_path / "again", batch_size=2, progress=False, reuse=True,
                    dask_scheduler=cluster.address,
                )  # fmt: skip
            assert "finds no image" in e.value.message and "same path" in e.value.remedy

        # an image the bucket does not have: the worker names the tile and the bucket
        with daskexec.workers_read_bucket(url, "no-such-provider"):
            ex = daskexec.DaskExecutor(cluster.address, engine_dir=cb.cache_dir / "state" / "build" / "engine",
                                       store_root=cb.home / "store")  # fmt: skip
        assert isinstance(ex.source, daskexec.BucketSource)
        with ex:
            ids = np.ascontiguousarray(tiles["id"][:1], dtype=np.int64)
            digests = np.zeros((1, 32), dtype=np.uint8)
            with pytest.raises(BuildError) as e2:
                list(ex.run(iter([(0, ids, digests)])))
        assert "finds no image for tile" in e2.value.message and url in e2.value.message
    finally:
        cluster.close()
        s3.close()
