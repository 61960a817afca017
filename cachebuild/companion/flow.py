"""Companion mode, start to end, after the workstation's half of the build.

The wrapper (:mod:`cachebuild.cli.runner`) resolves the flight, takes the
workstation's lock and runs only the ``flight`` and ``tiles`` tasks; then
:func:`build_on_companion`:

1. **Bringup** — connect (:mod:`.ssh`), find ``COMPANION_DIR``, and ask the
   companion's agent, in one round trip, for its cachebuild version, device
   and free disk and which of the needed files it lacks; refuse (exit 30)
   when it cannot build.
2. **Push** — send exactly what it lacks (:mod:`.push`).
3. **Remote build** — ``COMPANION_CMD build-cache`` there, from what was
   pushed (``PROVIDER=pushed:…``), under the companion's own lock; its
   output streamed here; its JSON report merged into this run's report
   (``push`` and ``companion`` objects, its outcome and exit code).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from cachebuild import __version__
from cachebuild.companion.agent import PROTOCOL_VERSION
from cachebuild.companion.errors import CompanionNotReadyError, RemoteBuildError
from cachebuild.companion.messages import (
    COMPANION_PASSPHRASE_ENV,
    as_workstation,
    command_values,
    names_companion_key,
)
from cachebuild.companion.push import PushPlan, plan_push, push
from cachebuild.companion.reach import (
    DEFAULT_COMPANION_DIR,
    DISK_RESERVE_BYTES,
    companion_options,
    resolve_root,
)
from cachebuild.companion.records import record_companion_build
from cachebuild.companion.remote import (
    call_agent,
    remote_command,
    run_remote_build,
    start_agent,
    with_passphrase,
)
from cachebuild.companion.ssh import Factory, connect
from cachebuild.errors import EXIT_DOWNLOAD, EXIT_USAGE
from cachebuild.inputs.companion import CompanionTarget

__all__ = [
    "DEFAULT_COMPANION_DIR",
    "LOCAL_ONLY",
    "DEFAULT_COMPANION_CMD",
    "DISK_RESERVE_BYTES",
    "companion_options",
    "resolve_root",
    "remote_variables",
    "build_on_companion",
]

DEFAULT_COMPANION_CMD = "doit"
_PROGRESS_EVERY_S = 1.0


#: Variables that concern only the workstation (its flight lookup, tile
#: fetching, files, the SSH link) or that the flow sets itself for the
#: remote build.  Every other variable the operator sets is passed on as
#: given, so one added later reaches the companion's build by default.
LOCAL_ONLY = frozenset(
    {
        "FLIGHT",
        "FLIGHTS_API_URL",
        "FLIGHTS_API_TIMEOUT",
        "OFFLINE",
        "CACHE_DIR",
        "STORE",
        "PROVIDER",
        "CONCURRENCY",
        "HTTP_TIMEOUT",
        "HTTP_RETRIES",
        "HTTP_BACKOFF",
        "RATE_LIMIT",
        "SUBDOMAINS",
        "NODATA",
        "NODATA_SHA256",
        "RETRY_MISSING",
        "MODEL",
        "CALIBRATION",
        "KEY",
        "PUBKEY",
        "REPORT",
        "MAX_STORE_BYTES",
        "COMPANION",
        "SSH_KEY",
        "KNOWN_HOSTS",
        "HOST_KEY_POLICY",
        "COMPANION_DIR",
        "COMPANION_CMD",
        "COMPANION_KEY",
    }
)


def remote_variables(settings: Any, remote: dict[str, str | None]) -> dict[str, str | None]:
    """The ``build-cache`` variables of the remote build: what the build depends
    on, with the pushed flight, tiles and inputs in place of local paths.

    Variables not in :data:`LOCAL_ONLY` that the operator set (``INDEX``,
    ``MIN_RECALL``, ...) are passed on as given.
    """
    passed = {k: v for k, v in sorted(settings.given.items()) if k not in LOCAL_ONLY}
    return passed | {
        "FLIGHT": remote["flight"],
        "PROVIDER": f"pushed:{remote['tileset_dir']}",
        "CACHE_DIR": remote["cache"],
        "STORE": remote["store"],
        "ZOOM": ",".join(str(z) for z in settings.zooms),
        "BUFFER_M": repr(float(settings.buffer_m)),
        "MODEL": remote["model"],
        "CALIBRATION": remote["calibration"],
        "PRECISION": settings.precision,
        "BACKEND": settings.backend,
        "BATCH": str(settings.batch),
        "THREADS": None if settings.threads is None else str(settings.threads),
        "KEY": settings.companion_key,
        "EXPIRES_DAYS": repr(float(settings.expires_days)),
        "STRICT": "1" if settings.strict else "0",
        "REPORT": "json",
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _device_line(info: dict[str, Any]) -> str:
    dev = info.get("device") or {}
    parts = []
    if dev.get("jetson"):
        parts.append(str(dev["jetson"]))
    parts.append(f"GPU {dev['gpu']}" if dev.get("gpu") else "no GPU")
    parts.append(f"TensorRT {dev['tensorrt']}" if dev.get("tensorrt") else "no TensorRT")
    if dev.get("onnxruntime"):
        parts.append(f"ONNX Runtime {dev['onnxruntime']}")
    return ", ".join(parts)


def _check_ready(
    info: dict[str, Any],
    need: int,
    comfortable: int,
    settings: Any,
    target: CompanionTarget,
    warn: Any,
) -> None:

    if info.get("protocol") != PROTOCOL_VERSION:
        raise CompanionNotReadyError(
            f"{target} runs cachebuild {info.get('cachebuild')} (companion protocol {info.get('protocol')}); "
            f"this workstation's cachebuild {__version__} speaks protocol {PROTOCOL_VERSION}",
            remedy=f"install cachebuild {__version__} on the companion (docs/companion.md)",
        )
    if info.get("cachebuild") != __version__:
        warn(
            f"the companion runs cachebuild {info.get('cachebuild')}, this workstation {__version__}; "
            "compatible, but the same version on both is safer"
        )
    dev = info.get("device") or {}
    if settings.backend == "tensorrt" and not dev.get("tensorrt"):
        raise CompanionNotReadyError(
            f"BACKEND=tensorrt, but {target} has no TensorRT ({_device_line(info)})",
            remedy="install JetPack's TensorRT Python bindings there (python3-libnvinfer), "
            "or build with BACKEND=onnxruntime",
        )
    free = int(info.get("free_bytes") or 0)
    if free < need:
        raise CompanionNotReadyError(
            f"{target} has {_mb(free)} free under {info.get('dir')}; the push needs {_mb(need)} "
            f"(with {_mb(DISK_RESERVE_BYTES)} kept free)",
            remedy="free space on the companion (old releases are under COMPANION_DIR/cache/releases), "
            "or point COMPANION_DIR at a bigger disk",
        )
    if free < comfortable:
        warn(f"{target} has {_mb(free)} free; the build there may need about {_mb(comfortable)}")


class _Progress:
    """Push progress on stderr, at most once a second (the flow prints the end)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last = time.monotonic()

    def __call__(self, result: Any, total_objects: int, total_bytes: int) -> None:
        now = time.monotonic()
        if now - self.last < _PROGRESS_EVERY_S:
            return
        self.last = now
        self.stream.write(
            f"push: {result.objects:,}/{total_objects:,} objects, {_mb(result.bytes)} sent "
            f"of about {_mb(total_bytes)}\n"
        )
        self.stream.flush()


def _n(count: int, what: str) -> str:
    return f"{count:,} {what}" if count == 1 else f"{count:,} {what}s"


def _missing_line(plan: Any, absent: set[str]) -> str:
    """What the companion lacks, per kind, each "k of n" (the counts the sent line uses)."""
    tiles = sum(plan.tile_rel(d) in absent for d in plan.tiles)
    parts = [f"{tiles:,} of {_n(len(plan.tiles), 'tile image')}"]
    if plan.inputs:
        parts.append(
            f"{sum(rel in absent for rel in plan.inputs):,} of {_n(len(plan.inputs), 'input file')}"
        )
    inbox = len(plan.inbox_files)
    parts.append(
        f"{inbox if f'{plan.inbox}/tileset.json' in absent else 0:,} of {_n(inbox, 'flight file')}"
    )
    return ", ".join(parts)


def _sent_line(plan: Any, result: Any, seconds: float, pre: int = 0) -> str:
    """What :func:`~.push.push` sent, in the kinds and counts of :func:`_missing_line`
    (``pre``: tile images the pre-push sent while fetching)."""
    inputs = result.objects - result.tile_objects
    parts = []
    if result.tile_objects:
        parts.append(f"{_n(result.tile_objects, 'tile image')} in {_n(result.packs, 'pack')}")
    if inputs:
        parts.append(_n(inputs, "input file"))
    if result.files - inputs:
        parts.append(_n(result.files - inputs, "flight file"))
    sent = (
        f"sent {', '.join(parts) if parts else 'nothing'}: {_mb(result.bytes)} in {seconds:.1f} s"
    )
    there = len(plan.tiles) - result.tile_objects - pre
    early = f", {pre:,} sent while fetching" if pre else ""
    return f"{sent}; {there:,} of {_n(len(plan.tiles), 'tile image')} were there already{early}"


def _merge_remote(report: Any, remote: dict[str, Any], code: int, target: CompanionTarget) -> None:
    companion = report.extra.setdefault("companion", {})
    companion.update(
        outcome=remote.get("outcome"),
        exit_code=remote.get("exit_code"),
        manifest_path=remote.get("manifest_path"),
        tasks=remote.get("tasks"),
        phases=remote.get("phases"),
        tiles=remote.get("tiles"),
    )
    if remote.get("engine"):  # the backend and device that ran on the companion
        report.extra["engine"] = remote["engine"]
    report.build_id = remote.get("build_id")
    report.manifest_version = remote.get("manifest_version")
    report.manifest_path = remote.get("manifest_path")
    for w in remote.get("warnings") or []:
        report.warnings.append(f"companion: {as_workstation(w)}")
    remote_code = int(remote.get("exit_code", code))
    if remote.get("outcome") in ("success", "up_to_date") and remote_code == 0:
        report.outcome = remote["outcome"]
        report.exit_code = 0
        return
    error = as_workstation(remote.get("error")) or f"the build exited {code}"
    remedy = as_workstation(remote.get("remedy"))
    # the companion refusing to re-sign another key's cache with its dev key: its remedy is the right one
    if (remote_code == EXIT_USAGE or 90 <= remote_code <= 99) and "ALLOW_DEV_KEY" not in remedy:
        if names_companion_key(remote.get("error")):
            if (
                not remedy or "no such file" in error
            ):  # else the companion's own remedy, in our terms
                remedy = (
                    f"COMPANION_KEY is a path on the companion {target.host}: check that the signing key "
                    "is there, or leave COMPANION_KEY unset to sign with the companion's development key"
                )
        else:  # everything else the remote build was given, this workstation checked and made
            remedy = "install the same cachebuild version on the companion as on this workstation (docs/companion.md)"
    raise RemoteBuildError(
        f"on the companion {target}: {error}",
        exit_code=remote_code,
        phase=remote.get("failure_phase"),
        remedy=remedy or None,
    )


def _warn_quarantined(settled: dict[str, Any], target: CompanionTarget, warn: Any) -> None:
    """Say which packs the companion's agent refused and moved aside (their objects are sent again)."""
    for line in (settled.get("quarantined") or [])[:5]:
        warn(f"the companion {target} refused a pack and quarantined it: {line}")


def build_on_companion(
    plan: Any,
    report: Any,
    warn: Any,
    *,
    factory: Factory | None = None,
    stream: TextIO | None = None,
    pack_bytes: int | None = None,
    prepush: Any = None,
    download_ended: float | None = None,
) -> None:
    """Bring up the companion, push what it lacks, build there, merge its report.

    Parameters
    ----------
    plan
        The resolved :class:`~cachebuild.inputs.plan.BuildPlan`; its ``flight`` and
        ``tiles`` tasks have run (the staged tile set is in ``plan.paths.build``).
    report
        This run's :class:`~cachebuild._util.report.Report`; gains ``push``,
        ``companion``, phases ``bringup``, ``push``, ``remote`` and the
        remote build's outcome, identity and exit code.
    warn
        Prints and records a warning.
    factory
        Makes the SSH connection (tests inject one); paramiko by default.
    stream
        Where progress and the companion's output go (stderr).
    prepush, download_ended
        The tiles phase's :class:`~.prepush.PrePush` (push while fetching;
        waited for first) and ``time.monotonic()`` at the download's end, or None.

    Raises
    ------
    CompanionError
        Exit 30: unreachable, untrusted, refused, not ready, link lost.
    RemoteBuildError, RemoteReportError
        The remote build failed (its exit code), or gave no report (21).
    """

    since = time.monotonic()
    settings = plan.settings
    out = stream or sys.stderr
    target, options = companion_options(settings)
    companion: dict[str, Any] = {"host": str(target), "device": None}
    report.extra["companion"] = companion
    t = time.monotonic()
    try:  # meanwhile the pre-push's tail: what the fetch stored last
        handed = _hand_over(prepush, plan)
        conn = connect(target, options, factory=factory, warn=warn)
    finally:
        waited = _settle(prepush, report, out, target, warn)
    with conn:
        sftp = conn.open_sftp()
        there = {PushPlan.tile_rel(d.hex()) for d in prepush.there()} if prepush else set()
        given = _answered(prepush, handed)
        root, wanted_plan, absent = _bring_up(conn, sftp, plan, target, companion, out, warn, there, given)  # fmt: skip
        report.timed("bringup", time.monotonic() - t - waited)
        _push(conn, sftp, root, wanted_plan, absent, settings, out, report, warn, pack_bytes)
        _pipelined(report, download_ended, since)
        try:
            _remote_build(conn, settings, wanted_plan.remote, out, report)
        except RemoteBuildError as exc:
            if exc.exit_code != EXIT_DOWNLOAD:
                raise
            # a pushed image it had was corrupt there: its build removed it and could not fetch
            # it (it reads only what was pushed); ask again what it lacks, push that, build again
            again = _absent(conn, settings, root, wanted_plan)
            if not again:
                raise
            warn(
                f"the companion {target} lacked {_n(len(again), 'pushed file')} its build needed "
                "(found corrupt there and removed): pushing again and building once more"
            )
            sftp = conn.open_sftp()
            _push(conn, sftp, root, wanted_plan, again, settings, out, report, warn, pack_bytes)
            _remote_build(conn, settings, wanted_plan.remote, out, report)
        if report.exit_code == 0 and report.build_id:
            record_companion_build(plan.paths.state, str(target), root, report)


def _settle(prepush: Any, report: Any, out: TextIO, target: CompanionTarget, warn: Any) -> float:
    """Wait for the pre-push, if one ran: its counts start the report's ``push``; the seconds waited."""
    report.extra["push"] = {"objects": 0, "bytes": 0}
    if prepush is None:
        return 0.0
    t = time.monotonic()
    report.extra["push"] = prepush.settle(report, out)
    _warn_quarantined(prepush.settled, target, warn)
    return time.monotonic() - t


def _pipelined(report: Any, download_ended: float | None, since: float) -> None:
    """After the first push: ``push.after_download_s`` (its end after the download's) and the
    report's ``pipeline`` with the push's stages and the wall time to its end.

    The stages: the workstation's tasks, the pre-push's busy time (push while
    fetching, docs/design/pipeline.md), bring-up and the final push; ``since``:
    when this flow started, right after the tasks.
    """
    now = time.monotonic()
    push = report.extra["push"]
    if download_ended is not None:
        push["after_download_s"] = round(now - download_ended, 3)
    entry = report.extra.get("pipeline")
    if not entry:
        return
    stages = dict(entry["stages"])
    pre = push.get("prepushed")
    if pre is not None:
        stages["prepush"] = round(float(pre["busy_s"]), 3)
    for phase in ("bringup", "push"):
        stages[phase] = round(float(report.phases.get(phase, 0.0)), 3)
    total = round(sum(stages.values()), 3)
    wall = round(float(entry["wall_s"]) + now - since, 3)
    overlap = round(max(0.0, total - wall), 3)
    entry.update(
        enabled=pre is not None, stages=stages, sum_s=total, wall_s=wall, overlap_s=overlap
    )


def _plan(plan: Any, root: str) -> PushPlan:
    """What a remote build of the staged tile set needs under ``root`` (:func:`.push.plan_push`)."""
    settings = plan.settings
    return plan_push(
        build_dir=plan.paths.build,
        store_root=settings.store,
        root=root,
        model=settings.model,
        calibration=settings.calibration,
        state_dir=plan.paths.state,
    )


def _hand_over(prepush: Any, plan: Any) -> tuple[str, PushPlan] | None:
    """Tell a pre-push that reached the companion what else the build needs, so that its
    session's end answers the final probe (no second agent started there): ``(root, plan)``."""
    root = prepush.root if prepush is not None else None
    if root is None:
        return None
    wanted_plan = _plan(plan, root)
    told = {PushPlan.tile_rel(d.hex()) for d in prepush.told()}
    prepush.end_with([w for w in wanted_plan.wanted() if w not in told])
    return root, wanted_plan


def _answered(
    prepush: Any, handed: tuple[str, PushPlan] | None
) -> tuple[str, PushPlan, dict[str, Any]] | None:
    """``(root, plan, the probe's answer)`` when the pre-push's end gave it, else None."""
    info = prepush.final_info() if handed is not None else None
    return (*handed, info) if handed is not None and info is not None else None


def _absent(conn: Any, settings: Any, root: str, wanted_plan: PushPlan) -> set[str]:
    """Which of the files the build needs the companion lacks now (the probe's answer)."""
    info = call_agent(
        conn, settings.companion_cmd, "probe", root, wanted=wanted_plan.wanted(),
        backend=settings.backend,
    )  # fmt: skip
    return set(info.get("absent") or [])


def _push(
    conn: Any,
    sftp: Any,
    root: str,
    wanted_plan: PushPlan,
    absent: set[str],
    settings: Any,
    out: TextIO,
    report: Any,
    warn: Any,
    pack_bytes: int | None,
) -> None:
    """Send what the companion lacks (``absent``); the report's ``push`` adds up what was sent."""
    t = time.monotonic()
    result = push(
        conn,
        sftp,
        wanted_plan,
        absent,
        root=root,
        on_progress=_Progress(out),
        start_unpack=lambda rels, session: start_agent(
            conn,
            settings.companion_cmd,
            "unpack",
            root,
            wanted=rels,
            watch=session,
            during="unpacking the push",
        ),
        **({"pack_bytes": pack_bytes} if pack_bytes else {}),
    )
    before = report.extra.get("push") or {}  # pushed once more (or after the pre-push): the
    # counts add up, but the objects already there, which are the first answer's, less the pre-push's
    first = "already_there" not in before
    pre = int(before.get("prepushed", {}).get("objects", 0)) if first else 0
    report.extra["push"] = before | {
        k: before.get(k, max(0, v - pre)) if k == "already_there" else before.get(k, 0) + v
        for k, v in result.to_dict().items()
    }
    _warn_quarantined(result.settled, conn.target, warn)
    report.timed("push", time.monotonic() - t)
    out.write(f"push: {_sent_line(wanted_plan, result, time.monotonic() - t, pre)}\n")
    sftp.close()


def _bring_up(
    conn: Any,
    sftp: Any,
    plan: Any,
    target: CompanionTarget,
    companion: dict[str, Any],
    out: TextIO,
    warn: Any,
    there: set[str] | None = None,
    given: tuple[str, PushPlan, dict[str, Any]] | None = None,
) -> tuple[str, PushPlan, set[str]]:
    """Probe the companion: ``(its root, what to push, what of it is absent there)``.

    Fills ``companion`` (device, engine, version, free space), refuses a
    companion that is not ready or lacks the disk, and says what will be sent.
    ``there``: paths the pre-push saw unpacked there, left out of the probe.
    ``given``: the plan and the probe's answer the pre-push's end already got.
    """
    settings = plan.settings
    if given is not None:
        root, wanted_plan, info = given
    else:
        root = resolve_root(sftp, settings.companion_dir)
        wanted_plan = _plan(plan, root)
        info = call_agent(
            conn,
            settings.companion_cmd,
            "probe",
            root,
            wanted=[w for w in wanted_plan.wanted() if w not in (there or ())],
            backend=settings.backend,
        )
    absent = set(info.get("absent") or [])
    sending = wanted_plan.bytes_for(absent)
    tiles_absent = sum(
        size for d, (_, size) in wanted_plan.tiles.items() if wanted_plan.tile_rel(d) in absent
    )
    need = sending + tiles_absent + DISK_RESERVE_BYTES  # packs and the objects unpacked from them
    comfortable = need + wanted_plan.tile_bytes + 4096 * len(wanted_plan.tiles)
    companion.update(
        device=info.get("device"),
        engine=info.get("engine"),
        cachebuild=info.get("cachebuild"),
        dir=root,
        free_bytes=info.get("free_bytes"),
    )
    _check_ready(info, need, comfortable, settings, target, warn)
    settled = info.get("settled") or {}
    out.write(
        f"companion {target}: cachebuild {info.get('cachebuild')}, {_device_line(info)}, "
        f"{_mb(int(info.get('free_bytes') or 0))} free in {root}\n"
    )
    if settled.get("objects"):
        out.write(f"companion: kept {settled['objects']:,} objects a cut-off push had sent\n")
    _warn_quarantined(settled, target, warn)
    out.write(
        f"push: {_missing_line(wanted_plan, absent)} missing there, about {_mb(sending)} to send\n"
    )
    out.flush()
    return root, wanted_plan, absent


def _remote_build(
    conn: Any, settings: Any, pushed: dict[str, str | None], out: TextIO, report: Any
) -> None:
    """``COMPANION_CMD build-cache`` on what was pushed; its report merged into ``report``.

    An encrypted ``COMPANION_KEY``'s passphrase goes over the channel's
    stdin (:func:`.remote.with_passphrase`); ``COMPANION_CMD``'s values are
    redacted from what the companion prints.
    """

    t = time.monotonic()
    command = remote_command(
        settings.companion_cmd, "build-cache", remote_variables(settings, pushed)
    )
    command, stdin = with_passphrase(command, settings.env.get(COMPANION_PASSPHRASE_ENV))
    hide = tuple(command_values(settings.companion_cmd))
    try:
        code, remote = run_remote_build(
            conn, command, out=out, env=settings.env, stdin=stdin, hide=hide
        )
    finally:
        report.timed("remote", time.monotonic() - t)
    _merge_remote(report, remote, code, conn.target)
