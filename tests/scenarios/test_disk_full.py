"""A full disk at any write: a clear error (exit 24), the cache and store intact.

In process (tests/_harness/diskfault.py): a build of flight B over a published cache
A is run once recording every write it makes from Python (files, ``os.write``,
fsync, links, directories, SQLite statements: about 200 writes at some 75
sites), then again from the same starting state with the first write at a
site failing with ENOSPC (and every write after it: the disk stays full).
Each time the build must exit 24 naming the phase, "disk full", the file
when known, the free space of STORE and CACHE_DIR and the remedy; the
published cache must verify (A, or B when only bookkeeping after the swap
failed); every store object must hash to its name, no temp file may be
left in the store; and a build once space is back must succeed.  CI fails
the first write at each site of every module; ``CACHEBUILD_LONG=1`` every site.

On a real filesystem: where this runs as root and ``mount`` works, a tmpfs
too small for the build holds CACHEBUILD_HOME; the build fails with exit 24,
the earlier cache survives, and after growing the tmpfs the build succeeds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cachebuild._util.diskspace import disk_full_error, free_space_note, is_disk_full
from cachebuild._util.sizes import human_bytes
from cachebuild.errors import DiskFullError
from tests._harness.diskfault import DiskFault, full
from tests._harness.killharness import store_problems
from tests._harness.tileserver import TileServer
from tests.conftest import Cb, write_flight

LONG = os.environ.get("CACHEBUILD_LONG") == "1"
ARGS = {"BUFFER_M": "200", "ZOOM": "17"}


@dataclass
class World:
    """A published cache A in ``snapshot``; B's writes recorded."""

    root: Path
    server: TileServer
    flight_a: Path
    flight_b: Path
    old_id: str = ""
    new_id: str = ""
    sites: list[tuple[int, str]] = field(default_factory=list)
    writes: int = 0

    @property
    def home(self) -> Path:
        return self.root / "work" / "home"

    def restore(self) -> Path:
        if self.home.exists():
            shutil.rmtree(self.home.parent)
        self.home.parent.mkdir(parents=True)
        subprocess.run(
            ["cp", "-a", str(self.root / "snapshot" / "home"), str(self.home)], check=True
        )
        return self.home

    def vars(self, flight: Path) -> dict[str, str]:
        return {
            "FLIGHT": str(flight),
            "PROVIDER": self.server.template(query=""),
            "REPORT": "json",
            **ARGS,
        }


def _in_process(
    command: Any, vars: dict[str, str], fault: DiskFault | None = None
) -> tuple[int, dict, str]:
    """Run a runner command in this process; ``(exit code, report, stderr)``."""
    from cachebuild._util.report import Report

    out, err = io.StringIO(), io.StringIO()
    emit = Report.emit
    Report.emit = lambda self, fmt: emit(self, fmt, out, err)  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stderr(err):
            if fault is None:
                code = command(vars)
            else:
                with fault.active():
                    code = command(vars)
    finally:
        Report.emit = emit  # type: ignore[method-assign]
    return code, json.loads(out.getvalue().strip().splitlines()[-1]), err.getvalue()


def _build(world: World, flight: Path, fault: DiskFault | None = None) -> tuple[int, dict, str]:
    from cachebuild.cli.runner import build_cache

    return _in_process(build_cache, world.vars(flight), fault)


def _verify() -> tuple[int, dict, str]:
    from cachebuild.cli.runner import verify_cache_cmd

    return _in_process(verify_cache_cmd, {"REPORT": "json"})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("diskfull")
    server = TileServer()
    w = World(
        root,
        server,
        write_flight(root / "a.json", lat=47.3700, lon=8.5400),
        write_flight(root / "b.json", lat=47.3712, lon=8.5418),
    )
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("CACHEBUILD_")]:
            mp.delenv(name)
        home = root / "snapshot" / "home"
        home.mkdir(parents=True)
        mp.setenv("CACHEBUILD_HOME", str(home))
        mp.setenv("XDG_DATA_HOME", str(home / "data"))  # the dev key, inside the home
        code, rep, err = _build(w, w.flight_a)
        assert code == 0, err
        w.old_id = rep["build_id"]
        mp.setenv("CACHEBUILD_HOME", str(w.home))
        mp.setenv("XDG_DATA_HOME", str(w.home / "data"))
        w.restore()
        recorder = DiskFault()
        code, rep, err = _build(w, w.flight_b, recorder)
        assert code == 0, err
        w.new_id = rep["build_id"]
        w.sites = recorder.first_of_each_site()
        w.writes = len(recorder.sites)
        yield w
    server.close()


def _ci_sample(sites: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The first write of each module, and every site of the modules that publish and record state."""
    seen: set[str] = set()
    picked = []
    for n, site in sites:
        module = site.split(":", 1)[0]
        if module not in seen or module.endswith(("publish.py", "dependency.py")):
            seen.add(module)
            picked.append((n, site))
    return picked


def _check_failure(world: World, n: int, site: str) -> dict[str, Any]:
    """Fail the first write at ``site`` (the ``n``-th when recorded); check what the build said and left."""
    world.restore()
    fault = DiskFault(fail_site=site)
    code, rep, err = _build(world, world.flight_b, fault)
    assert fault.failed == site, (fault.failed, site)  # the site was reached
    problems = []
    if code == 0:
        # the failed write was one the build can do without: then it must be whole
        if rep["build_id"] != world.new_id:
            problems.append(f"succeeded with build {rep['build_id']}")
    else:
        msg = rep["error"] or ""
        if code != 24 or not msg.startswith("disk full during "):
            problems.append(f"exit {code}: {msg}")
        if "free space: STORE " not in msg or ", CACHE_DIR " not in msg:
            problems.append(f"no free space named: {msg}")
        if "STORE" not in (rep["remedy"] or "") or "CACHE_DIR" not in (rep["remedy"] or ""):
            problems.append(f"remedy: {rep['remedy']}")
        if "Traceback" in err:
            problems.append("a traceback on stderr")
    vcode, vrep, verr = _verify()
    if vcode != 0 or vrep["build_id"] not in (world.old_id, world.new_id):
        problems.append(f"published cache: verify-cache exit {vcode}: {vrep.get('error')}")
    problems += store_problems(world.home / "store")
    left = list((world.home / "store" / "tmp").iterdir())
    if left:
        problems.append(f"temp files left in the store: {left}")
    return {
        "site": site,
        "n": n,
        "code": code,
        "phase": rep["failure_phase"],
        "error": rep["error"],
        "problems": problems,
    }


def _resume(world: World) -> None:
    code, rep, err = _build(world, world.flight_b)
    assert code == 0 and rep["build_id"] == world.new_id, err
    vcode, vrep, _ = _verify()
    assert vcode == 0 and vrep["build_id"] == world.new_id


def test_the_recording_saw_every_kind_of_write(world: World) -> None:
    kinds = {site.split(" ", 1)[1] for _, site in world.sites}
    assert {"write", "open", "sqlite", "fsync", "link", "symlink", "mkdir"} <= kinds, kinds
    modules = {site.split(":", 1)[0] for _, site in world.sites}
    for m in (
        "store/objects.py",
        "tileset.py",
        "tiles/mbtiles.py",
        "store/descriptors.py",
        "_util/npyio.py",
        "release/manifest.py",
        "release/publish.py",
    ):
        assert f"cachebuild/{m}" in modules, modules
    assert "doit/dependency.py" in modules  # doit's database


def test_enospc_at_every_write_site(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("CACHEBUILD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CACHEBUILD_HOME", str(world.home))
    monkeypatch.setenv("XDG_DATA_HOME", str(world.home / "data"))
    sites = world.sites if LONG else _ci_sample(world.sites)
    outcomes = []
    for i, (n, site) in enumerate(sites):
        outcomes.append(_check_failure(world, n, site))
        if i % 8 == 0 or i == len(sites) - 1:
            _resume(world)  # space is back: the build finishes
    if LONG:
        for o in outcomes:
            print(
                f"{o['site']:<40} exit {o['code']:>2}  {o['phase'] or '-':<10} {'; '.join(o['problems']) or 'ok'}"
            )
        print(
            f"{len(outcomes)} ENOSPC sites ({world.writes} writes), {sum(bool(o['problems']) for o in outcomes)} damaged"
        )
    bad = [o for o in outcomes if o["problems"]]
    assert bad == []
    assert sum(o["code"] == 24 for o in outcomes) >= len(outcomes) - 2, outcomes


def test_a_failed_sqlite_write_is_a_disk_full_too(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """doit's database is written last, by doit itself: its SQLITE_FULL is exit 24, not a bug."""
    monkeypatch.setenv("CACHEBUILD_HOME", str(world.home))
    monkeypatch.setenv("XDG_DATA_HOME", str(world.home / "data"))
    n = next(
        n for n, site in world.sites if site.startswith("doit/dependency.py") and "commit" in site
    )
    o = _check_failure(world, n, next(s for m, s in world.sites if m == n))
    assert o["problems"] == [] and o["code"] == 24
    assert "SQLite" in o["error"]


# -- cachebuild._util.diskspace, unit ---------------------------------------------------------


def test_is_disk_full_knows_enospc_edquot_and_sqlite_full() -> None:
    import errno
    import sqlite3

    assert is_disk_full(full("/x"))
    assert is_disk_full(OSError(errno.EDQUOT, "quota"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not is_disk_full(OSError(errno.EACCES, "no"))
    assert not is_disk_full(ValueError("x"))
    try:
        try:
            raise full("/deep")
        except OSError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)


def test_disk_full_error_names_the_file_phase_and_space(tmp_path: Path) -> None:
    err = disk_full_error(
        full(tmp_path / "a.npy"),
        "describe",
        {"STORE": tmp_path, "CACHE_DIR": tmp_path / "no" / "such"},
    )
    assert isinstance(err, DiskFullError) and err.exit_code == 24 and err.phase == "describe"
    assert err.message.startswith(
        f"disk full during describe (writing {tmp_path / 'a.npy'}: No space left on device)"
    )
    assert f"free space: STORE {tmp_path} " in err.message and "CACHE_DIR" in err.message
    assert "STORE and CACHE_DIR" in err.remedy
    assert free_space_note({"X": tmp_path}).startswith(f"free space: X {tmp_path} ")
    assert human_bytes(5 * 1024**2) == "5.0 MiB"


# -- a real full filesystem --------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


def test_a_real_full_filesystem(tmp_path: Path) -> None:
    """CACHEBUILD_HOME on a tmpfs that holds cache A but not A and B.

    B has fewer tiles than A (elsewhere), so the up-front disk estimate
    (cachebuild/inputs/area.py: only tiles beyond the staged build's count) lets it
    start, and the disk fills during the build, as when something else
    fills it meanwhile.
    """
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "64m"):
        pytest.skip("needs root and a working `mount -t tmpfs` to make a small filesystem")
    server = TileServer()
    try:
        home = mnt / "home"
        home.mkdir()
        cb = Cb(home=home)
        provider = f"PROVIDER={server.template(query='')}"
        fa = write_flight(tmp_path / "a.json")
        a = cb.build(f"FLIGHT={fa}", "BUFFER_M=400", "ZOOM=17", provider)
        assert a.code == 0, a.stderr
        fb = write_flight(tmp_path / "b.json", lat=47.3900, lon=8.5600)
        size = shutil.disk_usage(mnt).used + 128 * 1024
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)
        assert shutil.disk_usage(mnt).free <= 256 * 1024, shutil.disk_usage(mnt)
        b = cb.build(f"FLIGHT={fb}", "BUFFER_M=200", "ZOOM=17", provider)
        assert b.code == 24, b.stderr
        rep = b.report
        assert (
            rep["error"].startswith("disk full during ")
            and f"STORE {home / 'store'}" in rep["error"]
        )
        assert "Traceback" not in b.stderr
        print(f"real ENOSPC: phase {rep['failure_phase']}: {rep['error']}")
        v = cb.run("verify-cache")
        assert v.code == 0 and v.report["build_id"] == a.report["build_id"], v.stderr
        assert store_problems(home / "store") == []
        assert list((home / "store" / "tmp").iterdir()) == []
        # space is back: the build finishes, fetching only what it lacks
        subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)
        before = server.count()
        b2 = cb.build(f"FLIGHT={fb}", "BUFFER_M=200", "ZOOM=17", provider)
        assert b2.code == 0, b2.stderr
        assert (
            server.count() - before == b2.report["tiles"]["fetched"] < b2.report["tiles"]["planned"]
        )
        assert cb.run("verify-cache").code == 0
    finally:
        server.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
