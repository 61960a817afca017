"""An encrypted signing key's passphrase: one documented way, the environment
variable CACHEBUILD_KEY_PASSPHRASE, never the command line (issue 18, item 6).
Real ``doit build-cache`` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cachebuild._util.report import redact
from cachebuild.release.lock import CacheLock
from cachebuild.release.signing import keyid
from tests.conftest import Cb, CbResult, write_flight

SMALL = ("BUFFER_M=200", "ZOOM=17", "SELFTEST_QUERIES=0")
PASSPHRASE = "pass-Qz7-unique-4e1c-phrase"


@pytest.fixture
def cbd(tmp_path: Path) -> Cb:
    home = tmp_path / "home"
    home.mkdir()
    return Cb(home=home, env_extra={"XDG_DATA_HOME": str(tmp_path / "data")})


@pytest.fixture
def enc_key(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSPHRASE.encode()),
    )
    path = tmp_path / "operator" / "enc.pem"
    path.parent.mkdir()
    path.write_bytes(pem)
    path.chmod(0o600)
    return path, key


def assert_nowhere(secret: str, results: list[CbResult], roots: list[Path]) -> None:
    for r in results:
        assert secret not in r.stdout and secret not in r.stderr
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert secret.encode() not in path.read_bytes(), f"the passphrase is in {path}"


def test_the_passphrase_comes_from_cachebuild_key_passphrase(
    cbd: Cb, tmp_path: Path, enc_key: tuple[Path, Ed25519PrivateKey]
) -> None:
    path, key = enc_key
    f = write_flight(tmp_path / "f.json")
    r = cbd.build(
        f"FLIGHT={f}", *SMALL, f"KEY={path}", env=cbd.env(CACHEBUILD_KEY_PASSPHRASE=PASSPHRASE)
    )
    assert r.code == 0, r.stderr
    signed = json.loads((cbd.current / "manifest.json").read_bytes())
    assert signed["signatures"][0]["keyid"] == keyid(key.public_key())
    assert "deprecated" not in r.stderr
    assert_nowhere(PASSPHRASE, [r], [cbd.home, tmp_path / "data"])


def test_a_missing_or_wrong_passphrase_names_the_variable_before_the_lock(
    cbd: Cb, tmp_path: Path, enc_key: tuple[Path, Ed25519PrivateKey]
) -> None:
    path, _ = enc_key
    f = write_flight(tmp_path / "f.json")
    with CacheLock(cbd.cache_dir / "build.lock"):  # refused before it: exit 2, not 50
        missing = cbd.build(f"FLIGHT={f}", *SMALL, f"KEY={path}")
        wrong_env = cbd.env(CACHEBUILD_KEY_PASSPHRASE="wrong-9x7q")
        wrong = cbd.build(f"FLIGHT={f}", *SMALL, f"KEY={path}", env=wrong_env)
    assert missing.code == 2, missing.stderr
    assert "CACHEBUILD_KEY_PASSPHRASE is not set" in missing.report["error"]
    assert "export CACHEBUILD_KEY_PASSPHRASE=" in missing.report["remedy"]
    assert (
        wrong.code == 2 and "wrong passphrase in CACHEBUILD_KEY_PASSPHRASE" in wrong.report["error"]
    )
    assert_nowhere("wrong-9x7q", [wrong], [cbd.home])


@pytest.mark.parametrize("name", ["KEY_PASSPHRASE", "CACHEBUILD_KEY_PASSPHRASE"])
def test_a_passphrase_on_the_command_line_is_refused_and_never_shown(
    cbd: Cb, tmp_path: Path, enc_key: tuple[Path, Ed25519PrivateKey], name: str
) -> None:
    path, _ = enc_key
    f = write_flight(tmp_path / "f.json")
    r = cbd.build(f"FLIGHT={f}", *SMALL, f"KEY={path}", f"{name}={PASSPHRASE}")
    assert r.code == 2, r.stderr
    assert f"{name} is a secret" in r.report["error"] and "environment" in r.report["error"]
    assert "export CACHEBUILD_KEY_PASSPHRASE=" in r.report["remedy"]
    assert not (cbd.cache_dir / "state").exists(), "refused before anything was written"
    assert_nowhere(PASSPHRASE, [r], [cbd.home])


def test_the_old_bare_variable_still_works_with_a_warning(
    cbd: Cb, tmp_path: Path, enc_key: tuple[Path, Ed25519PrivateKey]
) -> None:
    path, _ = enc_key
    f = write_flight(tmp_path / "f.json")
    r = cbd.build(f"FLIGHT={f}", *SMALL, f"KEY={path}", env=cbd.env(KEY_PASSPHRASE=PASSPHRASE))
    assert r.code == 0, r.stderr
    warnings = r.report["warnings"]
    assert any(
        "KEY_PASSPHRASE is deprecated" in w and "CACHEBUILD_KEY_PASSPHRASE" in w for w in warnings
    )
    assert_nowhere(PASSPHRASE, [r], [cbd.home])


@pytest.mark.parametrize(
    "name", ["CACHEBUILD_KEY_PASSPHRASE", "KEY_PASSPHRASE", "CACHEBUILD_SSH_KEY_PASSPHRASE"]
)
def test_passphrases_are_redacted(name: str) -> None:
    assert redact(f"failed: {PASSPHRASE}!", {name: PASSPHRASE}) == "failed: ***!"


@pytest.mark.parametrize(
    "name",
    ["COMPANION_KEY_PASSPHRASE", "CACHEBUILD_COMPANION_KEY_PASSPHRASE", "SSH_KEY_PASSPHRASE"],
)
def test_other_passphrases_on_the_command_line_are_refused_by_name(
    cbd: Cb, tmp_path: Path, name: str
) -> None:
    """Every passphrase variable is environment-only: named in the refusal, never echoed."""
    f = write_flight(tmp_path / "f.json")
    r = cbd.build(f"FLIGHT={f}", *SMALL, f"{name}={PASSPHRASE}")
    assert r.code == 2, r.stderr
    assert f"{name} is a secret" in r.report["error"], r.report
    assert "export CACHEBUILD_" in r.report["remedy"]
    assert_nowhere(PASSPHRASE, [r], [cbd.home])
