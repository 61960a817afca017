"""Tampering and replay: every way of changing a published cache is refused by
``doit verify-cache`` (exit 23) with the reason, and a cache older than one
already accepted is refused as a rollback (docs/reliability.md, section 3).

Two real builds (flight A: version 1, flight B: version 2) are made once for
the module; each test tampers with a copy of that home and runs real
``doit verify-cache`` processes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cachebuild.errors import EXIT_VERIFY, VerifyError
from cachebuild.inputs.config import load_settings
from cachebuild.release.rollback import (
    accepted_path,
    check_not_rolled_back,
    highest_accepted,
    read_record,
    record_accepted,
    signed_digest,
)
from cachebuild.release.signing import keyid, load_private_key, sign_envelope
from tests.conftest import Cb, CbResult, write_flight

SMALL = ("BUFFER_M=150", "ZOOM=17", "SELFTEST_QUERIES=0")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with two published builds: flight A (version 1), then flight B (version 2)."""
    root = tmp_path_factory.mktemp("tamper")
    cb = Cb(home=root / "home")
    cb.home.mkdir()
    a = write_flight(root / "a.json", lat=47.37, lon=8.54)
    b = write_flight(root / "b.json", lat=47.40, lon=8.50)
    for flight, version in ((a, 1), (b, 2)):
        r = cb.build(f"FLIGHT={flight}", *SMALL)
        assert r.code == 0, r.stderr
        assert r.report["manifest_version"] == version
    return cb.home


@pytest.fixture
def cb(built: Path, tmp_path: Path) -> Cb:
    home = tmp_path / "home"
    shutil.copytree(built, home, symlinks=True)
    return Cb(home=home)


def releases(cb: Cb) -> dict[int, Path]:
    """Version -> release directory."""
    out = {}
    for d in (cb.cache_dir / "releases").iterdir():
        if d.is_dir() and not d.name.startswith("."):
            out[json.loads((d / "manifest.json").read_text())["signed"]["version"]] = d
    return out


def point_current_at(cb: Cb, release: Path) -> None:
    tmp = cb.cache_dir / "current.tmp"
    os.symlink(os.path.relpath(release, cb.cache_dir), tmp)
    os.replace(tmp, cb.current)


def dev_key(cb: Cb) -> ed25519.Ed25519PrivateKey:
    key = load_private_key(
        load_settings({}, cb.env()).dev_key
    )  # in the data dir (cachebuild.release.devkey)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key


def resign(
    manifest: Path, key: ed25519.Ed25519PrivateKey, change: Callable[[dict[str, Any]], None]
) -> None:
    """Rewrite ``manifest`` with ``change`` applied to its signed part, validly signed by ``key``."""
    signed = json.loads(manifest.read_text())["signed"]
    change(signed)
    replace_file(
        manifest, json.dumps(sign_envelope(signed, key), indent=1, sort_keys=True).encode()
    )


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` by a new file (never in place: releases share inodes with the staged build)."""
    path.unlink()
    path.write_bytes(data)


def verify(cb: Cb, *args: str) -> CbResult:
    return cb.run("verify-cache", *args)


def assert_refused(r: CbResult, reason: str, words: str) -> None:
    assert r.code == EXIT_VERIFY, (r.code, r.stdout, r.stderr)
    rep = r.report
    assert rep["outcome"] == "failure" and rep["failure_phase"] == "verify"
    assert rep["reason"] == reason, rep
    assert words in rep["error"], rep["error"]
    assert f"ERROR [verify, exit {EXIT_VERIFY}]" in r.stderr
    assert "Traceback" not in r.stderr


# -- the published cache as built ---------------------------------------------------------------


def test_untouched_cache_verifies_and_is_recorded(cb: Cb) -> None:
    r = verify(cb)
    assert r.code == 0, r.stderr
    assert r.report["manifest_version"] == 2 and r.report.get("reason") is None
    kid = keyid(dev_key(cb).public_key())
    entry = read_record(cb.cache_dir)[kid]
    assert entry["version"] == 2
    current = json.loads((cb.current / "manifest.json").read_text())["signed"]
    assert entry["signed_sha256"] == signed_digest(current)


# -- a changed artifact, a changed manifest, another key -----------------------------------------


@pytest.mark.parametrize(
    "artifact", ["tiles.mbtiles", "index.faiss", "engine/engine.onnx", "flight.json"]
)
def test_changed_artifact(cb: Cb, artifact: str) -> None:
    path = cb.current / artifact
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    replace_file(path, bytes(data))
    assert_refused(verify(cb), "artifact", f"{artifact}: sha256 mismatch")


def test_removed_artifact(cb: Cb) -> None:
    (cb.current / "descriptors.npy").unlink()
    assert_refused(verify(cb), "artifact", "descriptors.npy: missing")


@pytest.mark.parametrize(
    "field, value",
    [
        ("flight_id", "00000000-0000-0000-0000-000000000000"),
        ("version", 99),
        ("expires", "2099-01-01T00:00:00Z"),
        ("targets", {}),
    ],
)
def test_changed_manifest(cb: Cb, field: str, value: Any) -> None:
    manifest = cb.current / "manifest.json"
    env = json.loads(manifest.read_text())
    if field == "flight_id":
        env["signed"]["identity"]["flight_id"] = value
    else:
        env["signed"][field] = value
    replace_file(manifest, json.dumps(env).encode())
    assert_refused(verify(cb), "signature", "modified after signing")


def test_manifest_signed_by_another_key(cb: Cb) -> None:
    manifest = cb.current / "manifest.json"
    resign(manifest, ed25519.Ed25519PrivateKey.generate(), lambda s: None)
    assert_refused(verify(cb), "untrusted-key", "no signature by a trusted key")


def test_cache_built_with_another_key_is_refused_with_the_operators_pubkey(
    cb: Cb, tmp_path: Path
) -> None:
    from cachebuild.release.signing import write_public_key

    operator = tmp_path / "operator.pub"
    write_public_key(operator, ed25519.Ed25519PrivateKey.generate().public_key())
    assert_refused(
        verify(cb, f"PUBKEY={operator}"), "untrusted-key", "no signature by a trusted key"
    )


def test_malformed_manifest(cb: Cb) -> None:
    replace_file(cb.current / "manifest.json", b'{"signed": {}, "signed": {}}')
    assert_refused(verify(cb), "malformed", "not valid JSON")


def test_no_manifest(cb: Cb) -> None:
    (cb.current / "manifest.json").unlink()
    assert_refused(verify(cb), "no-manifest", "no published cache")


# -- expiry ---------------------------------------------------------------------------------------


def test_expired_manifest_validly_signed(cb: Cb) -> None:
    manifest = cb.current / "manifest.json"
    past = (datetime.now(timezone.utc) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    # a higher version, so that only the expiry is wrong
    resign(manifest, dev_key(cb), lambda s: s.update(expires=past, version=3))
    assert_refused(verify(cb), "expired", f"manifest expired at {past}")


# -- replay and rollback ----------------------------------------------------------------------------


def test_older_validly_signed_release_put_back_is_a_rollback(cb: Cb) -> None:
    rel = releases(cb)
    assert set(rel) == {1, 2}
    point_current_at(cb, rel[1])  # the older cache, untouched, validly signed
    r = verify(cb)
    assert_refused(r, "rollback", "manifest version 1 is older than version 2 already accepted")
    assert "accepted.json" in r.report["error"]
    assert "build-cache" in r.report["remedy"]


def test_rollback_after_verify_accepted_the_newer(cb: Cb) -> None:
    accepted_path(cb.cache_dir).unlink()  # only verify-cache's own acceptance counts here
    rel = releases(cb)
    point_current_at(cb, rel[1])
    assert verify(cb).code == 0  # nothing newer accepted yet: version 1 is fine
    point_current_at(cb, rel[2])
    assert verify(cb).code == 0
    point_current_at(cb, rel[1])
    assert_refused(verify(cb), "rollback", "version 1 is older than version 2")


def test_older_manifest_copied_over_the_current_release(cb: Cb) -> None:
    rel = releases(cb)
    for f in rel[1].rglob(
        "*"
    ):  # the whole old cache, files and all, copied into the current release
        if f.is_file():
            dst = rel[2] / f.relative_to(rel[1])
            dst.unlink(missing_ok=True)
            shutil.copyfile(f, dst)
    assert_refused(verify(cb), "rollback", "version 1 is older than version 2")


def test_same_version_resigned_is_refused(cb: Cb) -> None:
    manifest = cb.current / "manifest.json"
    resign(manifest, dev_key(cb), lambda s: s["info"].update(note="re-signed"))
    assert_refused(verify(cb), "rollback", "differs from the version 2 manifest already accepted")


def test_damaged_record_is_refused_until_removed(cb: Cb) -> None:
    record = accepted_path(cb.cache_dir)
    record.write_text("{not json")
    r = verify(cb)
    assert_refused(r, "rollback", "is damaged")
    assert str(record) in r.report["remedy"]
    record.unlink()
    assert verify(cb).code == 0
    assert highest_accepted(cb.cache_dir) == 2


def test_a_record_that_cannot_be_written_is_a_warning(cb: Cb) -> None:
    """A read-only state (here: the record's lock cannot be opened) verifies, and says what it cannot do."""
    accepted_path(cb.cache_dir).unlink()
    lock = cb.cache_dir / "state" / "accepted.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    r = verify(cb)
    assert r.code == 0, r.stderr
    assert any("could not be recorded" in w for w in r.report["warnings"]), r.report
    assert "WARNING: verified, but" in r.stderr and "Traceback" not in r.stderr


def test_build_after_a_rollback_publishes_the_newest_again(cb: Cb, tmp_path: Path) -> None:
    point_current_at(cb, releases(cb)[1])
    assert verify(cb).code == EXIT_VERIFY
    b = write_flight(tmp_path / "b.json", lat=47.40, lon=8.50)
    r = cb.build(f"FLIGHT={b}", *SMALL)
    assert r.code == 0, r.stderr
    # the newest again (re-signed as version 3 here: the copied home's paths differ)
    assert r.report["manifest_version"] >= 2
    assert verify(cb).code == 0


def test_lost_current_never_makes_the_next_build_a_rollback(cb: Cb, tmp_path: Path) -> None:
    cb.current.unlink()
    shutil.rmtree(cb.cache_dir / "releases")
    shutil.rmtree(cb.cache_dir / "state" / "build")
    (cb.cache_dir / "state" / "doit.sqlite3").unlink()
    a = write_flight(tmp_path / "a.json", lat=47.37, lon=8.54)
    r = cb.build(f"FLIGHT={a}", *SMALL)
    assert r.code == 0, r.stderr
    assert r.report["manifest_version"] == 3  # above the recorded 2, though no release is left
    assert verify(cb).code == 0
    assert highest_accepted(cb.cache_dir) == 3


def test_doit_clean_keeps_the_record(cb: Cb) -> None:
    assert cb.run("clean").code == 0
    assert highest_accepted(cb.cache_dir) == 2
    point_current_at(cb, releases(cb)[1])
    assert_refused(verify(cb), "rollback", "older than version 2")


def test_cache_info_reports_the_rollback(cb: Cb) -> None:
    point_current_at(cb, releases(cb)[1])
    r = cb.run("cache-info")
    assert r.code == 0, r.stderr
    v = r.report["cache"]["verify"]
    assert v["ok"] is False and "rollback refused" in v["reason"]
    assert highest_accepted(cb.cache_dir) == 2  # cache-info records nothing


# -- the record itself, in-process --------------------------------------------------------------


def _signed(version: int, note: str = "") -> dict[str, Any]:
    return {"version": version, "build_id": "b" * 64, "info": {"note": note}}


def test_record_never_goes_down_and_keeps_the_first_of_a_version(tmp_path: Path) -> None:
    kid = "k" * 64
    assert record_accepted(tmp_path, kid, _signed(3))
    assert not record_accepted(tmp_path, kid, _signed(2))
    assert not record_accepted(tmp_path, kid, _signed(3, "other"))
    assert read_record(tmp_path)[kid]["signed_sha256"] == signed_digest(_signed(3))
    assert record_accepted(tmp_path, kid, _signed(4))
    assert highest_accepted(tmp_path) == 4
    assert check_not_rolled_back(tmp_path, kid, _signed(4)) == 4
    assert check_not_rolled_back(tmp_path, kid, _signed(5)) == 4
    assert check_not_rolled_back(tmp_path, "x" * 64, _signed(1)) is None  # per signer key
    with pytest.raises(VerifyError, match="version 3 is older than version 4") as info:
        check_not_rolled_back(tmp_path, kid, _signed(3))
    assert info.value.reason == "rollback" and info.value.exit_code == EXIT_VERIFY
    with pytest.raises(VerifyError, match="differs"):
        check_not_rolled_back(tmp_path, kid, _signed(4, "forged"))
    assert not list((tmp_path / "state").glob(".*.tmp"))  # no temp file left


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"[]",
        b'{"format": 2, "keys": {}}',
        b'{"format": 1, "keys": {"k": {"version": 0}}}',
        b"\xff",
    ],
)
def test_damaged_record(tmp_path: Path, content: bytes) -> None:
    accepted_path(tmp_path).parent.mkdir(parents=True)
    accepted_path(tmp_path).write_bytes(content)
    with pytest.raises(VerifyError, match="damaged") as info:
        read_record(tmp_path)
    assert info.value.reason == "rollback"
    assert highest_accepted(tmp_path, tolerant=True) == 0
    assert check_not_rolled_back(tmp_path, "k" * 64, _signed(1), tolerant=True) is None
    assert record_accepted(tmp_path, "k" * 64, _signed(1))  # the builder replaces it
    assert highest_accepted(tmp_path) == 1


def test_concurrent_recorders_keep_the_highest(tmp_path: Path) -> None:
    import threading

    kid = "k" * 64
    threads = [
        threading.Thread(target=record_accepted, args=(tmp_path, kid, _signed(v)))
        for v in range(1, 21)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert highest_accepted(tmp_path) == 20


# -- on the companion: its builds record what they publish, its verify-cache refuses a rollback -----

from tests._harness.sshd import Sshd  # noqa: E402


def test_rollback_on_the_companion_is_refused_there(sshd: Sshd, tmp_path: Path) -> None:
    from tests.scenarios.test_companion import Companion

    local = Cb(home=tmp_path / "ws")
    local.home.mkdir()
    c = Companion.under(tmp_path, local, sshd)
    for flight, version in (("a", 1), ("b", 2)):
        f = write_flight(tmp_path / f"{flight}.json", lat=47.37 if flight == "a" else 47.40)
        r = c.build(f, "SELFTEST_QUERIES=0")
        assert r.code == 0, r.stderr
        assert r.report["manifest_version"] == version
    cache = c.dir / "cache"
    assert highest_accepted(cache) == 2  # recorded on the companion by its own build
    assert c.verify().code == 0
    old = next(
        d
        for d in (cache / "releases").iterdir()
        if json.loads((d / "manifest.json").read_text())["signed"]["version"] == 1
    )
    tmp = cache / "current.tmp"
    os.symlink(os.path.relpath(old, cache), tmp)
    os.replace(tmp, cache / "current")
    assert_refused(
        c.verify(), "rollback", "manifest version 1 is older than version 2 already accepted"
    )
