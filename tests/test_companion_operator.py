"""Companion mode as an operator meets it (issue 18): what its errors advise,
what ``cache-info`` compares with, the push line, ``~/.ssh/config``.

Real ``doit`` processes against a real OpenSSH sshd on 127.0.0.1, as in
tests/test_companion.py (whose :class:`Companion` helper this reuses).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from .conftest import write_flight
from .sshd import SSHD
from .test_companion import Companion, companion  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(
    not os.path.exists(SSHD), reason=f"{SSHD} (openssh-server) is not installed; .ci/run installs it"
)

#: ``KEY`` as a variable name of its own (not COMPANION_KEY, CACHEBUILD_KEY, KEY_PASSPHRASE).
BARE_KEY = re.compile(r"(?<![A-Za-z0-9_])KEY(?=[= ])")


def test_a_missing_companion_key_names_companion_key_keeps_exit_2_and_says_what_to_do(
    companion: Companion, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json")
    r = companion.build(f, COMPANION_KEY="/missing.pem")
    assert r.code == 2, r.stderr  # the companion's own exit code, as docs/companion.md promises
    rep = r.report
    assert rep["exit_code"] == 2 and rep["outcome"] == "failure"
    assert rep["error"].startswith(f"on the companion {companion.sshd.target}:")
    assert "COMPANION_KEY=/missing.pem" in rep["error"] and not BARE_KEY.search(rep["error"])
    assert "COMPANION_KEY" in rep["remedy"] and "on the companion" in rep["remedy"]
    assert "install the same cachebuild" not in rep["remedy"]
    assert "ERROR [" in r.stderr and not BARE_KEY.search(r.stderr.split("ERROR [", 1)[1])


def test_the_companions_dev_key_warning_says_companion_key(companion: Companion, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    r = companion.build(f)
    assert r.code == 0, r.stderr
    dev = [w for w in r.report["warnings"] if "development" in w]
    assert dev, r.report["warnings"]
    for w in dev:
        assert w.startswith("companion: ") and "COMPANION_KEY" in w and not BARE_KEY.search(w), w
    streamed = [ln for ln in r.stderr.splitlines() if ln.startswith("companion| ") and "development" in ln]
    assert streamed and not any(BARE_KEY.search(ln) for ln in streamed), streamed
