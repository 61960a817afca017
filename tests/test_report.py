from __future__ import annotations

import io
import json

from cachebuild.errors import DownloadError
from cachebuild.report import Report, redact


def test_json_report_is_the_last_stdout_line() -> None:
    r = Report("build-cache")
    r.outcome, r.exit_code = "success", 0
    out, err = io.StringIO(), io.StringIO()
    r.emit("json", out, err)
    d = json.loads(out.getvalue().splitlines()[-1])
    for key in ("outcome", "exit_code", "failure_phase", "build_id", "manifest_path", "tiles", "phases"):
        assert key in d
    assert set(d["tiles"]) == {"planned", "fetched", "reused", "missing"}
    assert "total" in d["phases"]


def test_failure_is_redacted_everywhere() -> None:
    env = {"CACHEBUILD_API_KEY": "hunter2-secret"}
    import os

    old = os.environ.get("CACHEBUILD_API_KEY")
    os.environ["CACHEBUILD_API_KEY"] = env["CACHEBUILD_API_KEY"]
    try:
        r = Report("build-cache")
        r.fail(DownloadError("GET https://t.example/1/2/3?key=hunter2-secret refused"))
        r.warnings.append("retrying ?key=hunter2-secret")
        out, err = io.StringIO(), io.StringIO()
        r.emit("json", out, err)
    finally:
        if old is None:
            del os.environ["CACHEBUILD_API_KEY"]
        else:
            os.environ["CACHEBUILD_API_KEY"] = old
    assert "hunter2" not in out.getvalue() + err.getvalue()
    d = json.loads(out.getvalue())
    assert d["exit_code"] == 20 and d["failure_phase"] == "tiles"
    assert "ERROR [tiles, exit 20]" in err.getvalue()


def test_redact_ignores_short_values() -> None:
    assert redact("a b c", {"CACHEBUILD_API_KEY": "b"}) == "a b c"
