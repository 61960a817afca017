"""LOG_LEVEL on a companion command: paramiko's records reach stderr through the same handler."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import Cb
from .sshd import SSHD, Sshd
from .test_companion import Companion

pytestmark = pytest.mark.skipif(
    not os.path.exists(SSHD), reason=f"{SSHD} (openssh-server) is not installed; .ci/run installs it"
)


def test_log_level_debug_shows_paramikos_records(cb: Cb, sshd: Sshd, tmp_path: Path) -> None:
    companion = Companion.under(tmp_path, cb, sshd)
    args = [f"{k}={v}" for k, v in companion.vars().items()]
    quiet = cb.run("cache-info", *args)
    assert "paramiko.transport" not in quiet.stderr
    r = cb.run("cache-info", *args, "LOG_LEVEL=debug")
    assert r.code == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if " paramiko.transport: " in ln]
    assert any(" DEBUG paramiko.transport: " in ln or " INFO paramiko.transport: " in ln for ln in lines), r.stderr
