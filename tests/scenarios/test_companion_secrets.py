"""Companion secrets (issue 19 §4): an encrypted COMPANION_KEY's passphrase
travels over the SSH channel (never argv, on either machine), COMPANION_CMD is
masked in every error, and the SSH and COMPANION_KEY passphrases are secrets
that :func:`cachebuild._util.report.redact` hides.

Real ``doit`` processes against a real OpenSSH sshd on 127.0.0.1; the
"companion" is this machine, so a snapshot of every process's argv taken
while the remote build starts covers both ends.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path

import pytest

from cachebuild._util.report import SECRET_ENV_VARS, redact
from tests._harness.sshd import SSHD
from tests.conftest import write_flight
from tests.scenarios.test_companion import Companion, companion  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(
    not os.path.exists(SSHD),
    reason=f"{SSHD} (openssh-server) is not installed; .ci/run installs it",
)

PASSPHRASE = "pass-Phrase-7c1e93 with spaces\\and a backslash"


def encrypted_key(path: Path, passphrase: str) -> str:
    """An encrypted PKCS#8 Ed25519 key at ``path``; its keyid."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cachebuild.release.signing import keyid

    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase.encode()),
        )
    )
    path.chmod(0o600)
    return keyid(key.public_key())


def argv_spy(path: Path, log: Path, cmd: str) -> str:
    """A COMPANION_CMD that appends every process's argv to ``log``, then runs ``cmd``."""
    path.write_text(
        "#!/bin/sh\n"
        f"for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' 2>/dev/null < \"$f\"; echo; done 2>/dev/null >> {shlex.quote(str(log))}\n"
        f'exec {cmd} "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_an_encrypted_companion_key_gets_its_passphrase_over_the_channel_never_argv(
    companion: Companion, tmp_path: Path
) -> None:
    key = tmp_path / "sign.pem"  # "on the companion": the same machine here
    kid = encrypted_key(key, PASSPHRASE)
    log = tmp_path / "argv.log"
    spy = argv_spy(tmp_path / "spy.sh", log, companion.cmd)
    env = companion.cb.env(CACHEBUILD_COMPANION_KEY_PASSPHRASE=PASSPHRASE)
    f = write_flight(tmp_path / "f.json")
    r = companion.build(f, env=env, COMPANION_KEY=str(key), COMPANION_CMD=spy)
    assert r.code == 0, r.stderr
    signed = json.loads(companion.manifest.read_text())
    assert signed["signatures"][0]["keyid"] == kid, "signed with the encrypted COMPANION_KEY"
    argv = log.read_text()
    assert "build-cache" in argv and "companion-agent" in argv  # the snapshots saw both ends
    for text, where in ((argv, "argv"), (r.stdout, "stdout"), (r.stderr, "stderr")):
        assert PASSPHRASE not in text, f"the passphrase is in {where}"
    for root in (companion.dir, companion.home, companion.cb.home):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert PASSPHRASE.encode() not in path.read_bytes(), f"the passphrase is in {path}"

    # cache-info reads that cache with the same key, the passphrase sent the same way
    info = companion.cb.run(
        "cache-info",
        *[f"{k}={v}" for k, v in companion.vars(COMPANION_KEY=str(key)).items()],
        env=env,
    )
    assert info.code == 0, info.stderr
    assert info.report["companion"]["cache"]["verify"]["ok"] is True
    assert PASSPHRASE not in info.stdout + info.stderr

    # without it: the companion's error, naming this workstation's variable
    bad = companion.build(f, "ZOOM=16", COMPANION_KEY=str(key))
    assert bad.code != 0
    assert "CACHEBUILD_COMPANION_KEY_PASSPHRASE" in (bad.report["error"] or "") + (
        bad.report["remedy"] or ""
    )


def test_companion_cmd_is_masked_in_errors(companion: Companion, tmp_path: Path) -> None:
    secret = "hunter2-Zq81"
    f = write_flight(tmp_path / "f.json")
    for cmd in (
        f"env KEY_PASSPHRASE={secret} /opt/nowhere/doit",
        f"env KEY_PASSPHRASE={secret} true",
    ):
        r = companion.build(f, COMPANION_CMD=cmd)
        assert r.code == 30, r.stderr
        assert "KEY_PASSPHRASE=***" in r.report["error"]
        assert secret not in r.stdout and secret not in r.stderr


def test_the_ssh_and_companion_key_passphrases_are_secrets() -> None:
    for name in ("CACHEBUILD_SSH_KEY_PASSPHRASE", "CACHEBUILD_COMPANION_KEY_PASSPHRASE"):
        assert name in SECRET_ENV_VARS
        assert redact(f"oops: {PASSPHRASE}", {name: PASSPHRASE}) == "oops: ***"


def test_a_malformed_companion_cmd_is_refused_without_echoing_it(
    companion: Companion, tmp_path: Path
) -> None:
    secret = "hunter2-Zq81"
    f = write_flight(tmp_path / "f.json")
    r = companion.build(f, COMPANION_CMD=f"env KEY_PASSPHRASE={secret}\ndoit")
    assert r.code == 2, r.stderr
    assert "COMPANION_CMD must be one non-empty line" in r.report["error"]
    assert secret not in r.stdout and secret not in r.stderr
