"""The companion's side of companion mode: ``doit companion-agent OP=…``.

The workstation runs it over SSH through ``COMPANION_CMD`` (so it is the
very cachebuild that will build there); each run prints one JSON object as
its last stdout line and exits 0, or prints ``{"error": …, "remedy": …}``
and exits 1.

``OP=probe DIR=<root> [WANT=stdin] [BACKEND=…]``
    Makes the layout under ``DIR`` (the ``COMPANION_DIR``), unpacks packs a
    cut-off push left complete, and answers: cachebuild and protocol
    versions, the device (GPU name, TensorRT version, Jetson model), free
    disk, and which of the paths read from stdin (one per line, relative to
    ``DIR``) are absent — one round trip, however large the store and
    however slow the link.
``OP=unpack DIR=<root> [WANT=stdin] [WATCH=<session>]``
    Unpacks the complete packs in ``incoming/`` into the store, then answers
    which of the paths on stdin are still absent.  With ``WATCH``, keeps
    unpacking packs as they arrive, while the workstation is still sending,
    until ``incoming/<session>.done`` appears (or the workstation is gone:
    its output pipe closed, or nothing arrived for :data:`WATCH_IDLE_S`).
    A marker that lists paths (one per line) adds them to those asked
    about, and the answer has ``listed: true`` and ``free_bytes``: the end
    of a push while fetching is then also the build's probe, with no
    second agent started (docs/design/pipeline.md).

Layout under ``DIR``::

    store/              the content-addressed store (objects/ab/<sha256>)
    incoming/           packs being pushed (*.tar.part) and pushed (*.tar);
                        quarantine/ holds packs that failed a check
    inputs/<sha256>.*   model and calibration files, named by content
    inbox/<key>/        a pushed flight: flight.json, tiles.npy, missing.npy,
                        tileset.json (last), push.json
    cache/              the companion's cache (CACHE_DIR): lock, releases, current

No doit import here; :mod:`cachebuild.cli.runner` registers the command.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cachebuild import __version__
from cachebuild._util.dists import installed_version
from cachebuild.companion.packs import settle_incoming
from cachebuild.inputs.plan import engine_environment
from cachebuild.store.lock import StoreLock
from cachebuild.store.objects import TileStore

__all__ = [
    "PROTOCOL_VERSION",
    "INBOX_KEEP_S",
    "WATCH_IDLE_S",
    "DONE_SUFFIX",
    "layout",
    "device_info",
    "probe",
    "unpack",
    "main",
]

#: Bumped when what the workstation and the companion say to each other changes.
PROTOCOL_VERSION = 1
#: Pushed flights not used for this long are removed by the next probe.
INBOX_KEEP_S = 7 * 24 * 3600.0
#: A watching unpacker gives up when no pack arrived for this long.
WATCH_IDLE_S = 600.0
DONE_SUFFIX = ".done"
_DIRS = ("store", "incoming", "inputs", "inbox", "cache")


def layout(root: Path) -> dict[str, Path]:
    """The directories under a ``COMPANION_DIR``."""
    return {name: root / name for name in _DIRS}


def _tensorrt_version() -> str | None:
    # JetPack installs TensorRT's Python bindings from a Debian package, with
    # no pip metadata: ask the module itself, in a child so a broken CUDA
    # install cannot take the agent down.
    import importlib.util

    found = installed_version("tensorrt", "tensorrt-cu12", "tensorrt_lean")
    if found:
        return found[1]
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        p = subprocess.run(
            [sys.executable, "-c", "import tensorrt; print(tensorrt.__version__)"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (p.stdout.strip() or None) if p.returncode == 0 else None


def _gpus() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        p = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in p.stdout.splitlines() if ln.strip()] if p.returncode == 0 else []


def _jetson_model() -> str | None:
    try:
        text = (
            Path("/proc/device-tree/model")
            .read_bytes()
            .rstrip(b"\0")
            .decode("utf-8", "replace")
            .strip()
        )
    except OSError:
        return None
    return text or None


def device_info() -> dict[str, Any]:
    """What will build here: GPU (``nvidia-smi``), TensorRT, Jetson model, CPU.

    Every field may be None (no GPU: ONNX Runtime on the CPU builds).
    """
    gpus = _gpus()
    ort = installed_version("onnxruntime", "onnxruntime-gpu")
    return {
        "gpu": gpus[0] if gpus else None,
        "gpus": gpus,
        "tensorrt": _tensorrt_version(),
        "onnxruntime": ort[1] if ort else None,
        "jetson": _jetson_model(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def _checked(rel: str) -> str:
    if not rel or rel.startswith("/") or ".." in rel.split("/"):
        raise ValueError(f"not a path under DIR: {rel!r}")
    return rel


def _absent(root: Path, wanted: list[str]) -> list[str]:
    # strings and os.path: pathlib costs more than the stat for 10k paths
    base = str(root)
    return [rel for rel in wanted if not os.path.isfile(os.path.join(base, _checked(rel)))]


def _touch_inboxes(inbox: Path, wanted: list[str]) -> set[str]:
    """The pushed flights ``wanted`` names, marked in use (a probe prunes the unused)."""
    inboxes = {_checked(w).split("/")[1] for w in wanted if w.startswith("inbox/")}
    for name in inboxes:
        if (inbox / name).is_dir():
            os.utime(inbox / name)
    return inboxes


def _prune_inbox(inbox: Path, keep: set[str], now: float) -> int:
    removed = 0
    for entry in os.scandir(inbox):
        if entry.name in keep or not entry.is_dir():
            continue
        try:
            if now - entry.stat().st_mtime > INBOX_KEEP_S:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def _store_shared(store: Path) -> Any:
    """The store's shared lock, as a build's actions hold it: ``gc-store`` waits."""

    return StoreLock(store, exclusive=False, wait=True, stream=sys.stderr)


def _prepare(root: Path) -> dict[str, Path]:

    dirs = layout(root)
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    TileStore(dirs["store"]).close()  # objects/, tmp/, journal/
    probe_file = dirs["incoming"] / f".probe-{os.getpid()}"
    probe_file.write_bytes(b"")
    probe_file.unlink()
    return dirs


def probe(root: Path, wanted: list[str], backend: str | None = None) -> dict[str, Any]:
    """Everything the workstation needs to decide whether and what to push.

    Parameters
    ----------
    root
        The ``COMPANION_DIR`` (absolute).
    wanted
        Paths relative to ``root`` the push would provide.
    backend
        The engine backend the build will use (reported as ``engine``).
    """

    dirs = _prepare(root)
    with _store_shared(dirs["store"]), TileStore(dirs["store"]) as store:
        settled = settle_incoming(dirs["incoming"], store)
    now = time.time()
    inboxes = _touch_inboxes(dirs["inbox"], wanted)
    pruned = _prune_inbox(dirs["inbox"], inboxes, now)
    device = device_info()
    doit = installed_version("doit")
    engine = None
    if backend:
        engine = engine_environment(backend)
    return {
        "protocol": PROTOCOL_VERSION,
        "cachebuild": __version__,
        "python": platform.python_version(),
        "doit": doit[1] if doit else None,
        "dir": str(root),
        "free_bytes": shutil.disk_usage(root).free,
        "device": device,
        "engine": engine,
        "settled": settled,
        "pruned_inbox": pruned,
        "absent": _absent(root, wanted),
    }


def _output_gone() -> bool:
    """True when nobody reads our stdout any more (the SSH session ended)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def unpack(
    root: Path, wanted: list[str], *, watch: str | None = None, idle_s: float = WATCH_IDLE_S
) -> dict[str, Any]:
    """Unpack the complete packs under ``root/incoming``; which ``wanted`` are still absent.

    With ``watch`` (a push session's name), go on unpacking packs as they
    arrive until ``incoming/<watch>.done`` appears; the answer then has
    ``done: true``.
    """

    dirs = layout(root)
    total: dict[str, Any] = {"packs": 0, "objects": 0, "bytes": 0, "corrupt": 0, "stale_parts": 0}
    total["quarantined"] = []
    done = watch is None
    marker = dirs["incoming"] / f"{watch}{DONE_SUFFIX}"
    with _store_shared(dirs["store"]), TileStore(dirs["store"]) as store:
        last = time.monotonic()
        while True:
            finished = (
                done or marker.exists()
            )  # before settling: packs renamed before it are settled now
            counts = settle_incoming(dirs["incoming"], store)
            for k, v in counts.items():
                total[k] += v
            if finished:
                break
            if counts["packs"]:
                last = time.monotonic()
            elif time.monotonic() - last > idle_s or _output_gone():
                break
            else:
                time.sleep(0.05)
    answer: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "settled": total}
    if watch is not None:
        done = marker.exists()
        listed = _marker_list(marker) if done else None
        marker.unlink(missing_ok=True)
        if listed is not None:  # the session's end names what else the build needs
            wanted = wanted + listed
            _touch_inboxes(dirs["inbox"], listed)
            answer.update(listed=True, free_bytes=shutil.disk_usage(root).free)
    answer["done"] = done
    answer["absent"] = _absent(root, wanted)
    return answer


def _marker_list(marker: Path) -> list[str] | None:
    """The paths a session's end marker lists (one per line), or None when it lists none."""
    try:
        text = marker.read_bytes().decode()
    except (OSError, UnicodeDecodeError):
        return None
    lines = [_checked(ln.strip()) for ln in text.splitlines() if ln.strip()]
    return lines or None


def _answer(obj: Mapping[str, Any], code: int) -> int:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()
    return code


def main(vars: Mapping[str, str]) -> int:
    """``doit companion-agent OP=probe|unpack DIR=<abs path> [WANT=stdin] [BACKEND=…] [WATCH=…]``."""
    op = vars.get("OP", "")
    raw_dir = vars.get("DIR", "")
    unknown = sorted(set(vars) - {"OP", "DIR", "WANT", "BACKEND", "WATCH"})
    if op not in ("probe", "unpack") or not raw_dir or unknown:
        return _answer(
            {
                "error": "usage: companion-agent OP=probe|unpack DIR=<absolute path> [WANT=stdin] "
                "[BACKEND=name] [WATCH=session]"
                + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
                "remedy": "this command is run by `doit build-cache COMPANION=…` on the workstation",
            },
            2,
        )
    root = Path(raw_dir)
    wanted: list[str] = []
    if vars.get("WANT") == "stdin":
        wanted = [ln.strip() for ln in sys.stdin.buffer.read().decode().splitlines() if ln.strip()]
    try:
        if not root.is_absolute():
            raise ValueError(f"DIR={raw_dir} is not absolute")
        if op == "probe":
            return _answer(probe(root, wanted, vars.get("BACKEND")), 0)
        watch = vars.get("WATCH") or None
        if watch is not None and (not watch.replace("-", "").isalnum() or len(watch) > 100):
            raise ValueError(f"WATCH={watch!r} is not a push session name")
        return _answer(unpack(root, wanted, watch=watch), 0)
    except PermissionError as exc:
        return _answer(
            {
                "error": f"cannot write under {root} ({exc.strerror}: {exc.filename})",
                "remedy": "set COMPANION_DIR to a directory the companion user owns, "
                "or fix its permissions on the companion",
            },
            1,
        )
    except OSError as exc:
        return _answer(
            {
                "error": f"{root}: {exc.strerror or exc} ({exc.filename})",
                "remedy": "check COMPANION_DIR",
            },
            1,
        )
    except ValueError as exc:
        return _answer({"error": str(exc), "remedy": "check COMPANION_DIR"}, 1)
