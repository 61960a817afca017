"""Running a build plan's tasks with doit: the loader, the reporter, the database.

One place says how doit sees a build (its database, its file checker, its
tasks), so that ``build-cache``, ``doit info``, ``doit forget`` and
``doit list`` all judge the same state the same way.  The reporter records
what ran for the report and, where stderr is not a terminal, closes each
phase with one line giving its time and rate.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from doit.cmd_base import TaskLoader2

from cachebuild._util.statcache import HASH_CACHE_NAME, doit_file_checker
from targets import FINAL_TASK, task_dicts

__all__ = [
    "RecordingReporter",
    "PlanLoader",
    "doit_config",
    "run_doit",
    "sigterm_as_interrupt",
    "cmdline_vars",
    "ignored_tasks",
    "phase_line",
]

#: Phases whose closing line another part prints (tiles: the fetcher's summary).
_OWN_SUMMARY = frozenset({"tiles"})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _phase_count(build: Path, name: str) -> tuple[int, str] | None:
    """What phase ``name`` worked through, from the small JSON files it leaves: (count, unit)."""
    if name == "describe":
        return int(_read_json(build / "describe.json").get("computed", 0)), "tiles described"
    if name == "index":
        return int(_read_json(build / "index.json").get("ntotal", 0)), "vectors"
    if name == "selftest":
        return int(_read_json(build / "selftest.json").get("queries", 0)), "frames"
    if name in ("mbtiles", "preview"):
        return int(_read_json(build / "tileset.json").get("present", 0)), "tiles"
    return None


def phase_line(build: Path | None, name: str, seconds: float) -> str:
    """The closing line of a phase: ``describe: 12 tiles described in 0.2 s, 52/s``."""
    count = _phase_count(build, name) if build is not None else None
    if count is None:
        return f"{name}: done in {seconds:.1f} s"
    n, unit = count
    return f"{name}: {n:,} {unit} in {seconds:.1f} s, {n / max(seconds, 1e-3):,.0f}/s"


class RecordingReporter:
    """A doit reporter that records what ran and how long, and tells the user.

    Task lines go to stderr (``.. tiles`` ran, ``-- flight`` up to date), so
    stdout carries only the report.  Where stderr is not a terminal (CI
    logs), each phase that ran ends with one line: its time and its rate.
    """

    desc = "cachebuild recording reporter"

    def __init__(self, stream: Any = None, build: Path | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.build = build
        self.ran: list[str] = []
        self.up_to_date: list[str] = []
        self.failed: list[str] = []
        self.ignored: list[str] = []
        self.errors: list[str] = []
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self._t0 = 0.0
        self._quiet = not getattr(self.stream, "isatty", lambda: False)()

    def initialize(self, tasks: Any, selected_tasks: Any) -> None:
        pass

    def get_status(self, task: Any) -> None:
        pass

    def execute_task(self, task: Any) -> None:
        self.current = task.name
        self._t0 = time.monotonic()
        self.stream.write(f".. {task.name}\n")
        self.stream.flush()

    def _done(self, task: Any) -> None:
        self.seconds[task.name] = round(time.monotonic() - self._t0, 4)
        self.current = None

    def add_success(self, task: Any) -> None:
        self._done(task)
        self.ran.append(task.name)
        if self._quiet and task.name not in _OWN_SUMMARY:
            self.stream.write(phase_line(self.build, task.name, self.seconds[task.name]) + "\n")
            self.stream.flush()

    def add_failure(self, task: Any, fail: Any) -> None:
        self._done(task)
        self.failed.append(task.name)
        self.errors.append(f"{task.name}: {fail.get_name()}: {fail.message}")

    def skip_uptodate(self, task: Any) -> None:
        self.up_to_date.append(task.name)
        self.stream.write(f"-- {task.name}\n")

    def skip_ignore(self, task: Any) -> None:
        self.ignored.append(task.name)

    def cleanup_error(self, exception: Any) -> None:
        self.errors.append(str(exception))

    def runtime_error(self, msg: str) -> None:
        self.errors.append(msg)

    def teardown_task(self, task: Any) -> None:
        pass

    def complete_run(self) -> None:
        self.stream.flush()


def doit_config(plan: Any) -> dict[str, Any]:
    """doit's configuration for a build: its database and its file checker.

    ``build-cache``, ``doit info``, ``doit forget`` and dodo.py's
    ``DOIT_CONFIG`` all use this, so each judges a task as the build does.
    """

    return {
        "dep_file": str(plan.paths.dep_file),
        "backend": "sqlite3",
        "verbosity": 2,
        # file deps hashed once per change, through the build's hash cache (not md5 on every check)
        "check_file_uptodate": doit_file_checker(plan.paths.build / HASH_CACHE_NAME),
    }


class PlanLoader(TaskLoader2):
    """Give doit the tasks of one build plan, with the DB where the state lives."""

    def __init__(self, plan: Any, reporter: Any = None):
        super().__init__()
        self.plan = plan
        self.reporter = reporter

    def setup(self, opt_values: Any) -> None:
        pass

    def load_doit_config(self) -> dict[str, Any]:
        config = doit_config(self.plan)
        if self.reporter is not None:
            config["reporter"] = self.reporter
        return config

    def load_tasks(self, cmd: Any, pos_args: Any) -> list[Any]:
        from doit.task import dict_to_task

        return [dict_to_task(d) for d in task_dicts(self.plan)]


def run_doit(plan: Any, reporter: RecordingReporter, tasks: list[str] | None = None) -> int:
    """Run the build's tasks with doit; returns doit's exit code."""
    from doit.cmd_run import Run

    plan.paths.state.mkdir(parents=True, exist_ok=True)
    cmd = Run(task_loader=PlanLoader(plan, reporter), config={}, bin_name="doit")
    try:
        return int(cmd.parse_execute(tasks or [FINAL_TASK]))
    finally:
        # a commit that failed (a full disk) leaves doit's transaction, and the
        # database's lock, open until the connection goes: close it now
        conn = getattr(getattr(getattr(cmd, "dep_manager", None), "backend", None), "_conn", None)
        if conn is not None:
            conn.close()


def ignored_tasks(dep_file: Path) -> list[str]:
    """The tasks ``doit ignore`` marked in the build's database at ``dep_file`` (read only).

    doit skips an ignored task and everything after it counts it as done: a
    build would then publish a cache that claims settings it was not built
    with.  A missing database has none; a damaged one is the build's to
    repair (:mod:`cachebuild.cli.repair`).
    """
    if not Path(dep_file).exists():
        return []
    try:
        conn = sqlite3.connect(Path(dep_file).absolute().as_uri() + "?mode=ro", uri=True)
        try:
            rows = conn.execute("select task_id, task_data from doit order by task_id").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return []
    out = []
    for task_id, data in rows:
        try:
            if json.loads(data).get("ignore:"):
                out.append(str(task_id))
        except (ValueError, AttributeError, TypeError):
            continue
    return out


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so doit saves completed tasks."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmdline_vars() -> dict[str, str]:
    """The NAME=value arguments doit parsed off the command line."""
    from doit import doit_cmd

    # doit keeps them in a module global; get_var needs each name up front,
    # and we want to refuse names we do not know.
    return dict(doit_cmd._CMDLINE_VARS or {})
