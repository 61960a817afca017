"""Companion mode: the companion does not re-sign with its development key a
cache its operator key signed, unless ALLOW_DEV_KEY=1 (issue 18, item 4).
Real builds through a real sshd on 127.0.0.1 (tests/_harness/sshd.py)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cachebuild.release.signing import keyid
from tests._harness.sshd import SSHD, Sshd
from tests.conftest import Cb, write_flight

pytestmark = pytest.mark.skipif(
    not os.path.exists(SSHD), reason=f"{SSHD} (openssh-server) is not installed"
)

pytest.importorskip("paramiko")

from tests.scenarios.test_companion import Companion  # noqa: E402


def test_the_companion_refuses_to_resign_an_operator_cache(
    cb: Cb, sshd: Sshd, tmp_path: Path
) -> None:
    if sshd.proc is None:
        sshd.start()
    c = Companion.under(tmp_path, cb, sshd)
    data = tmp_path / "companion-data"  # the companion's own data dir: its development key
    cmd = (
        f"env CACHEBUILD_HOME={shlex.quote(str(c.home))} XDG_DATA_HOME={shlex.quote(str(data))} "
        f"{shlex.quote(sys.executable)} -m doit"
    )
    op = Ed25519PrivateKey.generate()
    op_path = tmp_path / "on-the-companion" / "sign.pem"
    op_path.parent.mkdir()
    op_path.write_bytes(
        op.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    op_path.chmod(0o600)
    f = write_flight(tmp_path / "f.json")

    first = c.build(f, "SELFTEST_QUERIES=0", COMPANION_CMD=cmd, COMPANION_KEY=str(op_path))
    assert first.code == 0, first.stderr
    published = c.manifest.read_bytes()
    assert json.loads(published)["signatures"][0]["keyid"] == keyid(op.public_key())

    r = c.build(f, "SELFTEST_QUERIES=0", "BUFFER_M=250", COMPANION_CMD=cmd)
    assert r.code != 0, r.stderr
    text = f"{r.report['error']} {r.report['remedy']}"
    assert "ALLOW_DEV_KEY=1" in text and "COMPANION_KEY=" in text, r.stderr
    assert keyid(op.public_key())[:16] in r.report["error"]
    assert c.manifest.read_bytes() == published, "the companion's cache is untouched"
    assert not (data / "cachebuild" / "keys" / "dev_ed25519.pem").exists()

    allowed = c.build(f, "SELFTEST_QUERIES=0", "BUFFER_M=250", "ALLOW_DEV_KEY=1", COMPANION_CMD=cmd)
    assert allowed.code == 0, allowed.stderr
    dev_pub = (data / "cachebuild" / "keys" / "dev_ed25519.pem").is_file()
    assert dev_pub and json.loads(c.manifest.read_bytes())["signatures"][0]["keyid"] != keyid(
        op.public_key()
    )
