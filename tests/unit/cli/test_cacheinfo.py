"""cache-info's companion comparison, as a pure function (the real-sshd test is in test_companion)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cachebuild.cli.info import compare, format_companion


def _remote(build_id: str | None, ok: bool = True) -> dict[str, Any]:
    cache = {
        "build_id": build_id,
        "manifest_version": 3,
        "built_at": "2026-11-30T15:02:11Z",
        "verify": {"ok": ok, "reason": None if ok else "index.faiss: SHA-256 mismatch"},
    }
    return {"host": "jet@10.0.0.7:22", "dir": "/home/jet/.cache/cachebuild", "cache": cache}


def test_the_reference_is_the_last_build_for_that_companion_and_dir_never_the_local_cache() -> None:
    last = {"host": "jet@10.0.0.7:22", "dir": "/home/jet/.cache/cachebuild", "build_id": "a" * 64}
    last["at"] = "2026-11-30T15:00:00Z"
    c = compare(_remote("a" * 64), last, Path("/s/companion-build.json"))
    assert c["reference"] == {
        "source": "last companion build",
        **{k: last[k] for k in ("host", "dir", "build_id", "at")},
        "record": "/s/companion-build.json",
    }
    assert c["status"] == "matches" and c["matches"] is True
    assert "matches the last build this workstation made for jet@10.0.0.7:22" in format_companion(c)
    c = compare(_remote("b" * 64), last)
    assert c["status"] == "stale" and c["matches"] is False and c["build_id"] == "b" * 64
    assert "STALE" in format_companion(c) and "aaaaaaaaaaaaaaaa" in format_companion(c)
    # a build recorded for another companion, or another COMPANION_DIR, says nothing about this one
    for other in ({**last, "host": "jet@10.0.0.8:22"}, {**last, "dir": "/srv/cb"}):
        c = compare(_remote("a" * 64), other)
        assert c["reference"] is None and c["status"] == "unknown" and c["matches"] is None
        assert "nothing to compare it with" in format_companion(c)


def test_no_cache_on_the_companion_and_a_failing_verify() -> None:
    c = compare({**_remote(None), "cache": None, "error": "no published cache at /c"}, None)
    assert c["status"] == "no cache" and c["matches"] is False and c["build_id"] is None
    assert "no published cache" in format_companion(c)
    last = {"host": "jet@10.0.0.7:22", "dir": "/home/jet/.cache/cachebuild", "build_id": "a" * 64}
    c = compare(_remote("a" * 64, ok=False), last)
    assert c["status"] == "matches"  # the same build, damaged there: verify says so
    assert "FAILS: index.faiss" in format_companion(c)
