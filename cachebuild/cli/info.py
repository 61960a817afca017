"""``doit cache-info`` and ``doit preview-cache``: look at the published cache.

``cache-info`` summarises the published cache — flight, build, signer,
manifest version and expiry, tiles per zoom, artifact sizes, engine, index,
self-test recall — and says whether ``verify-cache`` passes right now.
``preview-cache`` renders the coverage map (:mod:`cachebuild.tiles.preview`) of
the published cache.  Neither takes the lock: they only read a release,
which is never written after it is published.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cachebuild._util.report import Report
from cachebuild._util.sizes import human_bytes
from cachebuild.companion.errors import CompanionNotReadyError, RemoteReportError
from cachebuild.companion.messages import COMPANION_PASSPHRASE_ENV, command_values, shown_command
from cachebuild.companion.reach import companion_options, resolve_root
from cachebuild.companion.records import LAST_BUILD_FILE, last_companion_build
from cachebuild.companion.remote import remote_command, run_remote_build, with_passphrase
from cachebuild.companion.ssh import connect
from cachebuild.errors import CacheBuildError, UsageError, VerifyError
from cachebuild.inputs.config import Settings, load_settings
from cachebuild.localize.selftest_score import headline
from cachebuild.release.publish import current_release
from cachebuild.release.rollback import check_not_rolled_back
from cachebuild.release.signing import keyid, load_public_key
from cachebuild.release.verify import read_manifest, verify_cache
from cachebuild.store.lock import store_user
from cachebuild.tiles.preview import render_preview

__all__ = [
    "cache_info",
    "format_info",
    "companion_cache",
    "compare",
    "format_companion",
    "cache_info_cmd",
    "preview_cache_cmd",
]


def _trusted(settings: Settings) -> list[Any]:

    for path in (settings.pubkey, settings.key, settings.dev_key):
        if path is not None and Path(path).exists():
            return [load_public_key(path)]
    return []


def _per_zoom(release: Path) -> dict[str, dict[str, int]]:
    import numpy as np

    out: dict[str, dict[str, int]] = {}
    for name, kind in (("tiles.npy", "present"), ("missing.npy", "missing")):
        arr = np.load(release / name, allow_pickle=False, mmap_mode="r")
        ids = arr["id"] if arr.dtype.names else arr
        zooms, counts = np.unique(np.asarray(ids) >> 58, return_counts=True)
        for z, n in zip(zooms.tolist(), counts.tolist()):
            row = out.setdefault(str(z), {"planned": 0, "present": 0, "missing": 0})
            row[kind] += n
            row["planned"] += n
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def cache_info(release: Path, trusted: list[Any], cache_dir: Path | None = None) -> dict[str, Any]:
    """Everything an operator wants to know about the cache in ``release``.

    With ``cache_dir``, ``verify`` also says whether the release would be
    refused as a rollback (:mod:`cachebuild.release.rollback`; read only: nothing is
    recorded).
    """

    envelope = read_manifest(release)
    signed = envelope["signed"]
    info = signed.get("info", {})
    identity = signed.get("identity", {})
    verify: dict[str, Any] = {"ok": False, "reason": None}
    if not trusted:
        verify["reason"] = "no public key to verify against (set PUBKEY)"
    else:
        try:
            checked = verify_cache(release, trusted)
            if cache_dir is not None:
                check_not_rolled_back(cache_dir, keyid(trusted[0]), checked)
            verify["ok"] = True
        except VerifyError as exc:
            verify["reason"] = exc.message
    sigs = envelope.get("signatures") or [{}]
    return {
        "path": str(release),
        "flight_id": identity.get("flight_id"),
        "build_id": signed.get("build_id"),
        "built_at": signed.get("built_at"),
        "signer_keyid": sigs[0].get("keyid"),
        "manifest_version": signed.get("version"),
        "expires": signed.get("expires"),
        "tiles": info.get("tiles"),
        "tiles_per_zoom": _per_zoom(release),
        "artifacts": {
            rel: meta["length"] for rel, meta in sorted(signed.get("targets", {}).items())
        },
        "engine": info.get("engine"),
        "index": info.get("index"),
        "selftest": info.get("selftest"),
        "verify": verify,
    }


def format_info(d: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`cache_info`'s result."""
    engine = d.get("engine") or {}
    index = d.get("index") or {}
    selftest = d.get("selftest")
    v = d["verify"]
    rows = [
        ("cache", d["path"]),
        ("flight", d.get("flight_id") or "(no id)"),
        ("build", d.get("build_id") or "?"),
        ("built at", d.get("built_at") or "?"),
        ("signer", (d.get("signer_keyid") or "?")[:16]),
        ("manifest", f"v{d.get('manifest_version')}, expires {d.get('expires')}"),
        (
            "engine",
            f"{engine.get('backend')} {engine.get('backend_version')} {engine.get('precision')}, "
            f"key {str(engine.get('key'))[:16]}",
        ),
        ("index", f"{index.get('type')} ({index.get('ntotal')} vectors)"),
        ("self-test", headline(selftest) if selftest else "not run"),
        ("verify", "passes" if v["ok"] else f"FAILS: {v['reason']}"),
    ]
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {val}" for k, val in rows]
    out.append("")
    out.append(f"{'zoom':>6} {'planned':>9} {'present':>9} {'missing':>9}")
    for z, row in d["tiles_per_zoom"].items():
        out.append(f"{z:>6} {row['planned']:>9} {row['present']:>9} {row['missing']:>9}")
    out.append("")
    for rel, n in d["artifacts"].items():
        out.append(f"  {rel:<24} {human_bytes(n):>10}")
    return "\n".join(out)


def _release(settings: Settings) -> Path:
    release = current_release(settings.paths)
    if release is None:
        raise UsageError(
            f"no published cache at {settings.paths.current}",
            remedy="build one with `doit build-cache FLIGHT=...`",
        )
    return release


def companion_cache(
    settings: Settings, *, factory: Any = None, stream: Any = None
) -> dict[str, Any]:
    """The companion's published cache, read by running ``cache-info`` there over SSH.

    Returns ``host``, ``dir`` (``COMPANION_DIR`` there), ``cache`` (its
    :func:`cache_info`, verified there with the key it signs with:
    ``COMPANION_KEY``, else its development key) or None with ``error``
    when it has no readable published cache.

    Raises
    ------
    CompanionError
        Exit 30: unreachable, untrusted host key, refused key, or no
        cachebuild answering ``COMPANION_CMD`` there.
    """

    target, options = companion_options(settings)
    with connect(target, options, factory=factory) as conn:
        sftp = conn.open_sftp()
        root = resolve_root(sftp, settings.companion_dir)
        sftp.close()
        variables = {"CACHE_DIR": f"{root}/cache", "KEY": settings.companion_key, "REPORT": "json"}
        command = remote_command(settings.companion_cmd, "cache-info", variables)
        command, stdin = with_passphrase(command, settings.env.get(COMPANION_PASSPHRASE_ENV))
        hide = tuple(command_values(settings.companion_cmd))
        try:
            _, remote = run_remote_build(
                conn, command, out=stream or sys.stderr, env=settings.env, stdin=stdin, hide=hide
            )
        except RemoteReportError as exc:
            raise CompanionNotReadyError(
                f"`{shown_command(settings.companion_cmd)} cache-info` on {target} gave no report: {exc.message}",
                remedy="install the same cachebuild version on the companion as here (docs/companion.md), "
                "or set COMPANION_CMD to its doit",
            ) from exc
    cache = remote.get("cache") if remote.get("exit_code") == 0 else None
    out: dict[str, Any] = {
        "host": str(target),
        "dir": root,
        "cache": cache if isinstance(cache, dict) else None,
    }
    if out["cache"] is None:
        out["error"] = remote.get("error") or f"cache-info there exited {remote.get('exit_code')}"
    return out


def compare(
    companion: dict[str, Any], last: Mapping[str, Any] | None, record: Path | None = None
) -> dict[str, Any]:
    """Is the companion's cache the one this workstation last built there?  Adds
    ``reference``, ``build_id``, ``matches`` and ``status`` to ``companion``.

    The reference is the last build this workstation made for that companion
    and ``COMPANION_DIR`` (``last``, from ``record``); a local published cache
    is another cache and never the reference.  ``status`` is ``matches``
    (same build id), ``stale`` (another build there), ``no cache`` (none
    published there) or ``unknown`` (no build for it recorded here).
    """
    remote = companion.get("cache")
    ref: dict[str, Any] | None = None
    if last is not None and (last.get("host"), last.get("dir")) == (
        companion["host"],
        companion["dir"],
    ):
        ref = {
            "source": "last companion build",
            "host": last.get("host"),
            "dir": last.get("dir"),
            "build_id": last.get("build_id"),
            "at": last.get("at"),
            "record": None if record is None else str(record),
        }
    companion["reference"] = ref
    companion["build_id"] = remote.get("build_id") if remote else None
    if remote is None:
        companion["matches"], companion["status"] = False, "no cache"
    elif ref is None:
        companion["matches"], companion["status"] = None, "unknown"
    elif remote.get("build_id") == ref["build_id"]:
        companion["matches"], companion["status"] = True, "matches"
    else:
        companion["matches"], companion["status"] = False, "stale"
    return companion


def format_companion(c: Mapping[str, Any]) -> str:
    """One paragraph: the companion's cache against the reference."""
    remote, ref = c.get("cache"), c.get("reference")
    head = f"companion {c['host']} ({c['dir']}/cache)"
    if remote is None:
        return f"{head}: no published cache ({c.get('error')})"
    v = remote["verify"]
    line = (
        f"{head}: build {str(remote.get('build_id'))[:16]}, v{remote.get('manifest_version')}, "
        f"built {remote.get('built_at')}, verify {'passes' if v['ok'] else 'FAILS: ' + str(v['reason'])}"
    )
    if ref is not None:
        made = f"the last build this workstation made for {ref['host']} {ref['dir']}"
        if c["status"] == "matches":
            return f"{line}\n  matches {made} (at {ref.get('at')})"
        return (
            f"{line}\n  STALE: {made} is build {str(ref['build_id'])[:16]} (at {ref.get('at')}); "
            "another build was published there since"
        )
    return f"{line}\n  nothing to compare it with: this workstation recorded no build for {c['host']} {c['dir']}"


def cache_info_cmd(vars: Mapping[str, str], env: Mapping[str, str] | None = None) -> int:
    """``doit cache-info``: a table, or with ``REPORT=json`` the report with ``cache``.

    With ``COMPANION``, the companion's cache too (``companion`` in the
    report: see :func:`companion_cache` and :func:`compare`); the local
    published cache is then optional.
    """
    report = Report("cache-info")
    fmt = "json" if (vars.get("REPORT") or "").lower() == "json" else "text"
    try:
        settings = load_settings(vars, env)
        fmt = settings.report
        d: dict[str, Any] | None = None
        if settings.companion is None or current_release(settings.paths) is not None:
            d = cache_info(_release(settings), _trusted(settings), settings.cache_dir)
            report.build_id = d["build_id"]
            report.flight_id = d["flight_id"]
            report.manifest_version = d["manifest_version"]
            report.manifest_path = str(Path(d["path"]) / "manifest.json")
        report.extra["cache"] = d
        text = [format_info(d)] if d is not None else []
        if settings.companion is not None:
            c = companion_cache(settings)
            last = last_companion_build(settings.paths.state, c["host"], c["dir"])
            c = compare(c, last, settings.paths.state / LAST_BUILD_FILE)
            report.extra["companion"] = c
            if d is None and c["cache"] is not None:
                report.build_id = c["cache"].get("build_id")
                report.flight_id = c["cache"].get("flight_id")
                report.manifest_version = c["cache"].get("manifest_version")
            text.append(format_companion(c))
        report.outcome, report.exit_code = "success", 0
        if fmt == "text":
            sys.stdout.write("\n\n".join(text) + "\n")
            return 0
    except CacheBuildError as exc:
        report.fail(exc)
    except (OSError, ValueError, KeyError) as exc:
        report.fail(VerifyError(f"the published cache is unreadable: {exc}"))
    report.emit(fmt)
    return report.exit_code


def _png_size(path: Path) -> tuple[int, int, int]:
    """Width and height from a PNG file's header, and its size in bytes."""
    with open(path, "rb") as f:
        head = f.read(24)
        nbytes = os.fstat(f.fileno()).st_size
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"), nbytes


def preview_cache_cmd(vars: Mapping[str, str], env: Mapping[str, str] | None = None) -> int:
    """``doit preview-cache [OUT=path.png]``: the coverage map of the published cache."""

    vars = dict(vars)
    out = vars.pop("OUT", None)
    report = Report("preview-cache")
    fmt = "json" if (vars.get("REPORT") or "").lower() == "json" else "text"
    try:
        settings = load_settings(vars, env)
        fmt = settings.report
        release = _release(settings)
        signed = json.loads((release / "manifest.json").read_text())["signed"]
        target = Path(out) if out else settings.cache_dir / "preview.png"

        with store_user(str(settings.store)):  # thumbnails in the store; gc-store waits
            r = render_preview(
                release, target, built_at=signed.get("built_at"), store=settings.store
            )
        report.build_id = signed.get("build_id")
        width, height, nbytes = _png_size(target)  # the file's, legend included
        report.extra["preview"] = {
            "path": str(target),
            "width": width,
            "height": height,
            "bytes": nbytes,
            "mode": r["mode"],
            "thumbnails_reused": r["thumbnails_reused"],
            "thumbnails_made": r["thumbnails_made"],
        }
        report.outcome, report.exit_code = "success", 0
        if fmt == "text":
            sys.stdout.write(
                f"preview: {target} ({width}x{height} px, {human_bytes(nbytes)}, z{r['zoom']})\n"
            )
            return 0
    except CacheBuildError as exc:
        report.fail(exc)
    report.emit(fmt)
    return report.exit_code
