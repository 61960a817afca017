"""cache-info's companion comparison, as a pure function (the real-sshd test is in test_companion)."""

from __future__ import annotations

from typing import Any

from cachebuild.cacheinfo import compare, format_companion


def _remote(build_id: str | None, ok: bool = True) -> dict[str, Any]:
    cache = {
        "build_id": build_id,
        "manifest_version": 3,
        "built_at": "2026-11-30T15:02:11Z",
        "verify": {"ok": ok, "reason": None if ok else "index.faiss: SHA-256 mismatch"},
    }
    return {"host": "jet@10.0.0.7:22", "dir": "/home/jet/.cache/cachebuild", "cache": cache}


def test_the_local_cache_is_the_reference_when_there_is_one() -> None:
    last = {"host": "jet@10.0.0.7:22", "build_id": "a" * 64}
    c = compare(_remote("a" * 64), {"build_id": "b" * 64, "path": "/x"}, last)
    assert c["reference"]["source"] == "local cache" and c["status"] == "stale" and c["matches"] is False
    assert "STALE" in format_companion(c) and "bbbbbbbbbbbbbbbb" in format_companion(c)
    c = compare(_remote("b" * 64), {"build_id": "b" * 64, "path": "/x"}, last)
    assert c["status"] == "matches" and c["matches"] is True and c["build_id"] == "b" * 64


def test_else_the_last_build_on_that_companion() -> None:
    last = {"host": "jet@10.0.0.7:22", "build_id": "a" * 64, "at": "2026-11-30T15:00:00Z"}
    c = compare(_remote("a" * 64), None, last)
    assert c["reference"] == {"source": "last companion build", "build_id": "a" * 64, "at": last["at"]}
    assert c["status"] == "matches" and "matches the last companion build" in format_companion(c)
    # a build recorded for another companion says nothing about this one
    c = compare(_remote("a" * 64), None, {**last, "host": "jet@10.0.0.8:22"})
    assert c["reference"] is None and c["status"] == "unknown" and c["matches"] is None
    assert "nothing here to compare" in format_companion(c)


def test_no_cache_on_the_companion_and_a_failing_verify() -> None:
    c = compare({**_remote(None), "cache": None, "error": "no published cache at /c"}, None, None)
    assert c["status"] == "no cache" and c["matches"] is False and c["build_id"] is None
    assert "no published cache" in format_companion(c)
    c = compare(_remote("a" * 64, ok=False), {"build_id": "a" * 64, "path": "/x"}, None)
    assert c["status"] == "matches"  # the same build, damaged there: verify says so
    assert "FAILS: index.faiss" in format_companion(c)
