"""End to end: real `doit build-cache` processes on small flights."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from cachebuild.release.lock import CacheLock
from tests.conftest import Cb, write_flight

SMALL = ("BUFFER_M=200", "ZOOM=17")
ALL_TASKS = {
    "flight",
    "tiles",
    "mbtiles",
    "preview",
    "model",
    "engine",
    "describe",
    "index",
    "selftest",
    "manifest",
}


def manifest_bytes(cb: Cb) -> bytes:
    return (cb.current / "manifest.json").read_bytes()


def test_cold_build_then_noop_then_verify(cb: Cb, tmp_path: Path) -> None:
    flight = write_flight(tmp_path / "f.json", flight_id="3F2B8C1E-5A7D-4E6F-9B0A-1C2D3E4F5A6B")
    r = cb.build(f"FLIGHT={flight}", *SMALL)
    assert r.code == 0, r.stderr
    rep = r.report
    assert rep["outcome"] == "success"
    assert rep["exit_code"] == 0 and rep["failure_phase"] is None
    assert set(rep["tasks"]["run"]) == ALL_TASKS
    assert rep["tiles"]["planned"] > 4 and rep["tiles"]["fetched"] == rep["tiles"]["planned"]
    assert rep["tiles"]["missing"] == 0 and rep["tiles"]["reused"] == 0
    assert rep["flight_id"] == "3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b"
    for phase in ("flight", "tiles", "engine", "describe", "index", "manifest", "publish", "total"):
        assert phase in rep["phases"]
    assert Path(rep["manifest_path"]).is_file()
    assert "development signing key" in r.stderr

    # the cache holds the flight's tiles as MBTiles and a signed manifest
    signed = json.loads(manifest_bytes(cb))["signed"]
    assert signed["build_id"] == rep["build_id"]
    assert "tiles.mbtiles" in signed["targets"] and "index.faiss" in signed["targets"]
    # the coverage map is built, signed and published with the cache
    assert "preview.png" in signed["targets"]
    assert (cb.current / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = cb.build(f"FLIGHT={flight}", *SMALL)
    assert again.code == 0, again.stderr
    assert again.report["outcome"] == "up_to_date"
    assert again.report["tasks"]["run"] == []
    assert set(again.report["tasks"]["up_to_date"]) == ALL_TASKS
    assert again.report["build_id"] == rep["build_id"]
    assert again.report["tiles"]["fetched"] == 0

    v = cb.run("verify-cache")
    assert v.code == 0, v.stderr
    assert v.report["build_id"] == rep["build_id"]


@pytest.mark.parametrize(
    "change, expected",
    [
        # the coverage map draws the tiles, the route, the origin and the flight id:
        # each change redraws it; nothing else (engine, descriptors) reruns for them
        ("bbox", {"tiles", "mbtiles", "preview", "describe", "index", "selftest", "manifest"}),
        ("origin", {"flight", "preview", "manifest"}),
        ("flight_id", {"flight", "preview", "manifest"}),
        ("waypoint_inside", {"flight", "preview", "manifest"}),
    ],
)
def test_rebuild_exactly_what_depends_on_the_change(
    cb: Cb, tmp_path: Path, change: str, expected: set[str]
) -> None:
    wps = [(47.3700, 8.5400), (47.3720, 8.5430)]
    base = dict(
        waypoints=wps, origin=(47.3705, 8.5405), flight_id="11111111-1111-4111-8111-111111111111"
    )
    f = write_flight(tmp_path / "f.json", **base)
    first = cb.build(f"FLIGHT={f}", *SMALL)
    assert first.code == 0, first.stderr
    args = list(SMALL)
    if change == "bbox":
        args = ["BUFFER_M=400", "ZOOM=17"]
    elif change == "origin":
        write_flight(f, **{**base, "origin": (47.3710, 8.5410)})
    elif change == "flight_id":
        write_flight(f, **{**base, "flight_id": "22222222-2222-4222-8222-222222222222"})
    elif change == "waypoint_inside":
        write_flight(f, **{**base, "waypoints": [wps[0], (47.3710, 8.5415), wps[1]]})
    second = cb.build(f"FLIGHT={f}", *args)
    assert second.code == 0, second.stderr
    assert second.report["outcome"] == "success"
    assert set(second.report["tasks"]["run"]) == expected
    assert second.report["build_id"] != first.report["build_id"] or change == "waypoint_inside"
    assert cb.run("verify-cache").code == 0
    if change == "bbox":
        # tiles already in the store are reused, only the new ones fetched
        t = second.report["tiles"]
        assert t["reused"] == first.report["tiles"]["planned"]
        assert t["fetched"] == t["planned"] - t["reused"] > 0


def test_clean_makes_the_next_build_do_the_work_again(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    assert cb.build(f"FLIGHT={f}", *SMALL).code == 0
    c = cb.run("clean")
    assert c.code == 0, c.stderr
    assert (cb.current / "manifest.json").is_file(), "clean keeps the published cache"
    r = cb.build(f"FLIGHT={f}", *SMALL)
    assert r.code == 0, r.stderr
    assert set(r.report["tasks"]["run"]) == ALL_TASKS
    # the store is shared: no tile is fetched twice
    assert r.report["tiles"]["fetched"] == 0
    assert r.report["tiles"]["reused"] == r.report["tiles"]["planned"]


def test_clean_from_project_root_uses_our_command(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    assert cb.build(f"FLIGHT={f}", *SMALL).code == 0
    with CacheLock(cb.cache_dir / "build.lock"):
        c = cb.run("clean")
    assert c.code == 50, "clean takes the lock too"


def test_works_from_any_directory(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    cb.cwd = tmp_path
    r = cb.build(f"FLIGHT={f}", *SMALL)
    assert r.code == 0, r.stderr
    assert cb.run("verify-cache").code == 0


def test_concurrent_build_exits_50_naming_lock_and_pid(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    with CacheLock(cb.cache_dir / "build.lock"):
        t0 = time.monotonic()
        r = cb.build(f"FLIGHT={f}", *SMALL)
        elapsed = time.monotonic() - t0
    assert r.code == 50
    assert r.report["failure_phase"] == "lock"
    assert str(cb.cache_dir / "build.lock") in r.report["error"]
    assert f"pid {os.getpid()}" in r.report["error"]
    assert elapsed < 5  # process start included; the lock itself does not wait


def test_two_real_builds_race_one_waits_out_with_50(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    a = cb.popen("build-cache", f"FLIGHT={f}", *SMALL)
    # wait until a holds the lock
    pid_file = cb.cache_dir / "build.lock.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() and a.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    b = cb.build(f"FLIGHT={f}", *SMALL)
    a.communicate(timeout=300)
    assert a.returncode == 0
    if b.code != 0:  # b may have started after a finished on a fast machine
        assert b.code == 50
        assert f"pid {a.pid}" in b.report["error"]


def test_flight_errors_resolve_before_the_lock(cb: Cb, tmp_path: Path) -> None:
    missing = cb.build(f"FLIGHT={tmp_path / 'nope.json'}")
    assert missing.code == 94
    assert "nope.json" in missing.report["error"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"waypoints": [{"lat": 95, "lon": 8, "alt_m": 1}]}')
    invalid = cb.build(f"FLIGHT={bad}")
    assert invalid.code == 95
    assert "bad.json" in invalid.report["error"] and "waypoints[0].lat" in invalid.report["error"]
    assert not (cb.cache_dir / "build.lock").exists(), "no lock taken for a bad flight"
    # and even while someone holds the lock, a bad flight says so (not 50)
    with CacheLock(cb.cache_dir / "build.lock"):
        assert cb.build(f"FLIGHT={bad}").code == 95


def test_usage_errors_exit_2(cb: Cb, tmp_path: Path) -> None:
    assert cb.build().code == 2
    f = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={f}", "ZOOM=99")
    assert r.code == 2 and "ZOOM" in r.report["error"]
    r = cb.build(f"FLIGHT={f}", "BOGUS=1")
    assert r.code == 2 and "BOGUS" in r.report["error"]


def test_strict_coverage_failure_keeps_previous_cache(cb: Cb, tmp_path: Path, tile_server) -> None:
    f = write_flight(tmp_path / "f.json")
    good = cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={tile_server.template()}")
    assert good.code == 0, good.stderr
    before = manifest_bytes(cb)

    # a second provider with holes: 404 = no tile here, a gap, not a failure
    from cachebuild.tilemath import tiles

    planned = sorted(tiles(_area(f, 200), [17]))
    tile_server.missing = {(t.z, t.x, t.y) for t in planned[:3]}
    holes = tile_server.template("?v=2")
    r = cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={holes}")
    assert r.code == 22, r.stderr
    assert r.report["failure_phase"] == "coverage"
    assert r.report["tiles"]["missing"] == 3
    assert manifest_bytes(cb) == before
    assert cb.run("verify-cache").code == 0

    # non-strict: a warning, the partial cache published, the report counts the gap
    r2 = cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={holes}", "STRICT=0")
    assert r2.code == 0, r2.stderr
    assert r2.report["tiles"]["missing"] == 3
    assert any("coverage" in w for w in r2.report["warnings"])
    assert "WARNING" in r2.stderr
    assert manifest_bytes(cb) != before
    assert cb.run("verify-cache").code == 0


def _area(flight: Path, buffer_m: float):
    from cachebuild.inputs.flight import flight_area, load_flight_file

    return flight_area(load_flight_file(flight), buffer_m)


def test_xyz_provider_is_fetched_once(cb: Cb, tmp_path: Path, tile_server) -> None:
    f = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={tile_server.template()}")
    assert r.code == 0, r.stderr
    n = len(tile_server.requests)
    assert n == r.report["tiles"]["planned"]
    # another cache, same store: nothing fetched again
    r2 = cb.build(
        f"FLIGHT={f}",
        *SMALL,
        f"PROVIDER={tile_server.template()}",
        f"CACHE_DIR={tmp_path / 'other'}",
    )
    assert r2.code == 0, r2.stderr
    assert len(tile_server.requests) == n
    assert r2.report["tiles"]["reused"] == r2.report["tiles"]["planned"]


def test_sigkill_mid_build_leaves_a_cache_that_verifies(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    assert cb.build(f"FLIGHT={f}", *SMALL).code == 0
    before = manifest_bytes(cb)
    f2 = write_flight(tmp_path / "f2.json", lat=47.38, lon=8.55)
    for delay in (0.3, 0.8, 1.5, 2.5):
        p = cb.popen("build-cache", f"FLIGHT={f2}", *SMALL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        v = cb.run("verify-cache")
        assert v.code == 0, v.stderr
        assert CacheLock(cb.cache_dir / "build.lock").acquire().release() is None
    r = cb.build(f"FLIGHT={f2}", *SMALL)
    assert r.code == 0, r.stderr
    assert manifest_bytes(cb) != before
    assert cb.run("verify-cache").code == 0
    leftovers = [p for p in (cb.home / "store" / "tmp").iterdir()]
    assert leftovers == []


def test_sigterm_records_completed_tasks(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    p = cb.popen("build-cache", f"FLIGHT={f}", *SMALL)
    # wait until the describe phase starts, then stop the build
    deadline = time.monotonic() + 60
    err = ""
    while time.monotonic() < deadline:
        build = cb.cache_dir / "state" / "build"
        # the engine is compiled before the tiles (PIPELINE); mbtiles follows the tiles task
        if (build / "engine" / "engine.json").exists() and (build / "tiles.mbtiles").exists():
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("the build finished before SIGTERM arrived")
    report = json.loads(out.strip().splitlines()[-1])
    assert report["outcome"] == "failure" and report["exit_code"] == 130
    r = cb.build(f"FLIGHT={f}", *SMALL)
    assert r.code == 0
    assert "tiles" not in r.report["tasks"]["run"], "completed tasks were recorded"


def test_secrets_never_reach_anything_written(cb: Cb, tmp_path: Path, tile_server) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    key_path = tmp_path / "op.pem"
    key_path.write_bytes(pem)
    key_path.chmod(0o600)
    api_key = "sk-Very-Secret-4f9a2c"
    tile_server.key = api_key
    f = write_flight(tmp_path / "f.json")
    env = cb.env(CACHEBUILD_API_KEY=api_key)
    r = cb.build(
        f"FLIGHT={f}",
        *SMALL,
        f"PROVIDER={tile_server.template('?key={key}')}",
        f"KEY={key_path}",
        env=env,
    )
    assert r.code == 0, r.stderr
    # a refused key: the error names the template, never the key
    tile_server.key = "something-else"
    r2 = cb.build(
        f"FLIGHT={f}",
        *SMALL,
        f"PROVIDER={tile_server.template('?key={key}&v=2')}",
        f"KEY={key_path}",
        env=env,
    )
    assert r2.code == 20, r2.stderr
    pem_body = b"".join(pem.splitlines()[1:-1])
    needles = [api_key.encode(), raw, raw.hex().encode(), pem_body]
    for text in (r.stdout, r.stderr, r2.stdout, r2.stderr):
        for needle in needles:
            assert needle.decode("latin-1") not in text
    for path in cb.home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"secret found in {path}"


def test_verify_cache_names_the_first_tampered_artifact(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    assert cb.build(f"FLIGHT={f}", *SMALL).code == 0
    target = cb.current / "index.faiss"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.unlink()  # a hard link to the staged file: replace, don't write through
    target.write_bytes(bytes(data))
    v = cb.run("verify-cache")
    assert v.code == 23
    assert v.report["failure_phase"] == "verify"
    assert "index.faiss" in v.report["error"] and "sha256" in v.report["error"]
    # a damaged release (here: a truncated artifact) is noticed by the next
    # build, by stat alone, and published afresh from the staged artifacts
    target.unlink()
    target.write_bytes(bytes(data[:100]))
    r = cb.build(f"FLIGHT={f}", *SMALL)
    assert r.code == 0 and r.report["outcome"] == "success"
    assert r.report["tasks"]["run"] == []
    assert any("damaged" in w for w in r.report["warnings"])
    assert cb.run("verify-cache").code == 0


def test_verify_cache_refuses_another_signer(cb: Cb, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    f = write_flight(tmp_path / "f.json")
    assert cb.build(f"FLIGHT={f}", *SMALL).code == 0
    other = Ed25519PrivateKey.generate().public_key()
    pub = tmp_path / "other.pub"
    pub.write_bytes(
        other.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    v = cb.run("verify-cache", f"PUBKEY={pub}")
    assert v.code == 23
    assert "trusted" in v.report["error"]


def test_verify_cache_without_a_cache(cb: Cb) -> None:
    v = cb.run("verify-cache")
    assert v.code == 23
    assert "no published cache" in v.report["error"]


def test_running_a_task_directly_is_refused(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    r = cb.run("tiles", f"FLIGHT={f}", "REPORT=text")
    assert r.code != 0
    assert "doit build-cache" in r.stderr


def test_text_report_and_console_script(cb: Cb, tmp_path: Path) -> None:
    import subprocess
    import sys

    f = write_flight(tmp_path / "f.json")
    p = subprocess.run(
        [sys.executable, "-m", "cachebuild.cli.console", "build-cache", f"FLIGHT={f}", *SMALL],
        env=cb.env(),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert "build-cache: success" in p.stdout
    assert ".. tiles" in p.stderr
    p2 = subprocess.run(
        [sys.executable, "-m", "cachebuild.cli.console", "build-cache", f"FLIGHT={f}", *SMALL],
        env=cb.env(),
        capture_output=True,
        text=True,
    )
    assert "up to date" in p2.stdout and "-- tiles" in p2.stderr
