"""The doit commands of a cachebuild project: ours, and doit's own made safe.

``build-cache``, ``verify-cache`` and the other commands are doit command
plugins (entry points: any directory; pyproject.toml: the project root).
doit's own commands that read or write the build state are replaced here,
because run as doit ships them they bypass the wrapper: ``ignore`` and
``reset-dep`` would let a signed cache claim settings it was not built with
(refused), ``forget`` and ``clean`` would write the database without the
cache lock (taken here), ``info`` judged tasks with another file checker and
other values than the build (here: the build's own), and ``run`` (bare
``doit``, ``doit tiles``) said nothing or failed noisily (one line here).

Where a directory holds another project's dodo file, doit's own command
serves it unchanged (:func:`foreign_dodo`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from doit.cmd_base import Command

from cachebuild._util.report import Report
from cachebuild._util.warn import operator_warnings
from cachebuild.cli.doitrun import PlanLoader, cmdline_vars
from cachebuild.cli.logsetup import configure_logging
from cachebuild.cli.runner import build_cache, clean_cache, verify_cache_cmd
from cachebuild.cli.startup import leave, started
from cachebuild.errors import CacheBuildError, UsageError, did_you_mean
from cachebuild.inputs.config import VARIABLES, load_settings
from cachebuild.inputs.plan import resolve_plan
from cachebuild.release.lock import CacheLock
from targets import task_dicts

__all__ = [
    "foreign_dodo",
    "BuildCacheCmd",
    "VerifyCacheCmd",
    "CleanCacheCmd",
    "CleanCmd",
    "CacheInfoCmd",
    "PreviewCacheCmd",
    "CompanionAgentCmd",
    "GcStoreCmd",
    "RunCmd",
    "IgnoreCmd",
    "ResetDepCmd",
    "ForgetCmd",
    "InfoCmd",
    "StraceCmd",
    "DumpDbCmd",
    "COMMAND_NAMES",
]

_VARS_HELP = "\n".join(f"  {name:<14} {text}" for name, text in VARIABLES.items()) + (
    "\n  LOG_LEVEL      debug | info | warning | error: log records on stderr, secrets redacted [default: none]"
)

#: The commands a cachebuild project offers (for "did you mean").
COMMAND_NAMES = (
    "build-cache",
    "verify-cache",
    "clean",
    "clean-cache",
    "cache-info",
    "preview-cache",
    "gc-store",
    "forget",
    "info",
    "list",
    "help",
)


def _report_format(vars: Mapping[str, str]) -> str:
    import os

    raw = vars.get("REPORT") or os.environ.get("CACHEBUILD_REPORT") or "text"
    return "json" if raw.lower() == "json" else "text"


def foreign_dodo(opt_vals: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """True where doit would load another project's dodo file (one that does not use cachebuild).

    Outside any project (no dodo file) and in a cachebuild project the
    replaced commands are ours; elsewhere doit's own serve that project.
    """
    name = opt_vals.get("dodoFile") or (config.get("GLOBAL") or {}).get("dodoFile") or "dodo.py"
    path = Path(str(name))
    if opt_vals.get("seek_file") and not path.is_absolute():
        for parent in [Path.cwd(), *Path.cwd().parents]:
            if (parent / path).is_file():
                path = parent / path
                break
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return "cachebuild" not in text


def _fail(name: str, fmt: str, exc: CacheBuildError) -> int:
    report = Report(name)
    report.fail(exc)
    report.emit(fmt)
    return report.exit_code


class _CacheCommand(Command):
    """Shared parsing: NAME=value variables only, no positional arguments.

    ``builtin`` (doit's own command of the same name) serves another
    project's dodo file; ``LOG_LEVEL`` is taken off the variables and sets up
    logging (:mod:`cachebuild.cli.logsetup`) for every command.
    """

    doc_usage = "[NAME=value ...]"
    doc_description = (
        "Variables (also read from the environment as CACHEBUILD_<NAME>):\n" + _VARS_HELP
    )
    cmd_options = ()
    impl: Any = None
    builtin: Any = None
    takes_args = False

    def __init__(self, **kwargs: Any):
        self._doit_kwargs = dict(kwargs)
        super().__init__(
            **{k: v for k, v in kwargs.items() if k in ("config", "bin_name", "opt_vals")}
        )

    def parse_execute(self, in_args: list[str]) -> int:
        if self.builtin is not None and foreign_dodo(self.opt_vals, self.config):
            started()  # doit's own command: its Ctrl-C handling from here
            return self.builtin(**self._doit_kwargs).parse_execute(in_args)
        return int(super().parse_execute(in_args))

    def execute(self, params: Any, args: list[str]) -> int:
        vars = cmdline_vars()
        fmt = _report_format(vars)
        try:
            vars = configure_logging(vars)
        except UsageError as exc:
            return _fail(self.get_name(), fmt, exc)
        with operator_warnings():
            if args and not self.takes_args:
                return _fail(
                    self.get_name(),
                    fmt,
                    UsageError(f"unexpected argument(s): {' '.join(args)}; use NAME=value"),
                )
            # the command handles Ctrl-C (KeyboardInterrupt) from here; until now (the module's
            # imports and classes, doit's parsing) cachebuild.cli.startup's guard ends it: exit 130
            started()
            if self.takes_args:
                code = int(type(self).impl(vars, args))
            else:
                code = int(type(self).impl(vars))
        return leave(code)  # a doit process ends here, with the reported code


class BuildCacheCmd(_CacheCommand):
    name = "build-cache"
    doc_purpose = "build, sign, check and atomically publish the map cache for FLIGHT"

    @staticmethod
    def impl(vars: Mapping[str, str]) -> int:

        return build_cache(vars)


class VerifyCacheCmd(_CacheCommand):
    name = "verify-cache"
    doc_purpose = "check the published cache's signature and every artifact's SHA-256"

    @staticmethod
    def impl(vars: Mapping[str, str]) -> int:

        return verify_cache_cmd(vars)


def _doit_builtin(name: str) -> Any:
    from doit.doit_cmd import DoitMain

    return {c.get_name(): c for c in DoitMain.DOIT_CMDS}[name]


class CleanCacheCmd(_CacheCommand):
    """``doit clean-cache`` (any directory): :func:`cachebuild.cli.runner.clean_cache`."""

    name = "clean-cache"
    doc_purpose = (
        "forget the build state (under the lock); the next build-cache does the work again"
    )

    @staticmethod
    def impl(vars: Mapping[str, str]) -> int:

        return clean_cache(vars)


class CleanCmd(CleanCacheCmd):
    """``doit clean``: ours outside any project and in a cachebuild one; doit's in another project."""

    name = "clean"
    builtin = property(lambda self: _doit_builtin("clean"))


class CacheInfoCmd(_CacheCommand):
    name = "cache-info"
    doc_purpose = "summarise the published cache (REPORT=json for JSON) and whether it verifies"

    @staticmethod
    def impl(vars: Mapping[str, str]) -> int:
        from cachebuild.cli.info import cache_info_cmd

        return cache_info_cmd(vars)


class PreviewCacheCmd(_CacheCommand):
    name = "preview-cache"
    doc_purpose = "render the coverage map of the published cache (OUT=path.png)"
    doc_usage = "[OUT=preview.png] [NAME=value ...]"

    @staticmethod
    def impl(vars: Mapping[str, str]) -> int:
        from cachebuild.cli.info import preview_cache_cmd

        return preview_cache_cmd(vars)


class CompanionAgentCmd(_CacheCommand):
    name = "companion-agent"
    doc_purpose = "the companion's side of COMPANION=... builds, run over SSH by build-cache"
    doc_usage = "OP=probe|unpack DIR=<COMPANION_DIR> [WANT=stdin] [BACKEND=name]"
    doc_description = "See docs/companion.md."

    @staticmethod
    def impl(vars: Mapping[str, str]) -> int:
        from cachebuild.companion.agent import main as agent_main

        return agent_main(vars)


class GcStoreCmd(_CacheCommand):
    name = "gc-store"
    doc_purpose = "shrink the shared store to MAX_STORE_BYTES, keeping what every cache uses"

    @staticmethod
    def impl(vars: Mapping[str, str]) -> int:
        from cachebuild.release.gc import gc_store_cmd

        return gc_store_cmd(vars)


# -- doit's own commands, made safe -------------------------------------------


def _plan(vars: Mapping[str, str], *, with_flight: bool) -> Any:

    settings = load_settings(vars)
    return resolve_plan(settings, with_flight=with_flight)


def _task_names(plan: Any) -> list[str]:

    return [d["name"] for d in task_dicts(plan)]


def _unknown_task(name: str, tasks: list[str], commands: bool = False) -> UsageError:
    kind = "no command or task" if commands else "no task"
    hint = did_you_mean(name, [*tasks, *(COMMAND_NAMES if commands else ())])
    return UsageError(
        f"{kind} '{name}'{hint}",
        remedy=f"tasks: {', '.join(tasks)}; `doit help` lists the commands",
    )


class RunCmd(_CacheCommand):
    """Bare ``doit`` and ``doit <task>``: the tasks run only inside build-cache."""

    name = "run"
    doc_purpose = "refused in a cachebuild project: build-cache runs the tasks, under the lock"
    doc_usage = "(use doit build-cache FLIGHT=...)"
    takes_args = True
    builtin = property(lambda self: _doit_builtin("run"))

    @staticmethod
    def impl(vars: Mapping[str, str], args: list[str]) -> int:
        fmt = _report_format(vars)
        if not args:
            sys.stderr.write(
                "doit: nothing to run: build the cache with `doit build-cache FLIGHT=<flight file or id>`; "
                "`doit list` shows its tasks, `doit help` every command\n"
            )
            return 2
        tasks = _task_names(_plan({}, with_flight=False))
        name = args[0]
        if name not in tasks:
            return _fail("run", fmt, _unknown_task(name, tasks, commands=True))
        return _fail(
            "run",
            fmt,
            UsageError(
                f"task '{name}' runs only inside `doit build-cache`, which holds the cache lock "
                "and checks, signs and publishes what it builds",
                remedy="doit build-cache FLIGHT=<flight file or id> (it runs every task that is out of date)",
            ),
        )


class IgnoreCmd(_CacheCommand):
    name = "ignore"
    doc_purpose = (
        "refused: a skipped task would leave a signed cache claiming settings it was not built with"
    )
    takes_args = True
    builtin = property(lambda self: _doit_builtin("ignore"))

    @staticmethod
    def impl(vars: Mapping[str, str], args: list[str]) -> int:
        what = "`" + " ".join(["doit ignore", *args]) + "`"
        return _fail(
            "ignore",
            _report_format(vars),
            UsageError(
                f"{what} is refused in a cachebuild project: build-cache would skip the task and sign "
                "a cache that claims settings it was not built with",
                remedy="to skip the self-test, build with SELFTEST_QUERIES=0; "
                "to run a task again, `doit forget <task>`",
            ),
        )


class ResetDepCmd(_CacheCommand):
    name = "reset-dep"
    doc_purpose = "refused: it would record files as built without running the tasks"
    takes_args = True
    builtin = property(lambda self: _doit_builtin("reset-dep"))

    @staticmethod
    def impl(vars: Mapping[str, str], args: list[str]) -> int:
        return _fail(
            "reset-dep",
            _report_format(vars),
            UsageError(
                "`doit reset-dep` is refused in a cachebuild project: it records the current files as "
                "built without running the tasks, so a signed cache could claim settings it was not built with",
                remedy="`doit clean` (the next build-cache does the work again, reusing the store), "
                "or `doit forget <task>`",
            ),
        )


class ForgetCmd(_CacheCommand):
    name = "forget"
    doc_purpose = "forget tasks' state (under the cache lock): the next build-cache runs them again"
    doc_usage = "TASK ... [NAME=value ...]"
    takes_args = True
    builtin = property(lambda self: _doit_builtin("forget"))

    @staticmethod
    def impl(vars: Mapping[str, str], args: list[str]) -> int:
        from doit.dependency import Dependency, SqliteDB

        report = Report("forget")
        fmt = _report_format(vars)
        try:
            plan = _plan(vars, with_flight=False)
            tasks = _task_names(plan)
            if not args:
                raise UsageError(
                    "name the tasks to forget",
                    remedy="doit forget selftest; `doit clean` forgets all",
                )
            for name in args:
                if name not in tasks:
                    raise _unknown_task(name, tasks)
            dep_file = plan.paths.dep_file
            with CacheLock(plan.paths.lock):
                if dep_file.exists():
                    dep = Dependency(SqliteDB, str(dep_file))
                    for name in args:
                        dep.remove(name)
                    dep.close()
            report.extra["forgotten"] = list(args)
            report.outcome, report.exit_code = "success", 0
            if fmt == "text":
                them = "it" if len(args) == 1 else "them"
                sys.stderr.write(
                    f"forgot {', '.join(args)}: the next build-cache runs {them} again\n"
                )
        except CacheBuildError as exc:
            report.fail(exc)
        report.emit(fmt)
        return report.exit_code


class InfoCmd(_CacheCommand):
    name = "info"
    doc_purpose = (
        "a task's dependencies and whether build-cache would run it (give the build's variables)"
    )
    doc_usage = "TASK FLIGHT=... [NAME=value ...]"
    takes_args = True
    builtin = property(lambda self: _doit_builtin("info"))

    @staticmethod
    def impl(vars: Mapping[str, str], args: list[str]) -> int:
        from doit.cmd_info import Info

        fmt = _report_format(vars)
        try:
            with_flight = bool(vars.get("FLIGHT"))
            if len(args) != 1:
                raise UsageError(
                    "name one task: doit info TASK FLIGHT=...", remedy="`doit list` shows the tasks"
                )
            plan = _plan(vars, with_flight=with_flight)
            tasks = _task_names(plan)
            if args[0] not in tasks:
                raise _unknown_task(args[0], tasks)
        except CacheBuildError as exc:
            return _fail("info", fmt, exc)
        cmd = Info(task_loader=PlanLoader(plan), config={}, bin_name="doit")
        code = int(cmd.parse_execute(args if with_flight else ["--no-status", *args]))
        if not with_flight:
            sys.stdout.write(
                "\nstatus     : not judged: give the variables build-cache runs with "
                "(FLIGHT=... and any others) to see whether it would run this task\n"
            )
        return code


class StraceCmd(RunCmd):
    """``doit strace <task>`` would run the task outside build-cache: refused like ``doit <task>``."""

    name = "strace"
    builtin = property(lambda self: _doit_builtin("strace"))


class DumpDbCmd(_CacheCommand):
    """``doit dumpdb``: the build's database (SQLite, which doit's own dumpdb cannot read), read only."""

    name = "dumpdb"
    doc_purpose = "print the build's doit database, one task a line (read only)"
    builtin = property(lambda self: _doit_builtin("dumpdb"))

    @staticmethod
    def impl(vars: Mapping[str, str]) -> int:
        import sqlite3

        try:
            settings = load_settings(vars)
        except CacheBuildError as exc:
            return _fail("dumpdb", _report_format(vars), exc)
        dep_file = settings.paths.dep_file
        if not dep_file.exists():
            sys.stderr.write(f"no build state at {dep_file}: nothing built yet, or cleaned\n")
            return 0
        conn = sqlite3.connect(
            dep_file.absolute().as_uri() + "?mode=ro", uri=True
        )  # '#', '?' in a path
        try:
            for task_id, data in conn.execute(
                "select task_id, task_data from doit order by task_id"
            ):
                sys.stdout.write(f"{task_id}: {data}\n")
        except sqlite3.DatabaseError as exc:
            return _fail(
                "dumpdb",
                _report_format(vars),
                UsageError(f"{dep_file} is unreadable: {exc}", remedy="doit clean"),
            )
        finally:
            conn.close()
        return 0
