"""LOG_LEVEL: paramiko's records reach stderr on a companion command; the handler redacts secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests._harness.sshd import SSHD, Sshd
from tests.conftest import Cb
from tests.scenarios.test_companion import Companion

needs_sshd = pytest.mark.skipif(
    not os.path.exists(SSHD),
    reason=f"{SSHD} (openssh-server) is not installed; .ci/run installs it",
)


@needs_sshd
def test_log_level_debug_shows_paramikos_records(cb: Cb, sshd: Sshd, tmp_path: Path) -> None:
    companion = Companion.under(tmp_path, cb, sshd)
    args = [f"{k}={v}" for k, v in companion.vars().items()]
    quiet = cb.run("cache-info", *args)
    assert "paramiko.transport" not in quiet.stderr
    r = cb.run("cache-info", *args, "LOG_LEVEL=debug")
    assert r.code == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if " paramiko.transport: " in ln]
    assert any(
        " DEBUG paramiko.transport: " in ln or " INFO paramiko.transport: " in ln for ln in lines
    ), r.stderr


def test_redact_filter_cleans_messages_args_and_tracebacks(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import logging

    from cachebuild.cli.logsetup import configure_logging

    monkeypatch.setenv("CACHEBUILD_API_KEY", "sk-filter-secret-1")
    root = logging.getLogger()
    before = list(root.handlers), root.level
    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    try:
        assert configure_logging({"LOG_LEVEL": "INFO", "ZOOM": "17"}) == {"ZOOM": "17"}
        configure_logging({"LOG_LEVEL": "info"})  # again: replaced, not stacked
        log = logging.getLogger("cachebuild.test")
        log.info("GET /t?key=%s", "sk-filter-secret-1")
        try:
            raise ValueError("bad key sk-filter-secret-1")
        except ValueError:
            log.exception("failed")
        log.debug("not shown at info")
    finally:
        for h in list(root.handlers):
            if h not in before[0]:
                root.removeHandler(h)
        root.setLevel(before[1])
    text = buf.getvalue()
    assert "sk-filter-secret-1" not in text
    assert text.count("GET /t?key=***") == 1 and "ValueError: bad key ***" in text
    assert "not shown" not in text
