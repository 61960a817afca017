from __future__ import annotations

import io
import json

from cachebuild._util.report import Report, redact
from cachebuild.errors import DownloadError


def test_json_report_is_the_last_stdout_line() -> None:
    r = Report("build-cache")
    r.outcome, r.exit_code = "success", 0
    out, err = io.StringIO(), io.StringIO()
    r.emit("json", out, err)
    d = json.loads(out.getvalue().splitlines()[-1])
    for key in (
        "outcome",
        "exit_code",
        "failure_phase",
        "build_id",
        "manifest_path",
        "tiles",
        "phases",
    ):
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


def test_redact_header_values_and_passphrases() -> None:
    env = {
        "CACHEBUILD_HTTP_HEADERS": "Authorization: Bearer tok-abc-123\nX-Other: plain-value-9",
        "CACHEBUILD_SSH_KEY_PASSPHRASE": "pass-phrase-1",
    }
    text = "sent Authorization: Bearer tok-abc-123 and plain-value-9; passphrase pass-phrase-1"
    out = redact(text, env)
    assert "tok-abc-123" not in out and "plain-value-9" not in out and "pass-phrase-1" not in out
    assert (
        redact("x json-secret-1", {"CACHEBUILD_HTTP_HEADERS": '{"X-Api-Key": "json-secret-1"}'})
        == "x ***"
    )


def test_text_summary_gives_phase_times_in_order_and_recall() -> None:
    r = Report("build-cache", outcome="success", exit_code=0)
    for name, secs in (
        ("flight", 0.01),
        ("lock", 0.0),
        ("coverage", 0.0),
        ("publish", 0.1),
        ("tiles", 1.5),
    ):
        r.timed(name, secs)
    r.extra["selftest"] = {"recall_at_1": 0.98, "recall_at_5": 1.0, "queries": 200}
    out = io.StringIO()
    r.emit("text", out, io.StringIO())
    text = out.getvalue()
    assert (
        "  phases   flight 0.01 s, lock 0.00 s, tiles 1.50 s, coverage 0.00 s, publish 0.10 s"
        in text
    )
    assert "  self-test recall@1 0.980, recall@5 1.000 (200 frames)" in text


def test_human_size() -> None:
    from cachebuild._util.sizes import human_bytes

    assert [human_bytes(n) for n in (0, 1023, 1024, 20 * 2**30, 3 * 2**40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "20.0 GiB",
        "3.0 TiB",
    ]
