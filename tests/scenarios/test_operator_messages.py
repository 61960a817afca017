"""What an operator reads: interrupts, warnings, sizes, typos, help, the key note, logs, CI lines.

Each test runs the real command (doit or the ``cachebuild`` script) the way
an operator does and reads its stderr, stdout and report.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from cachebuild import __version__
from cachebuild.release.lock import CacheLock
from tests.conftest import REPO, Cb, write_flight

SMALL = ("BUFFER_M=200", "ZOOM=17")


def _op_key(tmp_path: Path, mode: int) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / "op.pem"
    path.write_bytes(pem)
    path.chmod(mode)
    return path


def test_interrupt_names_the_signal_and_counts_the_tiles_fetched(
    cb: Cb, tmp_path: Path, tile_server
) -> None:
    tile_server.latency_s = 0.05
    f = write_flight(tmp_path / "f.json")
    p = cb.popen(
        "build-cache",
        f"FLIGHT={f}",
        "BUFFER_M=1500",
        "ZOOM=17",
        "CONCURRENCY=2",
        f"PROVIDER={tile_server.template()}",
    )
    deadline = time.monotonic() + 60
    while len(tile_server.requests) < 10 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    from tests.conftest import CbResult

    rep = CbResult(p.returncode, out, err).report
    assert p.returncode == 130
    assert rep["error"].startswith("interrupted (SIGINT) during tiles"), rep["error"]
    assert "()" not in rep["error"]
    t = rep["tiles"]
    assert t["planned"] > 100
    assert 0 < t["fetched"] <= len(tile_server.requests)


def test_warnings_are_one_line_without_source(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    key = _op_key(tmp_path, 0o644)  # readable by others: cachebuild warns
    r = cb.build(f"FLIGHT={f}", *SMALL, f"KEY={key}")
    assert r.code == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "accessible to other users" in ln]
    assert len(lines) == 1 and lines[0].startswith("WARNING: "), r.stderr
    assert "KeyPermissionWarning" not in r.stderr and ".py:" not in r.stderr
    assert any("accessible to other users" in w for w in r.report["warnings"])
    # a library's warning too: rasterio's on a TIFF without georeferencing
    from PIL import Image

    tif = tmp_path / "plain.tif"
    Image.new("RGB", (64, 64), "red").save(tif)
    g = cb.build(
        f"FLIGHT={f}", *SMALL, f"KEY={key}", f"PROVIDER={tif}", f"CACHE_DIR={tmp_path / 'c2'}"
    )
    assert g.code == 2
    assert "NotGeoreferencedWarning" not in g.stderr and ".py:" not in g.stderr
    assert "WARNING: Dataset has no geotransform" in g.stderr


def test_dev_key_note_only_when_a_manifest_is_signed(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    first = cb.build(f"FLIGHT={f}", *SMALL)
    assert first.code == 0 and "dev_ed25519.pem" in first.stderr
    noop = cb.build(f"FLIGHT={f}", *SMALL)
    assert noop.report["outcome"] == "up_to_date"
    assert "dev_ed25519.pem" not in noop.stderr and noop.report["warnings"] == []
    with CacheLock(cb.cache_dir / "build.lock"):
        held = cb.build(f"FLIGHT={f}", "BUFFER_M=300", "ZOOM=17")
    assert held.code == 50 and "dev_ed25519.pem" not in held.stderr


def test_sizes_typos_and_preview_size(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    typo = cb.build(f"FLIGHT={f}", "ZOM=16")
    assert typo.code == 2 and "ZOM (did you mean ZOOM?)" in typo.report["error"]
    assert cb.build(f"FLIGHT={f}", *SMALL).code == 0
    gc = cb.run("gc-store", "MAX_STORE_BYTES=20G", "REPORT=text")
    assert gc.code == 0, gc.stderr
    assert "bound 20.0 GiB" in gc.stderr and "21474836480" not in gc.stderr
    out = tmp_path / "p.png"
    pv = cb.run("preview-cache", f"OUT={out}", "REPORT=text")
    assert pv.code == 0, pv.stderr
    from PIL import Image

    with Image.open(out) as im:
        w, h = im.size
    assert f"({w}x{h} px, " in pv.stdout, pv.stdout


def test_console_script_help_and_version(cb: Cb) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cachebuild.cli.console", *args],
            env=cb.env(),
            capture_output=True,
            text=True,
            cwd=REPO,
        )

    h = run("build-cache", "--help")
    assert h.returncode == 0 and "usage: cachebuild build-cache" in h.stdout and "ZOOM" in h.stdout
    assert run("--help").returncode == 0
    v = run("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"cachebuild {__version__}"


def test_log_level_shows_records_with_secrets_redacted(cb: Cb, tmp_path: Path, tile_server) -> None:
    api_key = "sk-Log-Secret-77a1"
    tile_server.key = api_key
    f = write_flight(tmp_path / "f.json")
    env = cb.env(CACHEBUILD_API_KEY=api_key)
    r = cb.build(
        f"FLIGHT={f}",
        *SMALL,
        f"PROVIDER={tile_server.template('?key={key}')}",
        "LOG_LEVEL=debug",
        env=env,
    )
    assert r.code == 0, r.stderr
    assert " INFO cachebuild.release.manifest: " in r.stderr  # the project's own records
    assert " INFO httpx: HTTP Request: GET " in r.stderr  # and the libraries'
    assert "key=***" in r.stderr and api_key not in r.stderr + r.stdout
    quiet = cb.build(
        f"FLIGHT={f}", *SMALL, f"PROVIDER={tile_server.template('?key={key}')}", env=env
    )
    assert "INFO" not in quiet.stderr
    env_level = cb.env(CACHEBUILD_API_KEY=api_key, CACHEBUILD_LOG_LEVEL="info")
    again = cb.build(
        f"FLIGHT={f}",
        "BUFFER_M=600",
        "ZOOM=17",
        f"PROVIDER={tile_server.template('?key={key}')}",
        env=env_level,
    )
    assert again.code == 0 and " INFO httpx: " in again.stderr and api_key not in again.stderr
    bad = cb.build(f"FLIGHT={f}", "LOG_LEVEL=verbose")
    assert bad.code == 2 and "LOG_LEVEL" in bad.report["error"]


def test_ci_log_closes_each_phase_and_the_summary_gives_times_and_recall(
    cb: Cb, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={f}", *SMALL, "REPORT=text")
    assert r.code == 0, r.stderr
    err = r.stderr.splitlines()
    for phase, unit in (
        ("describe", "tiles described"),
        ("index", "vectors"),
        ("selftest", "frames"),
        ("mbtiles", "tiles"),
        ("preview", "tiles"),
    ):
        assert any(
            ln.startswith(f"{phase}: ") and f" {unit} in " in ln and ln.endswith("/s") for ln in err
        ), phase
    for phase in ("engine", "manifest", "flight", "model"):
        assert any(ln.startswith(f"{phase}: done in ") for ln in err), phase
    assert sum(ln.startswith("tiles: ") for ln in err) == 1
    out = r.stdout
    assert "  phases   flight " in out and "describe " in out and "publish " in out
    # SMALL has fewer frames than a figure needs: the line says so (issue 21)
    assert "  self-test too few frames for a figure (" in out and "frames)" in out
