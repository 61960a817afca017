"""The thin wrapper around doit: what build-cache, verify-cache and clean do.

doit tracks the dependencies and runs the tasks; this module adds what doit
lacks, around the whole run: flight resolution before the lock, the lock
(held across the run, doit's database included), SIGTERM turned into
KeyboardInterrupt so completed tasks are recorded, the coverage check,
atomic publish, the report and the exit code of the phase that failed.

The commands are doit command plugins (:mod:`cachebuild.cli.doitcmds`,
registered through the ``doit.COMMAND`` entry point and pyproject.toml);
how doit runs a plan's tasks is :mod:`cachebuild.cli.doitrun`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from cachebuild._util.progress import finished_counts, forget_counts
from cachebuild._util.report import Report, redact
from cachebuild._util.warn import operator_warnings
from cachebuild.cli.doitrun import (
    PlanLoader,
    RecordingReporter,
    cmdline_vars,
    doit_config,
    ignored_tasks,
    run_doit,
    sigterm_as_interrupt,
)
from cachebuild.cli.pipeline import (
    arm_pipeline,
    describe_ahead_config,
    doit_tasks,
    pipeline_entry,
    pipeline_on,
)
from cachebuild.cli.repair import push_repairing, run_repairing
from cachebuild.cli.startup import settled
from cachebuild.companion import LOCAL_TASKS, build_on_companion
from cachebuild.errors import (
    BuildError,
    CacheBuildError,
    CoverageError,
    DiskFullError,
    UsageError,
    VerifyError,
)
from cachebuild.inputs.config import VARIABLES, Settings, load_settings
from cachebuild.inputs.plan import resolve_plan
from cachebuild.localize.index_files import read_index_run
from cachebuild.localize.selftest import check_recall, read_run, summary
from cachebuild.localize.selftest_score import low_recall_warning
from cachebuild.release.lock import CacheLock
from cachebuild.release.publish import (
    clean_leftovers,
    current_release,
    publish,
    published_manifest_bytes,
    release_intact,
)
from cachebuild.release.rollback import check_not_rolled_back, record_accepted
from cachebuild.release.signing import keyid, load_public_key, verify_envelope
from cachebuild.tileset import read_summary
from targets import actions, task_dicts

__all__ = [
    "build_cache",
    "verify_cache_cmd",
    "clean_cache",
    "dodo_namespace",
    "PlanLoader",
    "RecordingReporter",
    "run_doit",
    "sigterm_as_interrupt",
    "cmdline_vars",
]


class Interrupted(CacheBuildError):
    """The run was stopped by SIGINT or SIGTERM."""

    exit_code = 130
    remedy = "run build-cache again: completed phases are kept"


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
    s = read_summary(build)
    # tileset.json holds no history: this run's count is the tiles phase's own
    counts = finished_counts("tiles") if "tiles" in ran else None
    fetched = int(counts.get("fetched", 0)) if counts else 0
    reused = int(s["present"]) - fetched
    out = {
        "planned": int(s["planned"]),
        "fetched": fetched,
        "reused": reused,
        "missing": int(s["missing"]),
    }
    # flow control (429/503 answers) and revalidation, when they happened
    for k in ("throttled", "lowest_concurrency", "not_modified", "refreshed"):
        if counts and k in counts:
            out[k] = int(counts[k])
    return out


def _descriptor_counts(build: Path, ran: list[str], ahead: int = 0) -> dict[str, int]:
    """``computed``/``reused`` descriptors of this run, from describe.json (a small file).

    ``ahead``: blocks the background describer computed while the tiles
    arrived (``PIPELINE``): computed by this run too, before describe found them.
    """
    try:
        s = json.loads((build / "describe.json").read_text())
    except (OSError, ValueError):
        return {"computed": 0, "reused": 0}
    tiles = int(s.get("tiles", 0))
    computed = min(tiles, int(s.get("computed", 0)) + ahead) if "describe" in ran else 0
    return {"computed": computed, "reused": tiles - computed}


def _describe_entry(build: Path, ran: list[str], dask_scheduler: str | None) -> dict[str, Any]:
    """The report's ``describe``: where the engine ran, on how many workers, how fast.

    ``workers``, ``tiles_per_s`` (tiles described per second), ``windows``
    (places written) and ``windows_per_s`` are this run's: 0 when describe
    was up to date; ``window_stride`` is WINDOW_STRIDE's.
    """
    executor = "local" if dask_scheduler is None else "dask"
    entry: dict[str, Any] = {
        "executor": executor, "workers": 0, "tiles_per_s": 0.0, "windows": 0, "windows_per_s": 0.0,
    }  # fmt: skip
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
        windows=int(s.get("windows", 0)),
        windows_per_s=float(s.get("windows_per_s", 0.0)),
        window_stride=int(s.get("window_stride", 1)),
    )
    return entry


def check_coverage(signed: Mapping[str, Any], strict: bool, warn: Any) -> None:
    """Every planned tile present and described, or CoverageError / a warning."""
    info = signed["info"]
    tiles = info["tiles"]
    problems = []
    if tiles["missing"]:
        examples = ", ".join(info.get("missing_examples", [])[:5])
        problems.append(
            f"{tiles['missing']} of {tiles['planned']} planned tiles missing (e.g. {examples})"
        )
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
    from cachebuild._util.diskspace import free_space_note

    if isinstance(exc, DiskFullError) and settings is not None and "free space:" not in exc.message:
        exc.message += "; " + free_space_note(
            {"STORE": settings.store, "CACHE_DIR": settings.cache_dir}
        )
        exc.args = (exc.message,)


def _refuse_ignored(plan: Any) -> None:
    """Refuse to build while ``doit ignore`` has marked a task (under the lock: the database is stable)."""
    ignored = ignored_tasks(plan.paths.dep_file)
    if ignored:
        raise UsageError(
            f"task(s) {', '.join(ignored)} marked ignored in {plan.paths.dep_file} (by `doit ignore`): "
            "the build would skip them and sign a cache that claims settings it was not built with",
            remedy=f"doit forget {' '.join(ignored)} (then build-cache runs them again)",
            phase="state",
        )


def _tiles_so_far(settings: Settings | None, reporter: RecordingReporter) -> dict[str, int] | None:
    """Tile counts of an interrupted run: the tiles phase's own, or the tile set it completed."""

    counts = finished_counts("tiles")
    if counts is not None:
        return {k: int(counts.get(k, 0)) for k in ("planned", "fetched", "reused", "missing")}
    if settings is not None and "tiles" in reporter.ran:
        try:
            return _tile_counts(settings.paths.build, reporter.ran)
        except (OSError, ValueError, KeyError):
            return None
    return None


def build_cache(vars: Mapping[str, str], env: Mapping[str, str] | None = None) -> int:
    """``doit build-cache``: resolve, lock, build, check, publish, report."""

    report = Report("build-cache")
    fmt = _report_format(vars)
    warn = _warn(report)
    reporter = RecordingReporter()
    settings = None
    key_notes: list[str] = []  # the signing key's warnings: shown once a manifest is signed

    forget_counts()
    with operator_warnings(report.warnings.append):  # one line each, and in the report
        try:
            t = time.monotonic()
            settings = load_settings(vars, env)
            reporter.build = settings.paths.build
            if settings.shared_store is not None:
                from cachebuild.store.s3 import reset_stats

                reset_stats()  # the report counts this run's objects
            plan = resolve_plan(settings, warn=key_notes.append)  # before the lock
            if settings.dask_scheduler is not None and settings.companion is None:
                from cachebuild.localize.daskexec import probe_scheduler

                probe_scheduler(settings.dask_scheduler)  # exit 21 naming it, before the lock
            report.flight_id = plan.record["flight_id"] if plan.record else None
            report.extra["flight_source"] = plan.flight_source
            report.timed("flight", time.monotonic() - t)

            t = time.monotonic()
            with CacheLock(settings.paths.lock):
                report.timed("lock", time.monotonic() - t)
                _refuse_ignored(plan)
                with sigterm_as_interrupt():
                    _locked_build(
                        plan,
                        settings,
                        report,
                        reporter,
                        warn,
                        clean_leftovers,
                        publish,
                        published_manifest_bytes,
                    )
        except CacheBuildError as exc:
            _note_free_space(exc, settings)
            report.fail(exc)
            if getattr(exc, "traceback", None):
                sys.stderr.write(redact(exc.traceback))  # type: ignore[attr-defined]
        except KeyboardInterrupt as exc:
            err = Interrupted(
                f"interrupted ({str(exc) or 'SIGINT'}) during {reporter.current or 'the build'}"
            )
            err.phase = reporter.current or "build"
            report.fail(err)
            report.tiles = _tiles_so_far(settings, reporter) or report.tiles
        except Exception as exc:  # a bug: say so, without secrets
            from cachebuild._util.diskspace import disk_full_error, is_disk_full

            if is_disk_full(exc):  # publishing, doit's database: exit 24, not a bug
                full = disk_full_error(exc, reporter.current or "build")
                _note_free_space(full, settings)
                report.fail(full)
            else:
                sys.stderr.write(redact(traceback.format_exc()))
                report.fail(BuildError(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            settled()  # the outcome is decided: a Ctrl-C now would only lose the report
            actions.ACTIVE["locked"] = False
            if "manifest" in reporter.ran:  # signed now: say with which key
                for msg in key_notes:
                    warn(msg)
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
    from cachebuild.store.s3 import stats_entry

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
    # the action cache's store, bucket and this run's hits and misses (cachebuild.store.actioncache)
    actions.ACTIVE.update(
        store=str(settings.store),
        shared=settings.shared_store,
        action_cache={"hits": [], "misses": [], "from_bucket": []},
    )
    on_companion = settings.companion is not None  # then only flight and tiles run here
    # PIPELINE: the tiles phase describes (with COMPANION: pushes) as tiles arrive
    arm_pipeline(actions.ACTIVE, settings, describe_ahead_config(settings, plan, reporter))

    tasks = list(LOCAL_TASKS) if on_companion else doit_tasks(settings)
    started = time.monotonic()
    try:
        _run_locked(plan, reporter, warn, tasks)
    except BaseException:
        actions.take_prepush(abort=True)  # what it sent stays there: the next push sends less
        raise
    finally:  # a describer still running (describe did not run, or failed) is stopped
        stats = actions.stop_describe_ahead() or actions.ACTIVE.pop("ahead_stats", None)
        report.extra["pipeline"] = pipeline_entry(
            pipeline_on(settings), dict(reporter.seconds), stats, time.monotonic() - started
        )

    report.tiles = _tile_counts(paths.build, reporter.ran)
    if on_companion:
        _on_companion(plan, report, reporter, warn, tasks)
        return
    t = time.monotonic()
    staged = (paths.build / "manifest.json").read_bytes()
    signed = json.loads(staged)["signed"]
    report.build_id = signed["build_id"]
    report.manifest_version = signed["version"]

    ahead = int(report.extra["pipeline"]["described_ahead"])
    report.extra["descriptors"] = _descriptor_counts(paths.build, reporter.ran, ahead)
    report.extra["action_cache"] = actions.ACTIVE.get("action_cache") or {"hits": [], "misses": []}
    report.extra["describe"] = _describe_entry(paths.build, reporter.ran, settings.dask_scheduler)
    report.extra["selftest"] = summary(signed["info"].get("selftest"))
    # history stays out of selftest.json and index.json: what this run did, from the run files
    # (an action served from the action cache ran nothing)
    did = set(reporter.ran) - set(report.extra["action_cache"].get("hits") or [])
    run = read_run(paths.build) if "selftest" in did else None
    report.extra["selftest_frames"] = (run or {}).get("frames") or {"described": 0}
    report.extra["index_run"] = (read_index_run(paths.build) or {}) if "index" in did else {}
    low = low_recall_warning(signed["info"].get("selftest"), settings.recall_warn)
    if low:
        warn(low)
    engine = signed["info"].get("engine") or {}  # which backend ran, on what device
    report.extra["engine"] = {k: engine.get(k) for k in ("backend", "device", "key")}
    check_coverage(signed, settings.strict, warn)
    check_recall(signed["info"].get("selftest"), settings.min_recall)  # exit 22, phase selftest
    report.timed("coverage", time.monotonic() - t)

    _publish_staged(
        paths, staged, signed, report, reporter, warn, publish, published_manifest_bytes
    )


def _run_locked(plan: Any, reporter: RecordingReporter, warn: Any, tasks: Any) -> None:
    """doit's ``tasks`` under the lock; raises the failed phase's error.

    A damaged doit database or staged artifact, a missing or corrupt store
    object: repaired (:func:`~cachebuild.cli.repair.run_repairing`).
    """
    actions.FAILURES.clear()
    actions.ACTIVE["locked"] = True
    code = run_repairing(
        plan.paths, warn, lambda: run_doit(plan, reporter, tasks=tasks), reporter, actions.FAILURES
    )
    actions.ACTIVE["locked"] = False
    if code != 0:
        if actions.FAILURES:
            raise actions.FAILURES[-1]
        detail = "; ".join(reporter.errors) or f"doit exited {code}"
        raise BuildError(f"build failed: {detail}", phase=(reporter.failed or ["build"])[-1])


def _on_companion(
    plan: Any, report: Report, reporter: RecordingReporter, warn: Any, tasks: Any
) -> None:
    """Push, build on the companion, merge its report; an image the push finds corrupt in the
    store is fetched again (this machine's tasks once more), then pushed."""

    def push() -> None:
        report.tiles = _tile_counts(plan.paths.build, reporter.ran)
        build_on_companion(plan, report, warn, **actions.take_prepush())  # the first push only

    rerun = partial(_run_locked, plan, reporter, warn, tasks)
    push_repairing(plan.paths, warn, push, rerun, reporter)


def _publish_staged(
    paths: Any,
    staged: bytes,
    signed: Mapping[str, Any],
    report: Report,
    reporter: RecordingReporter,
    warn: Any,
    publish: Any,
    published_manifest_bytes: Any,
) -> None:
    """Publish the staged, checked cache (unless it is the published one, intact) and record it."""
    t = time.monotonic()

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

    for path in (settings.pubkey, settings.key, settings.dev_key):
        if path is not None and Path(path).exists():
            return load_public_key(path)
    raise UsageError(
        "no public key to verify against",
        remedy="set PUBKEY=<the signer's public key> (or KEY=<the signing key>)",
    )


def verify_cache_cmd(vars: Mapping[str, str], env: Mapping[str, str] | None = None) -> int:
    """``doit verify-cache``: the signature, expiry, rollback and every artifact's hash."""
    from cachebuild.release.publish import current_release
    from cachebuild.release.verify import read_manifest, verify_cache

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


# -- dodo.py and the console script ----------------------------------------


def dodo_namespace() -> dict[str, Any]:
    """What dodo.py exports: DOIT_CONFIG and one task_* creator per artifact.

    Lets ``doit list`` show the graph.  Running a task directly is refused
    (:class:`cachebuild.cli.doitcmds.RunCmd`, and the action itself: it would
    bypass the lock): use ``doit build-cache``.
    """

    vars = {k: v for k, v in cmdline_vars().items() if k in VARIABLES}
    settings = load_settings(vars)
    try:  # with FLIGHT, `doit list --status` judges the flight's tasks too
        plan = resolve_plan(settings, with_flight=bool(vars.get("FLIGHT")))
    except CacheBuildError:  # the flight's error is build-cache's to report
        plan = resolve_plan(settings, with_flight=False)
    plan.paths.state.mkdir(parents=True, exist_ok=True)
    # the build's own database and file checker: `doit list --status` judges as build-cache does
    ns: dict[str, Any] = {"DOIT_CONFIG": {**doit_config(plan), "default_tasks": []}}
    for d in task_dicts(plan):
        spec = dict(d)
        name = spec.pop("name")
        spec["basename"] = name

        def creator(spec: dict[str, Any] = spec) -> dict[str, Any]:
            return spec

        creator.__doc__ = spec.get("doc")
        ns[f"task_{name}"] = creator
    return ns
