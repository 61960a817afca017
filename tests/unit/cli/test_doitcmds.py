"""doit's own commands in a cachebuild project, run as an operator runs them (real doit processes).

``ignore`` and ``reset-dep`` are refused, ``forget`` takes the cache lock,
``info`` judges a task as build-cache does, bare ``doit`` and ``doit <task>``
say one clear line, and ``clean`` works from any directory while another
project's dodo file keeps doit's own ``clean``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib

from cachebuild.release.lock import CacheLock
from tests.conftest import REPO, Cb, write_flight

SMALL = ("BUFFER_M=200", "ZOOM=17")


@pytest.fixture
def entry_points(tmp_path: Path) -> Path:
    """A dist-info declaring pyproject.toml's ``doit.COMMAND`` entry points, for PYTHONPATH.

    The venv's installed metadata is as old as its last install; this makes
    a doit process see exactly what pyproject.toml declares (an install from
    it gives the same), so ``doit clean`` outside the project root is ours.
    """
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][
        "doit.COMMAND"
    ]
    site = tmp_path / "ep-site"
    info = site / "cachebuild_entry_points-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: cachebuild-entry-points\nVersion: 0\n"
    )
    lines = "".join(f"{name} = {target}\n" for name, target in table.items())
    (info / "entry_points.txt").write_text("[doit.COMMAND]\n" + lines)
    return site


def _doit(
    cb: Cb, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "doit", *args],
        cwd=cwd or cb.cwd,
        env=env or cb.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _mark_ignored(dep_file: Path, task: str) -> None:
    """What doit's own ``doit ignore`` writes (from an older cachebuild, or another tool)."""
    from doit.dependency import Dependency, SqliteDB

    dep = Dependency(SqliteDB, str(dep_file))
    dep.ignore(SimpleNamespace(name=task))
    dep.close()


def test_ignore_is_refused_and_an_ignored_task_stops_build_cache(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    first = cb.build(f"FLIGHT={f}", *SMALL)
    assert first.code == 0, first.stderr
    before = (cb.current / "manifest.json").read_bytes()

    ig = cb.run("ignore", "selftest")
    assert ig.code == 2, ig.stderr
    assert (
        "doit ignore selftest" in ig.report["error"] and "SELFTEST_QUERIES=0" in ig.report["remedy"]
    )

    dep_file = cb.cache_dir / "state" / "doit.sqlite3"
    assert dep_file.exists()
    _mark_ignored(dep_file, "selftest")
    r = cb.build(f"FLIGHT={f}", *SMALL, "SELFTEST_QUERIES=50")
    assert r.code == 2, r.stderr
    assert "selftest" in r.report["error"] and "ignore" in r.report["error"]
    assert r.report["remedy"].startswith("doit forget selftest")
    assert (cb.current / "manifest.json").read_bytes() == before

    fg = cb.run("forget", "selftest")
    assert fg.code == 0, fg.stderr
    again = cb.build(f"FLIGHT={f}", *SMALL, "SELFTEST_QUERIES=50")
    assert again.code == 0, again.stderr
    assert again.report["outcome"] == "success" and "selftest" in again.report["tasks"]["run"]
    assert json.loads((cb.current / "selftest.json").read_text())["queries"] <= 50
    # the same frames give the same selftest.json (content, no history: issue 24), so the
    # signed cache is the one already published
    assert (cb.current / "manifest.json").read_bytes() == before


def test_forget_takes_the_lock_and_reset_dep_is_refused(cb: Cb, tmp_path: Path) -> None:
    with CacheLock(cb.cache_dir / "build.lock"):
        fg = cb.run("forget", "selftest")
    assert fg.code == 50, fg.stderr
    assert fg.report["failure_phase"] == "lock"
    typo = cb.run("forget", "selftets")
    assert typo.code == 2 and "did you mean selftest?" in typo.report["error"]
    rd = cb.run("reset-dep")
    assert rd.code == 2 and "reset-dep" in rd.report["error"]


def test_info_judges_a_task_as_build_cache_does(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    assert cb.build(f"FLIGHT={f}", *SMALL).code == 0
    noop = cb.build(f"FLIGHT={f}", *SMALL)
    assert noop.report["outcome"] == "up_to_date"
    for task in ("selftest", "tiles", "manifest"):
        same = _doit(cb, "info", task, f"FLIGHT={f}", *SMALL)
        assert same.returncode == 0, same.stdout + same.stderr
        assert "status     : up-to-date" in same.stdout
        assert "checker changed" not in same.stdout
    listed = _doit(cb, "list", "--status", f"FLIGHT={f}", *SMALL)
    assert listed.returncode == 0 and all(
        ln.startswith("U ") for ln in listed.stdout.splitlines()
    ), listed.stdout
    dump = _doit(cb, "dumpdb")
    assert dump.returncode == 0 and "Traceback" not in dump.stderr
    assert dump.stdout.startswith("describe: {") and '"checker:": "HashCacheChecker"' in dump.stdout
    other = _doit(cb, "info", "selftest", f"FLIGHT={f}", *SMALL, "SELFTEST_QUERIES=50")
    assert other.returncode == 1 and "status     : run" in other.stdout
    assert "'queries': 50" in other.stdout

    nosuch = _doit(cb, "info", "nosuch", "REPORT=text")
    assert nosuch.returncode == 2
    assert "Traceback" not in nosuch.stderr
    assert nosuch.stderr.startswith("ERROR [arguments, exit 2]: no task 'nosuch'")


def test_bare_doit_and_a_task_name_say_one_clear_line(cb: Cb, tmp_path: Path) -> None:
    bare = _doit(cb)
    assert bare.returncode == 2
    assert "doit build-cache FLIGHT=" in bare.stderr and len(bare.stderr.splitlines()) == 1
    f = write_flight(tmp_path / "f.json")
    task = _doit(cb, "tiles", f"FLIGHT={f}", "REPORT=text")
    assert task.returncode == 2
    assert "TaskFailed" not in task.stdout + task.stderr
    assert task.stderr.startswith(
        "ERROR [arguments, exit 2]: task 'tiles' runs only inside `doit build-cache`"
    )
    st = _doit(cb, "strace", "tiles", f"FLIGHT={f}", "REPORT=text")
    assert (
        st.returncode == 2
        and "TaskFailed" not in st.stdout + st.stderr
        and "doit build-cache" in st.stderr
    )
    typo = _doit(cb, "biuld-cache", "REPORT=text")
    assert typo.returncode == 2 and "did you mean build-cache?" in typo.stderr


def test_clean_works_outside_the_project_root(cb: Cb, tmp_path: Path, entry_points: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    assert cb.build(f"FLIGHT={f}", *SMALL).code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cb.cwd = elsewhere
    env = cb.env(PYTHONPATH=str(entry_points))
    c = cb.run("clean", env=env)
    assert c.code == 0, c.stderr
    assert not (cb.cache_dir / "state" / "doit.sqlite3").exists()
    r = cb.build(f"FLIGHT={f}", *SMALL, env=env)
    assert r.code == 0 and "selftest" in r.report["tasks"]["run"]
    assert cb.run("clean-cache", env=env).code == 0


def test_another_projects_dodo_keeps_doits_own_clean(
    cb: Cb, tmp_path: Path, entry_points: Path
) -> None:
    project = tmp_path / "other"
    project.mkdir()
    (project / "dodo.py").write_text(
        "def task_hello():\n"
        "    return {'actions': ['echo hi > hello.txt'], 'targets': ['hello.txt'], 'clean': True}\n"
    )
    env = cb.env(PYTHONPATH=str(entry_points))
    assert _doit(cb, "hello", cwd=project, env=env).returncode == 0
    assert (project / "hello.txt").exists()
    c = _doit(cb, "clean", cwd=project, env=env)
    assert c.returncode == 0, c.stderr
    assert not (project / "hello.txt").exists(), (
        "doit's own clean removed the other project's target"
    )
    assert not (cb.cache_dir / "state").exists()
