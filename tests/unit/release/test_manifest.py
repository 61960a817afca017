"""Tests for cachebuild.release.manifest: build identity, signed manifest, cache verification."""

from __future__ import annotations

import base64
import doctest
import hashlib
import json
import logging
import os
import random
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

import cachebuild.release.manifest as manifest
from cachebuild._util.hashing import canonical_json
from cachebuild.errors import EXIT_VERIFY, BuildError, UsageError, VerifyError
from cachebuild.release.manifest import build_identity, write_manifest
from cachebuild.release.signing import keyid, load_public_key, public_key_raw, sign_envelope
from cachebuild.release.verify import read_manifest, verify_cache

ARTIFACTS = ["tiles.mbtiles", "engine/engine.onnx", "index/descriptors.faiss"]
TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def _identity() -> tuple[str, dict[str, Any]]:
    return build_identity(
        bbox=[8.5, 47.3, 8.6, 47.4],
        zooms=[17, 18],
        takeoff_origin={"lat": 47.35, "lon": 8.55, "alt_m": 410.0},
        flight_id="FL-0042",
        calibration_sha256="c" * 64,
        tiles_sha256="a" * 64,
        engine_key="onnxruntime-cpu-fp32-" + "e" * 16,
    )


@pytest.fixture
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    d = tmp_path / "cache"
    rng = random.Random(42)
    for rel, size in zip(ARTIFACTS, [200_000, 5_000, 1]):
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
    return d


def _publish(cache: Path, key: ed25519.Ed25519PrivateKey, **kw: Any) -> dict[str, Any]:
    build_id, identity = _identity()
    args: dict[str, Any] = {
        "cache_dir": cache,
        "artifacts": ARTIFACTS,
        "identity": identity,
        "build_id": build_id,
        "info": {"tiles": 1234, "backend": "cpu", "note": "Zürich ✈"},
        "key": key,
        "version": 3,
        "expires_at": datetime.now(timezone.utc) + timedelta(days=30),
    }
    args.update(kw)
    return write_manifest(**args)


def _edit_manifest(cache: Path, change: Any) -> None:
    path = cache / "manifest.json"
    env = json.loads(path.read_text())
    change(env)
    path.write_text(json.dumps(env, indent=1))


def _resign(cache: Path, key: ed25519.Ed25519PrivateKey, change: Any) -> None:
    """Change the signed part and sign it again with ``key`` (a trusted signer)."""
    path = cache / "manifest.json"
    env = json.loads(path.read_text())
    change(env["signed"])
    path.write_text(json.dumps(sign_envelope(env["signed"], key)))


def test_docstring_examples() -> None:
    result = doctest.testmod(manifest, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


def test_all_is_complete() -> None:
    defined = {
        n
        for n, v in vars(manifest).items()
        if not n.startswith("_")
        and callable(v)
        and getattr(v, "__module__", None) == manifest.__name__
    }
    assert defined <= set(manifest.__all__)
    assert all(hasattr(manifest, n) for n in manifest.__all__)


# -- build identity --------------------------------------------------------------


def test_build_id_is_sha256_of_canonical_identity() -> None:
    build_id, identity = _identity()
    assert build_id == hashlib.sha256(canonical_json(identity)).hexdigest()
    assert identity["zooms"] == [17, 18]
    assert identity["bbox"] == [8.5, 47.3, 8.6, 47.4]
    assert _identity() == (build_id, identity)


def test_build_id_normalizes_equivalent_inputs() -> None:
    common = dict(
        takeoff_origin=None,
        flight_id=None,
        calibration_sha256=None,
        tiles_sha256="a" * 64,
        engine_key="k",
    )
    a, _ = build_identity(bbox=(8, 47, 9, 48), zooms=[18, 17, 17], **common)  # type: ignore[arg-type]
    b, _ = build_identity(bbox=[8.0, 47.0, 9.0, 48.0], zooms=(17, 18), **common)  # type: ignore[arg-type]
    assert a == b


@pytest.mark.parametrize(
    "change",
    [
        {"bbox": [8.5, 47.3, 8.6, 47.41]},
        {"zooms": [17, 18, 19]},
        {"takeoff_origin": {"lat": 47.35, "lon": 8.55, "alt_m": 411.0}},
        {"takeoff_origin": None},
        {"flight_id": "FL-0043"},
        {"flight_id": None},
        {"calibration_sha256": "d" * 64},
        {"calibration_sha256": None},
        {"tiles_sha256": "b" * 64},
        {"engine_key": "tensorrt-10-fp16"},
    ],
)
def test_every_identity_field_changes_the_build_id(change: dict[str, Any]) -> None:
    base_id, base = _identity()
    kwargs = {**base, **change}
    changed_id, _ = build_identity(**kwargs)
    assert changed_id != base_id


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bbox": [1, 2, 3]}, "bbox"),
        ({"bbox": [1, 2, 3, float("nan")]}, "bbox"),
        ({"bbox": "1,2,3,4"}, "bbox"),
        ({"bbox": [1, 2, 3, True]}, "bbox"),
        ({"zooms": []}, "zooms"),
        ({"zooms": [17, -1]}, "zooms"),
        ({"zooms": [17.0]}, "zooms"),
        ({"tiles_sha256": "A" * 64}, "tiles_sha256"),
        ({"tiles_sha256": "a" * 63}, "tiles_sha256"),
        ({"calibration_sha256": "xyz"}, "calibration_sha256"),
        ({"engine_key": ""}, "engine_key"),
        ({"flight_id": 42}, "flight_id"),
        ({"takeoff_origin": [47.0, 8.0]}, "takeoff_origin"),
        ({"takeoff_origin": {"lat": float("inf")}}, "takeoff_origin"),
    ],
)
def test_build_identity_rejects_bad_fields(change: dict[str, Any], field: str) -> None:
    _, base = _identity()
    with pytest.raises(UsageError, match=field):
        build_identity(**{**base, **change})


# -- write + verify ----------------------------------------------------------------


def test_write_then_verify(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    env = _publish(cache, key)
    signed = verify_cache(cache, [key.public_key()])
    assert signed == env["signed"]
    assert signed["_type"] == "cachebuild/manifest" and signed["spec_version"] == 1
    assert signed["version"] == 3
    assert TIME_RE.fullmatch(signed["expires"]) and TIME_RE.fullmatch(signed["built_at"])
    build_id, identity = _identity()
    assert signed["build_id"] == build_id and signed["identity"] == identity
    assert sorted(signed["targets"]) == sorted(ARTIFACTS)
    for rel in ARTIFACTS:
        data = (cache / rel).read_bytes()
        assert signed["targets"][rel] == {
            "length": len(data),
            "hashes": {"sha256": hashlib.sha256(data).hexdigest()},
        }
    assert env["signatures"][0]["keyid"] == keyid(key.public_key())


def test_manifest_file_layout(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    env = _publish(cache, key)
    text = (cache / "manifest.json").read_text(encoding="utf-8")
    assert text == json.dumps(env, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    assert "Zürich ✈" in text
    assert read_manifest(cache) == env
    # signer.pub is the signer's key in OpenSSH form
    assert (cache / "signer.pub").read_text().startswith("ssh-ed25519 ")
    assert public_key_raw(load_public_key(cache / "signer.pub")) == public_key_raw(key.public_key())
    # nothing but what was asked for and the two published files
    left = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert left == sorted(ARTIFACTS + ["manifest.json", "signer.pub"])


def test_independent_verification_of_written_manifest(
    cache: Path, key: ed25519.Ed25519PrivateKey
) -> None:
    """What the drone does, written out without verify_cache."""
    _publish(cache, key)
    env = json.loads((cache / "manifest.json").read_bytes())
    sig = env["signatures"][0]
    key.public_key().verify(bytes.fromhex(sig["sig"]), canonical_json(env["signed"]))
    for rel, meta in env["signed"]["targets"].items():
        data = (cache / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["hashes"]["sha256"]


def test_republish_replaces_manifest(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    _publish(cache, key)
    (cache / "tiles.mbtiles").write_bytes(b"new tiles")
    _publish(cache, key, version=4)
    signed = verify_cache(cache, [key.public_key()], min_version=4)
    assert signed["version"] == 4 and signed["targets"]["tiles.mbtiles"]["length"] == 9


def test_custom_manifest_name(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    _publish(cache, key, out_name="manifest-v2.json")
    assert not (cache / "manifest.json").exists()
    assert verify_cache(cache, [key.public_key()], name="manifest-v2.json")["version"] == 3
    with pytest.raises(VerifyError, match="no published cache"):
        verify_cache(cache, [key.public_key()])


def test_symlink_inside_cache_is_fine(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    (cache / "engine" / "current.onnx").symlink_to("engine.onnx")
    _publish(cache, key, artifacts=ARTIFACTS + ["engine/current.onnx"])
    verify_cache(cache, [key.public_key()])


# -- tampering -------------------------------------------------------------------------


def test_flipped_byte_names_the_file(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    env = _publish(cache, key)
    p = cache / "tiles.mbtiles"
    data = bytearray(p.read_bytes())
    data[123_456] ^= 0x01
    p.write_bytes(bytes(data))
    want = env["signed"]["targets"]["tiles.mbtiles"]["hashes"]["sha256"]
    got = hashlib.sha256(data).hexdigest()
    with pytest.raises(VerifyError) as info:
        verify_cache(cache, [key.public_key()])
    assert (
        info.value.message
        == f"tiles.mbtiles: sha256 mismatch (manifest {want[:12]}…, file {got[:12]}…)"
    )
    assert info.value.exit_code == EXIT_VERIFY and info.value.phase == "verify"


def test_first_mismatch_in_sorted_order(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    _publish(cache, key)
    # list the targets in the file in reverse order: the check must still sort
    _resign(
        cache,
        key,
        lambda s: s.__setitem__("targets", dict(sorted(s["targets"].items(), reverse=True))),
    )
    assert next(iter(read_manifest(cache)["signed"]["targets"])) == "tiles.mbtiles"
    for rel in ["tiles.mbtiles", "index/descriptors.faiss", "engine/engine.onnx"]:
        p = cache / rel
        p.write_bytes(bytes(b ^ 0xFF for b in p.read_bytes()))
    with pytest.raises(VerifyError, match=r"^engine/engine\.onnx: sha256 mismatch"):
        verify_cache(cache, [key.public_key()])


def test_truncated_and_grown_artifacts(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    _publish(cache, key)
    p = cache / "tiles.mbtiles"
    original = p.read_bytes()
    p.write_bytes(original[:150_000])
    with pytest.raises(VerifyError) as info:
        verify_cache(cache, [key.public_key()])
    assert (
        info.value.message
        == "tiles.mbtiles: length mismatch (manifest 200000 bytes, file 150000 bytes)"
    )
    p.write_bytes(original + b"\0")
    with pytest.raises(
        VerifyError, match="length mismatch .manifest 200000 bytes, file 200001 bytes"
    ):
        verify_cache(cache, [key.public_key()])
    p.write_bytes(original)
    verify_cache(cache, [key.public_key()])


def test_missing_artifact(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    _publish(cache, key)
    (cache / "engine" / "engine.onnx").unlink()
    with pytest.raises(
        VerifyError, match=r"^engine/engine\.onnx: missing \(manifest lists 5000 bytes\)"
    ):
        verify_cache(cache, [key.public_key()])


def test_artifact_replaced_by_directory(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    _publish(cache, key)
    (cache / "index" / "descriptors.faiss").unlink()
    (cache / "index" / "descriptors.faiss").mkdir()
    with pytest.raises(VerifyError, match="descriptors.faiss: not a regular file"):
        verify_cache(cache, [key.public_key()])


@pytest.mark.parametrize(
    "change",
    [
        lambda e: e["signed"].__setitem__("version", 99),
        lambda e: e["signed"].__setitem__("expires", "2999-01-01T00:00:00Z"),
        lambda e: e["signed"]["targets"]["tiles.mbtiles"]["hashes"].__setitem__("sha256", "0" * 64),
        lambda e: e["signed"]["targets"].pop("engine/engine.onnx"),
        lambda e: e["signed"]["identity"].__setitem__("flight_id", "FL-9999"),
        lambda e: e["signed"]["info"].__setitem__("note", "edited"),
    ],
)
def test_changed_manifest_field_breaks_signature(
    cache: Path, key: ed25519.Ed25519PrivateKey, change: Any
) -> None:
    _publish(cache, key)
    _edit_manifest(cache, change)
    with pytest.raises(VerifyError, match="bad signature"):
        verify_cache(cache, [key.public_key()])


def test_other_key(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    _publish(cache, key)
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(VerifyError, match="no signature by a trusted key") as info:
        verify_cache(cache, [other.public_key()])
    assert keyid(key.public_key()) in str(info.value) and keyid(other.public_key()) in str(
        info.value
    )
    # trusting both keys is fine
    verify_cache(cache, [other.public_key(), key.public_key()])


def test_signer_pub_in_the_cache_is_not_trusted(
    cache: Path, key: ed25519.Ed25519PrivateKey
) -> None:
    attacker = ed25519.Ed25519PrivateKey.generate()
    _publish(cache, attacker)  # an attacker can ship their own signer.pub
    with pytest.raises(VerifyError, match="no signature by a trusted key"):
        verify_cache(cache, [key.public_key()])


def test_expired(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    expires = datetime(2099, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
    _publish(cache, key, expires_at=expires)
    assert verify_cache(cache, [key.public_key()], now=expires - timedelta(seconds=1))
    with pytest.raises(
        VerifyError, match=r"manifest expired at 2099-06-01T12:00:00Z \(now 2099-06-01T12:00:00Z\)"
    ):
        verify_cache(cache, [key.public_key()], now=expires)
    with pytest.raises(VerifyError, match="expired at 2099-06-01T12:00:00Z"):
        verify_cache(cache, [key.public_key()], now=expires + timedelta(days=400))
    with pytest.raises(UsageError, match="timezone-aware"):
        verify_cache(cache, [key.public_key()], now=datetime(2099, 1, 1))


def test_expiry_written_in_utc(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    plus2 = timezone(timedelta(hours=2))
    env = _publish(cache, key, expires_at=datetime(2099, 6, 1, 14, 30, 5, 900_000, tzinfo=plus2))
    assert env["signed"]["expires"] == "2099-06-01T12:30:05Z"


def test_min_version_refuses_replay(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    _publish(cache, key, version=3)
    verify_cache(cache, [key.public_key()], min_version=3)
    with pytest.raises(VerifyError, match="version 3 is older than the minimum 4"):
        verify_cache(cache, [key.public_key()], min_version=4)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.__setitem__("_type", "other/thing"), "not a cachebuild manifest"),
        (lambda s: s.__setitem__("spec_version", 2), "spec_version 2"),
        (lambda s: s.__setitem__("spec_version", True), "spec_version True"),
        (lambda s: s.__setitem__("expires", "tomorrow"), "'expires' is not a UTC time"),
        (lambda s: s.__setitem__("version", 0), "invalid version"),
        (lambda s: s.__setitem__("targets", []), "no 'targets'"),
        (
            lambda s: s["targets"].__setitem__("tiles.mbtiles", {"length": -1, "hashes": {}}),
            "malformed target",
        ),
        (lambda s: s["targets"]["tiles.mbtiles"].__setitem__("length", True), "malformed target"),
    ],
)
def test_signed_but_invalid_manifest(
    cache: Path, key: ed25519.Ed25519PrivateKey, change: Any, match: str
) -> None:
    _publish(cache, key)
    _resign(cache, key, change)
    with pytest.raises(VerifyError, match=match):
        verify_cache(cache, [key.public_key()])


def test_no_manifest(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    for d in (tmp_path, tmp_path / "absent"):
        with pytest.raises(VerifyError, match="no published cache at") as info:
            verify_cache(d, [key.public_key()])
        assert str(d) in str(info.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"signed": {"x": NaN}, "signatures": []}', "NaN is not valid JSON"),
        (b'{"signed": {}, "signed": {}, "signatures": []}', "duplicate key 'signed'"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"signatures": []}', "malformed signed envelope"),
    ],
)
def test_unreadable_manifest(
    tmp_path: Path, key: ed25519.Ed25519PrivateKey, content: bytes, match: str
) -> None:
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(VerifyError, match=match):
        verify_cache(tmp_path, [key.public_key()])


# -- paths -----------------------------------------------------------------------------

BAD_PATHS = [
    "../outside.bin",
    "/etc/passwd",
    "engine/../../x",
    "a/./b",
    "a//b",
    "",
    "C:/x",
    "a\\b",
    ".",
]


@pytest.mark.parametrize("rel", BAD_PATHS)
def test_write_refuses_bad_paths(cache: Path, key: ed25519.Ed25519PrivateKey, rel: str) -> None:
    with pytest.raises(BuildError) as info:
        _publish(cache, key, artifacts=["tiles.mbtiles", rel])
    assert info.value.phase == "manifest"
    assert repr(rel) in str(info.value)
    assert not (cache / "manifest.json").exists()


@pytest.mark.parametrize(
    ("artifacts", "match"),
    [
        (["tiles.mbtiles", "nope.bin"], "nope.bin is missing"),
        (["engine"], "engine is not a regular file"),
        (["tiles.mbtiles", "tiles.mbtiles"], "listed twice"),
        (["manifest.json"], "reserved"),
        (["signer.pub"], "reserved"),
    ],
)
def test_write_refuses_bad_artifacts(
    cache: Path, key: ed25519.Ed25519PrivateKey, artifacts: list[str], match: str
) -> None:
    with pytest.raises(BuildError, match=match) as info:
        _publish(cache, key, artifacts=artifacts)
    assert info.value.phase == "manifest"


def test_write_refuses_symlink_escape(
    cache: Path, key: ed25519.Ed25519PrivateKey, tmp_path: Path
) -> None:
    (tmp_path / "secret.txt").write_text("outside")
    (cache / "leak.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(BuildError, match="leak.txt resolves outside"):
        _publish(cache, key, artifacts=["leak.txt"])
    (cache / "sub").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(BuildError, match="resolves outside"):
        _publish(cache, key, artifacts=["sub/secret.txt"])


@pytest.mark.parametrize(
    "rel", ["../outside.bin", "/etc/hostname", "engine/../../outside.bin", "a\\b"]
)
def test_verify_refuses_traversal_even_if_signed(
    cache: Path, key: ed25519.Ed25519PrivateKey, tmp_path: Path, rel: str
) -> None:
    (tmp_path / "outside.bin").write_bytes(b"x")
    _publish(cache, key)
    target = {"length": 1, "hashes": {"sha256": hashlib.sha256(b"x").hexdigest()}}
    _resign(cache, key, lambda s: s["targets"].__setitem__(rel, target))
    with pytest.raises(VerifyError, match="manifest target"):
        verify_cache(cache, [key.public_key()])


def test_verify_refuses_symlink_escape(
    cache: Path, key: ed25519.Ed25519PrivateKey, tmp_path: Path
) -> None:
    _publish(cache, key)
    p = cache / "tiles.mbtiles"
    outside = tmp_path / "copy.mbtiles"
    outside.write_bytes(p.read_bytes())  # identical content, but outside the cache
    p.unlink()
    p.symlink_to(outside)
    with pytest.raises(VerifyError, match=r"^tiles\.mbtiles: resolves outside the cache directory"):
        verify_cache(cache, [key.public_key()])


# -- arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"version": 0}, "version must be an integer >= 1"),
        ({"version": True}, "version must be an integer >= 1"),
        ({"expires_at": datetime(2099, 1, 1)}, "timezone-aware"),
        ({"expires_at": datetime(2000, 1, 1, tzinfo=timezone.utc)}, "not in the future"),
        ({"build_id": "nope"}, "build_id"),
        ({"info": {"x": float("nan")}}, "not JSON-representable"),
        ({"info": {"x": object()}}, "not JSON-representable"),
    ],
)
def test_write_refuses_bad_arguments(
    cache: Path, key: ed25519.Ed25519PrivateKey, kw: dict[str, Any], match: str
) -> None:
    with pytest.raises((BuildError, UsageError), match=match):
        _publish(cache, key, **kw)
    assert not (cache / "manifest.json").exists()


def test_write_refuses_missing_cache_dir(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(BuildError, match="does not exist"):
        _publish(tmp_path / "nope", key)


# -- secrets -------------------------------------------------------------------------------


def test_no_key_material_in_outputs(
    cache: Path, key: ed25519.Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    raw = key.private_bytes_raw()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    body = b"".join(pem.splitlines()[1:-1]).decode()
    markers = [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode()[:24], body[16:48]]
    with caplog.at_level(logging.DEBUG):
        _publish(cache, key)
        (cache / "tiles.mbtiles").write_bytes(b"corrupt")
        with pytest.raises(VerifyError) as info:
            verify_cache(cache, [key.public_key()])
    written = b"".join(p.read_bytes() for p in [cache / "manifest.json", cache / "signer.pub"])
    outputs = [
        written.decode("utf-8"),
        "\n".join(r.getMessage() for r in caplog.records),
        str(info.value),
    ]
    assert any("wrote" in r.getMessage() for r in caplog.records)
    for text in outputs:
        for m in markers:
            assert m not in text
    assert raw not in written


# -- remembered hashes (HashCache) ---------------------------------------------------------


def test_hash_cache_off_by_default_hashes_all(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    _publish(cache, key)
    assert not (cache / manifest.HASH_CACHE_NAME).exists()


def _settle(*paths: Path) -> None:
    """Put the files' mtime 10 s back: a hash remembered now is not racy (cachebuild._util.statcache.racy)."""
    for p in paths:
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - 10 * 10**9))


def test_hash_cache_reuses_only_unchanged_files(
    cache: Path, key: ed25519.Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    hc = cache / manifest.HASH_CACHE_NAME
    _settle(*(cache / a for a in ARTIFACTS))
    with caplog.at_level(logging.INFO, logger="cachebuild.release.manifest"):
        _publish(cache, key, hash_cache=hc)
        assert "hashed 3 artifacts, 0 remembered" in caplog.text
        caplog.clear()
        _publish(cache, key, hash_cache=hc, version=4)
        assert "hashed 0 artifacts, 3 remembered" in caplog.text
        caplog.clear()
        # changed in place with its size and mtime put back: the ctime still moves
        p = cache / "tiles.mbtiles"
        st = p.stat()
        data = bytearray(p.read_bytes())
        data[7] ^= 1
        with open(p, "r+b") as fh:
            fh.write(data)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        _publish(cache, key, hash_cache=hc, version=5)
        assert "hashed 1 artifacts, 2 remembered" in caplog.text
    hc.unlink()  # a build directory's file, never published
    signed = verify_cache(cache, [key.public_key()])  # the true hashes, re-hashed by verify
    assert (
        signed["targets"]["tiles.mbtiles"]["hashes"]["sha256"]
        == hashlib.sha256(bytes(data)).hexdigest()
    )


def test_a_remembered_hash_needs_the_same_file(tmp_path: Path) -> None:
    hc = manifest.HashCache(tmp_path / manifest.HASH_CACHE_NAME)
    a = tmp_path / "a"
    a.write_bytes(b"one")
    _settle(a)
    assert hc.sha256(a) == (hashlib.sha256(b"one").hexdigest(), 3)
    assert hc.lookup(a) is not None
    # same bytes in a new file renamed onto it: another inode and ctime
    (tmp_path / "b").write_bytes(b"one")
    _settle(tmp_path / "b")
    os.replace(tmp_path / "b", a)
    assert hc.lookup(a) is None
    hc.sha256(a)
    hc.save()
    assert manifest.HashCache(hc.path).lookup(a) is not None
    a.unlink()
    assert manifest.HashCache(hc.path).lookup(a) is None


def test_a_racy_entry_is_hashed_again(tmp_path: Path) -> None:
    """git's racy entry: remembered within the tick of the file's mtime, a same-tick rewrite would look unchanged."""
    hc = manifest.HashCache(tmp_path / manifest.HASH_CACHE_NAME)
    a = tmp_path / "a"
    a.write_bytes(b"one")
    hc.sha256(a)
    assert hc.lookup(a) is None  # just written: not trusted yet
    _settle(a)
    hc.sha256(a)
    assert hc.lookup(a) is not None  # settled: trusted
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, time.time_ns() + 10**9))  # an mtime in the future stays racy
    hc.sha256(a)
    assert hc.lookup(a) is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00garbage",
        b"[]",
        b'{"format": "cachebuild/sha256-cache-v1", "entries": {"a": [1, 2, 3, 4, 5, "beef"]}}',
        b'{"format": "cachebuild/sha256-cache-v2", "entries": {"a": [1, 2, 3, 4, 5, 6, "beef"]}}',
    ],
)
def test_a_damaged_hash_cache_is_ignored(
    cache: Path, key: ed25519.Ed25519PrivateKey, content: bytes
) -> None:
    hc = cache / manifest.HASH_CACHE_NAME
    hc.write_bytes(content)
    _publish(cache, key, hash_cache=hc)
    assert json.loads(hc.read_text())["format"] == "cachebuild/sha256-cache-v2"
    hc.unlink()  # a build directory's file, never published
    verify_cache(cache, [key.public_key()])


def test_a_rewritten_file_is_hashed_again(cache: Path, key: ed25519.Ed25519PrivateKey) -> None:
    """The cache is trusted only while the stat it recorded holds: a rewrite changes it."""
    hc = cache / manifest.HASH_CACHE_NAME
    _publish(cache, key, hash_cache=hc)
    (cache / "tiles.mbtiles").write_bytes(b"new tiles")
    env = _publish(cache, key, hash_cache=hc, version=4)
    assert (
        env["signed"]["targets"]["tiles.mbtiles"]["hashes"]["sha256"]
        == hashlib.sha256(b"new tiles").hexdigest()
    )


def _digest(state: list) -> str:
    return state[-1]


def test_doit_file_checker_hashes_once_and_sees_every_change(tmp_path: Path) -> None:
    hc = tmp_path / manifest.HASH_CACHE_NAME
    f = tmp_path / "tiles.mbtiles"
    f.write_bytes(b"a" * 1000)
    _settle(f)
    checker = manifest.doit_file_checker(hc)()
    state = checker.get_state(str(f), None)
    assert (
        state[2] == 1000 and _digest(state) == "sha256:" + hashlib.sha256(b"a" * 1000).hexdigest()
    )
    assert checker.get_state(str(f), state) is None  # same stat, settled: unchanged, nothing read
    assert not checker.check_modified(str(f), f.stat(), state)
    # the same bytes written again (a new mtime, the same size): not modified
    f.write_bytes(b"a" * 1000)
    os.utime(f, ns=(1, 10**18))
    assert not checker.check_modified(str(f), f.stat(), state)
    # other bytes of the same size: modified
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(1, 2 * 10**18))
    assert checker.check_modified(str(f), f.stat(), state)
    # a state of an older cachebuild (mtime, size, sha256) is decided by the hash
    old = (0.0, 1000, "sha256:" + hashlib.sha256(b"b" * 1000).hexdigest())
    assert not checker.check_modified(str(f), f.stat(), old)
    # a state of doit's md5 checker (an older database) means modified, once
    assert checker.check_modified(
        str(f), f.stat(), (0.0, 1000, hashlib.md5(b"b" * 1000).hexdigest())
    )
    assert checker.check_modified(str(f), f.stat(), 12.5)  # doit's timestamp checker


@pytest.mark.parametrize("how", ["same-size-touch-r", "other-size-cp-p", "same-tick"])
def test_doit_file_checker_sees_a_restored_mtime(tmp_path: Path, how: str) -> None:
    """issue 19: an equal mtime is not an unchanged file (the size, inode and ctime count, and racy records)."""
    hc = tmp_path / manifest.HASH_CACHE_NAME
    f = tmp_path / "model.onnx"
    f.write_bytes(b"a" * 1000)
    if how != "same-tick":
        _settle(f)
    checker = manifest.doit_file_checker(hc)()
    state = checker.get_state(str(f), None)
    st = f.stat()
    if how == "same-size-touch-r":
        f.write_bytes(b"b" * 1000)
    elif how == "other-size-cp-p":
        (tmp_path / "new").write_bytes(b"c" * 1234)
        os.replace(tmp_path / "new", f)
    else:  # the same size, mtime and ctime, within the record's tick (as a same-tick write would leave it)
        with open(f, "r+b") as fh:
            fh.write(b"d" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert checker.check_modified(str(f), f.stat(), state)


def test_doit_file_checker_takes_the_writers_hash(tmp_path: Path) -> None:
    """A file its writer remembered is not read by the checker: a wrong remembered hash shows it."""
    hc = tmp_path / manifest.HASH_CACHE_NAME
    f = tmp_path / "big"
    f.write_bytes(b"x" * 100)
    _settle(f)
    cache = manifest.HashCache(hc)
    cache.remember(f, "0" * 64, f.stat())
    cache.save()
    checker = manifest.doit_file_checker(hc)()
    assert _digest(checker.get_state(str(f), None)) == "sha256:" + "0" * 64
    f.write_bytes(b"y" * 100)  # rewritten: the ctime moved, the remembered hash is dropped
    assert (
        _digest(checker.get_state(str(f), None))
        == "sha256:" + hashlib.sha256(b"y" * 100).hexdigest()
    )


def test_a_missing_staged_artifact_comes_with_a_remedy(
    cache: Path, key: ed25519.Ed25519PrivateKey
) -> None:
    """Found by tests/scenarios/test_sequences.py: exit 21 with no remedy."""
    with pytest.raises(BuildError, match="nope.bin is missing") as info:
        _publish(cache, key, artifacts=["tiles.mbtiles", "nope.bin"])
    assert "doit clean" in info.value.remedy
