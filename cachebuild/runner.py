"""The thin wrapper around doit: the one module of cachebuild that imports doit.

doit tracks the dependencies and runs the tasks; this module adds what doit
lacks, around the whole run: flight resolution before the lock, the lock
(held across the run, doit's database included), SIGTERM turned into
KeyboardInterrupt so completed tasks are recorded, the coverage check,
atomic publish, the report and the exit code of the phase that failed.

The commands are doit command plugins (``build-cache``, ``verify-cache``,
``clean``/``clean-cache``), registered through the ``doit.COMMAND`` entry
point (any directory, once installed) and pyproject.toml (the project root).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from doit.cmd_base import Command, TaskLoader2

from . import actions
from .companion import LOCAL_TASKS
from .config import VARIABLES, Settings, load_settings
from .errors import BuildError, CacheBuildError, CoverageError, UsageError, VerifyError
from .lock import CacheLock
from .report import Report, redact

__all__ = [
    "BuildCacheCmd",
    "VerifyCacheCmd",
    "CleanCacheCmd",
    "CacheInfoCmd",
    "PreviewCacheCmd",
    "CompanionAgentCmd",
    "GcStoreCmd",
    "build_cache",
    "verify_cache_cmd",
    "clean_cache",
    "dodo_namespace",
    "main",
]


class Interrupted(CacheBuildError):
    """The run was stopped by SIGINT or SIGTERM."""

    exit_code = 130
    remedy = "run build-cache again: completed phases are kept"


# -- doit plumbing -----------------------------------------------------------


class RecordingReporter:
    """A doit reporter that records what ran and how long, and tells the user.

    Task lines go to stderr (``.. tiles`` ran, ``-- flight`` up to date), so
    stdout carries only the report.
    """

    desc = "cachebuild recording reporter"

    def __init__(self, stream: Any = sys.stderr):
        self.stream = stream
        self.ran: list[str] = []
        self.up_to_date: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self._t0 = 0.0

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

    def add_failure(self, task: Any, fail: Any) -> None:
        self._done(task)
        self.failed.append(task.name)
        self.errors.append(f"{task.name}: {fail.get_name()}: {fail.message}")

    def skip_uptodate(self, task: Any) -> None:
        self.up_to_date.append(task.name)
        self.stream.write(f"-- {task.name}\n")

    def skip_ignore(self, task: Any) -> None:
        self.up_to_date.append(task.name)

    def cleanup_error(self, exception: Any) -> None:
        self.errors.append(str(exception))

    def runtime_error(self, msg: str) -> None:
        self.errors.append(msg)

    def teardown_task(self, task: Any) -> None:
        pass

    def complete_run(self) -> None:
        self.stream.flush()


class PlanLoader(TaskLoader2):
    """Give doit the tasks of one build plan, with the DB where the state lives."""

    def __init__(self, plan: Any, reporter: Any = None):
        super().__init__()
        self.plan = plan
        self.reporter = reporter

    def setup(self, opt_values: Any) -> None:
        pass

    def load_doit_config(self) -> dict[str, Any]:
        from .manifest import HASH_CACHE_NAME, doit_file_checker

        config: dict[str, Any] = {
            "dep_file": str(self.plan.paths.dep_file),
            "backend": "sqlite3",
            "verbosity": 2,
            # file deps hashed once per change, through the build's hash cache (not md5 on every check)
            "check_file_uptodate": doit_file_checker(self.plan.paths.build / HASH_CACHE_NAME),
        }
        if self.reporter is not None:
            config["reporter"] = self.reporter
        return config

    def load_tasks(self, cmd: Any, pos_args: Any) -> list[Any]:
        from doit.task import dict_to_task

        from targets import task_dicts

        return [dict_to_task(d) for d in task_dicts(self.plan)]


def run_doit(plan: Any, reporter: RecordingReporter, tasks: list[str] | None = None) -> int:
    """Run the build's tasks with doit; returns doit's exit code."""
    from doit.cmd_run import Run

    from targets import FINAL_TASK

    plan.paths.state.mkdir(parents=True, exist_ok=True)
    cmd = Run(task_loader=PlanLoader(plan, reporter), config={}, bin_name="doit")
    return int(cmd.parse_execute(tasks or [FINAL_TASK]))


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so doit saves completed tasks."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

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


def _report_format(vars: Mapping[str, str]) -> str:
    raw = vars.get("REPORT") or os.environ.get("CACHEBUILD_REPORT") or "text"
    return "json" if raw.lower() == "json" else "text"


def _warn(report: Report) -> Any:
    def warn(msg: str) -> None:
        report.warnings.append(msg)
        sys.stderr.write(f"WARNING: {redact(msg)}\n")

    return warn


# -- build-cache -------------------------------------------------------------


def _tile_counts(build: Path, ran: list[str]) -> dict[str, int]:
    from .tileset import read_summary

    s = read_summary(build)
    fetched = int(s.get("fetched", 0)) if "tiles" in ran else 0
    reused = int(s["present"]) - fetched
    return {"planned": int(s["planned"]), "fetched": fetched, "reused": reused, "missing": int(s["missing"])}


def _descriptor_counts(build: Path, ran: list[str]) -> dict[str, int]:
    """``computed``/``reused`` descriptors of this run, from describe.json (a small file)."""
    try:
        s = json.loads((build / "describe.json").read_text())
    except (OSError, ValueError):
        return {"computed": 0, "reused": 0}
    computed = int(s.get("computed", 0)) if "describe" in ran else 0
    return {"computed": computed, "reused": int(s.get("tiles", 0)) - computed}


def _describe_entry(build: Path, ran: list[str], dask_scheduler: str | None) -> dict[str, Any]:
    """The report's ``describe``: where the engine ran, on how many workers, how fast.

    ``workers`` and ``tiles_per_s`` (tiles described per second) are this
    run's: 0 when describe was up to date.
    """
    executor = "local" if dask_scheduler is None else "dask"
    entry: dict[str, Any] = {"executor": executor, "workers": 0, "tiles_per_s": 0.0}
    if "describe" not in ran:
        return entry
    try:
        s = json.loads((build / "describe.json").read_text())
    except (OSError, ValueError):
        return entry
    entry.update(
        executor=str(s.get("executor", entry["executor"])),
        workers=int(s.get("workers", 1)),
        tiles_per_s=float(s.get("computed_per_s", 0.0)),
    )
    return entry


def check_coverage(signed: Mapping[str, Any], strict: bool, warn: Any) -> None:
    """Every planned tile present and described, or CoverageError / a warning."""
    info = signed["info"]
    tiles = info["tiles"]
    problems = []
    if tiles["missing"]:
        examples = ", ".join(info.get("missing_examples", [])[:5])
        problems.append(f"{tiles['missing']} of {tiles['planned']} planned tiles missing (e.g. {examples})")
    if info["descriptors"] != tiles["present"]:
        problems.append(f"{tiles['present']} tiles present but {info['descriptors']} described")
    if not problems:
        return
    msg = "coverage check failed: " + "; ".join(problems)
    if strict:
        raise CoverageError(msg + "; the published cache was left as it was")
    warn(msg + "; publishing the partial cache (STRICT=0)")


def _note_free_space(exc: CacheBuildError, settings: Settings | None) -> None:
    """Add the free space of STORE and CACHE_DIR to a disk-full error's message."""
    from .diskspace import free_space_note
    from .errors import DiskFullError

    if isinstance(exc, DiskFullError) and settings is not None and "free space:" not in exc.message:
        exc.message += "; " + free_space_note({"STORE": settings.store, "CACHE_DIR": settings.cache_dir})
        exc.args = (exc.message,)


def build_cache(vars: Mapping[str, str], env: Mapping[str, str] | None = None) -> int:
    """``doit build-cache``: resolve, lock, build, check, publish, report."""
    from .plan import resolve_plan
    from .publish import clean_leftovers, publish, published_manifest_bytes

    report = Report("build-cache")
    fmt = _report_format(vars)
    warn = _warn(report)
    reporter = RecordingReporter()
    settings = None
    try:
        t = time.monotonic()
        settings = load_settings(vars, env)
        if settings.shared_store is not None:
            from .s3store import reset_stats

            reset_stats()  # the report counts this run's objects
        plan = resolve_plan(settings, warn=warn)  # before the lock
        if settings.dask_scheduler is not None and settings.companion is None:
            from .daskexec import probe_scheduler

            probe_scheduler(settings.dask_scheduler)  # exit 21 naming it, before the lock and any work
        report.flight_id = plan.record["flight_id"] if plan.record else None
        report.extra["flight_source"] = plan.flight_source
        report.timed("flight", time.monotonic() - t)

        t = time.monotonic()
        with CacheLock(settings.paths.lock):
            report.timed("lock", time.monotonic() - t)
            with sigterm_as_interrupt():
                _locked_build(
                    plan, settings, report, reporter, warn, clean_leftovers, publish, published_manifest_bytes
                )
    except CacheBuildError as exc:
        _note_free_space(exc, settings)
        report.fail(exc)
        if getattr(exc, "traceback", None):
            sys.stderr.write(redact(exc.traceback))  # type: ignore[attr-defined]
    except KeyboardInterrupt as exc:
        err = Interrupted(f"interrupted ({exc or 'SIGINT'}) during {reporter.current or 'the build'}")
        err.phase = reporter.current or "build"
        report.fail(err)
    except Exception as exc:  # a bug: say so, without secrets
        from .diskspace import disk_full_error, is_disk_full

        if is_disk_full(exc):  # publishing, doit's database: exit 24, not a bug
            err = disk_full_error(exc, reporter.current or "build")
            _note_free_space(err, settings)
            report.fail(err)
        else:
            sys.stderr.write(redact(traceback.format_exc()))
            report.fail(BuildError(f"internal error: {type(exc).__name__}: {exc}"))
    finally:
        actions.ACTIVE["locked"] = False
        for name, secs in reporter.seconds.items():
            report.timed(name, secs)
        report.tasks = {"run": reporter.ran, "up_to_date": reporter.up_to_date}
        if settings is not None:
            report.extra["store"] = _store_entry(settings)
    report.emit(fmt)
    return report.exit_code


def _store_entry(settings: Settings) -> dict[str, Any]:
    """The report's ``store``: its URL (never credentials) and the objects moved to and from a bucket."""
    if settings.shared_store is None:  # a local store: no bucket, nothing imported
        return {"url": str(settings.store), "objects_read": 0, "objects_written": 0}
    from .s3store import stats_entry

    return stats_entry(settings.shared_store)


def _locked_build(
    plan: Any,
    settings: Settings,
    report: Report,
    reporter: RecordingReporter,
    warn: Any,
    clean_leftovers: Any,
    publish: Any,
    published_manifest_bytes: Any,
) -> None:
    paths = settings.paths
    clean_leftovers(paths)
    actions.FAILURES.clear()
    actions.ACTIVE["locked"] = True
    # the action cache's store, bucket and this run's hits and misses (cachebuild.actioncache)
    actions.ACTIVE.update(
        store=str(settings.store),
        shared=settings.shared_store,
        action_cache={"hits": [], "misses": [], "from_bucket": []},
    )
    on_companion = settings.companion is not None  # then only flight and tiles run here
    from .repair import run_repairing

    tasks = list(LOCAL_TASKS) if on_companion else None
    # a damaged doit database or staged artifact, a missing or corrupt store object: repaired
    code = run_repairing(paths, warn, lambda: run_doit(plan, reporter, tasks=tasks), reporter, actions.FAILURES)
    actions.ACTIVE["locked"] = False
    if code != 0:
        if actions.FAILURES:
            raise actions.FAILURES[-1]
        detail = "; ".join(reporter.errors) or f"doit exited {code}"
        raise BuildError(f"build failed: {detail}", phase=(reporter.failed or ["build"])[-1])

    report.tiles = _tile_counts(paths.build, reporter.ran)
    if on_companion:
        from .companion import build_on_companion

        build_on_companion(plan, report, warn)  # push, build there, merge its report
        return
    t = time.monotonic()
    staged = (paths.build / "manifest.json").read_bytes()
    signed = json.loads(staged)["signed"]
    report.build_id = signed["build_id"]
    report.manifest_version = signed["version"]
    from .selftest import check_recall, summary

    report.extra["descriptors"] = _descriptor_counts(paths.build, reporter.ran)
    report.extra["action_cache"] = actions.ACTIVE.get("action_cache") or {"hits": [], "misses": []}
    report.extra["describe"] = _describe_entry(paths.build, reporter.ran, settings.dask_scheduler)
    report.extra["selftest"] = summary(signed["info"].get("selftest"))
    engine = signed["info"].get("engine") or {}  # which backend ran, on what device
    report.extra["engine"] = {k: engine.get(k) for k in ("backend", "device", "key")}
    check_coverage(signed, settings.strict, warn)
    check_recall(signed["info"].get("selftest"), settings.min_recall)  # exit 22, phase selftest
    report.timed("coverage", time.monotonic() - t)

    t = time.monotonic()
    from .publish import current_release, release_intact

    from .rollback import check_not_rolled_back, record_accepted

    signer = json.loads(staged)["signatures"][0]["keyid"]
    # never publish what verify-cache would refuse as a rollback (a stale staged manifest)
    check_not_rolled_back(
        paths.cache_dir,
        signer,
        signed,
        remedy="run `doit clean`, then build-cache again: it signs a newer version",
        tolerant=True,
    )
    published = published_manifest_bytes(paths)
    release = current_release(paths)
    if published == staged and release is not None and not release_intact(release, signed):
        warn(
            f"the published cache {release} is damaged (an artifact is missing or resized); publishing it again"
        )
        published = None
    if published != staged:
        files = ["manifest.json", "signer.pub", *signed["targets"]]
        release = publish(paths, files)
        report.manifest_path = str(release / "manifest.json")
        report.outcome = "success"
    else:
        report.manifest_path = str(paths.current.resolve() / "manifest.json")
        report.outcome = "success" if reporter.ran else "up_to_date"
    record_accepted(paths.cache_dir, signer, signed)  # the builder accepts what it published
    report.timed("publish", time.monotonic() - t)
    report.exit_code = 0


# -- verify-cache ------------------------------------------------------------


def _trusted_key(settings: Settings) -> Any:
    from .signing import load_public_key

    for path in (settings.pubkey, settings.key, settings.dev_key):
        if path is not None and Path(path).exists():
            return load_public_key(path)
    raise UsageError(
        "no public key to verify against",
        remedy="set PUBKEY=<the signer's public key> (or KEY=<the signing key>)",
    )


def verify_cache_cmd(vars: Mapping[str, str], env: Mapping[str, str] | None = None) -> int:
    """``doit verify-cache``: the signature, expiry, rollback and every artifact's hash."""
    from .manifest import read_manifest, verify_cache
    from .publish import current_release
    from .rollback import check_not_rolled_back, record_accepted
    from .signing import keyid, verify_envelope

    report = Report("verify-cache")
    fmt = _report_format(vars)
    try:
        settings = load_settings(vars, env)
        release = current_release(settings.paths)
        if release is None:
            err = VerifyError(
                f"no published cache at {settings.paths.current}",
                remedy="build one with `doit build-cache FLIGHT=...`",
            )
            err.reason = "no-manifest"
            raise err
        trusted = _trusted_key(settings)
        kid = keyid(trusted)
        try:  # the rollback check first: it needs only the signature, not every artifact's hash
            first = verify_envelope(read_manifest(release), [trusted])
        except VerifyError:
            first = None  # verify_cache names the problem
        if first is not None:
            check_not_rolled_back(settings.cache_dir, kid, first)  # exit 23, reason rollback
        signed = verify_cache(release, [trusted])
        check_not_rolled_back(settings.cache_dir, kid, signed)
        try:
            record_accepted(settings.cache_dir, kid, signed)
        except OSError as exc:  # a read-only CACHE_DIR: verified, but nothing can be remembered
            msg = (
                f"verified, but the accepted version could not be recorded in {settings.cache_dir / 'state'} "
                f"({exc.strerror or type(exc).__name__}): a later rollback to an older cache would not be noticed"
            )
            report.warnings.append(msg)
            sys.stderr.write(f"WARNING: {msg}\n")
        report.build_id = signed["build_id"]
        report.manifest_version = signed["version"]
        report.manifest_path = str(release / "manifest.json")
        report.flight_id = signed["identity"].get("flight_id")
        report.extra["verified_targets"] = len(signed["targets"])
        report.outcome = "success"
        report.exit_code = 0
    except CacheBuildError as exc:
        report.fail(exc)
        if isinstance(exc, VerifyError):
            report.extra["reason"] = exc.reason
    report.emit(fmt)
    return report.exit_code


# -- clean -------------------------------------------------------------------


def clean_cache(vars: Mapping[str, str], env: Mapping[str, str] | None = None) -> int:
    """``doit clean``: forget the build state so the next build does the work again.

    Under the lock, removes the staged artifacts and doit's database.  The
    published cache and the shared tile store are kept.
    """
    import shutil

    report = Report("clean")
    fmt = _report_format(vars)
    try:
        settings = load_settings(vars, env)
        with CacheLock(settings.paths.lock):
            removed = []
            for path in (settings.paths.build, settings.paths.dep_file):
                if path.is_dir():
                    shutil.rmtree(path)
                    removed.append(str(path))
                elif path.exists():
                    path.unlink()
                    removed.append(str(path))
            for extra in settings.paths.state.glob("doit.sqlite3*"):
                extra.unlink(missing_ok=True)
        report.extra["removed"] = removed
        report.outcome = "success"
        report.exit_code = 0
        if fmt == "text":
            sys.stderr.write(
                f"removed the staged build and doit state under {settings.paths.state}; "
                f"the published cache ({settings.paths.current}) and the store are kept\n"
            )
    except CacheBuildError as exc:
        report.fail(exc)
    report.emit(fmt)
    return report.exit_code


# -- doit commands -------------------------------------------------------------

_VARS_HELP = "\n".join(f"  {name:<14} {text}" for name, text in VARIABLES.items())


class _CacheCommand(Command):
    """Shared parsing: NAME=value variables only, no positional arguments."""

    doc_usage = "[NAME=value ...]"
    doc_description = "Variables (also read from the environment as CACHEBUILD_<NAME>):\n" + _VARS_HELP
    cmd_options = ()
    impl: Any = None

    def execute(self, params: Any, args: list[str]) -> int:
        if args:
            report = Report(self.get_name())
            report.fail(UsageError(f"unexpected argument(s): {' '.join(args)}; use NAME=value"))
            report.emit(_report_format(cmdline_vars()))
            return report.exit_code
        return int(type(self).impl(cmdline_vars()))


class BuildCacheCmd(_CacheCommand):
    name = "build-cache"
    doc_purpose = "build, sign, check and atomically publish the map cache for FLIGHT"
    impl = staticmethod(build_cache)


class VerifyCacheCmd(_CacheCommand):
    name = "verify-cache"
    doc_purpose = "check the published cache's signature and every artifact's SHA-256"
    impl = staticmethod(verify_cache_cmd)


class CleanCacheCmd(_CacheCommand):
    # registered as `clean` (project root) and `clean-cache` (anywhere)
    name = "clean"
    doc_purpose = "forget the build state (under the lock); the next build-cache does the work again"
    impl = staticmethod(clean_cache)


class CacheInfoCmd(_CacheCommand):
    name = "cache-info"
    doc_purpose = "summarise the published cache (REPORT=json for JSON) and whether it verifies"

    @staticmethod
    def impl(vars: Mapping[str, str]) -> int:
        from .cacheinfo import cache_info_cmd

        return cache_info_cmd(vars)


class PreviewCacheCmd(_CacheCommand):
    name = "preview-cache"
    doc_purpose = "render the coverage map of the published cache (OUT=path.png)"
    doc_usage = "[OUT=preview.png] [NAME=value ...]"

    @staticmethod
    def impl(vars: Mapping[str, str]) -> int:
        from .cacheinfo import preview_cache_cmd

        return preview_cache_cmd(vars)


class CompanionAgentCmd(_CacheCommand):
    name = "companion-agent"
    doc_purpose = "the companion's side of COMPANION=... builds, run over SSH by build-cache"
    doc_usage = "OP=probe|unpack DIR=<COMPANION_DIR> [WANT=stdin] [BACKEND=name]"
    doc_description = "See docs/companion.md."

    @staticmethod
    def impl(vars: Mapping[str, str]) -> int:
        from .companion.agent import main as agent_main

        return agent_main(vars)


class GcStoreCmd(_CacheCommand):
    name = "gc-store"
    doc_purpose = "shrink the shared store to MAX_STORE_BYTES, keeping what every cache uses"

    @staticmethod
    def impl(vars: Mapping[str, str]) -> int:
        from .gcstore import gc_store_cmd

        return gc_store_cmd(vars)


# -- dodo.py and the console script ----------------------------------------


def dodo_namespace() -> dict[str, Any]:
    """What dodo.py exports: DOIT_CONFIG and one task_* creator per artifact.

    Lets ``doit list`` / ``doit info`` show the graph.  Running a task
    directly is refused by the action (it would bypass the lock): use
    ``doit build-cache``.
    """
    from targets import task_dicts

    from .plan import resolve_plan

    vars = {k: v for k, v in cmdline_vars().items() if k in VARIABLES}
    settings = load_settings(vars)
    plan = resolve_plan(settings, with_flight=False)
    plan.paths.state.mkdir(parents=True, exist_ok=True)
    ns: dict[str, Any] = {
        "DOIT_CONFIG": {
            "dep_file": str(plan.paths.dep_file),
            "backend": "sqlite3",
            "default_tasks": [],
            "verbosity": 2,
        }
    }
    for d in task_dicts(plan):
        spec = dict(d)
        name = spec.pop("name")
        spec["basename"] = name

        def creator(spec: dict[str, Any] = spec) -> dict[str, Any]:
            return spec

        creator.__doc__ = spec.get("doc")
        ns[f"task_{name}"] = creator
    return ns


_COMMANDS = {
    "build-cache": build_cache,
    "verify-cache": verify_cache_cmd,
    "clean": clean_cache,
    "cache-info": CacheInfoCmd.impl,
    "preview-cache": PreviewCacheCmd.impl,
    "companion-agent": CompanionAgentCmd.impl,
    "gc-store": GcStoreCmd.impl,
}


def main(argv: list[str] | None = None) -> int:
    """``cachebuild <command> NAME=value ...``: the same commands without doit's CLI."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        sys.stderr.write(
            "usage: cachebuild {build-cache|verify-cache|clean|cache-info|preview-cache|gc-store} [NAME=value ...]\n\n"
            "Variables:\n" + _VARS_HELP + "\n"
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    vars: dict[str, str] = {}
    for arg in rest:
        if "=" not in arg:
            sys.stderr.write(f"ERROR: unexpected argument {arg!r}; use NAME=value\n")
            return 2
        name, value = arg.split("=", 1)
        vars[name] = value
    return _COMMANDS[cmd](vars)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
