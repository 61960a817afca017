"""The run report: outcome, exit code, phase timings and counts.

With ``REPORT=json`` the last line of stdout is one JSON object (the
contract in docs/exit-codes.md); otherwise a short human summary.  Every
message passes through :func:`redact` first, so a secret that slipped into
an exception from a third-party library is still never printed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["Report", "redact", "SECRET_ENV_VARS"]

#: Environment variables whose values are secrets.
SECRET_ENV_VARS = (
    "CACHEBUILD_API_KEY",
    "CACHEBUILD_HTTP_HEADERS",
    "FLIGHTS_API_TOKEN",
    "KEY_PASSPHRASE",
    "CACHEBUILD_COMPANION_KEY_PASSPHRASE",  # COMPANION_KEY's, sent to the companion over SSH
    "CACHEBUILD_KEY_PASSPHRASE",
    "CACHEBUILD_SSH_KEY_PASSPHRASE",
    # STORE=s3://...: the standard AWS credentials
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def _header_values(raw: str) -> list[str]:
    """The values of CACHEBUILD_HTTP_HEADERS (``Name: value`` lines or a JSON object)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        return [str(v) for v in obj.values()]
    return [line.split(":", 1)[1].strip() for line in raw.splitlines() if ":" in line]


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """Replace the value of every secret variable in ``text`` with ``***``.

    Each header value of ``CACHEBUILD_HTTP_HEADERS`` counts as a secret too
    (a log line shows one header, not the variable).

    >>> redact("GET /t?key=s3cr3t", {"CACHEBUILD_API_KEY": "s3cr3t"})
    'GET /t?key=***'
    """
    env = os.environ if env is None else env
    values = [env.get(name) or "" for name in SECRET_ENV_VARS]
    values += _header_values(env.get("CACHEBUILD_HTTP_HEADERS") or "")
    for value in sorted(values, key=len, reverse=True):
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


@dataclass
class Report:
    """What one command did; filled in as the run goes."""

    command: str
    outcome: str = "failure"
    exit_code: int = 1
    failure_phase: str | None = None
    error: str | None = None
    remedy: str | None = None
    build_id: str | None = None
    manifest_path: str | None = None
    manifest_version: int | None = None
    flight_id: str | None = None
    tiles: dict[str, int] = field(
        default_factory=lambda: {"planned": 0, "fetched": 0, "reused": 0, "missing": 0}
    )
    tasks: dict[str, list[str]] = field(default_factory=lambda: {"run": [], "up_to_date": []})
    phases: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    _t0: float = field(default_factory=time.monotonic, repr=False)

    def timed(self, phase: str, seconds: float) -> None:
        self.phases[phase] = round(self.phases.get(phase, 0.0) + seconds, 4)

    def fail(self, exc: Any) -> None:
        """Record a :class:`~cachebuild.errors.CacheBuildError` as the outcome."""
        self.outcome = "failure"
        self.exit_code = exc.exit_code
        self.failure_phase = exc.phase
        self.error = redact(exc.message)
        self.remedy = exc.remedy or None

    def to_dict(self) -> dict[str, Any]:
        self.phases["total"] = round(time.monotonic() - self._t0, 4)
        d = {
            "command": self.command,
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "failure_phase": self.failure_phase,
            "error": self.error,
            "remedy": self.remedy,
            "build_id": self.build_id,
            "manifest_path": self.manifest_path,
            "manifest_version": self.manifest_version,
            "flight_id": self.flight_id,
            "tiles": self.tiles,
            "tasks": self.tasks,
            "phases": self.phases,
            "warnings": [redact(w) for w in self.warnings],
        }
        d.update(self.extra)
        return d

    def emit(self, fmt: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        """Print the report: JSON as the last stdout line, or a human summary."""
        d = self.to_dict()
        if self.error:
            err.write(f"ERROR [{self.failure_phase}, exit {self.exit_code}]: {self.error}\n")
            if self.remedy:
                err.write(f"  remedy: {self.remedy}\n")
        if fmt == "json":
            out.write(json.dumps(d, sort_keys=True) + "\n")
            out.flush()
            return
        if self.outcome == "failure":
            return
        t = self.tiles
        lines = [
            f"{self.command}: {self.outcome.replace('_', ' ')} in {d['phases']['total']:.2f} s",
        ]
        if self.build_id:
            lines.append(f"  build    {self.build_id[:16]}  (manifest v{self.manifest_version})")
        if self.manifest_path:
            lines.append(f"  manifest {self.manifest_path}")
        if self.command == "build-cache":
            lines.append(
                f"  tiles    {t['planned']} planned, {t['fetched']} fetched, "
                f"{t['reused']} reused, {t['missing']} missing"
            )
            ran = ", ".join(self.tasks["run"]) or "nothing (all up to date)"
            lines.append(f"  ran      {ran}")
            order = {
                "flight": 0,
                "lock": 1,
                "coverage": 3,
                "publish": 4,
            }  # doit's tasks (2) between
            phases = sorted((k for k in d["phases"] if k != "total"), key=lambda k: order.get(k, 2))
            times = ", ".join(f"{k} {d['phases'][k]:.2f} s" for k in phases)
            lines.append(f"  phases   {times}")
            selftest = self.extra.get("selftest")
            if selftest and selftest.get("text"):  # cachebuild.localize.selftest.summary's line
                lines.append(f"  self-test {selftest['text']}")
            elif selftest and selftest.get("recall_at_1") is not None:
                lines.append(
                    f"  self-test recall@1 {selftest['recall_at_1']:.3f}, recall@5 "
                    f"{selftest['recall_at_5']:.3f} ({selftest['queries']} frames)"
                )
            elif selftest is not None:
                lines.append("  self-test not run (no frame could be made, or SELFTEST_QUERIES=0)")
            companion = self.extra.get("companion")
            if companion:  # COMPANION=...: what was pushed and built there
                pushed = self.extra.get("push") or {}
                there = (
                    ", ".join((companion.get("tasks") or {}).get("run") or [])
                    or "nothing (all up to date)"
                )
                lines.append(
                    f"  companion {companion['host']}: pushed {pushed.get('objects', 0)} objects "
                    f"({pushed.get('bytes', 0) / 1e6:.1f} MB), built {there}"
                )
        out.write("\n".join(lines) + "\n")
        out.flush()
